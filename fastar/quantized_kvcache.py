"""Quantized KV caches (docs/quantized_kvcache.md): the append that quantizes K and V into int8 or fp8 slots.

:func:`quantize_kv_append` is vLLM's ``reshape_and_cache`` for quantized caches: each new token's K and V rows
are quantized in one pass and written to the cache slot its ``slot_mapping`` entry names (``-1`` skips a
token, as in padded batches). Contiguous caches use slots ``b * capacity + t``; paged caches ``page *
page_size + offset``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from . import _common
from ._common import FLOAT_DTYPES, as_int, fake, no_grad, one_device
from .acceptance import check_rows, compact_kv
from .masked_attention import _attend_cache, _scale_rows
from .masks import Mask
from .reference.quantized_kvcache import KV_FORMATS, unpack_codes

__all__ = ["QuantizedKVCache", "quantize_kivi_append", "quantize_kv_append"]


def quantize_kv_append(
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
) -> None:
    """Quantizes K and V rows into a cache's slots, in place.

    Args:
        key, value: ``[num_tokens, kv_heads, head_dim]`` float32, float16 or bfloat16, the new tokens.
        slot_mapping: int64 ``[num_tokens]``: the cache slot of each token, ``-1`` to skip it.
        k_cache, v_cache: the codes, ``[num_slots, kv_heads, head_dim]`` or ``[num_pages, page_size, kv_heads,
            head_dim]``, contiguous: ``torch.int8`` for the int8 format, ``torch.float8_e4m3fn`` or
            ``torch.float8_e5m2`` for fp8.
        k_scale, v_scale: float32. int8: ``[num_slots, kv_heads]`` (or ``[num_pages, page_size, kv_heads]``),
            written with each row's scale ``max|x| / 127``. fp8: the same shape to compute and write scales per
            token the same way (``max|x| / 448`` for e4m3, ``/ 57344`` for e5m2), or one scale (``[]`` or
            ``[1]``) or one per kv head (``[kv_heads]``), read.

    Codes follow docs/quantized_kvcache.md exactly (the same bits on every backend). On the CPU a slot id
    outside ``[-1, num_slots)`` raises ``IndexError``, and a NaN or Inf in ``key`` or ``value``, or a fixed fp8
    scale that is not positive and finite, raises ``ValueError``, before anything is written. CUDA checks
    nothing that would need a host synchronisation: it skips an out-of-range slot, stores a non-finite row as
    NaN (its scale, or its codes at a fixed fp8 scale) so that only attention to that key sees NaN, and uses a
    fixed scale that is not positive as 1. Each slot should appear at most once.
    """
    _common.ops().quantize_kv_append(key, value, slot_mapping, k_cache, v_cache, k_scale, v_scale)


@fake("quantize_kv_append")
def _quantize_kv_append_fake(key, value, slot_mapping, k_cache, v_cache, k_scale, v_scale):
    one_device("quantize_kv_append", key, value, slot_mapping, k_cache, v_cache, k_scale, v_scale)


def quantize_kivi_append(
    key: torch.Tensor,
    value: torch.Tensor,
    key_groups: torch.Tensor,
    value_slots: torch.Tensor,
    k_codes: torch.Tensor,
    v_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    group_size: int = 32,
) -> None:
    """Quantizes K and V rows into a KIVI int4 / int2 cache, in place (docs/quantized_kvcache.md).

    Args:
        key: ``[num_key_tokens, kv_heads, head_dim]`` float32, float16 or bfloat16, a whole number of groups of
            ``group_size`` consecutive tokens, each quantized per channel over its tokens.
        value: ``[num_value_tokens, kv_heads, head_dim]``, each token quantized over groups of ``group_size``
            channels.
        key_groups: int64 ``[num_key_tokens / group_size]``: the cache group of each group of keys (it fills slots
            ``[key_groups[g] * group_size, + group_size)``), ``-1`` to skip it.
        value_slots: int64 ``[num_value_tokens]``: the slot of each value row, ``-1`` to skip it.
        k_codes, v_codes: uint8 ``[num_slots, kv_heads, head_dim * bits / 8]``, contiguous: ``head_dim / 2``
            bytes per row for int4, ``head_dim / 4`` for int2 (codes packed little-endian).
        k_scale, k_zero: float16 ``[num_slots / group_size, kv_heads, head_dim]``, written.
        v_scale, v_zero: float16 ``[num_slots, kv_heads, head_dim / group_size]``, written.
        group_size: G; it must divide ``head_dim`` and the number of slots, and fill whole bytes of codes (a
            multiple of 2 for int4, of 4 for int2).

    On the CPU an id out of range raises ``IndexError``, and a NaN, an infinity or a value past float16's range
    (+-65504) in a row to be written raises ``ValueError``, before anything is written. CUDA checks nothing that
    would need a host synchronisation: it skips an id out of range and writes a NaN scale where such a value
    falls (keys: its channel of the group, so the group's keys of that head read NaN; values: its token's channel
    group), so only attention to those keys sees it.
    """
    _common.ops().quantize_kivi_append(key, value, key_groups, value_slots, k_codes, v_codes, k_scale, k_zero,
                                       v_scale, v_zero, as_int(group_size, "fastar.quantize_kivi_append: group_size"))


@fake("quantize_kivi_append")
def _quantize_kivi_append_fake(key, value, key_groups, value_slots, k_codes, v_codes, k_scale, k_zero, v_scale,
                               v_zero, group_size):
    one_device("quantize_kivi_append", key, value, key_groups, value_slots, k_codes, v_codes, k_scale, k_zero,
               v_scale, v_zero)


_BYTE_FORMATS = ("int8", "fp8_e4m3", "fp8_e5m2")
_KIVI_BITS = {"int4": 4, "int2": 2}
_CLS = "fastar.QuantizedKVCache"
_HALF_MAX = 65504.0


def _host_lengths(value, batch: int, what: str, high: int) -> List[int]:
    """``value`` (an int, or integers ``[batch]`` as a sequence or tensor; a device tensor is read with a host
    sync) as a list of ``batch`` ints in ``[0, high]``."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.dtype.is_floating_point or value.dtype.is_complex:
            raise TypeError(f"{what} must hold integers, got {value.dtype}")
        if value.dim() == 0:
            value = int(value)
        else:
            value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != batch:
            raise ValueError(f"{what} must give one length per sequence ({batch}), got {len(value)}")
        return [as_int(n, what, 0, high) for n in value]
    return [as_int(value, what, 0, high)] * batch


