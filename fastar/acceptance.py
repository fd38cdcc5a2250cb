"""Parallel token acceptance: speculative (rejection) sampling and greedy verification of a chain of drafts.

Conventions (shared with FlashInfer's ``chain_speculative_sampling`` and vLLM's ``RejectionSampler``):

* ``tokens`` is int32 ``[B, n+1]``: the accepted drafts, then one token sampled by the target (the
  residual token at the first rejection, or the bonus token when every draft was accepted), then ``-1``
  padding. ``num_accepted`` is int32 ``[B]``: accepted drafts, the extra token not counted. Row ``b``
  emits ``num_accepted[b] + 1`` tokens.
* Randomness comes from Philox4x32-10 keyed by ``(seed, offset, row, position)``: the same seed gives
  identical tokens on the CPU, the SIMT emulation and CUDA. Advance ``offset`` between steps.

Invalid values (a draft id outside ``[0, V)``, ``num_draft_tokens`` outside ``[0, n]``, a NaN, negative or
> 1 probability, a NaN logit, a row with no probability mass) are detected inside the kernels, without a
host synchronisation. Which values are checked: every draft id, the target/draft probabilities of every
draft token, and every element of the row a token is sampled from (the kernels read no others).

* CPU: the op raises ``IndexError`` (bad token id) or ``ValueError`` naming the first bad row.
* CUDA: raising would need a device sync, so the kernel marks the row instead: all its tokens are ``-1``
  and ``num_accepted[b] = -status`` (a negative number; ``status`` is a bit set: 1 bad num_draft_tokens,
  2 bad token id, 4 bad value, 8 zero mass, 16 malformed tree). Call :func:`check_rows` to raise for such
  rows, or turn on :func:`set_debug_checks` (or ``FASTAR_DEBUG_CHECKS=1``): then every input element is
  validated before the launch and marked rows raise after it, at the cost of a sync.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from . import _common
from ._common import (
    INT32_MAX,
    as_int,
    check,
    fake,
    index_tensor,
    narrow_int32,
    no_grad,
    one_device,
    philox_args,
    same_device,
)
from .masks import Tree

__all__ = [
    "check_rows", "compact_kv", "debug_checks_enabled", "greedy_verify", "gsd_accept", "lantern_accept",
    "set_debug_checks", "sjd_accept", "spectr_accept", "speculative_sample", "tree_greedy_verify",
    "tree_speculative_sample", "typical_accept",
]

_debug_checks = os.environ.get("FASTAR_DEBUG_CHECKS", "0") == "1"


def set_debug_checks(enabled: bool) -> None:
    """Validate every input value before each acceptance op and raise for marked rows after it, and raise for
    marked tokens after each fastar.sample_cfg (syncs)."""
    global _debug_checks
    _debug_checks = bool(enabled)


def debug_checks_enabled() -> bool:
    return _debug_checks


def describe_status(status: int) -> str:
    """What a marked row's status (``-num_accepted``) means; the texts are the kernels' own."""
    from . import _C

    return _C.describe_status(int(status))


def check_rows(num_accepted: torch.Tensor, op: str = "fastar") -> None:
    """Raise if any row was marked invalid by a kernel (``num_accepted < 0``). Synchronises on CUDA."""
    bad = torch.nonzero(num_accepted < 0).flatten()
    if bad.numel():
        row = int(bad[0])
        status = -int(num_accepted[row])
        exc = IndexError if status & 2 else ValueError
        raise exc(f"{op}: invalid input in batch row {row}: {describe_status(status)}")


def _validate_values(op, draft_token_ids, rows, num_draft_tokens, probabilities, draft_probs=None):
    """Full validation for debug mode, in plain PyTorch (reads every element a row uses)."""
    n, vocab = draft_token_ids.shape[1], rows.shape[-1]
    if num_draft_tokens is not None and ((num_draft_tokens < 0) | (num_draft_tokens > n)).any():
        raise ValueError(f"{op}: num_draft_tokens outside [0, {n}]")
    bad_ids = (draft_token_ids < 0) | (draft_token_ids >= vocab)
    if num_draft_tokens is not None:  # positions past a row's length are padding (vLLM pads with -1)
        positions = torch.arange(n, device=draft_token_ids.device)
        bad_ids &= positions < num_draft_tokens.unsqueeze(1)
    if bad_ids.any():
        raise IndexError(f"{op}: a draft token id outside [0, {vocab})")
    if probabilities:
        for name, t in (("target_probs", rows), ("draft_probs", draft_probs)):
            if t is not None and not ((t >= 0) & (t <= 1)).all():
                raise ValueError(f"{op}: {name} holds a value that is NaN, negative or greater than 1")
    elif torch.isnan(rows).any():
        raise ValueError(f"{op}: target_logits holds a NaN")


def _check_devices(op: str, rows_name: str, rows, **tensors) -> None:
    """TypeError unless the probability/logit rows are a tensor; ValueError unless every input is on its device."""
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"{op}: {rows_name} must be a tensor, got {type(rows).__name__}")
    same_device(op, rows.device, **tensors)


def speculative_sample(
    draft_token_ids: torch.Tensor,
    draft_probs: Optional[torch.Tensor],
    target_probs: torch.Tensor,
    *,
    num_draft_tokens: Optional[torch.Tensor] = None,
    seed: Optional[int | torch.Tensor] = None,
    offset: int | torch.Tensor = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact speculative sampling of a chain of drafts (Leviathan et al. 2023; Chen et al. 2023).

    For ``i = 0..k-1`` draft ``x_i`` is accepted iff ``u_i <= p_i(x_i) / q_i(x_i)``; at the first rejection
    a token is sampled from ``norm(max(0, p_i - q_i))``, and if every draft was accepted a bonus token is
    sampled from ``p_k``. The emitted tokens are distributed exactly as sampling the target one token at a
    time (when the drafts were sampled from ``q``).

    Args:
        draft_token_ids: int32/int64 ``[B, n]``, the drafted tokens.
        draft_probs: float ``[B, n, V]``, the draft distribution ``q`` at each draft position, or ``None``
            when the drafter gives no probabilities (n-gram, EAGLE-2/3): ``q`` is then one-hot at the draft,
            a draft is accepted with probability ``p(x)`` and the residual is ``p`` without ``x``.
        target_probs: float ``[B, n+1, V]``, the target distribution ``p`` at each position (the last row
            is the bonus distribution). float32, float16 or bfloat16 (the same dtype as ``draft_probs``).
            Rows should sum to 1; they are renormalised when sampled.
        num_draft_tokens: optional int ``[B]``: row ``b`` uses only its first ``k_b <= n`` drafts and
            ``target_probs[b, k_b]`` as its bonus distribution (ragged batches).
        seed: int or int64 scalar tensor (on the CPU or the inputs' device; a device tensor is read by the
            kernel, so CUDA graphs can replay with new values). ``None`` draws one from torch's default
            generator of the inputs' device.
        offset: int or int64 scalar tensor, advanced by the caller between decoding steps.

    Returns:
        ``(tokens, num_accepted)``: int32 ``[B, n+1]`` with -1 padding, and int32 ``[B]``.

    Probabilities are compared in float64 and sampled by an exact fixed-point (2^-40) inverse CDF, so
    results do not depend on the backend's summation order. See the module docs for error reporting.
    """
    op = "fastar.speculative_sample"
    _check_devices(op, "target_probs", target_probs, draft_token_ids=draft_token_ids, draft_probs=draft_probs,
                   num_draft_tokens=num_draft_tokens)
    seed_t, offset_t = philox_args(op, seed, offset, target_probs.device)
    if _debug_checks:
        _validate_values(op, draft_token_ids, target_probs, num_draft_tokens, True, draft_probs)
    tokens, num_accepted = _common.ops().speculative_sample(
        draft_token_ids, draft_probs, target_probs, num_draft_tokens, seed_t, offset_t
    )
    if _debug_checks:
        check_rows(num_accepted, op)
    return tokens, num_accepted


