"""Tests of fastar.speculative_sample (docs/acceptance.md) on every backend.

The oracle is ``fastar.reference``: ``speculative_sample_reference`` fixes the exact token of every
(seed, offset, row, position), ``speculative_output_distribution`` the exact distribution of the emitted
sequence. The statistical tests additionally check the distributions against float64 formulas written here.

Statistical tests use fixed seeds and reject at p < 1e-3 (``P_THRESHOLD``), so they are deterministic:
a pass is reproducible, and a correct kernel fails one of them only if the fixed seed happens to be one of
the ~1e-3 unlucky ones (it is not: they pass).

The SIMT backend emulates CUDA on the CPU (about a millisecond per block = per batch row), so tests that
need many rows use fewer of them there (``rows(backend, cpu, simt)``).
"""
from __future__ import annotations

import math
import zlib
from collections import Counter
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import fastar
from fastar import _common, _simt
from fastar.reference import (
    philox4x32_10,
    speculative_output_distribution,
    speculative_sample_reference,
)
from helpers import HYPOTHESIS, assert_same, chisquare_pvalue, rows

P_THRESHOLD = 1e-3  # statistical tests fail when a p-value is below this (fixed seeds: deterministic)
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
STATUS_BAD_NUM_DRAFT, STATUS_BAD_ID, STATUS_BAD_VALUE, STATUS_ZERO_MASS = 1, 2, 4, 8


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def random_probs(gen, shape, *, sparsity: float = 0.0, sharpness: float = 1.0) -> torch.Tensor:
    """Random float64 distributions along the last dim (Dirichlet-like), some entries exactly zero."""
    x = -torch.log(torch.rand(shape, generator=gen, dtype=torch.float64).clamp_min(1e-300)) ** sharpness
    if sparsity > 0:
        x = x * (torch.rand(shape, generator=gen, dtype=torch.float64) >= sparsity)
        empty = x.sum(-1, keepdim=True) == 0
        x = torch.where(empty, torch.ones_like(x), x)
    return x / x.sum(-1, keepdim=True)


def sample_rows(gen, probs: torch.Tensor) -> torch.Tensor:
    """One token per row of probs [..., V] (float64 multinomial), shape probs.shape[:-1], int64."""
    flat = probs.reshape(-1, probs.shape[-1]).double()
    if flat.shape[0] == 0:
        return torch.zeros(probs.shape[:-1], dtype=torch.int64)
    return torch.multinomial(flat, 1, generator=gen).reshape(probs.shape[:-1])


def make_case(
    gen,
    batch: int,
    n: int,
    vocab: int,
    *,
    dtype=torch.float32,
    with_q: bool = True,
    ids_dtype=torch.int64,
    ragged: Optional[torch.dtype] = None,
    sparsity: float = 0.3,
):
    """Random valid inputs whose acceptance lengths vary: some rows have q == p (every draft accepted),
    drafts are mostly sampled from q (or from p without q), some are uniform (often rejected)."""
    p = random_probs(gen, (batch, n + 1, vocab), sparsity=sparsity, sharpness=2.0).to(dtype)
    same = torch.rand(batch, generator=gen) < 0.3
    if with_q:
        q = random_probs(gen, (batch, n, vocab), sparsity=sparsity, sharpness=2.0).to(dtype)
        q[same] = p[same, :n]
        src = q
    else:
        q = None
        src = p[:, :n]
    drafts = sample_rows(gen, src.double()) if n > 0 else torch.zeros(batch, 0, dtype=torch.int64)
    uniform = torch.randint(0, vocab, (batch, n), generator=gen)
    use_uniform = torch.rand(batch, n, generator=gen) < 0.15
    drafts = torch.where(use_uniform, uniform, drafts)
    if not with_q and n > 0:  # some rows where p is one-hot at the drafts: certain acceptance
        p = p.clone()
        p[same, :n] = torch.nn.functional.one_hot(drafts[same], vocab).to(dtype)
    drafts = drafts.to(ids_dtype)
    num_draft = None
    if ragged is not None:
        num_draft = torch.randint(0, n + 1, (batch,), generator=gen).to(ragged)
    return drafts, q, p, num_draft


def reference(drafts, q, p, num_draft=None, seed=0, offset=0):
    seed = int(seed) if isinstance(seed, torch.Tensor) else seed
    offset = int(offset) if isinstance(offset, torch.Tensor) else offset
    return speculative_sample_reference(drafts, q, p, num_draft, seed=seed, offset=offset)


def assert_well_formed(tokens, num_accepted, drafts, vocab, num_draft=None):
    """Structure of a valid result: accepted drafts, one token in [0, V), then exactly -1."""
    batch, n = drafts.shape
    assert tokens.shape == (batch, n + 1) and tokens.dtype == torch.int32
    assert num_accepted.shape == (batch,) and num_accepted.dtype == torch.int32
    k = torch.full((batch,), n) if num_draft is None else num_draft.long()
    na = num_accepted.long()
    assert ((na >= 0) & (na <= k)).all(), num_accepted
    pos = torch.arange(n + 1).expand(batch, n + 1)
    accepted = pos < na[:, None]
    padded_drafts = torch.cat([drafts.long(), torch.zeros(batch, 1, dtype=torch.long)], 1)
    assert torch.equal(tokens.long()[accepted], padded_drafts[accepted])
    last = tokens.long().gather(1, na[:, None]).squeeze(1)
    assert ((last >= 0) & (last < vocab)).all(), last
    assert (tokens[pos > na[:, None]] == -1).all()


def emitted_sequences(tokens: torch.Tensor, num_accepted: torch.Tensor) -> Counter:
    """Counts of the emitted sequences tokens[b, :num_accepted[b] + 1] (rows are i.i.d. trials)."""
    arr = tokens.numpy()
    uniq, counts = np.unique(arr, axis=0, return_counts=True)
    out = Counter()
    for row, c in zip(uniq.tolist(), counts.tolist()):
        out[tuple(t for t in row if t >= 0)] += c
    # -1 only ever follows the emitted tokens (checked by the callers with assert_well_formed)
    return out


def exact_output_distribution(
    p: torch.Tensor, q: Optional[torch.Tensor], drafts: Optional[Sequence[int]] = None
) -> Dict[Tuple[int, ...], float]:
    """Exact output distribution in float64, written independently of fastar.reference, for rows that
    need not be normalised (float16/bfloat16 rounding): the drafts are sampled from q / sum(q) (or fixed
    when q is None, then q is one-hot: accept with probability p(x)); a draft is accepted with probability
    min(1, p(x)/q(x)); a rejection emits norm(max(0, p - q)) (norm(p) if that is empty); the bonus row is
    norm(p_k)."""
    p = p.double()
    k, vocab = p.shape[0] - 1, p.shape[1]
    if q is None:
        q = torch.zeros(k, vocab, dtype=torch.float64)
        q[torch.arange(k), torch.as_tensor(list(drafts))] = 1.0
        draft_dist = q.clone()
    else:
        q = q.double()
        draft_dist = q / q.sum(-1, keepdim=True)
    ratio = torch.where(q > 0, torch.minimum(torch.ones_like(q), p[:k] / q.clamp_min(1e-300)), torch.ones_like(q))
    out: Dict[Tuple[int, ...], float] = {}

    def walk(prefix, mass):
        i = len(prefix)
        if i == k:
            for t in range(vocab):
                out[prefix + (t,)] = out.get(prefix + (t,), 0.0) + mass * float(p[k, t] / p[k].sum())
            return
        reject = float((draft_dist[i] * (1 - ratio[i])).sum())
        residual = (p[i] - q[i]).clamp_min(0)
        if residual.sum() == 0:
            residual = p[i]
        for t in range(vocab):
            if reject > 0 and residual[t] > 0:
                out[prefix + (t,)] = out.get(prefix + (t,), 0.0) + mass * reject * float(residual[t] / residual.sum())
        for x in range(vocab):
            m = mass * float(draft_dist[i, x] * ratio[i, x])
            if m > 0:
                walk(prefix + (x,), m)

    walk((), 1.0)
    return out