class _ByteStore:
    """int8 / fp8 storage: one-byte codes ``[*rows, Hkv, D]`` and float32 scales, per token and head
    ``[*rows, Hkv]`` (written by the append) or an fp8 cache's fixed ``[Hkv]``."""

    def __init__(self, cache: "QuantizedKVCache", rows, k_scale, v_scale):
        shape = (*rows, cache.kv_heads, cache.head_dim)
        self.cache = cache
        self.k = torch.zeros(shape, dtype=torch.uint8, device=cache.device).view(KV_FORMATS[cache.format])
        self.v = torch.zeros(shape, dtype=torch.uint8, device=cache.device).view(KV_FORMATS[cache.format])
        self.k_scale = self._scales("k_scale", k_scale, rows)
        self.v_scale = self._scales("v_scale", v_scale, rows)

    def _scales(self, name: str, fixed, rows) -> torch.Tensor:
        c = self.cache
        if fixed is None:
            return torch.zeros(*rows, c.kv_heads, dtype=torch.float32, device=c.device)
        if c.format == "int8":
            raise ValueError(f"{_CLS}: {name} fixes an fp8 cache's scales; int8 scales are computed per token")
        scale = torch.as_tensor(fixed, dtype=torch.float32).to(c.device)
        if scale.numel() not in (1, c.kv_heads) or scale.dim() > 1:
            raise ValueError(f"{_CLS}: {name} must be a number or [kv_heads={c.kv_heads}], got {tuple(scale.shape)}")
        if not bool(torch.isfinite(scale).all() & (scale > 0).all()):
            raise ValueError(f"{_CLS}: {name} must be positive and finite")
        return scale.expand(c.kv_heads).contiguous()

    def tensors(self) -> List[torch.Tensor]:
        return [self.k, self.v, self.k_scale, self.v_scale]

    def append(self, k, v, old: List[int], new: List[int]) -> None:
        """Quantizes the first ``new[b]`` of the rows ``k[b]``, ``v[b]`` ``[Hkv, L, D]`` into positions from
        ``old[b]``."""
        c, L = self.cache, k.shape[2]
        slots = torch.full((c.batch, L), -1, dtype=torch.int64)
        for b, n in enumerate(new):
            slots[b, :n] = c._slots_of(b, torch.arange(old[b], old[b] + n))
        views = self.tensors()
        if c.block_table is None:  # [batch, capacity] rows as batch * capacity slots
            views = [t.flatten(0, 1) if t.dim() >= 3 else t for t in views]
        rows = (c.batch * L, c.kv_heads, c.head_dim)
        quantize_kv_append(k.transpose(1, 2).reshape(rows), v.transpose(1, 2).reshape(rows),
                           slots.reshape(-1).to(c.device), *views)

    def truncate(self, old: List[int], new: List[int]) -> None:
        """Nothing to move: positions past a sequence's length are not read."""

    def compact(self, path, num_accepted, start: torch.Tensor, num_nodes: int, root_in_path: bool) -> torch.Tensor:
        """fastar.compact_kv over the codes and the per-token scales (fixed fp8 scales do not move)."""
        args = (path, num_accepted, start)
        kwargs = dict(num_nodes=num_nodes, root_in_path=root_in_path, block_table=self.cache.block_table)
        new = compact_kv(self.k, self.v, *args, **kwargs)
        if self.k_scale.dim() > 1:
            compact_kv(self.k_scale, self.v_scale, *args, **kwargs)
        return new

    def attention_args(self) -> dict:
        H = self.cache.kv_heads
        return {"k_scale": _scale_rows(self.k_scale, H), "v_scale": _scale_rows(self.v_scale, H)}

    def rows(self, b: int, length: int, work: torch.dtype):
        """Sequence ``b``'s first ``length`` K and V rows ``[length, Hkv, D]``, dequantized in ``work``."""
        slots = self.cache._slots_of(b, torch.arange(length)).to(self.cache.device)
        out = []
        for codes, scale in ((self.k, self.k_scale), (self.v, self.v_scale)):
            codes = codes.reshape(-1, *codes.shape[-2:])[slots]
            scale = scale.reshape(-1, scale.shape[-1])[slots] if scale.dim() > 1 else scale
            out.append(codes.to(work) * scale.to(work).unsqueeze(-1))
        return out


