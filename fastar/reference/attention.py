"""References for the attention ops: the mask rules of ``csrc/core/attention.h`` and attention in float64.

``mask_from_args`` evaluates lowered mask arguments (:class:`fastar.masks.MaskArgs`) with the kernels' rules,
written term by term after ``mask_visible``; the tests check it against ``Mask.materialize``, so the
lowering of every mask object is checked against the mask's definition. ``attention_reference`` is softmax
attention in float64 with the FlashAttention conventions (natural-log LSE; a fully masked row gives output
0 and LSE -inf).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..masks import BLOCK_CAUSAL, BLOCK_NONE, BLOCK_PREV, BLOCK_SAME, MaskArgs

__all__ = ["attention_reference", "mask_from_args"]


def mask_from_args(
    args: MaskArgs, batch: int, Lq: int, Lk: int, kv_lens: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """bool ``[batch, Lq, Lk]``: whether query ``i`` of sequence ``b`` sees key ``j`` under ``args``.

    ``kv_lens`` (int ``[batch]``): keys per sequence (``kv_len`` of the C++), default ``Lk`` for all; key
    positions ``>= kv_lens[b]`` are never visible (the kernels do not visit them). The additive ``bias`` is
    not a visibility rule and is ignored, as in ``mask_visible``.
    """
    device = next(
        (t.device for t in (args.q_block_ids, args.k_block_ids, args.bits, kv_lens) if t is not None),
        torch.device("cpu"),
    )
    if kv_lens is None:
        lk = torch.full((batch,), Lk, dtype=torch.int64, device=device)
    else:
        lk = kv_lens.to(device=device, dtype=torch.int64)
    lk = lk.view(batch, 1, 1)
    i = torch.arange(Lq, device=device).view(1, Lq, 1)
    j = torch.arange(Lk, device=device).view(1, 1, Lk)
    # MaskGeometry: the causal diagonal and the first key of the bit-packed part, per sequence.
    diag = lk - Lq if args.bottom_right else torch.zeros_like(lk)
    bits_start = lk - args.bits_cols
    d = i + diag

    visible = (j < lk).expand(batch, Lq, Lk).clone()
    if args.causal:
        visible &= j <= d
    if args.window:
        visible &= ((d - j <= args.window_left) & (j <= d)) | (j < args.window_sinks)
    if args.block_relation != BLOCK_NONE:
        qb = args.q_block_ids.expand(batch, Lq).unsqueeze(2).to(torch.int64)  # qb - 1 must not wrap
        kb = args.k_block_ids.expand(batch, Lk).unsqueeze(1).to(torch.int64)
        if args.block_relation == BLOCK_CAUSAL:
            visible &= kb <= qb
        elif args.block_relation == BLOCK_SAME:
            visible &= kb == qb
        elif args.block_relation == BLOCK_PREV:
            visible &= (kb <= qb) & (kb >= qb - 1)
        else:
            raise ValueError(f"unknown block_relation {args.block_relation}")
    if args.bits is not None:
        c = j - bits_start
        in_bits = j >= bits_start
        row_bytes = args.bits.shape[-1]
        # Keys past kv_len give a column past the row; they are invisible already, so clamp the index.
        byte_index = (c >> 3).clamp(0, row_bytes - 1).expand(batch, Lq, Lk)
        byte = torch.gather(args.bits.expand(batch, Lq, row_bytes).to(torch.int64), 2, byte_index)
        bit = (byte >> (c & 7)) & 1
        visible &= ~in_bits | (bit == 1)
    return visible


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    enable_gqa: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in float64: ``(out, lse)``.

    q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``; v: ``[B, Hkv, Lk, Dv]``. Query head ``h`` uses kv head
    ``h // (Hq // Hkv)`` (GQA; with ``enable_gqa=False`` the head counts must be equal).
    mask: bool broadcastable to ``[B, Hq, Lq, Lk]`` (True = attend; a materialized mask ``[B, Lq, Lk]`` needs
    ``.unsqueeze(1)``). bias: float broadcastable to ``[B, Hq, Lq, Lk]``, added to the scaled logits.
    scale: default ``1 / sqrt(D)``.

    Returns out ``[B, Hq, Lq, Dv]`` in q's dtype and lse float32 ``[B, Hq, Lq]``, the natural-log
    logsumexp of the scaled (and biased) logits over the visible keys. A query that sees no key (or only
    keys with bias -inf) gets output 0 and LSE -inf.

    NaN in, NaN out for exactly the rows that see it: a NaN or +inf logit of a visible key (from q, k,
    ``scale`` or ``bias``) makes the row's output and LSE NaN; a NaN in v row ``j`` makes NaN the outputs
    of the rows that see key ``j`` (0 * NaN), never of a row whose mask hides ``j``. A bias of -inf does
    not hide a key (as in SDPA, whose float masks are added).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D [B, H, L, D]")
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hq % Hkv != 0 or (not enable_gqa and Hq != Hkv):
        raise ValueError(f"{Hq} query heads cannot share {Hkv} kv heads")
    group = Hq // Hkv
    k64 = k.to(torch.float64).repeat_interleave(group, dim=1)
    v64 = v.to(torch.float64).repeat_interleave(group, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    logits = torch.matmul(q.to(torch.float64), k64.transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + bias.to(torch.float64)
    if mask is not None:
        logits = logits.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(logits, dim=-1)
    # exp(-inf - (-inf)) is NaN: a row with no visible key takes weights exp(-inf - 0) = 0 instead.
    safe_lse = torch.where(lse == -math.inf, torch.zeros_like(lse), lse)
    weights = torch.exp(logits - safe_lse.unsqueeze(-1))
    lse = lse.masked_fill(lse == math.inf, math.nan)  # a +inf logit: exp(inf - inf) weights, a NaN row
    finite = torch.isfinite(v64)
    out = torch.matmul(weights, v64.masked_fill(~finite, 0.0))
    if not bool(finite.all()):
        out = out + _nonfinite_values(weights, v64, mask)
    return out.to(q.dtype), lse.to(torch.float32)


def _nonfinite_values(weights: torch.Tensor, v64: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """What the NaN and +-inf elements of v add to ``weights @ v``, counting only the keys the mask lets a row
    see: NaN where a visible key's element is NaN, or +-inf times a zero weight, or +inf and -inf meet; else
    the sign's infinity (positive weights), else 0."""
    visible = torch.ones_like(weights, dtype=torch.bool) if mask is None else mask.expand_as(weights)
    pos_w = (visible & (weights > 0)).to(torch.float64)
    zero_w = (visible & (weights == 0)).to(torch.float64)
    pos_inf, neg_inf = (v64 == math.inf).to(torch.float64), (v64 == -math.inf).to(torch.float64)
    nan_hits = torch.matmul(visible.to(torch.float64), v64.isnan().to(torch.float64))
    nan_hits = nan_hits + torch.matmul(zero_w, pos_inf + neg_inf)
    pos_hits, neg_hits = torch.matmul(pos_w, pos_inf), torch.matmul(pos_w, neg_inf)
    extra = torch.zeros_like(nan_hits)
    extra = extra.masked_fill(pos_hits > 0, math.inf).masked_fill(neg_hits > 0, -math.inf)
    return extra.masked_fill((nan_hits > 0) | ((pos_hits > 0) & (neg_hits > 0)), math.nan)