def simt_backend_or_skip():
    try:
        _simt.load()
    except ImportError as exc:
        pytest.skip(f"SIMT build not present: {exc}")
    return torch.ops.fastar_simt


# ----------------------------------------------------------------------------------------------------
# the oracle's random numbers
# ----------------------------------------------------------------------------------------------------


def test_reference_philox_known_answers():
    # Random123's kat_vectors for philox4x32-10 (counter[4], key[2] -> output[4]): the oracle's generator
    # is the published one, so "same seed, same tokens" is pinned to a standard stream.
    kat = [
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        (
            [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
            [0xA4093822, 0x299F31D0],
            [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
        ),
    ]
    for counter, key, want in kat:
        assert philox4x32_10(counter, key) == want


def test_exact_distribution_helpers_agree():
    # The test-local float64 distribution and fastar.reference's agree on normalised rows.
    gen = torch.Generator().manual_seed(11)
    p = random_probs(gen, (3, 4), sparsity=0.2)
    q = random_probs(gen, (2, 4), sparsity=0.2)
    for mine, theirs in (
        (exact_output_distribution(p, q), speculative_output_distribution(p, q)),
        (exact_output_distribution(p, None, [1, 3]), speculative_output_distribution(p, None, [1, 3])),
    ):
        assert set(k for k, v in mine.items() if v > 1e-15) == set(k for k, v in theirs.items() if v > 1e-15)
        for key in theirs:
            assert mine.get(key, 0.0) == pytest.approx(theirs[key], abs=1e-12)
        assert sum(mine.values()) == pytest.approx(1.0, abs=1e-12)


# ----------------------------------------------------------------------------------------------------
# 1. known vectors
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 7, 12345, 2**40 + 3])
def test_hf_vector(backend, seed):
    # transformers' speculative-sampling test: vocab 10, drafts 1, 4, 5 with draft logits one-hot +-10; the
    # target agrees at the first two positions and is -inf except token 8 at the third.
    vocab = 10
    drafts = torch.tensor([[1, 4, 5]])
    draft_logits = torch.full((1, 3, vocab), -10.0)
    draft_logits[0, torch.arange(3), drafts[0]] = 10.0
    target_logits = torch.full((1, 4, vocab), -10.0)
    target_logits[0, 0, 1] = 10.0
    target_logits[0, 1, 4] = 10.0
    target_logits[0, 2] = -math.inf
    target_logits[0, 2, 8] = 10.0
    target_logits[0, 3, 3] = 10.0
    q = torch.softmax(draft_logits, -1)
    p = torch.softmax(target_logits, -1)
    tokens, num_accepted = backend.speculative_sample(drafts, q, p, seed=seed)
    assert tokens.tolist() == [[1, 4, 8, -1]]
    assert num_accepted.tolist() == [2]


def one_hot_rows(token_rows, vocab):
    """target probabilities one-hot at the given token of every position: [B, n+1, V] float32."""
    t = torch.tensor(token_rows)
    return torch.nn.functional.one_hot(t, vocab).float()


# vLLM RejectionSampler-style cases without draft probabilities (q one-hot at the draft): with a one-hot
# target, a draft is accepted iff it is the target's token, the first mismatch emits the target's token.
VLLM_CASES = [
    # (drafts per row, target token per position (n+1), expected tokens, expected num_accepted)
    ([[1, 2, 3]], [[1, 2, 3, 4]], [[1, 2, 3, 4]], [3]),  # perfect match: bonus token
    ([[1, 2, 3]], [[1, 5, 3, 4]], [[1, 5, -1, -1]], [1]),  # early mismatch
    ([[1, 2, 3]], [[6, 2, 3, 4]], [[6, -1, -1, -1]], [0]),  # mismatch at position 0
    ([[1, 2, 3], [4, 5, 6]], [[1, 2, 7, 6], [4, 8, 6, 9]], [[1, 2, 7, -1], [4, 8, -1, -1]], [2, 1]),
    ([[7]], [[7, 2]], [[7, 2]], [1]),  # single draft
]


@pytest.mark.parametrize("case", range(len(VLLM_CASES)))
@pytest.mark.parametrize("seed", [0, 99])
def test_vllm_cases_without_draft_probs(backend, case, seed):
    drafts, target, want_tokens, want_accepted = VLLM_CASES[case]
    tokens, num_accepted = backend.speculative_sample(
        torch.tensor(drafts, dtype=torch.int32), None, one_hot_rows(target, 10), seed=seed
    )
    assert tokens.tolist() == want_tokens
    assert num_accepted.tolist() == want_accepted


def test_vllm_ragged_and_empty_without_draft_probs(backend):
    # vLLM: sequences of different lengths [[1, 2], [3], []], targets [1, 2, 5], [3, 4], [5]
    drafts = torch.tensor([[1, 2], [3, 0], [0, 0]])
    target = one_hot_rows([[1, 2, 5], [3, 4, 0], [5, 0, 0]], 10)
    num_draft = torch.tensor([2, 1, 0])
    tokens, num_accepted = backend.speculative_sample(drafts, None, target, num_draft_tokens=num_draft, seed=3)
    assert tokens.tolist() == [[1, 2, 5], [3, 4, -1], [5, -1, -1]]
    assert num_accepted.tolist() == [2, 1, 0]


# ----------------------------------------------------------------------------------------------------
# 2-3. statistics: acceptance rate and output distributions
# ----------------------------------------------------------------------------------------------------


def test_toy_acceptance_probability(backend):
    # docs/acceptance.md toy: p = (.5, .3, .2), q = (.2, .3, .5) -> P(accept) = sum min(p, q) = 0.7; per draft
    # token the acceptance probability is min(1, p/q) = (1, 1, 0.4).
    N = rows(backend, 200_000, 1_000)
    gen = torch.Generator().manual_seed(1234)
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    drafts = torch.multinomial(q.double(), N, replacement=True, generator=gen)[:, None]
    tokens, num_accepted = backend.speculative_sample(
        drafts, q.expand(N, 1, 3), p.expand(N, 2, 3), seed=2024, offset=5
    )
    assert_well_formed(tokens, num_accepted, drafts, 3)
    accepted = num_accepted == 1
    # binomial test, reject at p-value < 1e-3 (P_THRESHOLD)
    assert stats.binomtest(int(accepted.sum()), N, 0.7).pvalue > P_THRESHOLD
    d = drafts[:, 0]
    assert accepted[d == 0].all() and accepted[d == 1].all()  # min(1, p/q) = 1
    assert stats.binomtest(int(accepted[d == 2].sum()), int((d == 2).sum()), 0.4).pvalue > P_THRESHOLD
    # after a rejection the residual norm(max(0, p - q)) = (1, 0, 0)
    assert (tokens[~accepted, 0] == 0).all()


