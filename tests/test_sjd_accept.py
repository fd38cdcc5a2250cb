"""Tests of fastar.sjd_accept, one step of speculative Jacobi decoding (docs/acceptance.md, "SJD"), on every backend.

Oracles: ``sjd_accept_reference`` (the documented algorithm with its random numbers: token for token, refreshed
drafts included) and the target rows themselves (the law of the first emitted token and of each refreshed draft
is p at its position: chi-square). Statistical tests use fixed seeds and reject at p < 1e-3, as in
test_speculative_sample.py.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

import fastar
from fastar import _common
from fastar.reference import sjd_accept_reference, speculative_sample_reference
from helpers import assert_same, chisquare_pvalue, rows
from test_speculative_sample import FLOAT_DTYPES, make_case, random_probs, simt_backend_or_skip

P_THRESHOLD = 1e-3
WINDOW = 16  # the paper's window


def assert_same_sjd(got, want, msg=""):
    assert_same(got[:2], want[:2], msg)
    next_drafts, next_probs = got[2:]
    assert next_drafts.dtype == torch.int32 and next_probs.dtype == torch.float32
    assert torch.equal(next_drafts, want[2]), f"{msg} next_drafts differ"
    assert torch.equal(next_probs, want[3]), f"{msg} next_probs differ"


# ----------------------------------------------------------------------------------------------------
# token-exact against the reference
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("with_q", [True, False], ids=["q", "no_q"])
@pytest.mark.parametrize("ragged", [None, torch.int32], ids=["full", "ragged"])
def test_matches_reference(backend, dtype, with_q, ragged):
    gen = torch.Generator().manual_seed(1)
    drafts, q, p, num_draft = make_case(gen, 24, WINDOW, 40, dtype=dtype, with_q=with_q, ragged=ragged)
    got = backend.sjd_accept(drafts, q, p, num_draft_tokens=num_draft, seed=3, offset=5)
    want = sjd_accept_reference(drafts, q, p, num_draft, seed=3, offset=5)
    assert_same_sjd(got, want, f"{dtype} with_q={with_q}")
    # the refresh happened where the reference says: some rows rejected early, some accepted everything
    refreshed = (want[2] >= 0).sum(-1)
    assert refreshed.max() > 1 and (refreshed == 0).any()


def test_tokens_are_speculative_sample(backend):
    # The acceptance part is speculative_sample's, for the same seed; next_probs is p at the refreshed draft.
    gen = torch.Generator().manual_seed(2)
    drafts, q, p, _ = make_case(gen, 32, WINDOW, 64)
    tokens, num_accepted, next_drafts, next_probs = backend.sjd_accept(drafts, q, p, seed=11, offset=1)
    assert_same((tokens, num_accepted), backend.speculative_sample(drafts, q, p, seed=11, offset=1))
    for b in range(32):
        j = int(num_accepted[b])
        count = WINDOW - j if j < WINDOW else 0
        assert (next_drafts[b, count:] == -1).all() and (next_probs[b, count:] == 0).all()
        for m in range(count):
            assert next_probs[b, m] == p[b, j + 1 + m, int(next_drafts[b, m])] > 0


def test_jacobi_iteration_converges(backend):
    # The documented loop: the next call's drafts are next_drafts (plus new random tokens), its draft_probs the
    # previous call's target rows at those positions. With a target that ignores the context (the same rows at
    # every iteration), a refreshed draft was sampled from its own p, so with q = p it is always accepted: the
    # second call accepts every refreshed draft. Half of p's entries are 0, so a draft paired with another
    # position's row would often be rejected.
    gen = torch.Generator().manual_seed(3)
    batch, vocab = 8, 30
    p = random_probs(gen, (batch, WINDOW + 1, vocab), sparsity=0.5, sharpness=2.0).float()
    drafts = torch.randint(0, vocab, (batch, WINDOW), generator=gen)
    _, num_accepted, next_drafts, _ = backend.sjd_accept(drafts, None, p, seed=1)
    for b in range(batch):
        j = int(num_accepted[b])
        if j == WINDOW:
            continue
        count = WINDOW - j
        rows_b = p[b : b + 1, j + 1 :]  # positions j+1..k: the refreshed drafts' p (and the next step's target)
        q_next = rows_b[:, : count - 1] if count > 1 else rows_b[:, :0]
        d_next = next_drafts[b : b + 1, : count - 1].long()
        tokens, accepted, _, _ = backend.sjd_accept(d_next, q_next, rows_b[:, :count], seed=2)
        assert int(accepted[0]) == count - 1 and torch.equal(tokens[0, : count - 1], d_next[0].int())


# ----------------------------------------------------------------------------------------------------
# exactness: the emitted token and the refreshed drafts follow the target
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_q", [True, False], ids=["q", "one_hot"])
def test_first_token_follows_target(backend, with_q):
    # Drafts sampled from q (the previous iteration's p), or fixed tokens initialised at random (one-hot q): the
    # first emitted token is distributed as p_now at that position.
    vocab = 12
    N = rows(backend, 60_000, 1_500)
    gen = torch.Generator().manual_seed(4)
    p = random_probs(gen, (3, vocab)).float()
    if with_q:
        q = random_probs(gen, (2, vocab)).float()
        drafts = torch.stack([torch.multinomial(row.double(), N, replacement=True, generator=gen) for row in q], 1)
        q_in = q.expand(N, 2, vocab)
    else:
        drafts = torch.tensor([[int(torch.argmin(p[0])), 0]]).expand(N, 2).contiguous()
        q_in = None
    tokens, num_accepted, next_drafts, _ = backend.sjd_accept(drafts, q_in, p.expand(N, 3, vocab), seed=21)
    observed = Counter(tokens[:, 0].tolist())
    assert chisquare_pvalue(observed, {t: float(p[0, t]) for t in range(vocab)}, N) > P_THRESHOLD
    # rows rejected at 0 refresh position 1 from p_1 and position 2 (the bonus row) from p_2
    rejected_first = num_accepted == 0
    assert int(rejected_first.sum()) > N // 20
    for m in range(2):
        refreshed = next_drafts[rejected_first, m]
        assert (refreshed >= 0).all()
        expected = {t: float(p[1 + m, t] / p[1 + m].sum()) for t in range(vocab)}
        assert chisquare_pvalue(Counter(refreshed.tolist()), expected, refreshed.numel()) > P_THRESHOLD


# ----------------------------------------------------------------------------------------------------
# backends agree; bad inputs
# ----------------------------------------------------------------------------------------------------


def test_cpu_and_simt_identical():
    simt_ops = simt_backend_or_skip()
    gen = torch.Generator().manual_seed(30)
    for dtype in FLOAT_DTYPES:
        for with_q in (True, False):
            # V = 2500: the emitted token's row is split over blocks in the emulator
            drafts, q, p, num_draft = make_case(gen, 8, WINDOW, 2500, dtype=dtype, with_q=with_q, ragged=torch.int64)
            for seed, offset in [(1, 0), (2**63 + 1, 12)]:
                kwargs = dict(num_draft_tokens=num_draft, seed=seed, offset=offset)
                cpu = fastar.sjd_accept(drafts, q, p, **kwargs)
                with _common.using_ops(simt_ops):
                    simt = fastar.sjd_accept(drafts, q, p, **kwargs)
                assert_same_sjd(simt, cpu, f"{dtype} with_q={with_q}")


def test_bad_arguments_raise(backend):
    gen = torch.Generator().manual_seed(40)
    drafts, q, p, _ = make_case(gen, 4, 3, 10)
    with pytest.raises(ValueError, match=r"fastar.sjd_accept: target_probs must have shape \[B, n\+1, V\]"):
        backend.sjd_accept(drafts, q, p[:, :3])
    with pytest.raises(ValueError, match=r"fastar.sjd_accept: draft_probs must have shape \[B, n, V\]"):
        backend.sjd_accept(drafts, q[:, :2], p)
    with pytest.raises(TypeError, match="fastar.sjd_accept: draft_token_ids must be int32 or int64"):
        backend.sjd_accept(drafts.float(), q, p)


def test_bad_values(backend):
    # A bad draft id, a NaN in a row the refresh samples, a negative probability at a draft: the row is marked
    # (CUDA) or the op raises (CPU); on CUDA the other rows are the reference's.
    drafts = torch.tensor([[1, 2, 3]] * 4)
    p = torch.full((4, 4, 10), 0.1)
    p[:, 0, 1] = 0.0  # every row rejects its first draft and refreshes positions 1..3
    q = None
    bad_id = drafts.clone()
    bad_id[1, 2] = 10
    nan_refresh = p.clone()
    nan_refresh[2, 3, 7] = float("nan")
    negative = p.clone()
    negative[3, 1, 2] = -0.5
    for d, p_, row, status, exc, msg in [
        (bad_id, p, 1, 2, IndexError, "batch row 1: a draft token id outside"),
        (drafts, nan_refresh, 2, 4, ValueError, "batch row 2: a probability that is NaN"),
        (drafts, negative, 3, 4, ValueError, "batch row 3: a probability that is NaN"),
    ]:
        if not backend.marks_invalid_rows:
            with pytest.raises(exc, match=f"fastar.sjd_accept: invalid input in {msg}"):
                backend.sjd_accept(d, q, p_, seed=3)
            continue
        tokens, num_accepted, next_drafts, next_probs = backend.sjd_accept(d, q, p_, seed=3)
        assert int(num_accepted[row]) == -status and (tokens[row] == -1).all()
        assert (next_drafts[row] == -1).all() and (next_probs[row] == 0).all()
        ok = torch.arange(4) != row
        want = sjd_accept_reference(drafts, q, p, seed=3)
        for got_t, want_t in zip((tokens, num_accepted, next_drafts, next_probs), want):
            assert torch.equal(got_t[ok], want_t[ok])


def test_reference_agrees_with_speculative_sample_reference():
    # The oracle's acceptance half is speculative_sample's reference (an independent check of the composition).
    gen = torch.Generator().manual_seed(41)
    drafts, q, p, num_draft = make_case(gen, 16, 6, 20, ragged=torch.int64)
    want = sjd_accept_reference(drafts, q, p, num_draft, seed=9)
    assert_same(want[:2], speculative_sample_reference(drafts, q, p, num_draft, seed=9))