class _KiviStore:
    """KIVI int4 / int2 storage (docs/quantized_kvcache.md): packed codes ``[*rows, Hkv, D * bits / 8]``, float16
    scales and zeros per key group and channel ``[num_slots / G, Hkv, D]`` and per slot and value channel group
    ``[num_slots, Hkv, D / G]``, and the full-precision window: a ring ``[batch, R + G, Hkv, D]`` in the cache's
    dtype where position ``p`` sits at ``p % (R + G)``.

    Sequence ``b`` has its first ``split[b][0]`` keys (a multiple of G) and ``split[b][1]`` values quantized; the
    later ones are in the ring. An append quantizes the values beyond the newest R, and the key groups wholly
    beyond the newest R values, so the ring always holds every position it must."""

    def __init__(self, cache: "QuantizedKVCache", rows, group_size: int, residual: int):
        c = self.cache = cache
        self.bits, self.G, self.R, self.W = _KIVI_BITS[c.format], group_size, residual, residual + group_size
        num_slots = rows[0] * rows[1]
        byte = dict(dtype=torch.uint8, device=c.device)
        half = dict(dtype=torch.float16, device=c.device)
        self.k = torch.zeros(*rows, c.kv_heads, c.head_dim * self.bits // 8, **byte)
        self.v = torch.zeros(*rows, c.kv_heads, c.head_dim * self.bits // 8, **byte)
        self.k_scale = torch.zeros(num_slots // self.G, c.kv_heads, c.head_dim, **half)
        self.k_zero = torch.zeros_like(self.k_scale)
        self.v_scale = torch.zeros(num_slots, c.kv_heads, c.head_dim // self.G, **half)
        self.v_zero = torch.zeros_like(self.v_scale)
        self.k_window = torch.zeros(c.batch, self.W, c.kv_heads, c.head_dim, dtype=c.dtype, device=c.device)
        self.v_window = torch.zeros_like(self.k_window)
        self.split = [[0, 0] for _ in range(c.batch)]
        self.split_device = torch.zeros(c.batch, 2, dtype=torch.int32, device=c.device)

    def tensors(self) -> List[torch.Tensor]:
        return [self.k, self.v, self.k_scale, self.k_zero, self.v_scale, self.v_zero, self.k_window, self.v_window]

    def append(self, k, v, old: List[int], new: List[int]) -> None:
        c, G = self.cache, self.G
        if c.device.type == "cpu":  # CUDA tokens are not read on the host (no sync): see quantize_kivi_append
            for name, t in (("k", k), ("v", v)):
                rows = t if all(n == t.shape[2] for n in new) else torch.cat(
                    [t[b, :, :n] for b, n in enumerate(new)], dim=1)
                if rows.numel() and not bool(rows.abs().amax() <= _HALF_MAX):  # NaN fails the comparison too
                    raise ValueError(f"{_CLS}.append: {name} holds NaN, Inf or a value past +-{_HALF_MAX:g}; a KIVI "
                                     "cache stores float16 scales and zeros")
        keys, key_groups, values, value_slots, split = [], [], [], [], []
        for b, n in enumerate(new):
            kq, vq = self.split[b]
            vq_new = max(old[b] + n - self.R, vq)
            kq_new = max(kq, vq_new // G * G)
            keys.append(self._rows(self.k_window, k[b], b, kq, kq_new, old[b]))
            values.append(self._rows(self.v_window, v[b], b, vq, vq_new, old[b]))
            key_groups.append(c._slots_of(b, torch.arange(kq, kq_new, G)) // G)
            value_slots.append(c._slots_of(b, torch.arange(vq, vq_new)))
            split.append([kq_new, vq_new])
        if any(len(rows) for rows in keys + values):
            quantize_kivi_append(torch.cat(keys), torch.cat(values), torch.cat(key_groups).to(c.device),
                                 torch.cat(value_slots).to(c.device), *self._flat(), group_size=G)
        for b, n in enumerate(new):  # the new tokens' rows into the ring (the newest W of them), by slices
            first = max(old[b], old[b] + n - self.W)
            while first < old[b] + n:
                at = first % self.W
                count = min(old[b] + n - first, self.W - at)
                for window, t in ((self.k_window, k), (self.v_window, v)):
                    window[b, at:at + count] = t[b, :, first - old[b]:first - old[b] + count].transpose(0, 1)
                first += count
        self.split = split
        self.split_device.copy_(torch.tensor(split, dtype=torch.int32))

    def _rows(self, window, t, b: int, start: int, stop: int, old: int) -> torch.Tensor:
        """Sequence b's rows ``[start, stop)`` ``[*, Hkv, D]``: those before ``old`` from the ring, the later ones
        from ``t`` ``[Hkv, L, D]``, whose rows are the positions from ``old``."""
        parts = []
        if start < min(stop, old):
            parts.append(window[b, (torch.arange(start, min(stop, old)) % self.W).to(self.cache.device)])
        if max(start, old) < stop:
            parts.append(t[:, max(start, old) - old:stop - old].transpose(0, 1))
        if not parts:
            return window.new_empty((0, *window.shape[2:]))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _flat(self):
        """Codes as ``[num_slots, Hkv, bytes]``, scales and zeros as they are (the op's layout)."""
        return [self.k.flatten(0, 1), self.v.flatten(0, 1), self.k_scale, self.k_zero, self.v_scale, self.v_zero]

    def truncate(self, old: List[int], new: List[int]) -> None:
        """Keys of a quantized group that the new length cuts go back to the ring as their dequantized values
        (requantized with their group when it fills again); values and later keys are where they were."""
        c = self.cache
        for b, n in enumerate(new):
            kq, vq = self.split[b]
            if n < kq:
                kq = n // self.G * self.G
                k_rows, _ = self.rows(b, n, torch.float32)
                ring = (torch.arange(kq, n) % self.W).to(c.device)
                self.k_window[b, ring] = k_rows[kq:n].to(c.dtype)
            self.split[b] = [kq, min(vq, n)]
        self.split_device.copy_(torch.tensor(self.split, dtype=torch.int32))

    def compact(self, path, num_accepted, start: torch.Tensor, num_nodes: int, root_in_path: bool) -> torch.Tensor:
        """The tree's rows must all be in the full-precision ring (none quantized yet): the kept ones move there, by
        ring index. fastar.compact_kv over rows of no bytes checks the path and gives the new lengths."""
        c = self.cache
        starts = start.tolist()
        for b, (kq, vq) in enumerate(self.split):
            if max(kq, vq) > starts[b]:
                raise ValueError(
                    f"{_CLS}.compact: sequence {b} has quantized positions up to {max(kq, vq)}, but its tree starts at "
                    f"{starts[b]}: a KIVI cache compacts only trees inside its full-precision window (residual "
                    f"{self.R} >= the tree's {num_nodes} nodes)")
        rows = [torch.empty(c.batch, c.capacity, 0, dtype=torch.uint8, device=c.device) for _ in range(2)]
        new = compact_kv(*rows, path, num_accepted, start, num_nodes=num_nodes, root_in_path=root_in_path)
        check_rows(new, f"{_CLS}.compact")
        paths = torch.as_tensor(path).tolist()
        for b, n in enumerate(new.tolist()):
            kept = paths[b][: n - starts[b]]
            src = torch.tensor([(starts[b] + t) % self.W for t in kept], dtype=torch.int64, device=c.device)
            dst = torch.tensor([(starts[b] + j) % self.W for j in range(len(kept))], dtype=torch.int64,
                               device=c.device)
            for window in (self.k_window, self.v_window):
                window[b, dst] = window[b, src]
        return new

    def attention_args(self) -> dict:
        return {"k_scale": self.k_scale, "v_scale": self.v_scale, "k_zero": self.k_zero, "v_zero": self.v_zero,
                "k_window": self.k_window, "v_window": self.v_window, "kivi_split": self.split_device,
                "kivi_group": self.G}

    def rows(self, b: int, length: int, work: torch.dtype):
        c, G = self.cache, self.G
        kq, vq = (min(x, length) for x in self.split[b])
        slots = c._slots_of(b, torch.arange(length)).to(c.device)
        ring = (torch.arange(length) % self.W).to(c.device)
        k = self.k_window[b, ring].to(work)
        v = self.v_window[b, ring].to(work)
        k_codes = unpack_codes(self.k.reshape(-1, *self.k.shape[-2:])[slots[:kq]], self.bits).to(work)
        k[:kq] = k_codes * self.k_scale[slots[:kq] // G].to(work) + self.k_zero[slots[:kq] // G].to(work)
        v_codes = unpack_codes(self.v.reshape(-1, *self.v.shape[-2:])[slots[:vq]], self.bits).to(work)
        groups = (vq, c.kv_heads, c.head_dim // G, G)
        v_scale = self.v_scale[slots[:vq]].to(work).unsqueeze(-1)
        v_zero = self.v_zero[slots[:vq]].to(work).unsqueeze(-1)
        v[:vq] = (v_codes.view(groups) * v_scale + v_zero).view(vq, c.kv_heads, c.head_dim)
        return k, v


class QuantizedKVCache:
    """One layer's K/V cache stored quantized, read by the attention kernels without a dequantized copy.

    Args:
        batch, kv_heads, head_dim: the cache holds ``batch`` sequences of ``kv_heads`` heads of ``head_dim``.
        capacity: tokens per sequence of a contiguous cache. Or, paged: ``num_pages`` pages of ``page_size``
            tokens shared by the sequences (a page is taken from the pool when a sequence grows into it and
            given back by :meth:`truncate`).
        format: ``"int8"`` (one scale per token and head), ``"fp8_e4m3"``, ``"fp8_e5m2"``, or KIVI's ``"int4"``
            and ``"int2"`` (docs/quantized_kvcache.md).
        group_size, residual: KIVI's group G and full-precision window R (a multiple of G); G must divide
            head_dim and the capacity (or page_size), and fill whole bytes of codes.
        k_scale, v_scale: fp8 only: fixed scales (a number, or float ``[kv_heads]``) instead of one computed per
            token and head; values past the format's range saturate.
        dtype: float32, float16 or bfloat16, of the K/V appended and of a KIVI window (the queries may be any).
        device: where the cache lives.

    Positions are per sequence: :meth:`append` writes after each sequence's ``lengths[b]`` tokens, and
    :meth:`attend`'s queries are the last ``Lq`` positions of each sequence (bottom-right aligned masks,
    docs/masks.md), as in :func:`fastar.attention_with_kvcache`.
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, *, capacity: Optional[int] = None,
                 num_pages: Optional[int] = None, page_size: Optional[int] = None, format: str = "int8",
                 group_size: int = 32, residual: int = 128, k_scale=None, v_scale=None,
                 dtype: torch.dtype = torch.bfloat16, device=None):
        self.batch = as_int(batch, f"{_CLS}: batch", 1)
        self.kv_heads = as_int(kv_heads, f"{_CLS}: kv_heads", 1)
        self.head_dim = as_int(head_dim, f"{_CLS}: head_dim", 1)
        if format not in KV_FORMATS:
            raise ValueError(f"{_CLS}: unknown format {format!r}; expected one of {sorted(KV_FORMATS)}")
        group_size = as_int(group_size, f"{_CLS}: group_size", 1)
        residual = as_int(residual, f"{_CLS}: residual", 0)
        if residual % group_size:
            raise ValueError(f"{_CLS}: residual ({residual}) must be a multiple of group_size ({group_size})")
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"{_CLS}: dtype must be float32, float16 or bfloat16, got {dtype}")
        self.format, self.dtype = format, dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        paged = num_pages is not None or page_size is not None
        if paged == (capacity is not None) or (paged and (num_pages is None or page_size is None)):
            raise ValueError(f"{_CLS}: give capacity (a contiguous cache) or both num_pages and page_size (paged)")
        if paged:
            self.page_size = as_int(page_size, f"{_CLS}: page_size", 1)
            pages = as_int(num_pages, f"{_CLS}: num_pages", 1)
            rows = (pages, self.page_size)
            self.capacity = pages * self.page_size
            self._free = list(range(pages - 1, -1, -1))  # popped from the end: pages are taken in order
            self._pages: List[List[int]] = [[] for _ in range(self.batch)]
            self._block_table = torch.zeros(self.batch, pages, dtype=torch.int32, device=self.device)
        else:
            self.page_size = None
            self.capacity = as_int(capacity, f"{_CLS}: capacity", 1)
            rows = (self.batch, self.capacity)
            self._block_table = None
        if format in _KIVI_BITS:
            if k_scale is not None or v_scale is not None:
                raise ValueError(f"{_CLS}: k_scale and v_scale fix an fp8 cache's scales; KIVI computes its own")
            bits = _KIVI_BITS[format]
            for what, n in (("head_dim", self.head_dim), ("page_size" if paged else "capacity", rows[1])):
                if n % group_size:
                    raise ValueError(f"{_CLS}: group_size ({group_size}) must divide {what} ({n})")
            if group_size * bits % 8:
                raise ValueError(f"{_CLS}: group_size ({group_size}) must fill whole bytes of {bits}-bit codes: a "
                                 f"multiple of {8 // bits}")
            self._store = _KiviStore(self, rows, group_size, residual)
        else:
            self._store = _ByteStore(self, rows, k_scale, v_scale)
        self._lengths = [0] * self.batch
        self._seqlens = torch.zeros(self.batch, dtype=torch.int32, device=self.device)

    @property
    def lengths(self) -> torch.Tensor:
        """int64 ``[batch]`` on the cache's device: the tokens cached per sequence."""
        return self._seqlens.to(torch.int64)

    @property
    def block_table(self) -> Optional[torch.Tensor]:
        """int32 ``[batch, num_pages]`` of a paged cache (the pages each sequence holds, in order), else None."""
        return self._block_table

    def memory_bytes(self) -> int:
        """Bytes of storage held at full capacity: codes and scales (and KIVI's zeros and window)."""
        return sum(t.numel() * t.element_size() for t in self._store.tensors())

    def _slots_of(self, b: int, pos: torch.Tensor) -> torch.Tensor:
        """The slots (rows of the flattened storage) of sequence ``b``'s positions ``pos`` (CPU int64)."""
        if self._block_table is None:
            return b * self.capacity + pos
        pages = torch.tensor(self._pages[b], dtype=torch.int64)
        return pages[pos // self.page_size] * self.page_size + pos % self.page_size

    def append(self, k: torch.Tensor, v: torch.Tensor, *, lengths=None) -> None:
        """Quantizes ``k`` and ``v`` ``[batch, kv_heads, L, head_dim]`` (the cache's dtype and device) into the
        cache after each sequence's tokens, in place.

        ``lengths`` (an int, or integers ``[batch]``; default ``L``): how many of the ``L`` rows of each sequence
        to append (ragged appends; the other rows are padding, not read). Appending past the capacity (or
        past the free pages) raises ``ValueError`` and writes nothing; so does a NaN or Inf in the appended rows
        on the CPU (on CUDA such a row is stored as NaN: see :func:`quantize_kv_append`).
        """
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{_CLS}.append: {name} must be a tensor, got {type(t).__name__}")
            if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != (self.batch, self.kv_heads, self.head_dim):
                raise ValueError(f"{_CLS}.append: {name} must be [batch, kv_heads, L, head_dim] = [{self.batch}, "
                                 f"{self.kv_heads}, L, {self.head_dim}], got {tuple(t.shape)}")
            if t.dtype != self.dtype or t.device != self.device:
                raise ValueError(f"{_CLS}.append: {name} must be {self.dtype} on {self.device} like the cache, got "
                                 f"{t.dtype} on {t.device}")
        if k.shape != v.shape:
            raise ValueError(f"{_CLS}.append: k and v differ in shape: {tuple(k.shape)} and {tuple(v.shape)}")
        no_grad(f"{_CLS}.append", k=k, v=v)
        L = k.shape[2]
        new = _host_lengths(L if lengths is None else lengths, self.batch, f"{_CLS}.append: lengths", L)
        self._check_room(new)
        held = None if self._block_table is None else [len(p) for p in self._pages]
        try:
            if held is not None:
                for b, n in enumerate(new):
                    while len(self._pages[b]) * self.page_size < self._lengths[b] + n:
                        self._pages[b].append(self._free.pop())
            self._store.append(k, v, self._lengths, new)
        except Exception:
            if held is not None:  # pages taken for this append go back to the pool
                for b, n in enumerate(held):
                    self._keep_pages(b, n)
            raise
        self._lengths = [n + m for n, m in zip(self._lengths, new)]
        self._sync_lengths()

    def _check_room(self, new: List[int]) -> None:
        """ValueError unless every sequence, and the page pool, has room for ``new[b]`` more tokens."""
        for b, n in enumerate(new):
            if self._lengths[b] + n > self.capacity:
                raise ValueError(f"{_CLS}.append: sequence {b} holds {self._lengths[b]} tokens; {n} more overflow "
                                 f"the capacity of {self.capacity}")
        if self._block_table is not None:
            wanted = sum(max(0, -(-(self._lengths[b] + n) // self.page_size) - len(self._pages[b]))
                         for b, n in enumerate(new))
            if wanted > len(self._free):
                raise ValueError(f"{_CLS}.append: the append needs {wanted} more pages; {len(self._free)} of "
                                 f"{self._block_table.shape[1]} are free")

    def _sync_lengths(self) -> None:
        """The device copies of the host's lengths and page lists."""
        self._seqlens.copy_(torch.tensor(self._lengths, dtype=torch.int32))
        if self._block_table is not None:
            table = torch.zeros(self._block_table.shape, dtype=torch.int32)
            for b, pages in enumerate(self._pages):
                table[b, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
            self._block_table.copy_(table)

    def attend(self, q: torch.Tensor, *, mask: Optional[Mask] = None, scale: Optional[float] = None,
               return_lse: bool = False):
        """Attention of ``q`` ``[batch, Hq, Lq, head_dim]`` (``Hq`` a multiple of ``kv_heads``; float32, float16
        or bfloat16) over each sequence's cached tokens, the queries being its last ``Lq`` positions.

        ``mask``: any :mod:`fastar.masks` mask over the capacity's positions (``Causal()`` for a prefill or a
        chain of drafts, ``Tree(parents)`` for tree verification, ``Window``, ``BlockCausal``); None = every
        cached token visible. ``scale``: default ``1/sqrt(head_dim)``.

        Returns ``[batch, Hq, Lq, head_dim]`` in q's dtype (a transposed view of a ``[batch, Lq, Hq, head_dim]``
        buffer), and with ``return_lse`` the natural-log LSE float32 ``[batch, Hq, Lq]``.
        """
        if not isinstance(q, torch.Tensor) or q.dim() != 4:
            raise ValueError(f"{_CLS}.attend: q must be a 4-D tensor [batch, Hq, Lq, head_dim], got "
                             f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
        if q.shape[0] != self.batch or q.shape[3] != self.head_dim or q.shape[1] % self.kv_heads:
            raise ValueError(f"{_CLS}.attend: q must be [batch={self.batch}, a multiple of kv_heads={self.kv_heads}, "
                             f"Lq, head_dim={self.head_dim}], got {tuple(q.shape)}")
        if q.dtype not in FLOAT_DTYPES or q.device != self.device:
            raise ValueError(f"{_CLS}.attend: q must be float32, float16 or bfloat16 on {self.device}, got {q.dtype} "
                             f"on {q.device}")
        no_grad(f"{_CLS}.attend", q=q)
        query = q.transpose(1, 2)
        if self.format in _KIVI_BITS:  # the window is read in q's dtype
            query = query.to(self.dtype)
        result = _attend_cache(query, self._store.k, self._store.v, self._seqlens, self._block_table, self.capacity,
                               mask, scale, return_lse, **self._store.attention_args())
        out = (result[0] if return_lse else result).transpose(1, 2).to(q.dtype)
        return (out, result[1]) if return_lse else out

    def truncate(self, lengths) -> None:
        """Rolls sequences back to ``lengths`` tokens (an int, or integers ``[batch]``, each at most what the
        sequence holds): e.g. the draft tokens a verification rejected. A paged cache gives the pages it no
        longer needs back to the pool. In a KIVI cache, keys of a quantized group that the cut splits return to
        the full-precision window as their dequantized values."""
        new = _host_lengths(lengths, self.batch, f"{_CLS}.truncate: lengths", self.capacity)
        for b, n in enumerate(new):
            if n > self._lengths[b]:
                raise ValueError(f"{_CLS}.truncate: sequence {b} holds {self._lengths[b]} tokens, cannot "
                                 f"truncate to {n}")
        self._store.truncate(self._lengths, new)
        self._lengths = new
        if self._block_table is not None:
            for b, n in enumerate(new):
                self._keep_pages(b, -(-n // self.page_size))
        self._sync_lengths()

    def compact(self, path, num_accepted, *, num_nodes: int, root_in_path: bool) -> None:
        """After a tree's verification: the last ``num_nodes`` tokens of every sequence are the tree's nodes (as
        appended, node ``i`` at ``lengths[b] - num_nodes + i``); keep the accepted ones, ``path[b, :num_accepted[b]]``
        (``+ 1`` with ``root_in_path``), at consecutive positions and drop the rest (a paged cache gives back the
        pages it no longer needs). ``path``, ``num_accepted`` and ``root_in_path`` as the acceptance ops return and
        decide them (:func:`fastar.compact_kv`).

        int8 / fp8: codes and per-token scales move through :func:`fastar.compact_kv`. KIVI int4 / int2: the tree
        must still be in the full-precision window (``residual >= num_nodes``; else ``ValueError``), where the kept
        rows move. The cache keeps its lengths on the host, so this reads the new lengths back (a sync, as
        :meth:`append` and :meth:`truncate` have); a bad path raises ``ValueError`` / ``IndexError`` and moves
        nothing in that sequence.
        """
        op = f"{_CLS}.compact"
        num_nodes = as_int(num_nodes, f"{op}: num_nodes", 1)
        for b, n in enumerate(self._lengths):
            if n < num_nodes:
                raise ValueError(f"{op}: sequence {b} holds {n} tokens, fewer than the tree's {num_nodes} nodes")
        start = torch.tensor([n - num_nodes for n in self._lengths], dtype=torch.int32, device=self.device)
        new = self._store.compact(path, num_accepted, start, num_nodes, root_in_path)
        check_rows(new, op)
        self._lengths = new.tolist()
        if self._block_table is not None:
            for b, n in enumerate(self._lengths):
                self._keep_pages(b, -(-n // self.page_size))
        self._sync_lengths()

    def _keep_pages(self, b: int, n: int) -> None:
        """Sequence ``b`` keeps its first ``n`` pages; the others go back to the pool."""
        while len(self._pages[b]) > n:
            self._free.append(self._pages[b].pop())

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The cached K and V as the kernels read them, ``[batch, kv_heads, max(lengths), head_dim]`` in ``dtype``
        (default the cache's; float64 gives them exactly); rows past a sequence's length are 0."""
        dtype = self.dtype if dtype is None else dtype
        work = torch.float64 if dtype == torch.float64 else torch.float32
        n = max(self._lengths)
        out = [torch.zeros(self.batch, n, self.kv_heads, self.head_dim, dtype=work, device=self.device)
               for _ in range(2)]
        for b, length in enumerate(self._lengths):
            k, v = self._store.rows(b, length, work)
            out[0][b, :length], out[1][b, :length] = k, v
        return out[0].transpose(1, 2).to(dtype), out[1].transpose(1, 2).to(dtype)