def test_first_token_follows_target(backend):
    # (a) drafts sampled from q: the first emitted token is distributed as p_0, whatever q is.
    vocab, n = (6, 2) if backend.name != "simt" else (4, 2)
    N = rows(backend, 150_000, 1_000)
    gen = torch.Generator().manual_seed(77)
    p = random_probs(gen, (n + 1, vocab)).float()
    q = random_probs(gen, (n, vocab)).float()
    drafts = torch.stack([torch.multinomial(q[i].double(), N, True, generator=gen) for i in range(n)], 1)
    tokens, num_accepted = backend.speculative_sample(
        drafts, q.expand(N, n, vocab), p.expand(N, n + 1, vocab), seed=31337
    )
    assert_well_formed(tokens, num_accepted, drafts, vocab)
    observed = Counter(tokens[:, 0].tolist())
    p0 = p[0].double() / p[0].double().sum()
    expected = {t: float(p0[t]) for t in range(vocab)}
    assert chisquare_pvalue(observed, expected, N) > P_THRESHOLD  # chi-square, threshold 1e-3
    # and not merely "some" distribution: the acceptance rate at position 0 is sum min(p0, q0)
    acc_rate = float(torch.minimum(p[0], q[0]).double().sum())
    assert stats.binomtest(int((num_accepted >= 1).sum()), N, acc_rate).pvalue > P_THRESHOLD


@pytest.mark.parametrize("layout", ["expand", "contiguous"])
def test_sequence_distribution_with_draft_probs(backend, layout):
    # (b) the full emitted sequence follows speculative_output_distribution(p, q) (V=4, n=2)
    vocab, n = 4, 2
    N = rows(backend, 120_000, 1_000)
    gen = torch.Generator().manual_seed(5 if layout == "expand" else 6)
    p = random_probs(gen, (n + 1, vocab), sparsity=0.15).float()
    q = random_probs(gen, (n, vocab), sparsity=0.15).float()
    drafts = torch.stack([torch.multinomial(q[i].double(), N, True, generator=gen) for i in range(n)], 1)
    tp, dp = p.expand(N, n + 1, vocab), q.expand(N, n, vocab)
    if layout == "contiguous":
        tp, dp = tp.contiguous(), dp.contiguous()
    tokens, num_accepted = backend.speculative_sample(drafts.int(), dp, tp, seed=424242, offset=17)
    assert_well_formed(tokens, num_accepted, drafts, vocab)
    expected = speculative_output_distribution(p, q)
    assert chisquare_pvalue(emitted_sequences(tokens, num_accepted), expected, N) > P_THRESHOLD


def test_distribution_without_draft_probs(backend):
    # (c) fixed drafts, q one-hot: the first token follows p_0 exactly, and the whole sequence follows
    # speculative_output_distribution(p, None, drafts).
    vocab, n = 5, 2
    N = rows(backend, 120_000, 1_000)
    gen = torch.Generator().manual_seed(8)
    p = random_probs(gen, (n + 1, vocab)).float()
    # make the drafts likely enough to be accepted sometimes, unlikely enough to be rejected often
    fixed = [int(torch.argmax(p[0])), int(torch.argsort(p[1])[-2])]
    drafts = torch.tensor(fixed).expand(N, n)
    tokens, num_accepted = backend.speculative_sample(drafts, None, p.expand(N, n + 1, vocab), seed=555)
    assert_well_formed(tokens, num_accepted, drafts, vocab)
    p0 = p[0].double() / p[0].double().sum()
    first = {t: float(p0[t]) for t in range(vocab)}
    assert chisquare_pvalue(Counter(tokens[:, 0].tolist()), first, N) > P_THRESHOLD
    expected = speculative_output_distribution(p, None, fixed)
    assert chisquare_pvalue(emitted_sequences(tokens, num_accepted), expected, N) > P_THRESHOLD


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_q", [True, False])
def test_distribution_low_precision(backend, dtype, with_q):
    # (d) float16 / bfloat16 inputs: the output follows the exact distribution of the ROUNDED
    # probabilities (which do not sum to exactly 1: computed in float64 by exact_output_distribution).
    vocab, n = 4, 2
    N = rows(backend, 100_000, 600)
    gen = torch.Generator().manual_seed(21 + (dtype == torch.bfloat16) + 2 * with_q)
    p = random_probs(gen, (n + 1, vocab), sparsity=0.1).to(dtype)
    if with_q:
        q = random_probs(gen, (n, vocab), sparsity=0.1).to(dtype)
        qn = q.double() / q.double().sum(-1, keepdim=True)
        drafts = torch.stack([torch.multinomial(qn[i], N, True, generator=gen) for i in range(n)], 1)
        expected = exact_output_distribution(p, q)
        dp = q.expand(N, n, vocab)
    else:
        q, dp = None, None
        fixed = [int(torch.argmax(p[0].float())), int(torch.argmin(p[1].float()))]
        drafts = torch.tensor(fixed).expand(N, n)
        expected = exact_output_distribution(p, None, fixed)
    tokens, num_accepted = backend.speculative_sample(drafts, dp, p.expand(N, n + 1, vocab), seed=99, offset=1)
    assert_well_formed(tokens, num_accepted, drafts, vocab)
    assert chisquare_pvalue(emitted_sequences(tokens, num_accepted), expected, N) > P_THRESHOLD


# ----------------------------------------------------------------------------------------------------
# 4-5. exact agreement with the reference (which is the cross-backend spec)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("with_q", [True, False], ids=["q", "no_q"])
@pytest.mark.parametrize(
    "ids_dtype,ragged",
    [(torch.int32, None), (torch.int64, torch.int32), (torch.int32, torch.int64)],
    ids=["ids32", "ids64-nd32", "ids32-nd64"],
)
def test_matches_reference(backend, dtype, with_q, ids_dtype, ragged):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype}{with_q}{ids_dtype}{ragged}".encode()))
    batch, n, vocab = 24, 5, 37
    drafts, q, p, num_draft = make_case(
        gen, batch, n, vocab, dtype=dtype, with_q=with_q, ids_dtype=ids_dtype, ragged=ragged
    )
    for seed, offset in [(0, 0), (12345, 6), (2**63 + 11, 2**40 + 1)]:
        got = backend.speculative_sample(drafts, q, p, num_draft_tokens=num_draft, seed=seed, offset=offset)
        want = reference(drafts, q, p, num_draft, seed, offset)
        assert_same(got, want, f"seed={seed} offset={offset}")
        assert_well_formed(*got, drafts, vocab, num_draft)
    # the test data exercises every path: full acceptance, rejection at 0, something in between
    na, k = want[1].long(), (num_draft.long() if num_draft is not None else torch.full((batch,), n))
    na, k = na[k > 0], k[k > 0]
    assert (na == k).any() and (na == 0).any() and ((na > 0) & (na < k)).any()


@pytest.mark.parametrize("vocab", [1, 7, 300])
@pytest.mark.parametrize("with_q", [True, False])
def test_matches_reference_vocab_sizes(backend, vocab, with_q):
    gen = torch.Generator().manual_seed(vocab * 2 + with_q)
    drafts, q, p, _ = make_case(gen, 12, 4, vocab, with_q=with_q)
    for seed in (3, 2**64 - 1):
        assert_same(backend.speculative_sample(drafts, q, p, seed=seed, offset=9),
                    reference(drafts, q, p, None, seed, 9))
    if vocab == 1:  # one token: p = q = 1, every draft accepted, bonus token 0
        tokens, num_accepted = backend.speculative_sample(drafts, q, p, seed=1)
        assert (num_accepted == 4).all() and (tokens == 0).all()


def test_long_drafts(backend):
    # n + 1 > 256: more draft positions than CUDA threads per block (strided loops, atomicMin).
    gen = torch.Generator().manual_seed(4)
    batch, n, vocab = 3, 300, 5
    p = random_probs(gen, (batch, n + 1, vocab)).float()
    q = p[:, :n].clone()
    drafts = sample_rows(gen, q.double())
    # row 0: q == p everywhere -> all accepted; row 1: a forced rejection at position 270; row 2: at 3
    p[1, 270] = 0.0
    p[1, 270, (drafts[1, 270] + 1) % vocab] = 1.0
    p[2, 3] = 0.0
    p[2, 3, (drafts[2, 3] + 2) % vocab] = 1.0
    got = backend.speculative_sample(drafts, q, p, seed=8)
    assert_same(got, reference(drafts, q, p, None, 8))
    assert got[1].tolist() == [n, 270, 3]


