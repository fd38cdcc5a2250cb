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
from .masked_attention import attention_with_kvcache
from .masks import Mask
from .reference.quantized_kvcache import KV_FORMATS

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
_CLS = "fastar.QuantizedKVCache"


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


class QuantizedKVCache:
    """One layer's K/V cache stored quantized, read by the attention kernels without a dequantized copy.

    Args:
        batch, kv_heads, head_dim: the cache holds ``batch`` sequences of ``kv_heads`` heads of ``head_dim``.
        capacity: tokens per sequence of a contiguous cache. Or, paged: ``num_pages`` pages of ``page_size``
            tokens shared by the sequences (a page is taken from the pool when a sequence grows into it and
            given back by :meth:`truncate`).
        format: ``"int8"`` (one scale per token and head), ``"fp8_e4m3"`` or ``"fp8_e5m2"``
            (docs/quantized_kvcache.md).
        group_size, residual: the KIVI formats' group and full-precision window; checked, unused by the
            byte formats.
        k_scale, v_scale: fp8 only: fixed scales (a number, or float ``[kv_heads]``) instead of one computed per
            token and head; values past the format's range saturate.
        dtype: float32, float16 or bfloat16, of the K/V appended (the queries may be any of them).
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
        if format not in _BYTE_FORMATS:
            raise NotImplementedError(f"{_CLS}: the KIVI format {format!r} is not built yet; use int8 or fp8")
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
        codes = KV_FORMATS[format]
        shape = (*rows, self.kv_heads, self.head_dim)
        self._k = torch.zeros(shape, dtype=torch.uint8, device=self.device).view(codes)
        self._v = torch.zeros(shape, dtype=torch.uint8, device=self.device).view(codes)
        self._k_scale = self._scale_storage("k_scale", k_scale, rows)
        self._v_scale = self._scale_storage("v_scale", v_scale, rows)
        self._lengths = [0] * self.batch
        self._seqlens = torch.zeros(self.batch, dtype=torch.int32, device=self.device)

    def _scale_storage(self, name: str, fixed, rows) -> torch.Tensor:
        """The scales: per token and head (``[*rows, kv_heads]``, written by append), or an fp8 cache's fixed
        ``[kv_heads]`` scales."""
        if fixed is None:
            return torch.zeros(*rows, self.kv_heads, dtype=torch.float32, device=self.device)
        if self.format == "int8":
            raise ValueError(f"{_CLS}: {name} fixes an fp8 cache's scales; int8 scales are computed per token")
        scale = torch.as_tensor(fixed, dtype=torch.float32).to(self.device)
        if scale.numel() not in (1, self.kv_heads) or scale.dim() > 1:
            raise ValueError(f"{_CLS}: {name} must be a number or [kv_heads={self.kv_heads}], got "
                             f"{tuple(scale.shape)}")
        if not bool(torch.isfinite(scale).all() & (scale > 0).all()):
            raise ValueError(f"{_CLS}: {name} must be positive and finite")
        return scale.expand(self.kv_heads).contiguous()

    @property
    def lengths(self) -> torch.Tensor:
        """int64 ``[batch]`` on the cache's device: the tokens cached per sequence."""
        return self._seqlens.to(torch.int64)

    @property
    def block_table(self) -> Optional[torch.Tensor]:
        """int32 ``[batch, num_pages]`` of a paged cache (the pages each sequence holds, in order), else None."""
        return self._block_table

    def memory_bytes(self) -> int:
        """Bytes of storage held: codes and scales (and a KIVI window), at full capacity."""
        return sum(t.numel() * t.element_size() for t in (self._k, self._v, self._k_scale, self._v_scale))

    def _slots(self, new: List[int], L: int) -> torch.Tensor:
        """int64 ``[batch * L]``: the slot of each appended row (``-1`` past a sequence's ``new[b]``), taking
        pages from the pool as sequences grow (the caller commits or rolls back)."""
        slots = torch.full((self.batch, L), -1, dtype=torch.int64)
        for b, n in enumerate(new):
            pos = torch.arange(self._lengths[b], self._lengths[b] + n)
            if self._block_table is None:
                slots[b, :n] = b * self.capacity + pos
                continue
            pages = self._pages[b]
            while len(pages) * self.page_size < self._lengths[b] + n:
                pages.append(self._free.pop())
            slots[b, :n] = torch.tensor(pages, dtype=torch.int64)[pos // self.page_size] * self.page_size + (
                pos % self.page_size)
        return slots.reshape(-1)

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
            slots = self._slots(new, L).to(self.device)
            rows = (self.batch * L, self.kv_heads, self.head_dim)
            quantize_kv_append(k.transpose(1, 2).reshape(rows), v.transpose(1, 2).reshape(rows), slots,
                               *self._slot_views())
        except Exception:
            if held is not None:  # pages taken for this append go back to the pool
                for b, n in enumerate(held):
                    self._keep_pages(b, n)
            raise
        self._lengths = [n + m for n, m in zip(self._lengths, new)]
        self._sync_lengths()

    def _slot_views(self):
        """(k codes, v codes, k scales, v scales) as quantize_kv_append takes them: a contiguous cache's
        ``[batch, capacity]`` rows as ``batch * capacity`` slots; paged storage and fixed scales as they are."""
        views = [self._k, self._v, self._k_scale, self._v_scale]
        if self._block_table is None:
            views = [t.flatten(0, 1) if t.dim() >= 3 else t for t in views]
        return views

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
        result = attention_with_kvcache(q.transpose(1, 2), self._k, self._v, cache_seqlens=self._seqlens,
                                        block_table=self._block_table, mask=mask, scale=scale,
                                        return_lse=return_lse, k_scale=self._k_scale, v_scale=self._v_scale)
        if return_lse:
            return result[0].transpose(1, 2), result[1]
        return result.transpose(1, 2)

    def truncate(self, lengths) -> None:
        """Rolls sequences back to ``lengths`` tokens (an int, or integers ``[batch]``, each at most what the
        sequence holds): e.g. the draft tokens a verification rejected. A paged cache gives the pages it no
        longer needs back to the pool."""
        new = _host_lengths(lengths, self.batch, f"{_CLS}.truncate: lengths", self.capacity)
        for b, n in enumerate(new):
            if n > self._lengths[b]:
                raise ValueError(f"{_CLS}.truncate: sequence {b} holds {self._lengths[b]} tokens, cannot "
                                 f"truncate to {n}")
        self._lengths = new
        if self._block_table is not None:
            for b, n in enumerate(new):
                self._keep_pages(b, -(-n // self.page_size))
        self._sync_lengths()

    def _keep_pages(self, b: int, n: int) -> None:
        """Sequence ``b`` keeps its first ``n`` pages; the others go back to the pool."""
        while len(self._pages[b]) > n:
            self._free.append(self._pages[b].pop())

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The cached K and V as the kernels read them (codes times scales), ``[batch, kv_heads, max(lengths),
        head_dim]`` in ``dtype`` (default the cache's; float64 gives them exactly); rows past a sequence's length
        are 0."""
        dtype = self.dtype if dtype is None else dtype
        work = torch.float64 if dtype == torch.float64 else torch.float32
        n = max(self._lengths)
        out = []
        for codes, scale in ((self._k, self._k_scale), (self._v, self._v_scale)):
            rows = torch.zeros(self.batch, n, self.kv_heads, self.head_dim, dtype=work, device=self.device)
            for b, length in enumerate(self._lengths):
                pos = torch.arange(length, device=self.device)
                if self._block_table is None:
                    c, s = codes[b, :length], (scale[b, :length] if scale.dim() == 3 else scale)
                else:
                    page = self._block_table[b].long()[pos // self.page_size]
                    c, s = codes[page, pos % self.page_size], scale[page, pos % self.page_size] if scale.dim() == 3 \
                        else scale
                rows[b, :length] = c.to(work) * s.to(work).unsqueeze(-1)
            out.append(rows.transpose(1, 2).to(dtype))
        return out[0], out[1]
