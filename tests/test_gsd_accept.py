"""Tests of fastar.gsd_accept, grouped speculative decoding (docs/acceptance.md, "GSD"), on every backend.

Oracles: ``gsd_group`` (the group by a full stable sort of the target row, in float64), ``gsd_accept_reference``
(the documented algorithm with its random numbers: token for token) and ``gsd_first_token_distribution`` (the
acceptance probability min(1, p(G)/q(G)) of each draft and the emitted token's law, in float64). Statistical tests
use fixed seeds and reject at p < 1e-3, as in test_speculative_sample.py.

The kernels sum squared embedding distances in float32, the oracle in float64: the tests' embeddings lie on a grid
where both sums are exact, so the two cannot disagree on a member.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from scipy import stats

import fastar
from fastar import _common
from fastar.reference import gsd_accept_reference, gsd_first_token_distribution, gsd_group
from fastar.reference.acceptance import _draws
from helpers import assert_same, chisquare_pvalue, rows
from test_speculative_sample import FLOAT_DTYPES, make_case, random_probs, simt_backend_or_skip

P_THRESHOLD = 1e-3
STATUS_BAD_ID, STATUS_BAD_VALUE = 2, 4


def random_embeddings(gen, vocab: int, dim: int = 8) -> torch.Tensor:
    """Embeddings [V, d] on a grid of 1/8: squared distances are multiples of 1/64, exact in float32 and float64
    alike, so the kernels' float32 sums and the oracle's float64 ones agree on every member."""
    return torch.randint(-3, 4, (vocab, dim), generator=gen).float() / 8


def call(backend, drafts, q, p, embeddings, **kwargs):
    return backend.gsd_accept(drafts, q, p, embeddings, **kwargs)


# ----------------------------------------------------------------------------------------------------
# the oracle itself
# ----------------------------------------------------------------------------------------------------


def test_group_toy():
    # p ranks 3 > 1 > 4 > 0 > 2 (1 and 4 tie: the smaller id first). For x = 4 the nearest above is 1, then 3;
    # the nearest below is 0, then 2. Token 1 is far from 4 in the embeddings, the others close.
    p = torch.tensor([0.2, 0.25, 0.05, 0.3, 0.25])
    e = torch.tensor([[0.0], [2.0], [0.0], [0.0], [0.1]])
    assert gsd_group(p, 4, e, 1, 1, prob_threshold=1.0, dist_threshold=0.5) == [4, 0]  # 1 is far away
    assert gsd_group(p, 4, e, 1, 1, prob_threshold=1.0, dist_threshold=10.0) == [4, 1, 0]
    assert gsd_group(p, 4, e, 2, 2, prob_threshold=1.0, dist_threshold=10.0) == [4, 1, 3, 0, 2]
    assert gsd_group(p, 4, e, 2, 2, prob_threshold=0.04, dist_threshold=10.0) == [4, 1]  # |p(t) - .25| >= .05
    assert gsd_group(p, 3, e, 2, 2, prob_threshold=1.0, dist_threshold=10.0) == [3, 1, 4]  # nothing above 3
    assert gsd_group(p, 2, e, 0, 3, prob_threshold=1.0, dist_threshold=10.0) == [2]  # nothing below 2


def test_formula_toy():
    # Without q (one-hot at x) the acceptance probability is min(1, p(G)).
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    e = torch.zeros(4, 1)
    accept, out = gsd_first_token_distribution(p, None, e, draft=0, group_above=1, group_below=1,
                                               prob_threshold=0.15, dist_threshold=0.5)
    # ranking 3, 2, 1, 0: x = 0 has 1 above (p = .2, within .15) and nothing below
    assert abs(float(accept[0]) - 0.3) < 1e-12
    assert abs(float(out.sum()) - 1.0) < 1e-12


# ----------------------------------------------------------------------------------------------------
# token-exact against the reference
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("with_q", [True, False], ids=["q", "no_q"])
@pytest.mark.parametrize("window", [(6, 7), (7, 7), (0, 3), (16, 16)], ids=str)
def test_matches_reference(backend, dtype, with_q, window):
    gen = torch.Generator().manual_seed(11)
    vocab = 70  # not a multiple of the 16-byte vectors: the kernels' tails are read too
    drafts, q, p, num_draft = make_case(gen, 20, 4, vocab, dtype=dtype, with_q=with_q, ragged=torch.int64)
    e = random_embeddings(gen, vocab)
    kwargs = dict(group_above=window[0], group_below=window[1], prob_threshold=0.05, dist_threshold=0.5)
    got = call(backend, drafts, q, p, e, num_draft_tokens=num_draft, seed=5, offset=2, **kwargs)
    want = gsd_accept_reference(drafts, q, p, e, *window, 0.05, 0.5, num_draft, seed=5, offset=2)
    assert_same(got, want, f"{dtype} with_q={with_q} window={window}")


def test_ties_are_ranked_by_id(backend):
    # Probabilities on a coarse grid: many ties, ranked by token id. Token-exact against the sort-based oracle.
    gen = torch.Generator().manual_seed(12)
    batch, vocab = 24, 48
    p = torch.randint(1, 5, (batch, 3, vocab), generator=gen).float()
    p = p / p.sum(-1, keepdim=True)
    drafts = torch.randint(0, vocab, (batch, 2), generator=gen)
    e = random_embeddings(gen, vocab)
    got = call(backend, drafts, None, p, e, group_above=3, group_below=3, prob_threshold=1.0, dist_threshold=0.3,
               seed=8)
    assert_same(got, gsd_accept_reference(drafts, None, p, e, 3, 3, 1.0, 0.3, seed=8))


def test_infinite_thresholds_take_the_window(backend):
    # With both filters off the group is x and its whole window: with one-hot q the acceptance probability is
    # p(G), read off deterministically against the replayed uniforms.
    gen = torch.Generator().manual_seed(13)
    batch, vocab = 32, 40
    p = random_probs(gen, (batch, 2, vocab)).float()
    drafts = torch.randint(0, vocab, (batch, 1), generator=gen)
    e = torch.randn(vocab, 4, generator=gen)
    inf = float("inf")
    _, accepted = call(backend, drafts, None, p, e, group_above=2, group_below=2, prob_threshold=inf,
                       dist_threshold=inf, seed=4)
    for b in range(batch):
        x = int(drafts[b, 0])
        order = sorted(range(vocab), key=lambda t: (-float(p[b, 0, t]), t))
        r = order.index(x)
        group = order[max(0, r - 2):r + 3]
        u, _ = _draws(4, 0, b, 0)
        assert bool(accepted[b] == 1) == (u < float(p[b, 0, group].double().sum())), b


# ----------------------------------------------------------------------------------------------------
# group contents, read off the op deterministically
# ----------------------------------------------------------------------------------------------------


def test_group_contents(backend):
    # A probe per (draft x, token c): q one-hot at c, so q(G) = 1 if c is in x's group and 0 otherwise. With p
    # small everywhere near x (p(G) <= u for the probe's uniform) the draft is rejected iff c is in the group:
    # every backend's group is read off token by token and compared with gsd_group's.
    gen = torch.Generator().manual_seed(14)
    vocab = 64
    p_row = random_probs(gen, (vocab,)).float()
    e = random_embeddings(gen, vocab)
    kwargs = dict(group_above=5, group_below=4, prob_threshold=0.01, dist_threshold=0.5)
    xs = [int(t) for t in torch.randperm(vocab, generator=gen)[:rows(backend, 6, 2)]]
    probes = [(x, c) for x in xs for c in range(vocab) if c != x]
    batch = len(probes)
    drafts = torch.tensor([[x] for x, _ in probes])
    q = torch.nn.functional.one_hot(torch.tensor([[c] for _, c in probes]), vocab).float()
    p = p_row.expand(batch, 2, vocab).contiguous()
    _, accepted = call(backend, drafts, q, p, e, seed=6, **kwargs)
    checked = 0
    for b, (x, c) in enumerate(probes):
        group = gsd_group(p_row, x, e, **kwargs)
        u, _ = _draws(6, 0, b, 0)
        if u <= float(p_row[group].double().sum()):
            continue  # this probe accepts whatever the group: no information
        assert bool(accepted[b] == 0) == (c in group), (x, c, group)
        checked += 1
    assert checked > 0.5 * batch
    assert any(len(gsd_group(p_row, x, e, **kwargs)) > 1 for x in xs)


# ----------------------------------------------------------------------------------------------------
# the paper's formula: acceptance probability per draft and the emitted token's distribution
# ----------------------------------------------------------------------------------------------------


def test_acceptance_probability_per_draft(backend):
    vocab = 8
    N = rows(backend, 120_000, 1_500)
    gen = torch.Generator().manual_seed(21)
    p = random_probs(gen, (2, vocab)).float()
    q = random_probs(gen, (1, vocab)).float()
    e = random_embeddings(gen, vocab, dim=2)
    kwargs = dict(group_above=2, group_below=2, prob_threshold=0.15, dist_threshold=0.2)
    drafts = torch.multinomial(q[0].double(), N, replacement=True, generator=gen)[:, None]
    tokens, num_accepted = call(backend, drafts, q.expand(N, 1, vocab), p.expand(N, 2, vocab), e, seed=7, **kwargs)
    accept, out = gsd_first_token_distribution(p[0], q[0], e, **kwargs)
    assert (accept < 1).any() and any(len(gsd_group(p[0], x, e, **kwargs)) > 1 for x in range(vocab))
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
    observed = Counter(tokens[:, 0].tolist())
    assert chisquare_pvalue(observed, {t: float(out[t]) for t in range(vocab)}, N) > P_THRESHOLD


def test_grouping_accepts_more(backend):
    # Flat targets, one-hot drafts: the grouped test accepts far more often than the exact one, and never less
    # (the same u, a larger p(G)).
    gen = torch.Generator().manual_seed(22)
    vocab, batch = 32, rows(backend, 400, 64)
    p = torch.full((batch, 2, vocab), 1.0 / vocab)
    drafts = torch.randint(0, vocab, (batch, 1), generator=gen)
    e = torch.zeros(vocab, 4)
    _, exact = call(backend, drafts, None, p, e, group_above=0, group_below=0, seed=1)
    _, grouped = call(backend, drafts, None, p, e, seed=1)
    assert_same(call(backend, drafts, None, p, e, group_above=0, group_below=0, seed=1),
                backend.speculative_sample(drafts, None, p, seed=1))
    assert (grouped >= exact).all()
    assert grouped.float().mean() > 2 * exact.float().mean()


# ----------------------------------------------------------------------------------------------------
# backends agree; bad inputs
# ----------------------------------------------------------------------------------------------------


def test_cpu_and_simt_identical():
    simt_ops = simt_backend_or_skip()
    gen = torch.Generator().manual_seed(30)
    for dtype in FLOAT_DTYPES:
        for with_q in (True, False):
            # V = 2500: every chunk block of a split row runs the draft tests in the emulator
            drafts, q, p, num_draft = make_case(gen, 8, 4, 2500, dtype=dtype, with_q=with_q, ragged=torch.int64)
            e = random_embeddings(gen, 2500, dim=12)
            for seed, offset in [(1, 0), (2**63 + 1, 12)]:
                kwargs = dict(num_draft_tokens=num_draft, seed=seed, offset=offset, prob_threshold=0.02)
                cpu = fastar.gsd_accept(drafts, q, p, e, **kwargs)
                with _common.using_ops(simt_ops):
                    simt = fastar.gsd_accept(drafts, q, p, e, **kwargs)
                assert_same(simt, cpu, f"{dtype} with_q={with_q}")


def valid_case():
    gen = torch.Generator().manual_seed(40)
    _, q, p, _ = make_case(gen, 4, 2, 10)
    drafts = torch.arange(8).reshape(4, 2)
    return drafts, q, p, random_embeddings(gen, 10, dim=3)


def test_bad_arguments_raise(backend):
    drafts, q, p, e = valid_case()
    with pytest.raises(ValueError, match=r"fastar.gsd_accept: embeddings must have shape \[V, d\]"):
        call(backend, drafts, q, p, e[:5])
    with pytest.raises(ValueError, match=r"embeddings must have shape \[V, d\]"):
        call(backend, drafts, q, p, e[:, :0])
    with pytest.raises(ValueError, match=r"embeddings must have shape \[V, d\]"):
        call(backend, drafts, q, p, e[0])
    with pytest.raises(TypeError, match="embeddings must be float32"):
        call(backend, drafts, q, p, e.double())
    for above, below in ((-1, 7), (6, 17)):
        with pytest.raises(ValueError, match=r"group_above and group_below must lie in \[0, 16\]"):
            call(backend, drafts, q, p, e, group_above=above, group_below=below)
    for key in ("prob_threshold", "dist_threshold"):
        for bad in (-0.1, float("nan")):
            with pytest.raises(ValueError, match="prob_threshold and dist_threshold must be >= 0"):
                call(backend, drafts, q, p, e, **{key: bad})
    with pytest.raises(ValueError, match=r"target_probs must have shape \[B, n\+1, V\]"):
        call(backend, drafts, q, p[:, :2], e)


def test_bad_values(backend):
    # A NaN anywhere in a draft's target row (it is read whole, to rank it), a negative q at a group member, a
    # draft id outside [0, V): the row is marked (CUDA) or the op raises (CPU).
    drafts, q, p, e = valid_case()
    kwargs = dict(prob_threshold=float("inf"), dist_threshold=float("inf"), seed=3)
    nan_row = p.clone()
    nan_row[1, 0, 9] = float("nan")
    # row 2's first draft is 4; with infinite thresholds its group holds its ranking neighbours
    member = gsd_group(p[2, 0], 4, e, 6, 7, float("inf"), float("inf"))[1]
    bad_q = q.clone()
    bad_q[2, 0, member] = -0.5
    bad_id = drafts.clone()
    bad_id[3, 1] = 10
    for d, q_, p_, row, status, exc, msg in [
        (drafts, q, nan_row, 1, STATUS_BAD_VALUE, ValueError, "batch row 1: a probability that is NaN"),
        (drafts, bad_q, p, 2, STATUS_BAD_VALUE, ValueError, "batch row 2: a probability that is NaN"),
        (bad_id, q, p, 3, STATUS_BAD_ID, IndexError, "batch row 3: a draft token id outside"),
    ]:
        if not backend.marks_invalid_rows:
            with pytest.raises(exc, match=f"fastar.gsd_accept: invalid input in {msg}"):
                call(backend, d, q_, p_, e, **kwargs)
            continue
        tokens, num_accepted = call(backend, d, q_, p_, e, **kwargs)
        assert int(num_accepted[row]) == -status and (tokens[row] == -1).all()
        ok = torch.arange(4) != row
        want = gsd_accept_reference(drafts, q, p, e, 6, 7, float("inf"), float("inf"), seed=3)
        assert torch.equal(tokens[ok], want[0][ok]) and torch.equal(num_accepted[ok], want[1][ok])