def test_zero_drafts(backend):
    gen = torch.Generator().manual_seed(2)
    p = random_probs(gen, (9, 1, 13)).float()
    drafts = torch.zeros(9, 0, dtype=torch.int64)
    for q in (None, torch.zeros(9, 0, 13)):
        got = backend.speculative_sample(drafts, q, p, seed=5)
        assert got[0].shape == (9, 1) and (got[1] == 0).all()
        assert_same(got, reference(drafts, q, p, None, 5))


def test_empty_batch(backend):
    for with_q in (True, False):
        q = torch.rand(0, 3, 11) if with_q else None
        tokens, num_accepted = backend.speculative_sample(
            torch.zeros(0, 3, dtype=torch.int32), q, torch.rand(0, 4, 11),
            num_draft_tokens=torch.zeros(0, dtype=torch.int32), seed=1,
        )
        assert tokens.shape == (0, 4) and tokens.dtype == torch.int32
        assert num_accepted.shape == (0,) and num_accepted.dtype == torch.int32


@pytest.mark.parametrize("layout", ["transposed", "sliced", "last_dim_strided", "ids_transposed"])
def test_non_contiguous_inputs(backend, layout):
    gen = torch.Generator().manual_seed(42)
    batch, n, vocab = 10, 3, 45
    drafts, q, p, num_draft = make_case(gen, batch, n, vocab, ragged=torch.int64)
    if layout == "transposed":  # [n+1, B, V] storage seen as [B, n+1, V]: last dim contiguous
        p2 = p.transpose(0, 1).contiguous().transpose(0, 1)
        q2 = q.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "sliced":  # padded V and every other batch row
        big = torch.full((2 * batch, n + 1, vocab + 7), float("nan"))
        big[::2, :, :vocab] = p
        p2 = big[::2, :, :vocab]
        bigq = torch.full((batch, n + 2, vocab + 3), float("nan"))
        bigq[:, 1 : n + 1, 2 : vocab + 2] = q
        q2 = bigq[:, 1 : n + 1, 2 : vocab + 2]
    elif layout == "last_dim_strided":  # stride along V is not 1
        p2 = p.transpose(1, 2).contiguous().transpose(1, 2)
        q2 = torch.stack([q, torch.full_like(q, float("nan"))], -1)[..., 0]
    else:
        p2, q2 = p, q
    d2 = drafts.t().contiguous().t() if layout == "ids_transposed" else drafts
    nd2 = torch.stack([num_draft, num_draft], 1)[:, 1]  # strided ragged lengths
    assert torch.equal(p2, p) and torch.equal(q2, q) and torch.equal(d2, drafts)
    got = backend.speculative_sample(d2, q2, p2, num_draft_tokens=nd2, seed=77, offset=3)
    assert_same(got, reference(drafts, q, p, num_draft, 77, 3))
    # and without draft probs
    got = backend.speculative_sample(d2, None, p2, num_draft_tokens=nd2, seed=78)
    assert_same(got, reference(drafts, None, p, num_draft, 78, 0))


def test_seed_and_offset_tensors(backend):
    gen = torch.Generator().manual_seed(3)
    drafts, q, p, num_draft = make_case(gen, 16, 3, 20, ragged=torch.int32)
    for seed, offset in [(0, 1), (2**62 + 5, 7), (-3, 2**33), (2**63 - 1, 2**63)]:
        want = reference(drafts, q, p, num_draft, seed % 2**64, offset % 2**64)
        seed_t = torch.tensor(seed if seed < 2**63 else seed - 2**64, dtype=torch.int64)
        offset_t = torch.tensor([offset if offset < 2**63 else offset - 2**64], dtype=torch.int64)  # shape [1]
        for s, o in [(seed, offset), (seed_t, offset_t), (seed_t, offset), (seed, offset_t)]:
            got = backend.speculative_sample(drafts, q, p, num_draft_tokens=num_draft, seed=s, offset=o)
            assert_same(got, want, f"seed={s!r} offset={o!r}")
        # scalar views into larger tensors (storage offsets)
        seed_view = torch.stack([torch.tensor(123, dtype=torch.int64), seed_t])[1]
        offset_view = torch.stack([offset_t[0], torch.tensor(-9, dtype=torch.int64)])[:1]
        got = backend.speculative_sample(drafts, q, p, num_draft_tokens=num_draft, seed=seed_view, offset=offset_view)
        assert_same(got, want, "views")


DTYPE = st.sampled_from(FLOAT_DTYPES)


