"""Fused masked attention for decoding and verification.

Conventions:

* Layout ``[B, H, L, D]`` (SDPA's) for :func:`attention`; FlashAttention's ``[B, L, H, D]`` for
  :func:`attention_with_kvcache`. GQA/MQA: ``Hq % Hkv == 0``, query head ``h`` uses kv head
  ``h // (Hq // Hkv)``. float32, float16 and bfloat16; accumulation in float32.
* Masks are structured objects (:mod:`fastar.masks`), bottom-right aligned: the queries are the last ``Lq``
  key positions. A query row that sees no key gets output 0 and LSE ``-inf``.
* LSE: natural log, float32 ``[B, Hq, Lq]``.
* Inference only: under grad mode an input that requires grad is a ValueError (the kernels compute no
  gradients); so are inputs on different devices.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from collections import OrderedDict
from typing import Optional, Tuple, Union

import torch

from . import _common
from ._common import (
    FLOAT_DTYPES,
    INT32_MAX,
    attention_lse,
    check,
    fake,
    four_d,
    head_dim,
    index_tensor,
    integral,
    narrow_int32,
    no_grad,
    one_device,
    overlaps_itself,
    same_device,
    softmax_scale,
)
from .masks import BLOCK_NAMES, Dense, Mask, MaskArgs

__all__ = ["attention", "attention_with_kvcache", "patch_sdpa", "scaled_dot_product_attention"]

_KV_OP = "fastar.attention_with_kvcache"


def _run(q, k, v, args: MaskArgs, scale: float, kv_lens=None, block_table=None, out=None, **quantized):
    """The attention op on [B, H, L, D] views, written into ``out`` (a new tensor when None): (out, lse).
    ``quantized``: the op's arguments of a quantized cache (k_scale, v_scale; KIVI's k_zero, ..., kivi_group)."""
    if out is None:
        out = q.new_empty(q.shape)
    lse = _common.ops().attention(
        q, k, v, out, scale, kv_lens=kv_lens, block_table=block_table, causal=args.causal,
        bottom_right=args.bottom_right, window_left=args.window_left if args.window else -1,
        window_sinks=args.window_sinks, block_relation=BLOCK_NAMES[args.block_relation],
        q_block_ids=args.q_block_ids, k_block_ids=args.k_block_ids, mask_bits=args.bits,
        mask_bits_cols=args.bits_cols, bias=args.bias, **quantized,
    )
    return out, lse


def _check_layout(q, k, v, out):
    four_d("fastar.attention", "[B, H, L, D]", q=q, k=k, v=v)
    head_dim("fastar.attention", q.shape[-1])
    same_device("fastar.attention", q.device, k=k, v=v, out=out)
    no_grad("fastar.attention", q=q, k=k, v=v)


def _lower(mask, B, Lq, Lk, device, kv_lens=None) -> MaskArgs:
    if not isinstance(mask, Mask):
        raise TypeError(
            f"fastar.attention: mask must be a fastar.masks object (Causal, Tree, BlockCausal, Window, Dense), "
            f"got {type(mask).__name__}; wrap a bool tensor in fastar.masks.Dense"
        )
    return mask.lower(B, Lq, Lk, device, kv_lens)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: Optional[Mask] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    out: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Masked attention ``softmax(q k^T * scale + mask) v``.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` with ``Hq % Hkv == 0``. Same dtype (float32,
            float16 or bfloat16), any strides with a unit stride along ``D``. The CUDA kernels take
            ``D <= 256``; the CPU kernels any ``D``.
        mask: a :mod:`fastar.masks` object (``Causal()``, ``Tree(parents)``, ``BlockCausal(...)``,
            ``Window(left, sinks)``, ``Dense(bool)``, or their ``&``); None = every key visible.
        scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return the natural-log LSE, float32 ``[B, Hq, Lq]`` (``-inf`` for rows that see
            no key).
        out: optional ``[B, Hq, Lq, D]`` tensor of q's dtype and device that the kernel writes in place (any
            strides; it must not share memory with an input).

    Returns:
        ``out`` ``[B, Hq, Lq, D]`` in q's dtype, or ``(out, lse)``.
    """
    _check_layout(q, k, v, out if isinstance(out, torch.Tensor) else None)
    B, _, Lq, D = q.shape
    args = MaskArgs.none() if mask is None else _lower(mask, B, Lq, k.shape[2], q.device)
    if out is not None and not isinstance(out, torch.Tensor):
        raise TypeError(f"fastar.attention: out must be a tensor, got {type(out).__name__}")
    # The op checks out (q's shape, dtype and device, no memory shared with an input) and writes it in place.
    result, lse = _run(q, k, v, args, softmax_scale(scale, D), out=out)
    return (result, lse) if return_lse else result


