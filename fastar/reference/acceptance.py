"""References for the acceptance ops (docs/acceptance.md), one row and one position at a time.

``speculative_sample_reference`` follows the documented algorithm step by step with the documented random
numbers (Philox4x32-10, 53-bit accept uniforms, 2^-40 fixed-point inverse CDF), so kernels must match it
token for token. ``speculative_output_distribution`` gives the exact probability of every possible output,
for the statistical tests.
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "greedy_verify_reference", "gsd_accept_reference", "gsd_first_token_distribution", "gsd_group",
    "lantern_accept_reference", "lantern_first_token_distribution", "lantern_proximity_set", "philox4x32_10",
    "sjd_accept_reference", "speculative_output_distribution", "speculative_sample_reference",
]

_MASK32 = 0xFFFFFFFF
_FIXED_SCALE = 2**40


def philox4x32_10(counter: Sequence[int], key: Sequence[int]) -> List[int]:
    """Philox4x32-10 block function (Salmon et al., SC'11) on Python ints."""
    c = [int(v) & _MASK32 for v in counter]
    k0, k1 = int(key[0]) & _MASK32, int(key[1]) & _MASK32
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & _MASK32, (p0 >> 32) ^ c[3] ^ k1, p0 & _MASK32]
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    return c


def _draws(seed: int, offset: int, row: int, position: int) -> Tuple[float, int]:
    """(accept uniform in [0, 1) with 53 bits, 64 sampling bits) of one (row, position)."""
    seed, offset = seed % 2**64, offset % 2**64
    r = philox4x32_10([position, row, offset & _MASK32, offset >> 32], [seed & _MASK32, seed >> 32])
    accept_u = (((r[0] << 32) | r[1]) >> 11) / 2.0**53
    return accept_u, (r[2] << 32) | r[3]


def _fixed(weights: torch.Tensor) -> List[int]:
    """Fixed-point weights: w * 2^40 of the float32 values rounded half to even (negative -> 0)."""
    return [round(w * _FIXED_SCALE) for w in weights.to(torch.float64).clamp_min(0).tolist()]


def _sample_fixed(weights: List[int], bits: int) -> Optional[int]:
    total = sum(weights)
    if total == 0:
        return None
    target = (bits * total) >> 64
    cum = 0
    for t, w in enumerate(weights):
        cum += w
        if cum > target:
            return t
    raise AssertionError("unreachable")


def _chain_reference(draft_token_ids, draft_probs, target_probs, num_draft_tokens, seed, offset, accepts):
    """The chain rule's walk, shared by the chain references: draft ``i`` of row ``b`` is kept while
    ``accepts(b, i, x, u, p_all, q_all)``; at the first rejection a token is drawn from the residual
    ``norm(max(p - q, 0))`` (``p`` without ``x`` when ``q_all`` is None), else the bonus token from ``p``."""
    batch, n = draft_token_ids.shape
    tokens = torch.full((batch, n + 1), -1, dtype=torch.int32)
    num_accepted = torch.zeros(batch, dtype=torch.int32)
    # Differences of float32 probabilities are taken in float32, as the kernels do (exactly rounded).
    p_all = target_probs.float().cpu()
    q_all = None if draft_probs is None else draft_probs.float().cpu()
    for b in range(batch):
        k = n if num_draft_tokens is None else int(num_draft_tokens[b])
        drafts = [int(x) for x in draft_token_ids[b, :k]]
        emitted = None
        for i, x in enumerate(drafts):
            u, bits = _draws(seed, offset, b, i)
            if accepts(b, i, x, u, p_all, q_all):
                tokens[b, i] = x
                continue
            if q_all is None:
                residual = p_all[b, i].clone()
                residual[x] = 0
            else:
                residual = p_all[b, i] - q_all[b, i]
            t = _sample_fixed(_fixed(residual), bits)
            if t is None:  # no residual mass (p == q up to 2^-40): sample p itself
                t = _sample_fixed(_fixed(p_all[b, i]), bits)
            emitted = (i, t)
            break
        if emitted is None:
            _, bits = _draws(seed, offset, b, k)
            emitted = (k, _sample_fixed(_fixed(p_all[b, k]), bits))
        j, t = emitted
        tokens[b, j] = t
        num_accepted[b] = j
    return tokens, num_accepted


