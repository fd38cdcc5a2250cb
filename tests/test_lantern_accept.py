"""Tests of fastar.lantern_accept, LANTERN's relaxed acceptance (docs/acceptance.md, "LANTERN"), on every backend.

Oracles: ``lantern_accept_reference`` (the documented algorithm with its random numbers: token for token),
``lantern_first_token_distribution`` (the paper's formula in float64: the acceptance probability of each draft and
the distribution of the emitted token) and ``lantern_proximity_set`` (the set whose moved mass is the total
variation). Statistical tests use fixed seeds and reject at p < 1e-3, as in test_speculative_sample.py.
"""
from __future__ import annotations

import zlib
from collections import Counter

import pytest
import torch
from scipy import stats

import fastar
from fastar import _common
from fastar.reference import (
    lantern_accept_reference,
    lantern_first_token_distribution,
    lantern_proximity_set,
    speculative_sample_reference,
)
from helpers import assert_same, chisquare_pvalue, rows
from test_speculative_sample import FLOAT_DTYPES, SPLIT_VOCAB, make_case, random_probs, simt_backend_or_skip

P_THRESHOLD = 1e-3
STATUS_BAD_ID, STATUS_BAD_VALUE = 2, 4


def random_neighbors(gen, vocab: int, k: int, *, with_self: bool = False, dtype=torch.int64) -> torch.Tensor:
    """A neighbour table [V, k]: k distinct other tokens per token in a random order (the token itself first when
    with_self, as a top-(k+1) search over the codebook returns it)."""
    table = torch.empty(vocab, k, dtype=torch.int64)
    for t in range(vocab):
        others = torch.randperm(vocab - 1, generator=gen)
        others = others + (others >= t).long()  # skip t
        row = torch.cat([torch.tensor([t]), others[: k - 1]]) if with_self else others[:k]
        table[t] = row
    return table.to(dtype)


def call(backend, drafts, q, p, neighbors, delta, **kwargs):
    return backend.lantern_accept(drafts, q, p, neighbors, delta=delta, **kwargs)


# ----------------------------------------------------------------------------------------------------
# the oracle itself
# ----------------------------------------------------------------------------------------------------


def test_proximity_set_bounds_total_variation():
    # Moving the set's mass onto x gives a distribution within delta of p in total variation, and the set is the
    # longest prefix with that property.
    gen = torch.Generator().manual_seed(3)
    vocab = 40
    p = random_probs(gen, (vocab,))
    table = random_neighbors(gen, vocab, 12)
    for delta in (0.0, 0.01, 0.05, 0.2, 1.0):
        for x in range(vocab):
            members = lantern_proximity_set(p, x, table[x].tolist(), delta)
            relaxed = p.clone()
            relaxed[members[1:]] = 0
            relaxed[x] = p[members].sum()
            tv = 0.5 * float((relaxed - p).abs().sum())
            assert tv <= delta + 1e-15
            assert members == [x] + table[x, : len(members) - 1].tolist()
            if len(members) <= 12:  # the next neighbour would exceed the budget
                assert tv + float(p[table[x, len(members) - 1]]) > delta


def test_first_token_distribution_formula_toy():
    # p = (.1, .2, .3, .4), q = (.4, .3, .2, .1), neighbours: 0 <-> 1, 2 <-> 3. With delta = .2: A(0) = {0, 1}
    # (p(1) = .2 <= .2), A(1) = {1, 0} (p(0) = .1), A(2) = {2} (p(3) = .4 > .2), A(3) = {3} (p(2) = .3 > .2).
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    q = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    table = torch.tensor([[1], [0], [3], [2]])
    accept, out = lantern_first_token_distribution(p, q, table, 0.2)
    # accept = min(1, p(A)/q(A)): (.3/.7, .3/.7, 1, 1)
    assert torch.allclose(accept, torch.tensor([3 / 7, 3 / 7, 1.0, 1.0], dtype=torch.float64))
    assert abs(float(out.sum()) - 1.0) < 1e-12
    # delta = 0 is exact speculative sampling: the emitted token follows p
    _, exact = lantern_first_token_distribution(p, q, table, 0.0)
    assert torch.allclose(exact, p)


# ----------------------------------------------------------------------------------------------------
# token-exact against the reference
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("with_q", [True, False], ids=["q", "no_q"])
@pytest.mark.parametrize("delta", [0.0, 0.05, 0.3, 1.0])
def test_matches_reference(backend, dtype, with_q, delta):
    gen = torch.Generator().manual_seed(11)
    vocab, k = 50, 6
    drafts, q, p, num_draft = make_case(gen, 24, 4, vocab, dtype=dtype, with_q=with_q, ragged=torch.int64)
    table = random_neighbors(gen, vocab, k, with_self=bool(delta > 0.2), dtype=torch.int32)
    got = call(backend, drafts, q, p, table, delta, num_draft_tokens=num_draft, seed=5, offset=2)
    want = lantern_accept_reference(drafts, q, p, table, delta, num_draft, seed=5, offset=2)
    assert_same(got, want, f"{dtype} with_q={with_q} delta={delta}")