@fake("attention")
def _attention_fake(q, k, v, out, scale, **mask):
    one_device("attention", q, k, v, out, *mask.values())
    return attention_lse(q, out)


def _kvcache_append(cache: torch.Tensor, new: torch.Tensor, positions: torch.Tensor, block_table):
    """Write new [B, Lnew, H, D] into the cache at the given positions [B, Lnew] (in place, no host sync)."""
    B, L = positions.shape
    if block_table is None:
        rows = torch.arange(B, device=cache.device).unsqueeze(1).expand(B, L)
        cache[rows, positions] = new.to(cache.dtype)
    else:
        page_size = cache.shape[1]
        pages = torch.gather(block_table.long(), 1, positions // page_size)
        cache[pages, positions % page_size] = new.to(cache.dtype)


def _scale_rows(scale: torch.Tensor, Hkv: int) -> torch.Tensor:
    """A quantized cache's scales in the cache layout ([B or pages, S or page_size, Hkv], [Hkv] or one value) as
    a view that broadcasts to the kernel's rows [B or pages, Hkv, S or page_size]; other shapes go to the op,
    which names them in its error."""
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"{_KV_OP}: k_scale and v_scale must be tensors, got {type(scale).__name__}")
    if scale.dim() == 3:
        return scale.transpose(1, 2)
    if scale.dim() == 1 and scale.numel() == Hkv:
        return scale.reshape(1, Hkv, 1)
    return scale


def attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    cache_seqlens: Union[torch.Tensor, int],
    k_new: Optional[torch.Tensor] = None,
    v_new: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
    mask: Optional[Mask] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
):
    """Decode / verify against a KV cache, FlashAttention style (``flash_attn_with_kvcache``).

    Args:
        q: ``[B, Lq, Hq, D]`` the new tokens' queries.
        k_cache, v_cache: ``[B, S_max, Hkv, D]`` contiguous caches, or with ``block_table`` paged caches
            ``[num_pages, page_size, Hkv, D]`` (any page size). With ``k_new`` no two elements of a cache
            may share memory (an expanded view is refused).
        cache_seqlens: integer ``[B]`` (any integer dtype; or an int): tokens already in each sequence's
            cache, in ``[0, capacity - Lq_new]``.
        k_new, v_new: optional ``[B, Lq_new, Hkv, D]``, written into the cache in place at
            ``cache_seqlens`` before attending (so the new tokens see themselves).
        block_table: integer ``[B, max_pages]``: page ``block_table[b, s // page_size]`` holds position ``s``;
            entries in ``[0, num_pages)``.
        mask: applied to the queries (the last ``Lq`` positions of each sequence): e.g. ``Causal()`` for a
            chain of drafts, ``Tree(parents)`` for tree verification, ``BlockCausal`` for block diffusion.
            None = every cached key visible.
        scale, return_lse: as in :func:`attention`.
        k_scale, v_scale: for a quantized cache (``torch.int8``, ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``
            codes, as :func:`fastar.quantize_kv_append` writes them): float32 scales, one per slot and kv head
            (``[B, S_max, Hkv]`` or ``[num_pages, page_size, Hkv]``), one per kv head (``[Hkv]``) or one (``[]``).
            Key and value rows are ``codes * scale`` (docs/quantized_kvcache.md): the CPU kernels dequantize
            them to float32 as they read them, the CUDA kernels fold the scales into the logits and
            probabilities. Append with :func:`fastar.quantize_kv_append`, not ``k_new``.

    Returns:
        ``[B, Lq, Hq, D]`` (and the LSE ``[B, Hq, Lq]``). Sequence ``b`` attends to its first
        ``cache_seqlens[b] (+ Lq_new)`` keys.

    An int ``cache_seqlens``, and CPU tensors ``cache_seqlens`` and ``block_table``, are range-checked
    (ValueError / IndexError) before anything is written. Tensors on a CUDA device are not read on the host
    (no sync): a length outside its range is clamped into it (so an append stays inside that sequence's slots)
    and a page outside ``[0, num_pages)`` reads as no keys (an append into it fails as a device-side index
    error); values never wrap around when narrowed to int32.
    """
    four_d(_KV_OP, "[B, L, H, D]", q=q, k_cache=k_cache, v_cache=v_cache)
    B, Lq, _, D = q.shape
    head_dim(_KV_OP, D)
    if (k_new is None) != (v_new is None):
        raise ValueError(f"{_KV_OP}: give both k_new and v_new, or neither")
    if (k_scale is None) != (v_scale is None):
        raise ValueError(f"{_KV_OP}: give both k_scale and v_scale (a quantized cache), or neither")
    if k_scale is not None and k_new is not None:
        raise ValueError(f"{_KV_OP}: k_new cannot append to a quantized cache; use fastar.quantize_kv_append")
    seqlen_int = None  # an int length is known on the host: checked there on every device
    if not isinstance(cache_seqlens, torch.Tensor):
        seqlen_int = integral(_KV_OP, cache_seqlens, "cache_seqlens")
        if not 0 <= seqlen_int <= INT32_MAX:
            raise ValueError(f"{_KV_OP}: cache_seqlens must be a length in [0, capacity], got {seqlen_int}")
        cache_seqlens = torch.full((B,), seqlen_int, device=q.device)
    cache_seqlens = index_tensor(_KV_OP, cache_seqlens, "cache_seqlens", q.device)
    if block_table is not None:
        block_table = index_tensor(_KV_OP, block_table, "block_table", q.device)
        if block_table.dim() != 2:
            raise ValueError(f"{_KV_OP}: block_table must be 2-D [B, max_pages], got shape {tuple(block_table.shape)}")
    same_device(_KV_OP, q.device, k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new,
                cache_seqlens=cache_seqlens, block_table=block_table, k_scale=k_scale, v_scale=v_scale)
    no_grad(_KV_OP, q=q, k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new)
    if cache_seqlens.shape != (B,):
        raise ValueError(f"{_KV_OP}: cache_seqlens must have shape [{B}], got {tuple(cache_seqlens.shape)}")
    capacity = (block_table.shape[1] * k_cache.shape[1]) if block_table is not None else k_cache.shape[1]
    L_new = 0
    if k_new is not None:
        if (k_new.dim() != 4 or k_new.shape[0] != B or k_new.shape != v_new.shape
                or k_new.shape[2:] != k_cache.shape[2:]):
            raise ValueError(
                f"{_KV_OP}: k_new and v_new must have shape [B, Lnew, Hkv, D] = [{B}, Lnew, {k_cache.shape[2]}, "
                f"{k_cache.shape[3]}], got {tuple(k_new.shape)} and {tuple(v_new.shape)}"
            )
        L_new = k_new.shape[1]
        if L_new > capacity:
            raise ValueError(f"{_KV_OP}: appending {L_new} tokens overflows the cache of {capacity}")
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if overlaps_itself(cache):
                raise ValueError(
                    f"{_KV_OP}: {name} has elements that share memory (an expanded or stride-0 view), so an "
                    "append would write one slot for several positions; pass a cache with its own memory"
                )
    # Values are checked on the CPU before narrowing to int32; device tensors are not read (no host sync):
    # they are clamped into the valid range instead (see attention_with_kvcache).
    check((cache_seqlens >= 0).all(), ValueError, f"{_KV_OP}: cache_seqlens must be >= 0")
    overflow = f"appending {L_new} tokens overflows the cache of {capacity}" if L_new else (
        f"cache_seqlens must be at most the cache's capacity {capacity}")
    if seqlen_int is not None and seqlen_int > capacity - L_new:
        raise ValueError(f"{_KV_OP}: {overflow}")
    check((cache_seqlens <= capacity - L_new).all(), ValueError, f"{_KV_OP}: {overflow}")
    cache_seqlens = narrow_int32(cache_seqlens, 0, capacity - L_new)
    if block_table is not None:
        pages = k_cache.shape[0]
        check(((block_table >= 0) & (block_table < pages)).all(), IndexError,
              f"{_KV_OP}: block_table holds a page outside [0, {pages})")
        block_table = narrow_int32(block_table, -1, INT32_MAX)
    kv_lens = cache_seqlens
    if k_new is not None:
        positions = cache_seqlens.long().unsqueeze(1) + torch.arange(L_new, device=q.device)
        _kvcache_append(k_cache, k_new, positions, block_table)
        _kvcache_append(v_cache, v_new, positions, block_table)
        kv_lens = cache_seqlens + L_new
    scales = {}
    if k_scale is not None:
        scales = {"k_scale": _scale_rows(k_scale, k_cache.shape[2]), "v_scale": _scale_rows(v_scale, k_cache.shape[2])}
    bt = None if block_table is None else block_table.to(torch.int32)
    return _attend_cache(q, k_cache, v_cache, kv_lens, bt, capacity, mask, scale, return_lse, **scales)