@settings(max_examples=20, **HYPOTHESIS)
@given(
    batch=st.integers(0, 6),
    n=st.integers(0, 6),
    vocab=st.integers(1, 70),
    dtype=DTYPE,
    with_q=st.booleans(),
    ragged=st.sampled_from([None, torch.int32, torch.int64]),
    ids_dtype=st.sampled_from([torch.int32, torch.int64]),
    sparsity=st.sampled_from([0.0, 0.5, 0.9]),
    seed=st.integers(0, 2**64 - 1),
    offset=st.integers(0, 2**64 - 1),
    data_seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference_hypothesis(
    backend, batch, n, vocab, dtype, with_q, ragged, ids_dtype, sparsity, seed, offset, data_seed
):
    gen = torch.Generator().manual_seed(data_seed)
    drafts, q, p, num_draft = make_case(
        gen, batch, n, vocab, dtype=dtype, with_q=with_q, ids_dtype=ids_dtype, ragged=ragged, sparsity=sparsity
    )
    got = backend.speculative_sample(drafts, q, p, num_draft_tokens=num_draft, seed=seed, offset=offset)
    assert_same(got, reference(drafts, q, p, num_draft, seed, offset))
    assert_well_formed(*got, drafts, vocab, num_draft)


def test_cpu_and_simt_identical():
    # Same seed => the same tokens on the CPU kernels and the CUDA kernels (run by the SIMT emulator).
    simt_ops = simt_backend_or_skip()
    gen = torch.Generator().manual_seed(100)
    for dtype in FLOAT_DTYPES:
        for with_q in (True, False):
            drafts, q, p, num_draft = make_case(gen, 32, 4, 300, dtype=dtype, with_q=with_q, ragged=torch.int64)
            for seed, offset in [(1, 0), (2**63 + 1, 12)]:
                kwargs = dict(num_draft_tokens=num_draft, seed=seed, offset=offset)
                cpu = fastar.speculative_sample(drafts, q, p, **kwargs)
                with _common.using_ops(simt_ops):
                    simt = fastar.speculative_sample(drafts, q, p, **kwargs)
                assert_same(simt, cpu, f"{dtype} with_q={with_q}")


# A vocabulary of several 16-byte-load tiles and few rows: the CUDA kernels split each row to sample from over
# several blocks (the emulator counts 4 SMs, so 2 rows of V = 9001 take 5 chunks of 2048 tokens) and the finishing
# block searches the chunk that holds the target.
SPLIT_VOCAB = 9001


def unaligned(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """x with the same values in a vocabulary padded by one: rows no longer start 16-byte aligned."""
    if x is None:
        return None
    padded = torch.zeros(*x.shape[:-1], x.shape[-1] + 1, dtype=x.dtype)
    padded[..., 1:] = x
    return padded[..., 1:]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("with_q", [True, False], ids=["q", "no_q"])
@pytest.mark.parametrize("layout", ["contiguous", "unaligned"])
def test_rows_split_over_blocks(backend, dtype, with_q, layout):
    gen = torch.Generator().manual_seed(zlib.crc32(f"split{dtype}{with_q}{layout}".encode()))
    drafts, q, p, _ = make_case(gen, 2, 3, SPLIT_VOCAB, dtype=dtype, with_q=with_q, sparsity=0.5)
    if layout == "unaligned":
        q, p = unaligned(q), unaligned(p)
    sampled = set()
    for seed in range(6):
        got = backend.speculative_sample(drafts, q, p, seed=seed, offset=seed)
        assert_same(got, reference(drafts, q, p, None, seed, seed), f"seed={seed}")
        assert_well_formed(*got, drafts, SPLIT_VOCAB)
        sampled |= {int(t) // 2048 for t in got[0].gather(1, got[1].long()[:, None])}
    assert len(sampled) > 1, "the sampled tokens all fell in one chunk"


def test_split_row_with_one_token_of_mass(backend):
    # The mass of the row to sample from sits on one token of the last chunk (or the first): every chunk sum
    # before it is zero, the search walks past them.
    vocab = SPLIT_VOCAB
    drafts = torch.tensor([[0], [vocab - 1]])
    for t in (0, 2047, 2048, 6000, vocab - 1):
        p = torch.zeros(2, 2, vocab)
        p[:, :, t] = 1.0
        q = torch.zeros(2, 1, vocab)
        q[:, 0, (t + 1) % vocab] = 1.0  # the drafts are rejected unless they are t
        got = backend.speculative_sample(drafts, q, p, seed=4)
        assert_same(got, reference(drafts, q, p, None, 4))
        assert (got[0].gather(1, got[1].long()[:, None]) == t).all()


def test_empty_residual_falls_back_to_p_in_a_split_row(backend):
    gen = torch.Generator().manual_seed(33)
    p = torch.zeros(2, 2, SPLIT_VOCAB)
    p[:, :, 4000:8000] = random_probs(gen, (2, 2, 4000)).float()
    q = p[:, :1].clone()
    drafts = torch.tensor([[1], [8500]])  # p(x) = q(x) = 0: rejected, residual empty
    got = backend.speculative_sample(drafts, q, p, seed=14)
    assert (got[1] == 0).all() and ((got[0][:, 0] >= 4000) & (got[0][:, 0] < 8000)).all()
    assert_same(got, reference(drafts, q, p, None, 14))


@pytest.mark.parametrize("with_q", [True, False])
def test_invalid_value_in_any_chunk_of_a_split_row(backend, with_q):
    gen = torch.Generator().manual_seed(34)
    p = random_probs(gen, (2, 2, SPLIT_VOCAB)).float()
    q = random_probs(gen, (2, 1, SPLIT_VOCAB)).float()
    drafts = torch.tensor([[4], [7]])
    p[:, 0] = 0.0
    p[:, 0, 10] = 1.0  # the drafts are rejected at position 0: the residual row is sampled
    for t in (0, 2048, 5000, SPLIT_VOCAB - 1):
        bad_p = p.clone()
        bad_p[1, 0, t] = float("nan")
        with pytest.raises(ValueError, match="batch row 1: a probability that is NaN"):
            backend.checked(backend.speculative_sample, drafts, q if with_q else None, bad_p, seed=2)


def test_cpu_and_simt_identical_split_rows():
    simt_ops = simt_backend_or_skip()
    gen = torch.Generator().manual_seed(101)
    for dtype in FLOAT_DTYPES:
        for with_q in (True, False):
            drafts, q, p, num_draft = make_case(gen, 2, 3, 20000, dtype=dtype, with_q=with_q, ragged=torch.int64)
            for seed in range(3):
                kwargs = dict(num_draft_tokens=num_draft, seed=seed, offset=7)
                cpu = fastar.speculative_sample(drafts, q, p, **kwargs)
                with _common.using_ops(simt_ops):
                    simt = fastar.speculative_sample(drafts, q, p, **kwargs)
                assert_same(simt, cpu, f"{dtype} with_q={with_q} seed={seed}")


# ----------------------------------------------------------------------------------------------------
# 6. limiting cases
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_p_equals_q_accepts_everything(backend, dtype):
    gen = torch.Generator().manual_seed(6)
    batch, n, vocab = 40, 5, 33
    p = random_probs(gen, (batch, n + 1, vocab), sparsity=0.5).to(dtype)
    q = p[:, :n].clone()
    drafts = sample_rows(gen, q.double())  # drafts in q's support
    tokens, num_accepted = backend.speculative_sample(drafts, q, p, seed=10)
    assert (num_accepted == n).all()
    assert torch.equal(tokens[:, :n].long(), drafts)
    assert (p[torch.arange(batch), n, tokens[:, n].long()] > 0).all()  # bonus token from p_n's support
    # without q: a target that is one-hot at the draft accepts it with probability 1
    p1 = torch.nn.functional.one_hot(torch.cat([drafts, drafts[:, :1]], 1), vocab).to(dtype)
    tokens, num_accepted = backend.speculative_sample(drafts, None, p1, seed=11)
    assert (num_accepted == n).all() and torch.equal(tokens.long(), torch.cat([drafts, drafts[:, :1]], 1))


@pytest.mark.parametrize("with_q", [True, False])
def test_disjoint_supports_reject_first(backend, with_q):
    gen = torch.Generator().manual_seed(9)
    batch, n, vocab = 40, 3, 30
    half = vocab // 2
    p = torch.zeros(batch, n + 1, vocab)
    p[..., :half] = random_probs(gen, (batch, n + 1, half), sparsity=0.3).float()
    q = torch.zeros(batch, n, vocab)
    q[..., half:] = random_probs(gen, (batch, n, vocab - half)).float()
    drafts = sample_rows(gen, q.double())
    tokens, num_accepted = backend.speculative_sample(drafts, q if with_q else None, p, seed=12)
    assert (num_accepted == 0).all()
    assert (p[torch.arange(batch), 0, tokens[:, 0].long()] > 0).all()
    assert (tokens[:, 1:] == -1).all()


def test_empty_residual_falls_back_to_p(backend):
    # A draft with p(x) = q(x) = 0 is rejected (u * 0 < 0 is false); the residual max(0, p - q) is then
    # empty (p == q) and the token is sampled from p itself.
    gen = torch.Generator().manual_seed(13)
    batch, vocab = 30, 8
    p = torch.zeros(batch, 2, vocab)
    p[:, :, :4] = random_probs(gen, (batch, 2, 4)).float()
    q = p[:, :1].clone()
    drafts = torch.randint(4, vocab, (batch, 1), generator=gen)
    got = backend.speculative_sample(drafts, q, p, seed=14)
    assert (got[1] == 0).all() and (got[0][:, 0] < 4).all() and (got[0][:, 1] == -1).all()
    assert_same(got, reference(drafts, q, p, None, 14))


def test_empty_residual_without_draft_probs(backend):
    # No q: p is zero except p(x) = 0.5 at the draft (an unnormalised row): half the rows reject, the
    # residual (p without x) is empty, so the token is sampled from p itself, i.e. it is x again.
    batch, vocab = 64, 12
    drafts = torch.arange(batch)[:, None] % vocab
    p = torch.zeros(batch, 2, vocab)
    p[torch.arange(batch), 0, drafts[:, 0]] = 0.5
    p[:, 1, 3] = 1.0
    got = backend.speculative_sample(drafts, None, p, seed=15)
    assert_same(got, reference(drafts, None, p, None, 15))
    tokens, num_accepted = got
    assert (num_accepted == 0).any() and (num_accepted == 1).any()
    assert torch.equal(tokens[:, 0].long(), drafts[:, 0])  # accepted, or rejected and resampled as x
    assert (tokens[num_accepted == 1, 1] == 3).all() and (tokens[num_accepted == 0, 1] == -1).all()


def test_draft_with_zero_draft_probability_is_accepted(backend):
    # accept iff u * q(x) < p(x): q(x) = 0 < p(x) accepts (min(1, p/q) = 1), p(x) = 0 rejects
    gen = torch.Generator().manual_seed(16)
    batch, n, vocab = 20, 2, 9
    p = random_probs(gen, (batch, n + 1, vocab)).float()
    q = random_probs(gen, (batch, n, vocab)).float()
    drafts = torch.randint(0, vocab, (batch, n), generator=gen)
    q.scatter_(-1, drafts[..., None], 0.0)
    tokens, num_accepted = backend.speculative_sample(drafts, q, p, seed=16)
    assert (num_accepted == n).all()
    assert_same((tokens, num_accepted), reference(drafts, q, p, None, 16))


# On the CPU: scalar tail only / vector blocks + tail / vector blocks only (32: a multiple of every width)
@pytest.mark.parametrize("vocab", [5, 20, 32])
def test_fixed_point_rounding(backend, vocab):
    # Weights are round(w * 2^40) half to even: 2^-41 -> 0, 3 * 2^-41 -> 2, 2^-40 -> 1, 5 * 2^-42 -> 1
    # (1.25), and anything below 2^-41 counts as zero. A bonus row made of such weights has total 4:
    # token a (weight 2) 1/2, tokens b and c 1/4 each, the others never.
    batch = 48
    a, b, c, z = vocab - 2, 0, vocab - 1, 1  # z: the 0.5 tie rounded to even (0)
    row = torch.zeros(vocab)
    row[a], row[b], row[c], row[z] = 3 * 2.0**-41, 2.0**-40, 5 * 2.0**-42, 2.0**-41
    row[2] = 2.0**-43  # below 2^-41: weight 0
    p = row.expand(batch, 1, vocab).contiguous()
    drafts = torch.zeros(batch, 0, dtype=torch.int64)
    got = backend.speculative_sample(drafts, None, p, seed=17)
    assert_same(got, reference(drafts, None, p, None, 17))
    emitted = got[0][:, 0]
    assert set(emitted.tolist()) <= {a, b, c} and (emitted == a).any() and (emitted == b).any()
    # a row whose mass is all below 2^-41 has zero total probability
    tiny = torch.zeros(2, 1, vocab)
    tiny[0, 0, 0] = 1.0
    tiny[1, 0, :] = 2.0**-42
    with pytest.raises(ValueError, match="batch row 1: .*zero total probability"):
        backend.checked(backend.speculative_sample, torch.zeros(2, 0, dtype=torch.int32), None, tiny, seed=1)


# ----------------------------------------------------------------------------------------------------
# 7. every output slot is written
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_q", [True, False])
def test_outputs_fully_written_over_poisoned_memory(backend, with_q):
    gen = torch.Generator().manual_seed(17)
    batch, n, vocab = 33, 6, 50
    drafts, q, p, num_draft = make_case(gen, batch, n, vocab, with_q=with_q, ragged=torch.int32)
    for _ in range(3):
        # dirty the allocator with same-sized int32 blocks, free them, then let the op allocate
        poison = [torch.full((batch, n + 1), 0x7F7F7F7F, dtype=torch.int32, device=backend.device) for _ in range(4)]
        poison += [torch.full((batch,), 0x7F7F7F7F, dtype=torch.int32, device=backend.device) for _ in range(4)]
        del poison
        tokens, num_accepted = backend.speculative_sample(drafts, q, p, num_draft_tokens=num_draft, seed=1)
        assert not (tokens == 0x7F7F7F7F).any() and not (num_accepted == 0x7F7F7F7F).any()
        assert_well_formed(tokens, num_accepted, drafts, vocab, num_draft)
        assert_same((tokens, num_accepted), reference(drafts, q, p, num_draft, 1))


# ----------------------------------------------------------------------------------------------------
# 8. seed semantics
# ----------------------------------------------------------------------------------------------------


def seed_case():
    gen = torch.Generator().manual_seed(19)
    batch, n, vocab = 48, 3, 40
    p = random_probs(gen, (batch, n + 1, vocab)).float()  # spread out: rows rarely coincide by chance
    q = random_probs(gen, (batch, n, vocab)).float()
    return sample_rows(gen, q.double()), q, p


def test_seed_semantics(backend):
    drafts, q, p = seed_case()
    run = lambda **kw: backend.speculative_sample(drafts, q, p, **kw)  # noqa: E731
    a = run(seed=5, offset=0)
    assert_same(run(seed=5, offset=0), a)  # deterministic
    assert not torch.equal(run(seed=6, offset=0)[0], a[0])  # another seed, other tokens
    assert not torch.equal(run(seed=5, offset=1)[0], a[0])  # another offset, other tokens
    assert not torch.equal(run(seed=5 + 2**32, offset=0)[0], a[0])  # the high word of the seed is used
    assert not torch.equal(run(seed=5, offset=2**32)[0], a[0])  # and of the offset
    # seeds are taken modulo 2**64: s, s - 2**64 and s + 2**64 are the same seed
    for s in (2**63, 2**63 + 12345, 2**64 - 1):
        big = run(seed=s, offset=3)
        assert_same(run(seed=s - 2**64, offset=3), big)
        assert_same(run(seed=torch.tensor(s - 2**64, dtype=torch.int64), offset=3), big)
        assert_same(big, reference(drafts, q, p, None, s, 3))
    assert_same(run(seed=-1, offset=-1), run(seed=2**64 - 1, offset=2**64 - 1))
    assert_same(run(seed=2**64 + 5, offset=0), a)


def test_seed_none_uses_torch_generator(backend):
    drafts, q, p = seed_case()
    run = lambda: backend.speculative_sample(drafts, q, p, seed=None)  # noqa: E731
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(1234)
        a = run()
        b = run()  # the generator advanced: a new seed
        torch.manual_seed(1234)
        assert_same(run(), a)
        assert_same(run(), b)
        assert not torch.equal(a[0], b[0])
        torch.manual_seed(4321)
        assert not torch.equal(run()[0], a[0])
    finally:
        torch.random.set_rng_state(state)


# ----------------------------------------------------------------------------------------------------
# 9. bad input
# ----------------------------------------------------------------------------------------------------


def valid_case(batch=3, n=2, vocab=6, seed=23):
    gen = torch.Generator().manual_seed(seed)
    p = random_probs(gen, (batch, n + 1, vocab)).float()
    q = random_probs(gen, (batch, n, vocab)).float()
    return sample_rows(gen, q.double()), q, p


def test_bad_shapes_and_dtypes(backend):
    drafts, q, p = valid_case()
    B, n, V = 3, 2, 6

    def call(d=drafts, dq=q, tp=p, **kw):
        kw.setdefault("seed", 0)
        return backend.checked(backend.speculative_sample, d, dq, tp, **kw)

    with pytest.raises(ValueError, match="draft_token_ids must have 2 dimension"):
        call(d=drafts[0])
    with pytest.raises(ValueError, match="target_probs must be 3-D"):
        call(tp=p[0])
    with pytest.raises(ValueError, match="draft_probs must be 3-D"):
        call(dq=q[0])
    with pytest.raises(TypeError, match="draft_token_ids must be int32 or int64"):
        call(d=drafts.float())
    with pytest.raises(TypeError, match="draft_token_ids must be int32 or int64"):
        call(d=drafts.to(torch.int16))
    with pytest.raises(TypeError, match="target_probs must be float32, float16 or bfloat16"):
        call(dq=None, tp=p.double())
    with pytest.raises(TypeError, match="must be float32, float16 or bfloat16"):
        call(dq=q.double(), tp=p.double())
    with pytest.raises(TypeError, match="draft_probs must be float32, float16 or bfloat16"):
        call(dq=q.double())
    with pytest.raises(TypeError, match="same dtype"):
        call(dq=q.half())
    with pytest.raises(TypeError, match="same dtype"):
        call(dq=q.bfloat16(), tp=p.half())
    with pytest.raises(ValueError, match=r"target_probs must have shape \[B, n\+1, V\]"):
        call(tp=p[:, :n])  # [B, n, V] instead of [B, n+1, V]
    with pytest.raises(ValueError, match=r"target_probs must have shape \[B, n\+1, V\]"):
        call(tp=p[:2])
    with pytest.raises(ValueError, match=r"draft_probs must have shape \[B, n, V\]"):
        call(dq=torch.cat([q, q[:, :1]], 1))
    with pytest.raises(ValueError, match=r"draft_probs must have shape \[B, n, V\]"):
        call(dq=q[..., : V - 1])
    with pytest.raises(ValueError, match=r"draft_probs must have shape \[B, n, V\]"):
        call(dq=q[:2])
    with pytest.raises(ValueError, match="vocabulary dimension of target_probs is empty"):
        call(dq=None, tp=p[..., :0])
    with pytest.raises(ValueError, match=r"num_draft_tokens must have shape \[B\]"):
        call(num_draft_tokens=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="num_draft_tokens must have 1 dimension"):
        call(num_draft_tokens=torch.ones(B, 1, dtype=torch.int32))
    with pytest.raises(TypeError, match="num_draft_tokens must be int32 or int64"):
        call(num_draft_tokens=torch.ones(B))


def test_bad_seed(backend):
    drafts, q, p = valid_case()
    call = lambda **kw: backend.speculative_sample(drafts, q, p, **kw)  # noqa: E731
    with pytest.raises(TypeError, match="seed must be an int"):
        call(seed=1.0)
    with pytest.raises(TypeError, match="seed must be an int"):
        call(seed=True)
    with pytest.raises(TypeError, match="offset must be an int"):
        call(seed=1, offset=2.5)
    with pytest.raises(TypeError, match="seed must hold an integer"):
        call(seed=torch.tensor(1.0))
    with pytest.raises(TypeError, match="offset must hold an integer"):
        call(seed=1, offset=torch.tensor(True))
    with pytest.raises(ValueError, match="seed must hold one value"):
        call(seed=torch.tensor([1, 2]))


def bad_value_cases():
    """(name, mutate(drafts, q, p, num_draft) -> (drafts, q, p, num_draft), exception, message)."""

    def set_draft(value):
        def f(d, q, p, nd):
            d = d.clone()
            d[1, 1] = value
            return d, q, p, nd
        return f

    def set_num_draft(value):
        def f(d, q, p, nd):
            nd = torch.tensor([2, value, 2], dtype=torch.int64)
            return d, q, p, nd
        return f

    def set_prob(which, value, pos=1):
        def f(d, q, p, nd):
            q, p = q.clone(), p.clone()
            t = q if which == "q" else p
            if pos > 0:
                # make a rejection at position 0 certain: the bad value is after it and still detected
                p[1, 0] = 0.0
                p[1, 0, (int(d[1, 0]) + 1) % 6] = 1.0
            t[1, pos, int(d[1, pos])] = value
            return d, q, p, nd
        return f

    def zero_bonus(d, q, p, nd):  # q == p: every draft accepted, then the bonus row has no mass
        p = p.clone()
        q = q.clone()
        q[1] = p[1, :2]
        p[1, 2] = 0.0
        return d, q, p, nd

    def zero_target_row(d, q, p, nd):  # p_0 = 0: rejected at 0, residual and p both empty
        p = p.clone()
        p[1, 0] = 0.0
        return d, q, p, nd

    def nan_in_sampled_row(d, q, p, nd):  # rejected at 0, and the residual row holds a NaN
        p = p.clone()
        p[1, 0] = 0.0
        p[1, 0, (int(d[1, 0]) + 1) % 6] = 1.0
        p[1, 0, (int(d[1, 0]) + 2) % 6] = float("nan")
        return d, q, p, nd

    msg_value = "NaN, negative or greater than 1"
    return [
        ("id_minus_1", set_draft(-1), IndexError, "batch row 1: a draft token id outside"),
        ("id_eq_V", set_draft(6), IndexError, "batch row 1: a draft token id outside"),
        ("num_draft_gt_n", set_num_draft(3), ValueError, "batch row 1: num_draft_tokens outside"),
        ("num_draft_neg", set_num_draft(-1), ValueError, "batch row 1: num_draft_tokens outside"),
        ("p_nan", set_prob("p", float("nan")), ValueError, msg_value),
        ("p_negative", set_prob("p", -0.25), ValueError, msg_value),
        ("p_gt_1", set_prob("p", 1.5), ValueError, msg_value),
        ("p_one_ulp_above_1", set_prob("p", 1.0000001), ValueError, msg_value),
        ("p_inf", set_prob("p", float("inf")), ValueError, msg_value),
        ("q_nan", set_prob("q", float("nan")), ValueError, msg_value),
        ("q_negative", set_prob("q", -1e-3), ValueError, msg_value),
        ("q_gt_1", set_prob("q", 1.0625), ValueError, msg_value),
        ("p_nan_pos0", set_prob("p", float("nan"), pos=0), ValueError, msg_value),
        ("nan_in_sampled_row", nan_in_sampled_row, ValueError, msg_value),
        ("zero_bonus_row", zero_bonus, ValueError,
         "batch row 1: a distribution to sample from with zero total probability"),
        ("zero_target_row", zero_target_row, ValueError, "zero total probability"),
    ]


@pytest.mark.parametrize("case", bad_value_cases(), ids=lambda c: c[0] if isinstance(c, tuple) else str(c))
def test_bad_values_raise(backend, case):
    _, mutate, exc, message = case
    drafts, q, p = valid_case()
    d, dq, tp, nd = mutate(drafts, q, p, None)
    with pytest.raises(exc, match=message):
        backend.checked(backend.speculative_sample, d, dq, tp, num_draft_tokens=nd, seed=4)


def test_bad_values_raise_without_draft_probs(backend):
    drafts, q, p = valid_case()
    for value, exc, message in [
        (-1, IndexError, "batch row 2: a draft token id outside"),
        (6, IndexError, "batch row 2: a draft token id outside"),
    ]:
        d = drafts.clone()
        d[2, 0] = value
        with pytest.raises(exc, match=message):
            backend.checked(backend.speculative_sample, d, None, p, seed=1)
    bad = p.clone()
    bad[0, 1, int(drafts[0, 1])] = float("nan")
    with pytest.raises(ValueError, match="batch row 0: a probability that is NaN"):
        backend.checked(backend.speculative_sample, drafts, None, bad, seed=1)
    # rejected (p(x) = 0) and the residual p without x is empty, and so is p: zero mass
    zero = p.clone()
    zero[2, 0] = 0.0
    with pytest.raises(ValueError, match="batch row 2: a distribution to sample from with zero total probability"):
        backend.checked(backend.speculative_sample, drafts, None, zero, seed=1)


INVALID_VALUES = [
    (torch.float32, float("nan")),
    (torch.float32, -1e-30),
    (torch.float32, 1.0000001),  # one ulp above 1
    (torch.float32, float("inf")),
    (torch.float16, float("nan")),
    (torch.float16, -0.5),
    (torch.float16, 1.0009765625),  # one ulp above 1
    (torch.bfloat16, float("nan")),
    (torch.bfloat16, -1e-30),
    (torch.bfloat16, 1.0078125),  # one ulp above 1
]


@pytest.mark.parametrize("with_q", [True, False])
@pytest.mark.parametrize("dtype,value", INVALID_VALUES, ids=lambda v: str(v))
def test_invalid_value_anywhere_in_the_sampled_row(backend, with_q, dtype, value):
    # every element of the row a token is sampled from is validated (V = 21: vector blocks and a tail on the CPU)
    batch, vocab = 2, 21
    gen = torch.Generator().manual_seed(18)
    p = random_probs(gen, (batch, 2, vocab)).to(dtype)
    q = random_probs(gen, (batch, 1, vocab)).to(dtype)
    probe = torch.tensor([value], dtype=dtype)
    assert not bool(((probe >= 0) & (probe <= 1)).all()), "the probe value must be invalid in this dtype"
    drafts = torch.tensor([[4], [7]])
    p[:, 0] = 0.0
    p[:, 0, 10] = 1.0  # the drafts are rejected at position 0: the residual row is sampled
    for t in range(vocab):
        bad_p = p.clone()
        bad_p[1, 0, t] = value
        with pytest.raises(ValueError, match="batch row 1: a probability that is NaN"):
            backend.checked(backend.speculative_sample, drafts, q if with_q else None, bad_p, seed=2)
        if with_q:
            bad_q = q.clone()
            bad_q[1, 0, t] = value
            with pytest.raises(ValueError, match="batch row 1: a probability that is NaN"):
                backend.checked(backend.speculative_sample, drafts, bad_q, p, seed=2)
    # the bonus row after full acceptance, too
    ok_p = p.clone()
    ok_p[:, 0] = 0.0
    ok_p[0, 0, 4] = 1.0
    ok_p[1, 0, 7] = 1.0
    for t in (0, 9, vocab - 1):
        bad_p = ok_p.clone()
        bad_p[1, 1, t] = value
        with pytest.raises(ValueError, match="batch row 1: a probability that is NaN"):
            backend.checked(backend.speculative_sample, drafts, None, bad_p, seed=2)


def test_invalid_rows_are_marked(backend):
    # CUDA-style kernels mark bad rows (all tokens -1, num_accepted = -status) and leave the others correct;
    # the CPU kernels raise for the first bad row.
    batch, n, vocab = 9, 3, 12
    gen = torch.Generator().manual_seed(29)
    p = random_probs(gen, (batch, n + 1, vocab)).float()
    q = random_probs(gen, (batch, n, vocab)).float()
    drafts = sample_rows(gen, q.double())
    num_draft = torch.full((batch,), n, dtype=torch.int64)
    num_draft[8] = 2
    good = (drafts.clone(), q.clone(), p.clone(), num_draft.clone())
    want_status = torch.zeros(batch, dtype=torch.int32)

    num_draft[1] = n + 1
    want_status[1] = STATUS_BAD_NUM_DRAFT
    drafts[2, 2] = vocab
    want_status[2] = STATUS_BAD_ID
    p[3, 1, int(drafts[3, 1])] = float("nan")
    want_status[3] = STATUS_BAD_VALUE
    q[4] = p[4, :n]
    p[4, n] = 0.0  # every draft accepted, empty bonus row
    want_status[4] = STATUS_ZERO_MASS
    drafts[6, 0] = -5
    q[6, 2, int(drafts[6, 2])] = 2.0
    want_status[6] = STATUS_BAD_ID | STATUS_BAD_VALUE
    # row 8 uses 2 of 3 drafts: a bad id at the unused position 2 is not an error
    drafts[8, 2] = 10**6
    good[0][8, 2] = 10**6

    if not backend.marks_invalid_rows:
        with pytest.raises(ValueError, match="batch row 1: num_draft_tokens outside"):
            backend.speculative_sample(drafts, q, p, num_draft_tokens=num_draft, seed=31)
        return
    tokens, num_accepted = backend.speculative_sample(drafts, q, p, num_draft_tokens=num_draft, seed=31)
    bad = want_status != 0
    assert torch.equal(num_accepted[bad], -want_status[bad])
    assert (tokens[bad] == -1).all()
    ref_tokens, ref_num_accepted = reference(*good, seed=31)
    assert torch.equal(tokens[~bad], ref_tokens[~bad])
    assert torch.equal(num_accepted[~bad], ref_num_accepted[~bad])
    with pytest.raises(ValueError, match="batch row 1: num_draft_tokens outside"):
        fastar.check_rows(num_accepted)


# ----------------------------------------------------------------------------------------------------
# 10. debug mode
# ----------------------------------------------------------------------------------------------------


def unread_nan_case():
    """Every row is rejected at position 0 (p_0(x_0) = 0): rows 1..n are read only at the drafts, so a NaN
    elsewhere in them is never seen by the kernels."""
    drafts, q, p = valid_case(batch=4, n=3, vocab=8, seed=37)
    p[:, 0] = 0.0
    p[torch.arange(4), 0, (drafts[:, 0] + 1) % 8] = 1.0
    p_nan = p.clone()
    p_nan[2, 2, (int(drafts[2, 2]) + 3) % 8] = float("nan")  # row 2, position 2, not the draft
    p_nan[1, 3, 0] = float("nan")  # an unused bonus row
    q_nan = q.clone()
    q_nan[0, 1, (int(drafts[0, 1]) + 1) % 8] = float("nan")
    return drafts, q, p, p_nan, q_nan


def test_unread_nan_is_not_an_error(backend):
    drafts, q, p, p_nan, q_nan = unread_nan_case()
    got = backend.checked(backend.speculative_sample, drafts, q_nan, p_nan, seed=3)
    assert_same(got, reference(drafts, q, p, None, 3))
    assert (got[1] == 0).all()


def test_debug_checks_validate_everything(backend, debug_checks):
    drafts, q, p, p_nan, q_nan = unread_nan_case()
    assert fastar.debug_checks_enabled()
    with pytest.raises(ValueError, match="target_probs holds a value that is NaN"):
        backend.speculative_sample(drafts, q, p_nan, seed=3)
    with pytest.raises(ValueError, match="draft_probs holds a value that is NaN"):
        backend.speculative_sample(drafts, q_nan, p, seed=3)
    with pytest.raises(ValueError, match="target_probs holds a value that is NaN"):
        backend.speculative_sample(drafts, None, p_nan, seed=3)
    p_neg = p.clone()
    p_neg[3, 3, 5] = -0.5
    with pytest.raises(ValueError, match="target_probs holds a value"):
        backend.speculative_sample(drafts, q, p_neg, seed=3)
    d = drafts.clone()
    d[0, 2] = 8
    with pytest.raises(IndexError, match="draft token id outside"):
        backend.speculative_sample(d, q, p, seed=3)
    # marked rows raise after the launch, without backend.checked
    zero = p.clone()
    zero[1, 0] = 0.0
    with pytest.raises(ValueError, match="batch row 1: .*zero total probability"):
        backend.speculative_sample(drafts, q, zero, seed=3)
    # valid input still works and is unchanged
    assert_same(backend.speculative_sample(drafts, q, p, seed=3), reference(drafts, q, p, None, 3))


def test_debug_checks_accept_padding_past_ragged_lengths(backend, debug_checks):
    """vLLM pads ragged draft rows with -1: debug mode validates only the drafts a row uses."""
    drafts, q, p = valid_case(batch=3, n=3, vocab=8, seed=41)
    lengths = torch.tensor([3, 1, 0])
    padded = drafts.clone()
    padded[1, 1:] = -1
    padded[2, :] = -1
    got = backend.speculative_sample(padded, q, p, num_draft_tokens=lengths, seed=5)
    assert_same(got, reference(drafts, q, p, lengths, 5))
    got = backend.greedy_verify(padded, torch.log(p), num_draft_tokens=lengths)
    assert_same(got, fastar.reference.greedy_verify_reference(drafts, torch.log(p), lengths))
    padded[0, 2] = -1  # inside row 0's length: still an error
    with pytest.raises(IndexError, match="draft token id outside"):
        backend.speculative_sample(padded, q, p, num_draft_tokens=lengths, seed=5)
