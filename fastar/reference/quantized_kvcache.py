"""The quantized KV cache formats (docs/quantized_kvcache.md), written plainly: the tests' oracle for the
quantize-on-append and dequantize-in-attention kernels.

Quantizers work in float32 with IEEE operations (a division, a round half to even), exactly as the kernels do,
so codes can be compared bit for bit; dequantization returns float64.
"""
from __future__ import annotations

from typing import Tuple

import torch

__all__ = [
    "KV_FORMATS",
    "quantize_int8_reference",
    "quantize_fp8_reference",
    "quantize_kivi_keys_reference",
    "quantize_kivi_values_reference",
    "dequantize_reference",
    "pack_codes",
    "unpack_codes",
    "kivi_split",
]

# Storage formats and the torch dtype of their codes (int4 / int2 codes are packed into uint8 bytes).
KV_FORMATS = {
    "int8": torch.int8,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "int4": torch.uint8,
    "int2": torch.uint8,
}
_KIVI_BITS = {"int4": 4, "int2": 2}


def quantize_int8_reference(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last dim: ``(codes int8 [..., D], scale float32 [...])``.

    ``scale = max|x| / 127`` and ``code = round_half_even(x / scale)`` in float32, so ``|x - code * scale| <=
    scale / 2``; an all-zero row has scale 0 and codes 0.
    """
    xf = x.float()
    scale = xf.abs().amax(-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(xf / safe.unsqueeze(-1)).clamp(-127, 127)
    return codes.to(torch.int8), scale


def quantize_fp8_reference(x: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """``fp8(x / scale)``: ``scale`` float32, broadcastable to ``x`` (per tensor, per kv head or per token and
    head). Values past the format's largest finite magnitude (448 for e4m3, 57344 for e5m2) saturate to it; the
    others convert exactly as ``Tensor.to(torch.float8_e4m3fn / torch.float8_e5m2)``."""
    dtype = KV_FORMATS[fmt]
    if fmt not in ("fp8_e4m3", "fp8_e5m2"):
        raise ValueError(f"not an fp8 format: {fmt!r}")
    limit = torch.finfo(dtype).max
    return (x.float() / scale.float()).clamp(-limit, limit).to(dtype)


def _asymmetric(x: torch.Tensor, dim: int, bits: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KIVI's asymmetric quantizer over ``dim``: ``(codes uint8, scale float16, zero float16)``. The zero is the
    minimum and the scale ``(max - zero) / (2**bits - 1)``, each rounded to float16 (what the cache stores)
    before the codes are computed from them in float32."""
    xf = x.float()
    zero = xf.amin(dim, keepdim=True).half().float()
    scale = ((xf.amax(dim, keepdim=True) - zero) / float(2**bits - 1)).half().float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((xf - zero) / safe).clamp(0, 2**bits - 1)
    return codes.to(torch.uint8), scale.squeeze(dim).half(), zero.squeeze(dim).half()


def quantize_kivi_keys_reference(k: torch.Tensor, fmt: str, group_size: int):
    """KIVI keys, per channel over groups of ``group_size`` tokens: ``k`` ``[..., T, D]`` with ``T`` a multiple
    of the group. Returns ``(codes uint8 [..., T, D] unpacked, scale [..., T / G, D], zero [..., T / G, D])``
    (float16): ``zero = min`` and ``scale = (max - zero) / (2**bits - 1)`` over each group's tokens, rounded to
    float16, and ``code = round_half_even((x - zero) / scale)`` in float32; the dequantized value is ``code *
    scale + zero``."""
    bits = _KIVI_BITS[fmt]
    *lead, T, D = k.shape
    if T % group_size:
        raise ValueError(f"{T} tokens are not a whole number of groups of {group_size}")
    grouped = k.reshape(*lead, T // group_size, group_size, D)
    codes, scale, zero = _asymmetric(grouped, -2, bits)
    return codes.reshape(*lead, T, D), scale, zero


def quantize_kivi_values_reference(v: torch.Tensor, fmt: str, group_size: int):
    """KIVI values, per token over groups of ``group_size`` channels: ``v`` ``[..., D]`` with ``D`` a multiple of
    the group. Returns ``(codes uint8 [..., D] unpacked, scale [..., D / G], zero [..., D / G])`` (float16),
    the same quantizer as the keys' along the other axis."""
    bits = _KIVI_BITS[fmt]
    *lead, D = v.shape
    if D % group_size:
        raise ValueError(f"head dim {D} is not a whole number of groups of {group_size}")
    grouped = v.reshape(*lead, D // group_size, group_size)
    codes, scale, zero = _asymmetric(grouped, -1, bits)
    return codes.reshape(*lead, D), scale, zero


def dequantize_reference(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor = None) -> torch.Tensor:
    """``codes * scale (+ zero)`` in float64, with ``scale`` / ``zero`` already broadcast to ``codes``' shape."""
    out = codes.double() * scale.double()
    return out if zero is None else out + zero.double()


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs ``bits``-bit codes (uint8 ``[..., n]``, values below ``2**bits``) little-endian into bytes
    ``[..., n * bits / 8]``: code ``j`` sits at bits ``(j * bits) % 8`` up of byte ``(j * bits) // 8``."""
    per_byte = 8 // bits
    *lead, n = codes.shape
    if bits not in (2, 4) or n % per_byte:
        raise ValueError(f"cannot pack {n} codes of {bits} bits into whole bytes")
    c = codes.to(torch.int64).reshape(*lead, n // per_byte, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int64) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of :func:`pack_codes`: uint8 ``[..., m]`` to codes uint8 ``[..., m * 8 / bits]``."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int64) * bits
    codes = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte).to(torch.uint8)


def kivi_split(length: int, residual: int, group_size: int) -> Tuple[int, int]:
    """How many of a sequence's ``length`` tokens are quantized: ``(keys, values)``.

    Values leave the full-precision window a token at a time, keeping the newest ``residual``; keys a group at a
    time, so the window holds between ``residual`` and ``residual + group_size - 1`` keys once it is full.
    """
    if group_size < 1 or residual < 0 or residual % group_size:
        raise ValueError(f"residual ({residual}) must be a non-negative multiple of group_size ({group_size})")
    values = max(length - residual, 0)
    return values // group_size * group_size, values