def _attend_cache(q, k_cache, v_cache, kv_lens, block_table, capacity: int, mask, scale, return_lse: bool,
                  **quantized):
    """attention_with_kvcache's attention, on checked arguments: q ``[B, Lq, Hq, D]``, caches ``[B or pages, S or
    page_size, Hkv, *]``, int32 kv_lens and block_table, the mask over ``capacity`` key positions; ``quantized``
    as :func:`_run` takes it. Returns ``[B, Lq, Hq, D]`` (and the LSE)."""
    B, Lq, _, D = q.shape
    # [B, S, H, D] caches (or [pages, page_size, H, D]) are [B, H, S, D] views for the kernel.
    k_view, v_view, q_view = k_cache.transpose(1, 2), v_cache.transpose(1, 2), q.transpose(1, 2)
    args = MaskArgs.none() if mask is None else _lower(mask, B, Lq, capacity, q.device, kv_lens)
    result = q.new_empty(q.shape)
    _, lse = _run(q_view, k_view, v_view, args, softmax_scale(scale, D), kv_lens, block_table,
                  out=result.transpose(1, 2), **quantized)
    return (result, lse) if return_lse else result


_warned = set()


def _fallback(reason: str, *args, **kwargs):
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"fastar.scaled_dot_product_attention falls back to PyTorch's: {reason}", stacklevel=3)
    return _torch_sdpa(*args, **kwargs)


_torch_sdpa = torch.nn.functional.scaled_dot_product_attention


def _fallback_reason(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) -> Optional[str]:
    tensors = [query, key, value] + ([attn_mask] if attn_mask is not None else [])
    if dropout_p > 0.0:
        return "dropout"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "a tensor requires grad (fastar's kernels are inference-only)"
    if any(t.dim() != 4 for t in (query, key, value)):
        return "inputs are not 4-D [B, H, L, D]"
    if query.dtype not in FLOAT_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtype {query.dtype} (fastar takes float32, float16, bfloat16)"
    if query.device.type != "cpu" and not (query.device.type == "cuda" and _has_cuda_kernels()):
        return f"device {query.device}"
    if any(t.device != query.device for t in tensors):
        return "inputs on different devices"
    if attn_mask is not None and is_causal:
        return "attn_mask together with is_causal"
    if attn_mask is not None and attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
        return f"attn_mask of dtype {attn_mask.dtype} (PyTorch takes bool, float32 or the query's dtype)"
    if query.shape[-1] == 0:
        return "head dim 0"
    if key.shape[1] != query.shape[1] and not enable_gqa:
        return "key/value heads differ from query heads without enable_gqa"
    if key.shape[0] != query.shape[0] or key.shape[-1] != query.shape[-1] or value.shape[-1] != query.shape[-1]:
        return "shapes fastar does not take (different batch or value head dim)"
    return None


