"""Reference of ScaleKV's key selection (:meth:`fastar.ScaleKVCache.compress`), written plainly: float64,
one (batch row, kv head) at a time, every observation query's logits summed per key, the pooling and the
ranking as explicit loops."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["scalekv_keep_reference"]


def scalekv_keep_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    hw: Tuple[int, int],
    budget: int,
    *,
    window: int = 16,
    pool: int = 5,
    qk_norm: bool = False,
    q_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The cache positions ScaleKV keeps, int64 ``[B, Hkv, kept]`` (increasing along the last dim).

    Args:
        q: ``[B, Hq, h*w, D]`` the current scale's queries, row-major over its ``h x w`` grid.
        k: ``[B, Hkv, L, D]`` the cached keys in cache order; the current scale's are the last ``h*w``.
        hw: the current scale's ``(h, w)``.
        budget: how many keys to keep besides the observation queries' own keys.
        window: observation queries, a ``g x g`` grid (``g*g = window``) at the cell centres
            ``((2i+1)*h) // (2g)``, ``((2j+1)*w) // (2g)`` (distinct positions only).
        pool: max-pool kernel (odd) over the scores in cache order, stride 1, the ends padded with -inf.
        qk_norm, q_scale: score with ``q_scale[h] * q/|q|`` and ``k/|k|`` (VAR's attn_l2_norm).

    A key's score is the sum, over the observation queries of every query head of its kv head's group, of
    ``q . k``; observation keys score -inf before pooling and are excluded from the ranking; the ``budget``
    best pooled scores (ties: lower position first) join the observation keys. A cache of at most ``budget``
    + observation keys is kept whole.
    """
    B, Hq, n, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    h, w = hw
    assert n == h * w and Hq % Hkv == 0
    group = Hq // Hkv
    g = math.isqrt(window)
    rows = sorted(set((2 * i + 1) * h // (2 * g) for i in range(g)))
    cols = sorted(set((2 * j + 1) * w // (2 * g) for j in range(g)))
    local = [y * w + x for y in rows for x in cols]  # inside the current scale
    observed = [L - n + p for p in local]  # in the cache
    if L <= budget + len(observed):
        return torch.arange(L).expand(B, Hkv, L).clone()
    q64, k64 = q.double(), k.double()
    if qk_norm:
        scale = torch.ones(Hq, dtype=torch.float64) if q_scale is None else q_scale.double()
        q64 = q64 / q64.norm(dim=-1, keepdim=True) * scale.view(1, Hq, 1, 1)
        k64 = k64 / k64.norm(dim=-1, keepdim=True)

    kept = torch.empty(B, Hkv, budget + len(observed), dtype=torch.int64)
    for b in range(B):
        for kv_head in range(Hkv):
            heads = slice(kv_head * group, (kv_head + 1) * group)
            # logits[h, i, j]: observation query i of query head h of the group against key j.
            logits = q64[b, heads][:, local] @ k64[b, kv_head].T
            scores = [-math.inf if j in observed else logits[:, :, j].sum().item() for j in range(L)]
            half = pool // 2
            pooled = [max(scores[max(0, j - half) : j + half + 1]) for j in range(L)]
            candidates = [j for j in range(L) if j not in observed]
            ranked = sorted(candidates, key=lambda j: (-pooled[j], j))
            kept[b, kv_head] = torch.tensor(sorted(ranked[:budget] + observed))
    return kept