@pytest.mark.parametrize("with_q", [True, False])
def test_delta_zero_is_speculative_sample(backend, with_q):
    # With no budget the proximity set is {x} plus neighbours of zero target mass, which change nothing without
    # draft probabilities (q one-hot) and are absent from a p with no zeros: exactly speculative_sample.
    gen = torch.Generator().manual_seed(12)
    vocab = 64
    drafts, q, p, _ = make_case(gen, 32, 5, vocab, with_q=with_q, sparsity=0.3 if not with_q else 0.0)
    assert not with_q or (p > 0).all()
    table = random_neighbors(gen, vocab, 8)
    got = call(backend, drafts, q, p, table, 0.0, seed=99)
    assert_same(got, speculative_sample_reference(drafts, q, p, seed=99))
    assert_same(got, backend.speculative_sample(drafts, q, p, seed=99))


def test_relaxation_accepts_more(backend):
    # Uniform-ish (ambiguous) targets, one-hot drafts: the relaxed test accepts far more often than the exact one,
    # and every exact acceptance stays an acceptance (the same u, a larger p(A)).
    gen = torch.Generator().manual_seed(13)
    vocab, batch = 32, rows(backend, 400, 64)
    p = torch.full((batch, 2, vocab), 1.0 / vocab)
    drafts = torch.randint(0, vocab, (batch, 1), generator=gen)
    table = random_neighbors(gen, vocab, 10)
    _, exact = call(backend, drafts, None, p, table, 0.0, seed=1)
    _, relaxed = call(backend, drafts, None, p, table, 0.25, seed=1)
    assert (relaxed >= exact).all()
    assert relaxed.float().mean() > 2 * exact.float().mean()


# ----------------------------------------------------------------------------------------------------
# the paper's formula: acceptance probability per draft and the emitted token's distribution
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [0.05, 0.3])
def test_acceptance_probability_per_draft(backend, delta):
    vocab = 6
    N = rows(backend, 120_000, 1_500)
    gen = torch.Generator().manual_seed(21)
    p = random_probs(gen, (2, vocab)).float()
    q = random_probs(gen, (1, vocab)).float()
    table = random_neighbors(gen, vocab, 3)
    drafts = torch.multinomial(q[0].double(), N, replacement=True, generator=gen)[:, None]
    tokens, num_accepted = call(backend, drafts, q.expand(N, 1, vocab), p.expand(N, 2, vocab), table, delta, seed=7)
    accept, out = lantern_first_token_distribution(p[0], q[0], table, delta)
    accepted = num_accepted == 1
    for x in range(vocab):
        trials = int((drafts[:, 0] == x).sum())
        if trials == 0:
            continue
        hits = int(accepted[drafts[:, 0] == x].sum())
        if accept[x] == 1.0:
            assert hits == trials
        else:
            assert stats.binomtest(hits, trials, float(accept[x])).pvalue > P_THRESHOLD, (x, hits, trials, accept[x])
    # the emitted token at position 0 follows the formula's distribution (chi-square)
    observed = Counter(tokens[:, 0].tolist())
    assert chisquare_pvalue(observed, {t: float(out[t]) for t in range(vocab)}, N) > P_THRESHOLD


def test_acceptance_probability_without_draft_probs(backend):
    # One-hot q at a fixed draft: accepted with probability min(1, p(A(x))).
    vocab, delta = 8, 0.2
    N = rows(backend, 60_000, 1_500)
    gen = torch.Generator().manual_seed(22)
    p = random_probs(gen, (2, vocab)).float()
    table = random_neighbors(gen, vocab, 4)
    x = int(torch.argmin(p[0]))
    drafts = torch.full((N, 1), x)
    tokens, num_accepted = call(backend, drafts, None, p.expand(N, 2, vocab), table, delta, seed=8)
    accept, out = lantern_first_token_distribution(p[0], None, table, delta, draft=x)
    assert stats.binomtest(int((num_accepted == 1).sum()), N, float(accept[x])).pvalue > P_THRESHOLD
    observed = Counter(tokens[:, 0].tolist())
    assert chisquare_pvalue(observed, {t: float(out[t]) for t in range(vocab) if out[t] > 0}, N) > P_THRESHOLD


# ----------------------------------------------------------------------------------------------------
# backends agree; the neighbour table's conventions
# ----------------------------------------------------------------------------------------------------


