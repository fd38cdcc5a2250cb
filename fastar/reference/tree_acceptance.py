"""References for acceptance over draft trees (docs/acceptance.md, "Trees"), one row and one node at a time.

A tree is given by ``parents`` (int ``[N]``, ``-1`` for a child of the root, a parent before its child), the
root being the last verified token. ``target`` rows are indexed by node + 1 (row 0: the root's distribution).
Children of a node are taken in increasing node index. Every function returns ``(path, tokens, num_accepted)``
for one batch row as Python lists: ``path`` the accepted nodes root-side first, ``tokens`` their tokens then
the target's token; the batched ops pad both with ``-1`` to ``depth + 1``.

``tree_speculative_sample_row`` uses the random numbers of the chain rule (``acceptance._draws``): node ``c``'s
accept uniform and the sampling bits of a rejection at ``c`` come from the draws of (row, ``c``); a token drawn
at a leaf uses the draws of (row, ``N``). On a chain (``parents = [-1, 0, 1, ...]``) it therefore returns the
tokens of ``speculative_sample_reference`` for the same seed.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .acceptance import _draws, _fixed, _sample_fixed

__all__ = [
    "compact_kv_reference",
    "tree_greedy_verify_row",
    "tree_first_token_distribution",
    "tree_speculative_sample_row",
    "typical_accept_row",
]

def _children(parents: Sequence[int]) -> Dict[int, List[int]]:
    out: Dict[int, List[int]] = {-1: []}
    for node, parent in enumerate(parents):
        out.setdefault(node, [])
        out[parent].append(node)
    return out


def tree_speculative_sample_row(
    parents: Sequence[int],
    draft_token_ids: Sequence[int],
    draft_probs: Optional[torch.Tensor],
    target_probs: torch.Tensor,
    *,
    row: int = 0,
    seed: int = 0,
    offset: int = 0,
) -> Tuple[List[int], List[int], int]:
    """SpecInfer / EAGLE-1 multi-draft recursion for one row (``draft_probs`` ``[N, V]`` or ``None``: one-hot
    drafts, EAGLE-2/3), exactly as the kernels compute it. A node whose token is ``-1`` is absent (padding of
    ragged trees): it is never tried, nor anything below it.

    At a node the current distribution is first the target row as given, then, after a rejection, integer
    fixed-point weights ``W`` with total ``M`` (distribution ``W / M``). Child ``c`` with token ``x`` is accepted
    iff ``u_c * q_c(x) < p(x)`` on the target row (the chain rule's test), or ``u_c * q_c(x) * M < W[x]`` on
    weights, in float64 (``q_c(x) = 1`` without draft probabilities). A rejection sets the weights to:

    * from the target row: ``round(max(p - q_c, 0) * 2^40)`` (the difference in float32), or one-hot
      ``round(p * 2^40)`` with ``x`` at 0, as the chain rule's residual;
    * from weights: ``max(W - trunc(q_c * M), 0)`` (the product in float64), which is ``max(W / M - q_c, 0)``
      scaled by ``M``; or one-hot ``W`` with ``x`` at 0;

    unless that leaves no mass, when the distribution stays as it was. When no child is accepted, the token is
    drawn from the current distribution by the fixed-point inverse CDF, with the bits of the last rejected
    child, or at a leaf with those of (row, N).
    """
    n = len(parents)
    children = _children(parents)
    p_all = target_probs.float().cpu()
    q_all = None if draft_probs is None else draft_probs.float().cpu()
    path: List[int] = []
    current = -1
    while True:
        p = p_all[current + 1]
        weights: Optional[List[int]] = None  # None: the target row as given
        mass = 0
        bits = None
        accepted = None
        for c in children[current]:
            x = int(draft_token_ids[c])
            if x == -1:  # an absent node (ragged trees): never tried
                continue
            u, c_bits = _draws(seed, offset, row, c)
            q = 1.0 if q_all is None else float(q_all[c, x])
            if (u * q < float(p[x])) if weights is None else (u * q * float(mass) < float(weights[x])):
                accepted = c
                break
            bits = c_bits
            if weights is None:
                residual = _fixed(p - q_all[c]) if q_all is not None else _fixed(p)
            elif q_all is None:
                residual = list(weights)
            else:
                residual = [max(w - int(float(qt) * float(mass)), 0) for w, qt in zip(weights, q_all[c].tolist())]
            if q_all is None:
                residual[x] = 0
            if sum(residual) > 0:  # else the distribution stays (p == q up to the fixed-point grid)
                weights, mass = residual, sum(residual)
        if accepted is None:
            if bits is None:
                _, bits = _draws(seed, offset, row, n)
            token = _sample_fixed(_fixed(p) if weights is None else weights, bits)
            tokens = [int(draft_token_ids[t]) for t in path] + [token]
            return path, tokens, len(path)
        path.append(accepted)
        current = accepted


def tree_first_token_distribution(
    parents: Sequence[int],
    draft_token_ids: Sequence[int],
    draft_probs: Optional[torch.Tensor],
    target_probs: torch.Tensor,
) -> torch.Tensor:
    """float64 ``[V]``: the probability of the first emitted token (the first accepted child of the root, or
    the token drawn at the root) for fixed drafts, by the rule's exact recursion over the root's children.
    Averaged over drafts sampled from ``q`` (i.i.d. per child) it equals the target row 0 normalised."""
    children = _children(parents)[-1]
    w = target_probs[0].double().clamp_min(0)
    w = w / w.sum()
    out = torch.zeros_like(w)
    reach = 1.0  # probability that every earlier child was rejected
    for c in children:
        x = int(draft_token_ids[c])
        if draft_probs is None:
            accept = float(w[x])
            residual = w.clone()
            residual[x] = 0
        else:
            q = draft_probs[c].double()
            accept = min(1.0, float(w[x]) / float(q[x])) if q[x] > 0 else 1.0
            residual = (w - q).clamp_min(0)
        out[x] += reach * accept
        reach *= 1.0 - accept
        if residual.sum() > 0:
            w = residual / residual.sum()
    return out + reach * w


def _argmax(row: torch.Tensor) -> int:
    return int(torch.argmax(row.double()))  # ties: the smallest token id


def tree_greedy_verify_row(
    parents: Sequence[int], draft_token_ids: Sequence[int], target_logits: torch.Tensor
) -> Tuple[List[int], List[int], int]:
    """The longest root-to-node path whose every token equals the target's argmax at its parent, then the
    target's argmax after it. Among paths of equal length, the one whose node sequence is smallest
    (lexicographically) wins: siblings may repeat a token."""
    passes = [int(draft_token_ids[t]) == _argmax(target_logits[parent + 1]) for t, parent in enumerate(parents)]
    return _longest_path(parents, draft_token_ids, passes, target_logits)


def _longest_path(parents, draft_token_ids, passes, target_logits) -> Tuple[List[int], List[int], int]:
    """The longest root-to-node path of passing nodes (-1 ids never pass), the earliest (depth-first, children in
    index order) among equal lengths; its tokens, then the argmax after its last node."""
    children = _children(parents)
    best: List[int] = []

    def walk(node: int, path: List[int]) -> None:
        nonlocal best
        if len(path) > len(best):
            best = list(path)
        for c in children[node]:
            if passes[c] and int(draft_token_ids[c]) != -1:
                walk(c, path + [c])

    walk(-1, [])
    last = best[-1] if best else -1
    tokens = [int(draft_token_ids[t]) for t in best] + [_argmax(target_logits[last + 1])]
    return best, tokens, len(best)


def typical_accept_row(
    parents: Sequence[int],
    draft_token_ids: Sequence[int],
    target_logits: torch.Tensor,
    *,
    posterior_threshold: float = 0.09,
    posterior_alpha: float = 0.3,
    temperature: float = 1.0,
) -> Tuple[List[int], List[int], int]:
    """Medusa / Hydra typical acceptance in float64: node ``c`` with token ``x`` under parent row ``p =
    softmax(logits / temperature)`` passes iff ``p(x) > min(posterior_threshold, posterior_alpha *
    exp(-H(p)))``, ``H(p) = -sum p log p`` (``0 log 0 = 0``); ``temperature == 0`` passes iff ``x`` is the
    argmax. The longest path of passing nodes wins (ties as in ``tree_greedy_verify_row``); the last token is
    the target's argmax after it."""
    passes = []
    for c, parent in enumerate(parents):
        logits = target_logits[parent + 1].double()
        x = int(draft_token_ids[c])
        if temperature == 0:
            passes.append(x == _argmax(logits))
            continue
        p = torch.softmax(logits / temperature, dim=-1)
        entropy = -float(torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum())
        passes.append(float(p[x]) > min(posterior_threshold, posterior_alpha * math.exp(-entropy)))
    return _longest_path(parents, draft_token_ids, passes, target_logits)


def compact_kv_reference(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    path: torch.Tensor,
    num_accepted: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    root_in_path: bool,
    block_table: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """``fastar.compact_kv`` on copies of the caches, one position at a time: sequence ``b``'s position
    ``cache_seqlens[b] + j`` gets the row of position ``cache_seqlens[b] + path[b, j]`` of the original caches, for
    ``j < num_accepted[b] (+ 1 with root_in_path)``. Returns ``(k, v, new_lengths)``; inputs are assumed valid."""
    k_out, v_out, lengths = k_cache.clone(), v_cache.clone(), []
    for b in range(path.shape[0]):
        start = int(cache_seqlens[b])
        keep = int(num_accepted[b]) + (1 if root_in_path else 0)
        for j in range(keep):
            for out, cache in ((k_out, k_cache), (v_out, v_cache)):
                dst, src = start + j, start + int(path[b, j])
                if block_table is None:
                    out[b, dst] = cache[b, src]
                else:
                    page = cache.shape[1]
                    out[int(block_table[b, dst // page]), dst % page] = cache[int(block_table[b, src // page]),
                                                                              src % page]
        lengths.append(start + keep)
    return k_out, v_out, lengths
