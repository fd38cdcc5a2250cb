"""Quantized KV caches (docs/quantized_kvcache.md): the append that quantizes K and V into int8 or fp8 slots.

:func:`quantize_kv_append` is vLLM's ``reshape_and_cache`` for quantized caches: each new token's K and V rows
are quantized in one pass and written to the cache slot its ``slot_mapping`` entry names (``-1`` skips a
token, as in padded batches). Contiguous caches use slots ``b * capacity + t``; paged caches ``page *
page_size + offset``.
"""
from __future__ import annotations

import torch

from . import _common
from ._common import fake, one_device

__all__ = ["quantize_kv_append"]


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