def test_cpu_and_simt_identical():
    simt_ops = simt_backend_or_skip()
    gen = torch.Generator().manual_seed(30)
    for dtype in FLOAT_DTYPES:
        for with_q in (True, False):
            drafts, q, p, num_draft = make_case(gen, 32, 4, 300, dtype=dtype, with_q=with_q, ragged=torch.int64)
            table = random_neighbors(gen, 300, 16, with_self=with_q)
            for seed, offset in [(1, 0), (2**63 + 1, 12)]:
                kwargs = dict(delta=0.1, num_draft_tokens=num_draft, seed=seed, offset=offset)
                cpu = fastar.lantern_accept(drafts, q, p, table, **kwargs)
                with _common.using_ops(simt_ops):
                    simt = fastar.lantern_accept(drafts, q, p, table, **kwargs)
                assert_same(simt, cpu, f"{dtype} with_q={with_q}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("with_q", [True, False], ids=["q", "no_q"])
def test_rows_split_over_blocks(backend, dtype, with_q):
    # A large vocabulary and few rows: the CUDA kernels split the row to sample from over several blocks
    # (test_speculative_sample.SPLIT_VOCAB); the relaxed test runs in each of them.
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype}{with_q}".encode()))
    vocab, k = SPLIT_VOCAB, 8
    drafts, q, p, num_draft = make_case(gen, 2, 3, vocab, dtype=dtype, with_q=with_q, ragged=torch.int64)
    shifts = torch.randperm(vocab - 1, generator=gen)[:k] + 1  # k distinct other tokens per token
    table = (torch.arange(vocab)[:, None] + shifts[None, :]) % vocab
    for seed in range(4):
        got = call(backend, drafts, q, p, table, 0.2, num_draft_tokens=num_draft, seed=seed, offset=1)
        want = lantern_accept_reference(drafts, q, p, table, 0.2, num_draft, seed=seed, offset=1)
        assert_same(got, want, f"seed={seed}")


def test_self_in_neighbor_row_is_skipped(backend):
    # A row listing the token itself (top-(k+1) search including the query) gives the same result as without it.
    gen = torch.Generator().manual_seed(31)
    vocab = 40
    drafts, q, p, _ = make_case(gen, 16, 3, vocab)
    with_self = random_neighbors(gen, vocab, 6, with_self=True)
    without = with_self[:, 1:]
    assert_same(call(backend, drafts, q, p, with_self, 0.2, seed=4), call(backend, drafts, q, p, without, 0.2, seed=4))


# ----------------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------------


def valid_case():
    # Every row drafts its own tokens, so a bad entry of a draft's neighbour row belongs to one batch row.
    gen = torch.Generator().manual_seed(40)
    _, q, p, _ = make_case(gen, 4, 2, 10)
    drafts = torch.arange(8).reshape(4, 2)
    return drafts, q, p, random_neighbors(gen, 10, 3)


def test_bad_arguments_raise(backend):
    drafts, q, p, table = valid_case()
    with pytest.raises(ValueError, match=r"neighbors must have shape \[V, k\]"):
        call(backend, drafts, q, p, table[:5], 0.1)
    with pytest.raises(ValueError, match=r"neighbors must have shape \[V, k\]"):
        call(backend, drafts, q, p, table[:, :0], 0.1)
    with pytest.raises(ValueError, match=r"neighbors must have 2 dimension"):
        call(backend, drafts, q, p, table[0], 0.1)
    with pytest.raises(TypeError, match="neighbors must be int32 or int64"):
        call(backend, drafts, q, p, table.float(), 0.1)
    for delta in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"delta must lie in \[0, 1\]"):
            call(backend, drafts, q, p, table, delta)


def test_bad_neighbor_values(backend):
    drafts, q, p, table = valid_case()
    bad_id = table.clone()
    bad_id[int(drafts[1, 0]), 2] = 10  # read for row 1's first draft, past any budget
    bad_value = p.clone()
    x = int(drafts[2, 0])
    bad_value[2, 0, int(table[x, 2])] = float("nan")
    for table_, p_, row, status, exc, msg in [
        (bad_id, p, 1, STATUS_BAD_ID, IndexError, "batch row 1: a draft token id outside"),
        (table, bad_value, 2, STATUS_BAD_VALUE, ValueError, "batch row 2: a probability that is NaN"),
    ]:
        if not backend.marks_invalid_rows:
            with pytest.raises(exc, match=f"fastar.lantern_accept: invalid input in {msg}"):
                call(backend, drafts, q, p_, table_, 0.0, seed=3)
            continue
        tokens, num_accepted = call(backend, drafts, q, p_, table_, 0.0, seed=3)
        assert int(num_accepted[row]) == -status and (tokens[row] == -1).all()
        ok = torch.arange(4) != row
        want = lantern_accept_reference(drafts, q, p, table, 0.0, seed=3)
        assert torch.equal(tokens[ok], want[0][ok]) and torch.equal(num_accepted[ok], want[1][ok])


def test_debug_checks_validate_the_whole_table(backend, debug_checks):
    # Debug mode validates every neighbour id before the launch, also rows no draft reads, on every backend.
    drafts, q, p, table = valid_case()
    table = table.clone()
    table[9, 0] = -1  # token 9 is no draft
    with pytest.raises(IndexError, match=r"fastar.lantern_accept: a neighbour id outside \[0, 10\)"):
        call(backend, drafts, q, p, table, 0.1, seed=3)