def speculative_sample_reference(
    draft_token_ids: torch.Tensor,
    draft_probs: Optional[torch.Tensor],
    target_probs: torch.Tensor,
    num_draft_tokens: Optional[torch.Tensor] = None,
    seed: int = 0,
    offset: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """What ``fastar.speculative_sample`` must return for this seed (valid inputs only)."""

    def accepts(b, i, x, u, p_all, q_all):
        q = 1.0 if q_all is None else float(q_all[b, i, x])
        return u * q < float(p_all[b, i, x])  # u <= p/q, without dividing by q

    return _chain_reference(draft_token_ids, draft_probs, target_probs, num_draft_tokens, seed, offset, accepts)


def lantern_proximity_set(p: torch.Tensor, x: int, neighbors: Sequence[int], delta: float) -> List[int]:
    """LANTERN's latent proximity set of draft ``x`` under the target row ``p`` [V], in float64: ``x``, then
    ``x``'s neighbours nearest first (entries equal to ``x`` skipped) while their cumulative target mass stays
    ``<= delta``. Moving that mass onto ``x`` changes ``p`` by exactly that mass in total variation."""
    p = p.double()
    members, moved = [x], 0.0
    for y in (int(v) for v in neighbors):
        if y == x:
            continue
        moved += float(p[y])
        if moved > delta:
            break
        members.append(y)
    return members


def lantern_accept_reference(
    draft_token_ids: torch.Tensor,
    draft_probs: Optional[torch.Tensor],
    target_probs: torch.Tensor,
    neighbors: torch.Tensor,
    delta: float,
    num_draft_tokens: Optional[torch.Tensor] = None,
    seed: int = 0,
    offset: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """What ``fastar.lantern_accept`` must return for this seed (valid inputs only): the documented algorithm
    with its numbers (the proximity set and its masses in 2^-40 fixed point, the chain op's random numbers and
    residual sampling)."""
    table = neighbors.cpu().tolist()
    budget = round(delta * _FIXED_SCALE)

    def accepts(b, i, x, u, p_all, q_all):
        p_fixed = _fixed(p_all[b, i])
        q_fixed = [_FIXED_SCALE if t == x else 0 for t in range(len(p_fixed))] if q_all is None else _fixed(
            q_all[b, i])
        members, moved = [x], 0
        for y in table[x]:
            if y == x:
                continue
            moved += p_fixed[y]
            if moved > budget:
                break
            members.append(y)
        p_mass, q_mass = sum(p_fixed[t] for t in members), sum(q_fixed[t] for t in members)
        return u * float(q_mass) < float(p_mass)

    return _chain_reference(draft_token_ids, draft_probs, target_probs, num_draft_tokens, seed, offset, accepts)


def _relaxed_first_token_distribution(p, q, draft, group_of) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(accept, out)`` of a relaxed chain test at one position in float64: draft ``x`` is accepted with
    probability ``min(1, p(S) / q(S))`` for ``S = group_of(x)``, a rejection draws from ``norm(max(0, p - q))``
    (``norm(p)`` if that is empty); ``out`` is the emitted token's law with ``x ~ q`` (``q`` one-hot at ``draft``
    when None)."""
    p = p.double()
    vocab = p.shape[0]
    if q is None:
        q = torch.zeros(vocab, dtype=torch.float64)
        q[draft] = 1.0
    q = q.double()
    accept = torch.zeros(vocab, dtype=torch.float64)
    for x in range(vocab):
        members = group_of(x)
        p_a, q_a = float(p[members].sum()), float(q[members].sum())
        accept[x] = 1.0 if p_a >= q_a else p_a / q_a
    residual = (p - q).clamp_min(0)
    if residual.sum() == 0:
        residual = p
    out = q * accept + float((q * (1 - accept)).sum()) * residual / residual.sum()
    return accept, out


def lantern_first_token_distribution(
    p: torch.Tensor, q: Optional[torch.Tensor], neighbors: torch.Tensor, delta: float, draft: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The paper's formula in float64 for one position: ``(accept, out)`` where ``accept[x] = min(1, p(A(x)) /
    q(A(x)))`` is the acceptance probability of draft ``x`` and ``out`` [V] the distribution of the token
    emitted there when the draft is sampled from ``q`` (or is ``draft`` with ``q`` one-hot when ``q`` is None):
    accepted drafts, plus rejections resampled from ``norm(max(0, p - q))`` (``norm(p)`` if that is empty)."""
    return _relaxed_first_token_distribution(
        p, q, draft, lambda x: lantern_proximity_set(p, x, neighbors[x].tolist(), delta))


def gsd_group(
    p: torch.Tensor, x: int, embeddings: torch.Tensor, group_above: int = 6, group_below: int = 7,
    prob_threshold: float = 0.15, dist_threshold: float = 0.5,
) -> List[int]:
    """GSD's group of draft ``x`` under the target row ``p`` [V] (float64; docs/acceptance.md): ``x``, then the
    ``group_above`` tokens ranked just above ``x`` (nearest first) and the ``group_below`` just below, in the order
    of a stable descending sort of ``p`` (ties: the smaller id first), keeping those with ``|p(t) - p(x)| <
    prob_threshold`` and ``||e_t - e_x||^2 < dist_threshold``."""
    p = p.double()
    e = embeddings.double()
    order = sorted(range(p.shape[0]), key=lambda t: (-float(p[t]), t))
    r = order.index(x)
    window = order[max(0, r - group_above):r][::-1] + order[r + 1:r + 1 + group_below]
    members = [x]
    for t in window:
        close = abs(float(p[t]) - float(p[x])) < prob_threshold
        if close and float(((e[t] - e[x]) ** 2).sum()) < dist_threshold:
            members.append(t)
    return members


def gsd_accept_reference(
    draft_token_ids: torch.Tensor,
    draft_probs: Optional[torch.Tensor],
    target_probs: torch.Tensor,
    embeddings: torch.Tensor,
    group_above: int = 6,
    group_below: int = 7,
    prob_threshold: float = 0.15,
    dist_threshold: float = 0.5,
    num_draft_tokens: Optional[torch.Tensor] = None,
    seed: int = 0,
    offset: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """What ``fastar.gsd_accept`` must return for this seed (valid inputs only): the group of ``gsd_group``, its
    masses in 2^-40 fixed point, the chain op's random numbers and residual sampling."""

    def accepts(b, i, x, u, p_all, q_all):
        members = gsd_group(p_all[b, i], x, embeddings, group_above, group_below, prob_threshold, dist_threshold)
        p_mass = sum(_fixed(p_all[b, i, members]))
        q_mass = _FIXED_SCALE if q_all is None else sum(_fixed(q_all[b, i, members]))
        return u * float(q_mass) < float(p_mass)

    return _chain_reference(draft_token_ids, draft_probs, target_probs, num_draft_tokens, seed, offset, accepts)


def gsd_first_token_distribution(
    p: torch.Tensor, q: Optional[torch.Tensor], embeddings: torch.Tensor, draft: Optional[int] = None, **group_args
) -> Tuple[torch.Tensor, torch.Tensor]:
    """GSD's formula in float64 for one position, as :func:`lantern_first_token_distribution` with the group of
    :func:`gsd_group` (``group_args``: its thresholds and window sizes)."""
    return _relaxed_first_token_distribution(p, q, draft, lambda x: gsd_group(p, x, embeddings, **group_args))


def sjd_accept_reference(
    draft_token_ids: torch.Tensor,
    draft_probs: Optional[torch.Tensor],
    target_probs: torch.Tensor,
    num_draft_tokens: Optional[torch.Tensor] = None,
    seed: int = 0,
    offset: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ``fastar.sjd_accept`` must return for this seed (valid inputs only): speculative_sample's tokens, then
    after a rejection at ``j < k`` positions ``j+1..k`` drawn from their own target rows with the sampling bits of
    ``(row, position)``, and the target probability of each drawn token."""
    tokens, num_accepted = speculative_sample_reference(
        draft_token_ids, draft_probs, target_probs, num_draft_tokens, seed, offset)
    batch, n = draft_token_ids.shape
    next_drafts = torch.full((batch, n), -1, dtype=torch.int32)
    next_probs = torch.zeros(batch, n, dtype=torch.float32)
    p_all = target_probs.float().cpu()
    for b in range(batch):
        k = n if num_draft_tokens is None else int(num_draft_tokens[b])
        j = int(num_accepted[b])
        for m, pos in enumerate(range(j + 1, k + 1) if j < k else []):
            _, bits = _draws(seed, offset, b, pos)
            t = _sample_fixed(_fixed(p_all[b, pos]), bits)
            next_drafts[b, m] = t
            next_probs[b, m] = p_all[b, pos, t]
    return tokens, num_accepted, next_drafts, next_probs


def speculative_output_distribution(
    target_probs: torch.Tensor,
    draft_probs: Optional[torch.Tensor] = None,
    draft_token_ids: Optional[Sequence[int]] = None,
) -> Dict[Tuple[int, ...], float]:
    """Exact probability of every token sequence speculative sampling can emit for one row, in float64.

    With ``draft_probs`` ``[k, V]`` the drafts are taken as sampled from ``q``; without, ``draft_token_ids``
    are fixed and ``q`` is one-hot at them. ``target_probs`` is ``[k+1, V]`` (rows need not be normalised
    for p, but are treated as distributions).
    """
    p = target_probs.double()
    k = p.shape[0] - 1
    vocab = p.shape[1]
    if draft_probs is not None:
        q = draft_probs.double()
    else:
        q = torch.zeros(k, vocab, dtype=torch.float64)
        q[torch.arange(k), torch.as_tensor(list(draft_token_ids), dtype=torch.long)] = 1.0
    out: Dict[Tuple[int, ...], float] = {}
    accept_mass = torch.minimum(p[:k], q)  # P(draft = x and accepted) at each position
    residual = (p[:k] - q).clamp_min(0)  # P(rejected and the residual token = t) at each position
    for m in range(k + 1):
        for prefix in itertools.product(range(vocab), repeat=m):
            prob_prefix = 1.0
            for i, x in enumerate(prefix):
                prob_prefix *= float(accept_mass[i, x])
            if prob_prefix == 0.0:
                continue
            last = p[m] / p[m].sum() if m == k else residual[m]
            for t in range(vocab):
                value = prob_prefix * float(last[t])
                if value > 0:
                    out[prefix + (t,)] = out.get(prefix + (t,), 0.0) + value
    return out


def greedy_verify_reference(
    draft_token_ids: torch.Tensor,
    target_logits: torch.Tensor,
    num_draft_tokens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """vLLM's greedy rule, one position at a time (ties: the smallest token id)."""
    batch, n = draft_token_ids.shape
    tokens = torch.full((batch, n + 1), -1, dtype=torch.int32)
    num_accepted = torch.zeros(batch, dtype=torch.int32)
    for b in range(batch):
        k = n if num_draft_tokens is None else int(num_draft_tokens[b])
        for i in range(k + 1):
            best = int(torch.argmax(target_logits[b, i].double()))
            tokens[b, i] = best
            if i == k or best != int(draft_token_ids[b, i]):
                num_accepted[b] = i
                break
    return tokens, num_accepted