def _acceptance_outputs(draft_token_ids: torch.Tensor, rows: torch.Tensor):
    """The fake outputs of an acceptance op: ``(tokens, num_accepted)`` of its ``[B, n]`` drafts."""
    torch._check(draft_token_ids.dim() == 2, lambda: "draft_token_ids must be 2-D [B, n]")
    torch._check(rows.dim() == 3, lambda: "the probability/logit rows must be 3-D [B, n+1, V]")
    batch, n = draft_token_ids.shape
    tokens = rows.new_empty((batch, n + 1), dtype=torch.int32)
    num_accepted = rows.new_empty((batch,), dtype=torch.int32)
    return tokens, num_accepted


@fake("speculative_sample")
def _speculative_sample_fake(draft_token_ids, draft_probs, target_probs, num_draft_tokens, seed, offset):
    one_device("speculative_sample", draft_token_ids, draft_probs, target_probs, num_draft_tokens)
    return _acceptance_outputs(draft_token_ids, target_probs)


def lantern_accept(
    draft_token_ids: torch.Tensor,
    draft_probs: Optional[torch.Tensor],
    target_probs: torch.Tensor,
    neighbors: torch.Tensor,
    *,
    delta: float,
    num_draft_tokens: Optional[torch.Tensor] = None,
    seed: Optional[int | torch.Tensor] = None,
    offset: int | torch.Tensor = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """LANTERN's relaxed speculative sampling of a chain of image tokens (Jang et al., ICLR 2025; lossy).

    Draft ``x_i`` is tested against its latent proximity set ``A``: ``x_i`` itself plus the longest prefix of
    ``neighbors[x_i]`` whose target mass ``sum p_i(x')`` stays ``<= delta`` (so moving that mass onto ``x_i``
    changes ``p_i`` by at most ``delta`` in total variation). It is accepted iff ``u_i <= p_i(A) / q_i(A)``
    (``q_i(A) = 1`` without draft probabilities); at the first rejection a token is sampled from
    ``norm(max(0, p_i - q_i))`` as in :func:`speculative_sample`, and if every draft was accepted a bonus token
    from ``p_k``. A neighbour of zero target mass costs nothing and joins ``A``; so ``delta = 0`` is exactly
    :func:`speculative_sample` for the same seed without draft probabilities, or where ``p`` has no zeros.
    docs/acceptance.md ("LANTERN") has the reading of the paper and the choices it leaves open.

    Args:
        draft_token_ids, draft_probs, target_probs, num_draft_tokens, seed, offset: as :func:`speculative_sample`.
        neighbors: int32/int64 ``[V, k]`` on the inputs' device: row ``t`` lists the ``k`` codebook tokens
            nearest to ``t`` in latent space, nearest first. An entry equal to ``t`` is skipped, so a top-k
            search that returns ``t`` itself can be passed as it is. Entries of a row should be distinct.
        delta: the total-variation budget, in ``[0, 1]``.

    Returns:
        ``(tokens, num_accepted)`` as :func:`speculative_sample`. Every entry of a draft's neighbour row is
        validated: an id outside ``[0, V)`` is reported as a bad token id (status 2), a NaN, negative or > 1
        probability there as a bad value (status 4), as described in the module docs.
    """
    op = "fastar.lantern_accept"
    _check_devices(op, "target_probs", target_probs, draft_token_ids=draft_token_ids, draft_probs=draft_probs,
                   neighbors=neighbors, num_draft_tokens=num_draft_tokens)
    seed_t, offset_t = philox_args(op, seed, offset, target_probs.device)
    if _debug_checks:
        _validate_values(op, draft_token_ids, target_probs, num_draft_tokens, True, draft_probs)
        if neighbors.numel() and ((neighbors < 0) | (neighbors >= target_probs.shape[-1])).any():
            raise IndexError(f"{op}: a neighbour id outside [0, {target_probs.shape[-1]})")
    tokens, num_accepted = _common.ops().lantern_accept(
        draft_token_ids, draft_probs, target_probs, neighbors, float(delta), num_draft_tokens, seed_t, offset_t
    )
    if _debug_checks:
        check_rows(num_accepted, op)
    return tokens, num_accepted


@fake("lantern_accept")
def _lantern_accept_fake(draft_token_ids, draft_probs, target_probs, neighbors, delta, num_draft_tokens, seed, offset):
    one_device("lantern_accept", draft_token_ids, draft_probs, target_probs, neighbors, num_draft_tokens)
    return _acceptance_outputs(draft_token_ids, target_probs)


def gsd_accept(
    draft_token_ids: torch.Tensor,
    draft_probs: Optional[torch.Tensor],
    target_probs: torch.Tensor,
    embeddings: torch.Tensor,
    *,
    group_above: int = 6,
    group_below: int = 7,
    prob_threshold: float = 0.15,
    dist_threshold: float = 0.5,
    num_draft_tokens: Optional[torch.Tensor] = None,
    seed: Optional[int | torch.Tensor] = None,
    offset: int | torch.Tensor = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Grouped speculative decoding of a chain of image tokens (So et al., ICCV 2025, "GSD"; lossy).

    Draft ``x_i`` is tested with its group ``G``: ``x_i`` plus those of its ranking neighbours in ``p_i`` (the
    ``group_above`` tokens ranked just above it and the ``group_below`` just below, ranked by probability, ties by
    the smaller id) with ``|p_i(t) - p_i(x_i)| < prob_threshold`` and ``||e_t - e_x||^2 < dist_threshold``. It is
    accepted iff ``u_i <= p_i(G) / q_i(G)`` (``q_i(G) = 1`` without draft probabilities); at the first rejection a
    token is sampled from ``norm(max(0, p_i - q_i))`` as in :func:`speculative_sample`, and if every draft was
    accepted a bonus token from ``p_k``. The defaults are the authors' code (docs/acceptance.md, "GSD").

    Args:
        draft_token_ids, draft_probs, target_probs, num_draft_tokens, seed, offset: as :func:`speculative_sample`.
        embeddings: float32 ``[V, d]`` on the inputs' device, the token embeddings distances are taken in (the
            authors use the target model's input embedding table of the image tokens; a VQ codebook works too).
            A NaN embedding puts no token in the draft's group.
        group_above, group_below: ranking neighbours taken above and below the draft, each in ``[0, 16]``.
        prob_threshold, dist_threshold: ``>= 0`` (``inf`` turns a filter off); the group's members differ from
            ``p_i(x_i)`` by less than ``prob_threshold`` and lie within squared distance ``dist_threshold``.

    Returns:
        ``(tokens, num_accepted)`` as :func:`speculative_sample`. Every value of a draft's target row is read
        (to rank it) and validated; ``q`` is validated at the group's members.
    """
    op = "fastar.gsd_accept"
    _check_devices(op, "target_probs", target_probs, draft_token_ids=draft_token_ids, draft_probs=draft_probs,
                   embeddings=embeddings, num_draft_tokens=num_draft_tokens)
    seed_t, offset_t = philox_args(op, seed, offset, target_probs.device)
    if _debug_checks:
        _validate_values(op, draft_token_ids, target_probs, num_draft_tokens, True, draft_probs)
    tokens, num_accepted = _common.ops().gsd_accept(
        draft_token_ids, draft_probs, target_probs, embeddings, int(group_above), int(group_below),
        float(prob_threshold), float(dist_threshold), num_draft_tokens, seed_t, offset_t
    )
    if _debug_checks:
        check_rows(num_accepted, op)
    return tokens, num_accepted


@fake("gsd_accept")
def _gsd_accept_fake(draft_token_ids, draft_probs, target_probs, embeddings, group_above, group_below,
                     prob_threshold, dist_threshold, num_draft_tokens, seed, offset):
    one_device("gsd_accept", draft_token_ids, draft_probs, target_probs, embeddings, num_draft_tokens)
    return _acceptance_outputs(draft_token_ids, target_probs)


def sjd_accept(
    draft_token_ids: torch.Tensor,
    draft_probs: Optional[torch.Tensor],
    target_probs: torch.Tensor,
    *,
    num_draft_tokens: Optional[torch.Tensor] = None,
    seed: Optional[int | torch.Tensor] = None,
    offset: int | torch.Tensor = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of speculative Jacobi decoding (Teng et al. 2024, "SJD"): acceptance and the Jacobi refresh.

    The window's drafts ``x_0..x_{k-1}`` are verified by one forward of the target, which gives ``p_i`` at each
    position (conditioned on the drafts before it) and the bonus row ``p_k``. Draft ``x_i`` is accepted iff
    ``u_i <= p_i(x_i) / q_i(x_i)`` where ``q_i`` is the distribution the draft was sampled from at the previous
    Jacobi iteration; at the first rejection ``j`` a token is sampled from ``norm(max(0, p_j - q_j))``, and if every
    draft was accepted a bonus token from ``p_k``: exactly :func:`speculative_sample`'s ``tokens`` and
    ``num_accepted`` for the same seed. Then (after a rejection) positions ``j+1..k`` get new drafts sampled from
    their own ``p_i``: the next iteration's drafts, ``q`` there being that ``p_i``.

    Args:
        draft_token_ids, target_probs, num_draft_tokens, seed, offset: as :func:`speculative_sample`.
        draft_probs: float ``[B, n, V]``: row ``i`` is the ``p`` that drafted ``x_i`` at the previous iteration
            (``target_probs[b, j + 1 + m]`` of the previous call for its ``next_drafts[b, m]``), and a one-hot row
            at ``x_i`` for a token initialised at random; ``None``: every row one-hot (the first iteration).

    Returns:
        ``(tokens, num_accepted, next_drafts, next_probs)``: ``tokens`` int32 ``[B, n+1]`` and ``num_accepted``
        int32 ``[B]`` as :func:`speculative_sample`; ``next_drafts`` int32 ``[B, n]``: slot ``m`` holds the new
        draft of position ``j + 1 + m`` (``j = num_accepted[b]``) for ``m < k - j``, then ``-1``; all ``-1`` when
        every draft was accepted. ``next_probs`` float32 ``[B, n]``: ``p_{j+1+m}`` at that draft (its ``q`` in
        the next test), ``0`` where ``next_drafts`` is ``-1``. A marked row (CUDA) has all ``-1`` and ``0``.
        Randomness: the refresh of position ``i`` uses the sampling bits of ``(row, i)``, which no other token
        of the step uses. docs/acceptance.md ("SJD") has the iteration written out.
    """
    op = "fastar.sjd_accept"
    _check_devices(op, "target_probs", target_probs, draft_token_ids=draft_token_ids, draft_probs=draft_probs,
                   num_draft_tokens=num_draft_tokens)
    seed_t, offset_t = philox_args(op, seed, offset, target_probs.device)
    if _debug_checks:
        _validate_values(op, draft_token_ids, target_probs, num_draft_tokens, True, draft_probs)
    outputs = _common.ops().sjd_accept(draft_token_ids, draft_probs, target_probs, num_draft_tokens, seed_t, offset_t)
    if _debug_checks:
        check_rows(outputs[1], op)
    return outputs


@fake("sjd_accept")
def _sjd_accept_fake(draft_token_ids, draft_probs, target_probs, num_draft_tokens, seed, offset):
    one_device("sjd_accept", draft_token_ids, draft_probs, target_probs, num_draft_tokens)
    tokens, num_accepted = _acceptance_outputs(draft_token_ids, target_probs)
    batch, n = draft_token_ids.shape
    next_drafts = target_probs.new_empty((batch, n), dtype=torch.int32)
    next_probs = target_probs.new_empty((batch, n), dtype=torch.float32)
    return tokens, num_accepted, next_drafts, next_probs
def spectr_accept(
    draft_token_ids: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    *,
    seed: Optional[int | torch.Tensor] = None,
    offset: int | torch.Tensor = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SpecTr's K-SEQ over ``k`` i.i.d. drafts of length ``n`` (Sun et al., NeurIPS 2023; exact: the emitted
    tokens follow the target).

    Level ``t`` looks at the drafts that agree with the tokens emitted so far (``k_t`` of them, i.i.d. from
    ``q(. | prefix)``). With ``beta(rho) = sum_x min(q(x), p(x) / rho)`` and ``rho*`` the smallest ``rho >= 1``
    with ``1 - (1 - beta)^k_t <= rho beta``, candidate ``X`` is accepted with probability
    ``min(1, p(X) / (rho* q(X)))``, in index order; the first accepted one is emitted and the drafts that carry it
    go on to level ``t + 1``. If none is accepted a token is sampled from the residual
    ``norm(p - min(q, p / rho*) P(accept) / beta)`` and the row stops; after ``n`` accepted levels a bonus token is
    sampled from ``p``. ``k = 1`` is :func:`speculative_sample` (same tokens for the same seed). docs/acceptance.md
    ("SpecTr") has the solve of ``rho*`` and the random numbers.

    Args:
        draft_token_ids: int32/int64 ``[B, k, n]``, ``1 <= k <= 64`` drafts per row.
        draft_probs: float ``[B, k, n, V]``: row ``t`` of draft ``j`` is ``q`` after draft ``j``'s first ``t``
            tokens (drafts that share that prefix share the row; the lowest such draft's row is read).
        target_probs: float ``[B, k, n+1, V]`` of the same dtype: ``p`` at the same nodes, row ``n`` after the whole
            draft. Rows should sum to 1 (rho* is solved with the values as given).
        seed, offset: as :func:`speculative_sample`.

    Returns:
        ``(draft_index, tokens, num_accepted)``: int32 ``[B]``, the lowest draft whose first ``num_accepted``
        tokens were accepted (its target rows and KV cache are the ones to keep); int32 ``[B, n+1]`` with -1 padding;
        int32 ``[B]``. Invalid inputs are reported as the module docs say (``draft_index`` is -1 in a marked row):
        every draft id is checked; the probabilities read are those of the visited nodes (whole rows where
        ``k_t >= 2`` or a token is sampled, ``p(X)`` and ``q(X)`` of tested candidates otherwise).
    """
    op = "fastar.spectr_accept"
    _check_devices(op, "target_probs", target_probs, draft_token_ids=draft_token_ids, draft_probs=draft_probs)
    seed_t, offset_t = philox_args(op, seed, offset, target_probs.device)
    if _debug_checks:
        if draft_token_ids.dim() == 3:
            _validate_values(op, draft_token_ids.flatten(1), target_probs.flatten(1, 2), None, True,
                             draft_probs.flatten(1, 2) if draft_probs.dim() == 4 else draft_probs)
    draft_index, tokens, num_accepted = _common.ops().spectr_accept(
        draft_token_ids, draft_probs, target_probs, seed_t, offset_t
    )
    if _debug_checks:
        check_rows(num_accepted, op)
    return draft_index, tokens, num_accepted


@fake("spectr_accept")
def _spectr_accept_fake(draft_token_ids, draft_probs, target_probs, seed, offset):
    one_device("spectr_accept", draft_token_ids, draft_probs, target_probs)
    torch._check(draft_token_ids.dim() == 3, lambda: "draft_token_ids must be 3-D [B, k, n]")
    batch, _, n = draft_token_ids.shape
    draft_index = target_probs.new_empty((batch,), dtype=torch.int32)
    tokens = target_probs.new_empty((batch, n + 1), dtype=torch.int32)
    num_accepted = target_probs.new_empty((batch,), dtype=torch.int32)
    return draft_index, tokens, num_accepted


def greedy_verify(
    draft_token_ids: torch.Tensor,
    target_logits: torch.Tensor,
    *,
    num_draft_tokens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification: accept drafts while they equal ``argmax`` of the target.

    The first mismatching slot holds the target's argmax; a bonus token (argmax of row ``k``) is emitted
    only if every draft matched (vLLM's convention). Ties go to the smallest token id (``torch.argmax``).

    Args:
        draft_token_ids: int32/int64 ``[B, n]``.
        target_logits: float ``[B, n+1, V]`` logits (or probabilities: only the argmax matters);
            float32, float16 or bfloat16. A NaN is an error (see the module docs).
        num_draft_tokens: optional int ``[B]`` for ragged batches, as in :func:`speculative_sample`.

    Returns:
        ``(tokens, num_accepted)``: int32 ``[B, n+1]`` with -1 padding, and int32 ``[B]``.
    """
    op = "fastar.greedy_verify"
    _check_devices(op, "target_logits", target_logits, draft_token_ids=draft_token_ids,
                   num_draft_tokens=num_draft_tokens)
    if _debug_checks:
        _validate_values(op, draft_token_ids, target_logits, num_draft_tokens, False)
    tokens, num_accepted = _common.ops().greedy_verify(draft_token_ids, target_logits, num_draft_tokens)
    if _debug_checks:
        check_rows(num_accepted, op)
    return tokens, num_accepted


@fake("greedy_verify")
def _greedy_verify_fake(draft_token_ids, target_logits, num_draft_tokens=None):
    one_device("greedy_verify", draft_token_ids, target_logits, num_draft_tokens)
    return _acceptance_outputs(draft_token_ids, target_logits)


def _tree_args(op: str, tree, n: int, device: torch.device) -> Tuple[torch.Tensor, int, bool]:
    """(parents [B or 1, n] of the drafted nodes on ``device``, max_depth, root_in_path) for the tree ops."""
    if not isinstance(tree, Tree):
        raise TypeError(f"{op}: tree must be a fastar.masks.Tree, got {type(tree).__name__}")
    parents = tree.parents.reshape(-1, tree.num_nodes)
    levels, rooted_at_0 = tree._acceptance_shape()
    if tree.num_nodes == n:
        return parents.to(device), levels, False
    if tree.num_nodes == n + 1 and rooted_at_0:
        return (parents[:, 1:] - 1).to(device), levels - 1, True
    raise ValueError(
        f"{op}: the tree has {tree.num_nodes} nodes for {n} drafts; it must have N = {n} (the drafted nodes, -1 "
        f"for a child of the root) or N + 1 = {n + 1} with node 0 the only root (the verified token, as "
        "Tree.from_choices and Tree.from_next_links build it)"
    )


def tree_speculative_sample(
    draft_token_ids: torch.Tensor,
    tree: Tree,
    draft_probs: Optional[torch.Tensor],
    target_probs: torch.Tensor,
    *,
    seed: Optional[int | torch.Tensor] = None,
    offset: int | torch.Tensor = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact speculative sampling over a tree of drafts (SpecInfer; EAGLE-1's multi-draft recursion).

    From the root (the last verified token) down: a node's children are tried in increasing node index, child
    ``c`` with token ``x`` accepted iff ``u_c <= p(x) / q_c(x)``; a rejection replaces ``p`` by
    ``norm(max(p - q_c, 0))`` (with ``draft_probs=None``: ``x`` is accepted with probability ``p(x)`` and removed
    from ``p`` on rejection); when every child fails, or at a leaf, a token is drawn from the current ``p``. The
    emitted tokens follow the target exactly when each node's children were drafted i.i.d. from its ``q`` (or,
    one-hot, for any drafts). See docs/acceptance.md, "Draft trees".

    Args:
        draft_token_ids: int32/int64 ``[B, N]``, the drafted nodes' tokens; ``-1`` marks an absent node (ragged
            trees), never tried, nor its subtree.
        tree: a :class:`fastar.masks.Tree` (shared, or batched ``[B, ...]``) of either ``N`` nodes (the drafted
            ones; parent ``-1`` for a child of the root) or ``N + 1`` with node 0 the only root (the attention
            tree of ``Tree.from_choices`` / ``Tree.from_next_links``, whose node ``t + 1`` is drafted node ``t``).
        draft_probs: float ``[B, N, V]``: row ``t`` the distribution node ``t`` was drafted from; or ``None``.
        target_probs: float ``[B, N+1, V]``: row 0 the target's distribution at the root, row ``t + 1`` the one
            after node ``t``; float32, float16 or bfloat16 (the dtype of ``draft_probs``).
        seed, offset: the Philox stream, as in :func:`speculative_sample`.

    Returns:
        ``(path, tokens, num_accepted)``: int32 ``[B, depth + 1]`` each (``depth``: nodes on the tree's deepest
        path, below the root), ``-1`` padded. ``path`` holds the accepted nodes root-side first (in the tree's
        numbering: with a root node it starts with 0); ``tokens`` their tokens then the drawn token;
        ``num_accepted`` int32 ``[B]`` the accepted drafts. On a chain the tokens equal
        :func:`speculative_sample`'s for the same seed and offset. Invalid values raise on the CPU and mark the
        row on CUDA (status 16: a malformed tree), as for :func:`speculative_sample`.
    """
    op = "fastar.tree_speculative_sample"
    _check_devices(op, "target_probs", target_probs, draft_token_ids=draft_token_ids, draft_probs=draft_probs)
    if not isinstance(draft_token_ids, torch.Tensor) or draft_token_ids.dim() != 2:
        raise ValueError(f"{op}: draft_token_ids must be a 2-D tensor [B, N]")
    parents, max_depth, root_in_path = _tree_args(op, tree, draft_token_ids.shape[1], target_probs.device)
    seed_t, offset_t = philox_args(op, seed, offset, target_probs.device)
    if _debug_checks:  # -1 (an absent node) is a valid id here
        _validate_values(op, draft_token_ids.masked_fill(draft_token_ids == -1, 0), target_probs, None, True,
                         draft_probs)
    path, tokens, num_accepted = _common.ops().tree_speculative_sample(
        draft_token_ids, parents, draft_probs, target_probs, max_depth, root_in_path, seed_t, offset_t
    )
    if _debug_checks:
        check_rows(num_accepted, op)
    return path, tokens, num_accepted


@fake("tree_speculative_sample")
def _tree_speculative_sample_fake(draft_token_ids, parents, draft_probs, target_probs, max_depth, root_in_path, seed,
                                  offset):
    one_device("tree_speculative_sample", draft_token_ids, parents, draft_probs, target_probs)
    torch._check(draft_token_ids.dim() == 2, lambda: "draft_token_ids must be 2-D [B, N]")
    batch = draft_token_ids.shape[0]
    path = target_probs.new_empty((batch, max_depth + 1), dtype=torch.int32)
    return path, torch.empty_like(path), target_probs.new_empty((batch,), dtype=torch.int32)


def tree_greedy_verify(
    draft_token_ids: torch.Tensor, tree: Tree, target_logits: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy verification of a tree of drafts: the longest root-to-node path whose every token equals the
    target's argmax after its parent, then the target's argmax after the path's last node.

    A node matches when its parent is the root or matches and its token is ``argmax target_logits[parent + 1]``
    (ties in the argmax: the smallest token id, as ``torch.argmax``). Among matching paths of equal length the
    earlier one wins (siblings in increasing node index), which matters only when siblings repeat a token.

    Args:
        draft_token_ids: int32/int64 ``[B, N]``; ``-1`` marks an absent node, as in
            :func:`tree_speculative_sample`.
        tree: a :class:`fastar.masks.Tree` of ``N`` or ``N + 1`` nodes, as in :func:`tree_speculative_sample`.
        target_logits: float ``[B, N+1, V]`` logits (or probabilities): row 0 at the root, row ``t + 1`` after
            node ``t``; float32, float16 or bfloat16. A NaN in a row the rule reads is an error.

    Returns:
        ``(path, tokens, num_accepted)`` as :func:`tree_speculative_sample` returns them.
    """
    op = "fastar.tree_greedy_verify"
    _check_devices(op, "target_logits", target_logits, draft_token_ids=draft_token_ids)
    if not isinstance(draft_token_ids, torch.Tensor) or draft_token_ids.dim() != 2:
        raise ValueError(f"{op}: draft_token_ids must be a 2-D tensor [B, N]")
    parents, max_depth, root_in_path = _tree_args(op, tree, draft_token_ids.shape[1], target_logits.device)
    if _debug_checks:
        _validate_values(op, draft_token_ids.masked_fill(draft_token_ids == -1, 0), target_logits, None, False)
    path, tokens, num_accepted = _common.ops().tree_greedy_verify(
        draft_token_ids, parents, target_logits, max_depth, root_in_path
    )
    if _debug_checks:
        check_rows(num_accepted, op)
    return path, tokens, num_accepted


@fake("tree_greedy_verify")
def _tree_greedy_verify_fake(draft_token_ids, parents, target_logits, max_depth, root_in_path):
    one_device("tree_greedy_verify", draft_token_ids, parents, target_logits)
    torch._check(draft_token_ids.dim() == 2, lambda: "draft_token_ids must be 2-D [B, N]")
    batch = draft_token_ids.shape[0]
    path = target_logits.new_empty((batch, max_depth + 1), dtype=torch.int32)
    return path, torch.empty_like(path), target_logits.new_empty((batch,), dtype=torch.int32)


def typical_accept(
    draft_token_ids: torch.Tensor,
    target_logits: torch.Tensor,
    *,
    tree: Optional[Tree] = None,
    posterior_threshold: float = 0.09,
    posterior_alpha: float = 0.3,
    temperature: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Medusa's / Hydra's typical acceptance over a chain (``tree=None``) or a tree of drafts.

    A node with token ``x`` passes when its parent is the root or passes and, under ``p = softmax(target_logits
    [parent + 1] / temperature)``, ``p(x) > min(posterior_threshold, posterior_alpha * exp(-H(p)))`` (``H`` the
    entropy; ``temperature == 0``: ``x`` is the argmax). The longest path of passing nodes is accepted (ties: the
    earlier path), then the target's argmax after it. Statistics are float32: a token exactly at its threshold
    may go either way on different backends.

    Args:
        draft_token_ids: int32/int64 ``[B, N]`` (``-1``: an absent node).
        target_logits: float ``[B, N+1, V]``: row 0 at the root, row ``t + 1`` after node ``t``; float32,
            float16 or bfloat16. A NaN in a row the rule reads is an error.
        tree: a :class:`fastar.masks.Tree` as in :func:`tree_speculative_sample`; ``None``: the drafts are a
            chain.
        posterior_threshold, posterior_alpha: Medusa's epsilon and alpha (its defaults), finite and >= 0.
        temperature: >= 0.

    Returns:
        ``(path, tokens, num_accepted)`` as :func:`tree_speculative_sample` returns them (a chain's path is
        ``0, 1, ..., num_accepted - 1``).
    """
    op = "fastar.typical_accept"
    _check_devices(op, "target_logits", target_logits, draft_token_ids=draft_token_ids)
    if not isinstance(draft_token_ids, torch.Tensor) or draft_token_ids.dim() != 2:
        raise ValueError(f"{op}: draft_token_ids must be a 2-D tensor [B, N]")
    n = draft_token_ids.shape[1]
    if tree is None:  # a chain: node t's parent is t - 1
        parents, max_depth, root_in_path = torch.arange(-1, n - 1, device=target_logits.device)[None], n, False
    else:
        parents, max_depth, root_in_path = _tree_args(op, tree, n, target_logits.device)
    if _debug_checks:
        _validate_values(op, draft_token_ids.masked_fill(draft_token_ids == -1, 0), target_logits, None, False)
    path, tokens, num_accepted = _common.ops().typical_accept(
        draft_token_ids, parents, target_logits, max_depth, root_in_path, posterior_threshold, posterior_alpha,
        temperature,
    )
    if _debug_checks:
        check_rows(num_accepted, op)
    return path, tokens, num_accepted


@fake("typical_accept")
def _typical_accept_fake(draft_token_ids, parents, target_logits, max_depth, root_in_path, posterior_threshold,
                         posterior_alpha, temperature):
    one_device("typical_accept", draft_token_ids, parents, target_logits)
    torch._check(draft_token_ids.dim() == 2, lambda: "draft_token_ids must be 2-D [B, N]")
    batch = draft_token_ids.shape[0]
    path = target_logits.new_empty((batch, max_depth + 1), dtype=torch.int32)
    return path, torch.empty_like(path), target_logits.new_empty((batch,), dtype=torch.int32)


def _int32_arg(op: str, value, name: str, device: torch.device, low: int) -> torch.Tensor:
    """An index tensor as int32: CPU values outside ``[low, INT32_MAX]`` raise, device ones are clamped into it (no
    host read), so none wraps around."""
    t = index_tensor(op, value, name, device)
    if t.dtype == torch.int32:
        return t
    check(((t >= low) & (t <= INT32_MAX)).all(), ValueError, f"{op}: {name} holds a value outside [{low}, {INT32_MAX}]")
    return narrow_int32(t, low, INT32_MAX)


def compact_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    path: torch.Tensor,
    num_accepted: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    num_nodes: int,
    root_in_path: bool,
    block_table: Optional[torch.Tensor] = None,
    stacked: bool = False,
) -> torch.Tensor:
    """KV compaction after a tree's acceptance: keep the accepted nodes' K/V at consecutive positions, in place.

    Verification appended the tree's ``num_nodes`` nodes at positions ``cache_seqlens[b] + i`` (node ``i``, as
    :func:`fastar.attention_with_kvcache` with ``k_new`` writes them). Node ``path[b, j]`` moves to position
    ``cache_seqlens[b] + j`` for the kept ``j < num_accepted[b]`` (``+ 1`` with ``root_in_path``: the path then
    starts with the root, node 0, a tree token itself), on the caches' device, with no host synchronisation.

    Args:
        k_cache, v_cache: ``[B, S_max, Hkv, D]`` contiguous caches, or with ``block_table`` paged caches ``[num_pages,
            page_size, Hkv, D]`` (float32, float16, bfloat16, or a quantized cache's int8 / fp8 codes; any trailing
            shape works: a quantized cache's per-token scales ``[B, S_max, Hkv]`` move the same way). One position's
            row must be dense.
        path, num_accepted: the acceptance ops' outputs: int ``[B, depth + 1]``, the accepted nodes root-side first
            (``-1`` padded), and int ``[B]``.
        cache_seqlens: int ``[B]``, the tokens before the tree (as given to the verification's attention).
        num_nodes: the tree's nodes that verification appended.
        root_in_path: whether ``path`` numbers the tree with the root as node 0 (trees of ``N + 1`` nodes, as
            ``Tree.from_choices`` builds them), as the acceptance ops decided from the tree.
        block_table: int ``[B, max_pages]`` of a paged cache (the pages of the tree's positions must be the
            sequence's own).
        stacked: the caches hold every layer, ``[layers, B, S_max, ...]`` or ``[layers, num_pages, page_size, ...]``
            (EAGLE's and Medusa's one buffer for all layers): one call moves every layer's rows.

    Returns:
        int32 ``[B]``, the new lengths ``cache_seqlens + num_accepted (+ 1)``. On the CPU a bad row (``num_accepted``
        outside the path, a kept node outside ``[0, num_nodes)`` or not after the previous one, ``cache_seqlens +
        num_nodes`` past the capacity, a page outside the pool) raises before anything moves. On CUDA the kernel
        leaves such a row untouched and returns ``-status`` as its length (bit 32; a row an acceptance kernel
        marked keeps its ``num_accepted``): :func:`check_rows` raises for it, as do the debug checks.
    """
    # The common call (int32 tensors on the caches' device, as the acceptance ops return them) skips the
    # conversions: this op is a few microseconds, so the checks' own cost shows.
    Tensor, int32 = torch.Tensor, torch.int32
    if not (type(k_cache) is Tensor and type(v_cache) is Tensor and type(path) is Tensor and path.dtype == int32
            and type(num_accepted) is Tensor and num_accepted.dtype == int32 and type(cache_seqlens) is Tensor
            and cache_seqlens.dtype == int32 and type(num_nodes) is int and type(root_in_path) is bool
            and type(stacked) is bool
            and (block_table is None or (type(block_table) is Tensor and block_table.dtype == int32))
            and k_cache.device == v_cache.device == path.device == num_accepted.device == cache_seqlens.device
            and (block_table is None or block_table.device == k_cache.device)
            and not (torch.is_grad_enabled() and (k_cache.requires_grad or v_cache.requires_grad))):
        path, num_accepted, cache_seqlens, block_table, num_nodes = _compact_kv_args(
            k_cache, v_cache, path, num_accepted, cache_seqlens, block_table, num_nodes, root_in_path, stacked)
    new_seqlens = _common.ops().compact_kv(k_cache, v_cache, path, num_accepted, cache_seqlens, block_table,
                                           num_nodes, root_in_path, stacked)
    if _debug_checks:
        check_rows(new_seqlens, "fastar.compact_kv")
    return new_seqlens


def _compact_kv_args(k_cache, v_cache, path, num_accepted, cache_seqlens, block_table, num_nodes, root_in_path,
                     stacked):
    """compact_kv's arguments checked and converted: the index tensors as int32, num_nodes as an int."""
    op = "fastar.compact_kv"
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    device = k_cache.device
    for name, flag in (("root_in_path", root_in_path), ("stacked", stacked)):
        if not isinstance(flag, bool):
            raise TypeError(f"{op}: {name} must be a bool, got {type(flag).__name__}")
    num_nodes = as_int(num_nodes, f"{op}: num_nodes", 1)
    path = _int32_arg(op, path, "path", device, -1)
    num_accepted = _int32_arg(op, num_accepted, "num_accepted", device, -INT32_MAX)
    cache_seqlens = _int32_arg(op, cache_seqlens, "cache_seqlens", device, -1)
    if block_table is not None:
        block_table = _int32_arg(op, block_table, "block_table", device, -1)
    same_device(op, device, v_cache=v_cache, path=path, num_accepted=num_accepted, cache_seqlens=cache_seqlens,
                block_table=block_table)
    no_grad(op, k_cache=k_cache, v_cache=v_cache)
    return path, num_accepted, cache_seqlens, block_table, num_nodes


@fake("compact_kv")
def _compact_kv_fake(k_cache, v_cache, path, num_accepted, cache_seqlens, block_table, num_nodes, root_in_path,
                     stacked=False):
    one_device("compact_kv", k_cache, v_cache, path, num_accepted, cache_seqlens, block_table)
    torch._check(path.dim() == 2, lambda: "path must be 2-D [B, depth + 1]")
    return cache_seqlens.new_empty((path.shape[0],), dtype=torch.int32)