def _has_cuda_kernels() -> bool:
    from . import build_info

    return bool(build_info()["cuda"])


# Float masks classified by _bool_if_zero_or_neg_inf: key -> (weak reference to the mask's base tensor, the
# bool mask or None). The weak reference tells a live mask from a new tensor at a freed mask's address.
_mask_kinds: "OrderedDict[tuple, tuple]" = OrderedDict()
_MASK_KINDS_SIZE = 8


def _bool_if_zero_or_neg_inf(mask: torch.Tensor) -> torch.Tensor:
    """A float mask whose values are all 0 or -inf as the bool mask it means (``mask == 0``, True = attend),
    which the kernels read bit-packed instead of as an additive bias; any other mask as it is.

    The answer is cached per mask tensor (its address, version counter, shape, strides, dtype and device,
    while it lives), so a mask reused across calls (VAR's ``attn_bias``) is read once: one host sync per
    distinct CUDA mask. Not under torch.compile, and not for inference tensors on a device (they keep no
    version counter): those run as a bias.
    """
    if torch.compiler.is_compiling() or (mask.is_inference() and mask.device.type != "cpu"):
        return mask
    base = mask if mask._base is None else mask._base
    key = None
    if not mask.is_inference():
        key = (mask.data_ptr(), mask._version, tuple(mask.shape), mask.stride(), mask.dtype, mask.device)
        hit = _mask_kinds.get(key)
        if hit is not None and hit[0]() is base:
            _mask_kinds.move_to_end(key)
            return mask if hit[1] is None else hit[1]
    visible = mask == 0
    as_bool = visible if bool((visible | (mask == float("-inf"))).all()) else None
    if key is not None:
        _mask_kinds[key] = (weakref.ref(base), as_bool)
        if len(_mask_kinds) > _MASK_KINDS_SIZE:
            _mask_kinds.popitem(last=False)
    return mask if as_bool is None else as_bool


def _sdpa_mask_args(query, key, attn_mask, is_causal) -> MaskArgs:
    B, H, Lq, _ = query.shape
    Lk = key.shape[2]
    if attn_mask is None:
        args = MaskArgs.none()
        return args._replace(causal=True, bottom_right=False) if is_causal else args
    mask = attn_mask
    if mask.dtype != torch.bool:
        mask = _bool_if_zero_or_neg_inf(mask)
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.dtype == torch.bool and mask.shape[1] == 1:
        # One mask for all heads: bit-packed (1 bit per element instead of a float).
        dense = mask[:, 0].expand(mask.shape[0], Lq, Lk)
        return Dense(dense).lower(B, Lq, Lk, query.device)
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(~mask, float("-inf"))
    else:
        bias = mask.to(query.dtype)
    bias = bias.expand(bias.shape[0], bias.shape[1], Lq, Lk)
    return MaskArgs.none()._replace(bias=bias)


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``: same signature, same results.

    Keeps PyTorch's conventions: ``is_causal`` is top-left aligned, bool masks say True = attend, float
    masks are added to the logits, masks broadcast to ``[B, H, Lq, Lk]``, a row that sees no key gives 0.
    Where fastar cannot serve (dropout, a tensor that requires grad, an unsupported dtype, device or
    shape) it calls PyTorch's op instead (correct gradients, never a wrong answer) and says so once
    through ``warnings``.
    """
    reason = _fallback_reason(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    if reason is not None:
        return _fallback(
            reason, query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )
    args = _sdpa_mask_args(query, key, attn_mask, is_causal)
    out, _ = _run(query, key, value, args, softmax_scale(scale, query.shape[-1]))
    return out


@contextlib.contextmanager
def patch_sdpa():
    """Within the block, ``torch.nn.functional.scaled_dot_product_attention`` is fastar's drop-in.

    Reaches code that looks the function up at call time (``F.scaled_dot_product_attention(...)``, as VAR,
    LlamaGen and most research code do), not a name imported before the block.
    """
    functional = torch.nn.functional
    previous = functional.scaled_dot_product_attention
    functional.scaled_dot_product_attention = scaled_dot_product_attention
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = previous
