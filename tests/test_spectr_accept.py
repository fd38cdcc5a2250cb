"""Tests of fastar.spectr_accept, SpecTr's K-SEQ over k i.i.d. drafts (docs/acceptance.md, "SpecTr"), on every
backend.

Oracles: ``fastar.reference.spectr_level`` (the paper's formulas in float64, rho* by bisection: the acceptance
probability of a level, the residual and the emitted token's law), the paper's toy numbers, and
``speculative_sample`` (k = 1 is the same rule with the same random numbers). Statistical tests use fixed seeds and
reject at p < 1e-3, as in test_speculative_sample.py.
"""
from __future__ import annotations

import functools
import math
from collections import Counter

import pytest
import torch
from scipy import stats

import fastar
from fastar import _simt
from fastar.reference import spectr_level, spectr_rho
from helpers import chisquare_pvalue, rows
from test_speculative_sample import FLOAT_DTYPES, random_probs, sample_rows, simt_backend_or_skip

P_THRESHOLD = 1e-3
STATUS_BAD_ID, STATUS_BAD_VALUE = 2, 4


class PrefixModel:
    """Target and draft distributions that depend on the prefix (random, made on first use), so that drafts sampled
    from q form a real prefix tree and every node's rows are those of its prefix."""

    def __init__(self, gen, vocab: int, sharpness: float = 1.0):
        self.gen, self.vocab, self.sharpness = gen, vocab, sharpness
        self.p, self.q = {}, {}

    def rows(self, prefix):
        prefix = tuple(prefix)
        if prefix not in self.p:
            self.p[prefix] = random_probs(self.gen, (self.vocab,), sharpness=self.sharpness)
            self.q[prefix] = random_probs(self.gen, (self.vocab,), sharpness=self.sharpness)
        return self.p[prefix], self.q[prefix]

    def case(self, batch: int, k: int, n: int, dtype=torch.float32):
        """Drafts [B, k, n] sampled i.i.d. from q token by token, with their q rows [B, k, n, V] and p rows
        [B, k, n+1, V]."""
        drafts = torch.zeros(batch, k, n, dtype=torch.int64)
        q_rows = torch.zeros(batch, k, n, self.vocab, dtype=torch.float64)
        p_rows = torch.zeros(batch, k, n + 1, self.vocab, dtype=torch.float64)
        for b in range(batch):
            for j in range(k):
                for t in range(n + 1):
                    p, q = self.rows(drafts[b, j, :t].tolist())
                    p_rows[b, j, t] = p
                    if t < n:
                        q_rows[b, j, t] = q
                        drafts[b, j, t] = int(torch.multinomial(q, 1, generator=self.gen))
        return drafts, q_rows.to(dtype), p_rows.to(dtype)


def single_level_case(gen, p, q, batch: int, k: int):
    """n = 1 drafts of one (p, q) pair: drafts [B, k, 1] i.i.d. from q, q rows [B, k, 1, V], p rows [B, k, 2, V]."""
    vocab = p.shape[-1]
    drafts = sample_rows(gen, q.double().expand(batch, k, vocab))[..., None]
    return drafts, q.expand(batch, k, 1, vocab), p.expand(batch, k, 2, vocab)


def assert_well_formed(draft_index, tokens, num_accepted, drafts, vocab):
    """The accepted tokens are the first num_accepted tokens of draft draft_index, the lowest draft with that prefix;
    then one sampled token and -1 padding."""
    batch, k, n = drafts.shape
    assert draft_index.dtype == tokens.dtype == num_accepted.dtype == torch.int32
    assert tokens.shape == (batch, n + 1) and draft_index.shape == num_accepted.shape == (batch,)
    for b in range(batch):
        a, j = int(num_accepted[b]), int(draft_index[b])
        assert 0 <= a <= n and 0 <= j < k
        assert tokens[b, :a].tolist() == drafts[b, j, :a].tolist()
        assert all(drafts[b, i, :a].tolist() != tokens[b, :a].tolist() for i in range(j))
        assert 0 <= int(tokens[b, a]) < vocab and (tokens[b, a + 1 :] == -1).all()


# ----------------------------------------------------------------------------------------------------
# the oracle itself
# ----------------------------------------------------------------------------------------------------


def test_reference_toy_numbers():
    # The worked example (p = (.5, .3, .2), q = (.2, .3, .5), k = 2) by hand: for 1 <= rho <= 2.5, beta(rho) =
    # .2 + .3 / rho + .2 / rho, and 1 - (1 - beta)^2 = rho beta gives beta = 2 - rho, so rho^2 - 1.8 rho + .5 = 0:
    # rho* = (1.8 + sqrt(1.24)) / 2 = 1.45678, beta = 0.54322, P(accept) = 0.79136; p - rho* q = (.209, <0, <0).
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    rho = (1.8 + math.sqrt(1.24)) / 2
    level = spectr_level(p, q, 2)
    assert abs(level["rho"] - rho) < 1e-12 and abs(level["rho"] - 1.45678) < 1e-5
    assert abs(level["beta"] - (2 - rho)) < 1e-12 and abs(level["beta"] - 0.54322) < 1e-5
    assert abs(level["accept"] - (1 - (rho - 1) ** 2)) < 1e-12 and abs(level["accept"] - 0.79136) < 1e-5
    assert torch.allclose(level["residual"], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.allclose(level["output"], p, atol=1e-12)
    # k = 1 is speculative sampling: rho* = 1, P(accept) = sum min(p, q), residual norm(max(0, p - q))
    one = spectr_level(p, q, 1)
    assert one["rho"] == 1.0 and abs(one["accept"] - 0.7) < 1e-12
    assert torch.allclose(one["residual"], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


def test_reference_rho_is_the_smallest_valid():
    gen = torch.Generator().manual_seed(5)
    for k in (2, 3, 4, 8):
        p, q = random_probs(gen, (20,)), random_probs(gen, (20,))
        rho = spectr_rho(p, q, k)
        level = spectr_level(p, q, k)
        assert 1.0 <= rho <= k
        assert level["accept"] <= rho * level["beta"] + 1e-12  # the residual is a distribution
        assert torch.allclose(level["output"], p, atol=1e-9)
        if rho > 1.0:  # just below rho* the residual would need negative mass
            lower = spectr_level(p, q, k, rho=rho * (1 - 1e-6))
            assert lower["accept"] > (rho * (1 - 1e-6)) * lower["beta"]


# ----------------------------------------------------------------------------------------------------
# laws against the float64 formulas
# ----------------------------------------------------------------------------------------------------


def test_toy_case(backend):
    n_rows = rows(backend, 60_000, 1_500)
    gen = torch.Generator().manual_seed(2023)
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    drafts, q_rows, p_rows = single_level_case(gen, p, q, n_rows, 2)
    draft_index, tokens, num_accepted = backend.spectr_accept(drafts, q_rows, p_rows, seed=11, offset=3)
    assert_well_formed(draft_index, tokens, num_accepted, drafts, 3)
    accepted = num_accepted == 1
    assert stats.binomtest(int(accepted.sum()), n_rows, 0.79136).pvalue > P_THRESHOLD
    # The residual is (1, 0, 0) at rho*; the kernel's rho (at most (k - 1) / 2^20 above) leaves ~1e-6 elsewhere.
    assert int((tokens[~accepted, 0] != 0).sum()) <= 1
    observed = Counter(tokens[:, 0].tolist())
    assert chisquare_pvalue(observed, {t: float(p[t]) for t in range(3)}, n_rows) > P_THRESHOLD


@pytest.mark.parametrize("k", [2, 3, 4])
def test_first_token_follows_target(backend, k):
    vocab = 6
    n_rows = rows(backend, 40_000, 1_200)
    gen = torch.Generator().manual_seed(100 + k)
    p = random_probs(gen, (vocab,), sharpness=2.0)
    q = random_probs(gen, (vocab,), sharpness=2.0)
    drafts, q_rows, p_rows = single_level_case(gen, p.float(), q.float(), n_rows, k)
    draft_index, tokens, num_accepted = backend.spectr_accept(drafts, q_rows, p_rows, seed=7 * k)
    assert_well_formed(draft_index, tokens, num_accepted, drafts, vocab)
    level = spectr_level(p.float(), q.float(), k)
    assert level["rho"] > 1.0  # a case where K-SEQ differs from speculative sampling
    p32 = p.float().double() / p.float().double().sum()
    observed = Counter(tokens[:, 0].tolist())
    assert chisquare_pvalue(observed, {t: float(p32[t]) for t in range(vocab)}, n_rows) > P_THRESHOLD
    accepted = int((num_accepted == 1).sum())
    assert stats.binomtest(accepted, n_rows, level["accept"]).pvalue > P_THRESHOLD
    # the residual's law among the rejected rows
    rejected = tokens[num_accepted == 0, 0]
    residual = level["residual"]
    if rejected.numel() > 50:
        counts = Counter(rejected.tolist())
        assert chisquare_pvalue(counts, {t: float(residual[t]) for t in range(vocab) if residual[t] > 0},
                                rejected.numel()) > P_THRESHOLD


def test_sequences_follow_target(backend):
    # n = 2 levels over a prefix tree: the first token follows p(.|()), the second (when the first level accepted)
    # follows p(.|first), and each level accepts with the formula's probability for the drafts alive there.
    vocab, k, n = 3, 3, 2
    n_rows = rows(backend, 12_000, 800)
    model = PrefixModel(torch.Generator().manual_seed(9), vocab, sharpness=2.0)
    drafts, q_rows, p_rows = model.case(n_rows, k, n)
    draft_index, tokens, num_accepted = backend.spectr_accept(drafts, q_rows, p_rows, seed=4242)
    assert_well_formed(draft_index, tokens, num_accepted, drafts, vocab)

    def law(prefix):
        p = model.p[tuple(prefix)].float().double()
        return p / p.sum()

    p0 = law([])
    assert chisquare_pvalue(Counter(tokens[:, 0].tolist()), {t: float(p0[t]) for t in range(vocab)},
                            n_rows) > P_THRESHOLD
    for a in range(vocab):  # Bonferroni over the first tokens
        sel = (tokens[:, 0] == a) & (num_accepted >= 1)
        if int(sel.sum()) < 60:
            continue
        pa = law([a])
        assert chisquare_pvalue(Counter(tokens[sel, 1].tolist()), {t: float(pa[t]) for t in range(vocab)},
                                int(sel.sum())) > P_THRESHOLD / vocab
    # acceptance per level: a Poisson-binomial z-test of the accepted count against the sum of the formula's
    # probabilities (level 1: the drafts alive are those whose first token was emitted).
    @functools.cache
    def accept(prefix, alive):
        return spectr_level(model.p[prefix].float(), model.q[prefix].float(), alive)["accept"]

    for level_t in range(n):
        reached = num_accepted >= level_t
        probs = []
        for b in torch.nonzero(reached).flatten().tolist():
            prefix = tokens[b, :level_t].tolist()
            alive = sum(drafts[b, j, :level_t].tolist() == prefix for j in range(k))
            probs.append(accept(tuple(prefix), alive))
        probs = torch.tensor(probs, dtype=torch.float64)
        observed = int((num_accepted[reached] >= level_t + 1).sum())
        z = (observed - float(probs.sum())) / math.sqrt(float((probs * (1 - probs)).sum()))
        assert 2 * stats.norm.sf(abs(z)) > P_THRESHOLD, f"level {level_t}: z = {z:.2f}"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_one_draft_is_speculative_sample(backend, dtype):
    # k = 1: rho* = 1, the same test, residual and random numbers as speculative_sample, token for token.
    gen = torch.Generator().manual_seed(31)
    batch, n, vocab = 64, 4, 40
    model = PrefixModel(gen, vocab)
    drafts, q_rows, p_rows = model.case(batch, 1, n, dtype)
    draft_index, tokens, num_accepted = backend.spectr_accept(drafts, q_rows, p_rows, seed=77, offset=9)
    want_tokens, want_accepted = backend.speculative_sample(drafts[:, 0], q_rows[:, 0], p_rows[:, 0], seed=77,
                                                            offset=9)
    assert torch.equal(tokens, want_tokens) and torch.equal(num_accepted, want_accepted)
    assert (draft_index == 0).all()
    assert 0 < int((num_accepted == n).sum()) < batch  # both outcomes occur


# ----------------------------------------------------------------------------------------------------
# backends agree, edge cases
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [5, 300])
def test_cpu_and_simt_identical(dtype, vocab):
    simt = simt_backend_or_skip()
    gen = torch.Generator().manual_seed(vocab)
    model = PrefixModel(gen, vocab, sharpness=4.0)  # sharp rows: drafts share prefixes
    drafts, q_rows, p_rows = model.case(24, 4, 3, dtype)
    if vocab == 300:  # rows that are not 16-byte aligned: the kernel's scalar loads
        q_rows = torch.cat([q_rows, q_rows[..., :1]], -1)[..., :vocab]
        p_rows = torch.cat([p_rows, p_rows[..., :1]], -1)[..., 1:]
    seed = torch.tensor(123)
    want = torch.ops.fastar.spectr_accept(drafts, q_rows, p_rows, seed, torch.tensor(4))
    got = simt.spectr_accept(drafts, q_rows, p_rows, seed, torch.tensor(4))
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert_well_formed(*want, drafts, vocab)
    assert int((want[2] >= 1).sum()) > 0 and int((want[2] == 0).sum()) > 0


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_cpu_and_simt_identical_with_the_solve_split_over_v(dtype):
    """Few nodes for the GPU (7 rows x 2 drafts x 1 level, the emulator's 4 SMs) and a long vocabulary: the solve
    runs a launch per pass, each node's rows split over chunks whose histograms merge in global memory. Both drafts
    of a row are the same token, so every row's level is solved, and p is q perturbed by ~30% per token, so the
    draft's test (accepted with probability about 1 / rho*) and the residual depend on rho* itself."""
    simt = simt_backend_or_skip()
    module = _simt.load()
    B, vocab = 7, 4500
    for seed in range(8):
        module.reset_launch_counts()
        gen = torch.Generator().manual_seed(seed)
        q = random_probs(gen, (B, 1, 1, vocab))
        p = q * torch.exp(0.3 * torch.randn(B, 1, 2, vocab, generator=gen, dtype=torch.float64))
        p = p / p.sum(-1, keepdim=True)
        drafts = torch.multinomial(q.reshape(B, vocab), 1, generator=gen).reshape(B, 1, 1).expand(B, 2, 1)
        q_rows, p_rows = q.expand(B, 2, 1, vocab).to(dtype), p.expand(B, 2, 2, vocab).to(dtype)
        want = torch.ops.fastar.spectr_accept(drafts, q_rows, p_rows, torch.tensor(seed), torch.tensor(0))
        got = simt.spectr_accept(drafts, q_rows, p_rows, torch.tensor(seed), torch.tensor(0))
        for g, w in zip(got, want):
            assert torch.equal(g, w)
        assert_well_formed(*want, drafts, vocab)
        assert module.launch_counts()["spectr_solve"] == 2  # a launch per pass


def test_zero_drafts_and_empty_batch(backend):
    # n = 0: the bonus token from p; B = 0: empty outputs.
    gen = torch.Generator().manual_seed(2)
    p = random_probs(gen, (8, 2, 1, 5)).float()
    draft_index, tokens, num_accepted = backend.spectr_accept(torch.zeros(8, 2, 0, dtype=torch.int64),
                                                              torch.zeros(8, 2, 0, 5), p, seed=1)
    assert (num_accepted == 0).all() and (draft_index == 0).all() and ((tokens >= 0) & (tokens < 5)).all()
    out = backend.spectr_accept(torch.zeros(0, 2, 3, dtype=torch.int32), torch.zeros(0, 2, 3, 5),
                                torch.zeros(0, 2, 4, 5), seed=1)
    assert [tuple(t.shape) for t in out] == [(0,), (0, 4), (0,)]


def test_identical_drafts_use_k_drafts(backend):
    # All k drafts equal (q one-hot: the draft model is deterministic here). beta(rho) = .6 / rho and rho* solves
    # 1 - (1 - .6 / rho)^3 = .6 (rho* = 2.28 > 1): each candidate passes with .6 / rho*, P(accept) = .6 = p(0), and
    # the residual is (0, 1). Speculative sampling's test alone would accept 1 - .4^3 = .936 and emit 0 too often.
    n_rows = rows(backend, 20_000, 1_000)
    p = torch.tensor([0.6, 0.4])
    q = torch.tensor([1.0, 0.0])
    drafts = torch.zeros(n_rows, 3, 1, dtype=torch.int64)
    _, tokens, num_accepted = backend.spectr_accept(drafts, q.expand(n_rows, 3, 1, 2), p.expand(n_rows, 3, 2, 2),
                                                    seed=8)
    level = spectr_level(p, q, 3)
    assert abs(level["rho"] - 0.6 / (1 - 0.4 ** (1 / 3))) < 1e-6 and abs(level["accept"] - 0.6) < 1e-6  # float32 p
    assert stats.binomtest(int((num_accepted == 1).sum()), n_rows, level["accept"]).pvalue > P_THRESHOLD
    observed = Counter(tokens[:, 0].tolist())
    assert chisquare_pvalue(observed, {0: 0.6, 1: 0.4}, n_rows) > P_THRESHOLD
    assert int((tokens[num_accepted == 0, 0] != 1).sum()) <= 1  # the residual (0, 1)


# ----------------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------------


def test_shape_and_type_errors(backend):
    ids = torch.zeros(2, 3, 2, dtype=torch.int64)
    q = torch.full((2, 3, 2, 4), 0.25)
    p = torch.full((2, 3, 3, 4), 0.25)
    with pytest.raises(ValueError, match="target_probs must have shape"):
        backend.spectr_accept(ids, q, p[:, :, :2], seed=0)
    with pytest.raises(ValueError, match="draft_probs must have shape"):
        backend.spectr_accept(ids, q[:, :2], p, seed=0)
    with pytest.raises(ValueError, match="3 dimension"):
        backend.spectr_accept(ids[:, 0], q, p, seed=0)
    with pytest.raises(TypeError, match="same dtype"):
        backend.spectr_accept(ids, q.half(), p, seed=0)
    with pytest.raises(TypeError, match="int32 or int64"):
        backend.spectr_accept(ids.float(), q, p, seed=0)
    with pytest.raises(ValueError, match=r"number of drafts k must lie in \[1, 64\]"):
        backend.spectr_accept(torch.zeros(1, 65, 1, dtype=torch.int64), torch.full((1, 65, 1, 4), 0.25),
                              torch.full((1, 65, 2, 4), 0.25), seed=0)


@pytest.mark.parametrize("vocab", [6, 4500])  # 4500 on CUDA: the solve split over V (few nodes)
@pytest.mark.parametrize("where", ["bad_id", "negative_id", "nan_p", "negative_q", "nan_bonus"])
def test_bad_values(backend, where, vocab):
    gen = torch.Generator().manual_seed(3)
    model = PrefixModel(gen, vocab)
    drafts, q_rows, p_rows = model.case(3, 2, 2)
    drafts[:, 1] = drafts[:, 0]  # both drafts alive at every level: whole rows are read
    q_rows[:, 1], p_rows[:, 1] = q_rows[:, 0], p_rows[:, 0]
    row = 1
    if where == "bad_id":
        drafts[row, 1, 1] = vocab
    elif where == "negative_id":
        drafts[row, 0, 0] = -1
    elif where == "nan_p":
        p_rows[row, :, 0, 5] = float("nan")
    elif where == "negative_q":
        q_rows[row, :, 0, 2] = -0.1
    else:  # the bonus row, reached only when both levels accept: make them accept surely
        p_rows[row, :, :2] = q_rows[row, :, :2]
        p_rows[row, :, 2, 0] = float("nan")
    status = STATUS_BAD_ID if "id" in where else STATUS_BAD_VALUE
    if not backend.marks_invalid_rows:
        exc = IndexError if status == STATUS_BAD_ID else ValueError
        with pytest.raises(exc, match=f"fastar.spectr_accept: invalid input in batch row {row}"):
            backend.spectr_accept(drafts, q_rows, p_rows, seed=5)
        return
    draft_index, tokens, num_accepted = backend.spectr_accept(drafts, q_rows, p_rows, seed=5)
    assert int(num_accepted[row]) == -status and int(draft_index[row]) == -1 and (tokens[row] == -1).all()
    good = [b for b in range(3) if b != row]
    assert (num_accepted[good] >= 0).all()
    with pytest.raises(IndexError if status == STATUS_BAD_ID else ValueError, match="invalid input in batch row 1"):
        fastar.check_rows(num_accepted, "fastar.spectr_accept")
