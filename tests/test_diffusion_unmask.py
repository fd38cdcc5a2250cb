"""Tests of fastar.diffusion_unmask and the diffusion schedules on every backend.

The oracle is ``fastar.reference.diffusion_unmask_reference``: a float64 transcription of LLaDA's and Fast-dLLM's
per-step code (Dream's confidences), ties by the lowest position. Logits are random with a spread that makes
confidences differ by far more than float32 rounding, so the commits must be identical. Sampling is checked by
Pearson chi-square tests against softmax(logits / temperature) with fixed seeds, rejecting at p < 1e-4
(``P_THRESHOLD``): deterministic, and a correct kernel passes. Vocabularies are small (the benchmark runs the real
one); one test runs V > 1024 (the 256-thread CUDA kernel).
"""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import fastar
from fastar import diffusion
from fastar.reference import (
    diffusion_confidence_reference,
    diffusion_unmask_reference,
    dream_filter_keep,
    dream_sampling_probs,
    fast_dllm_factor_thresholds,
    llada_num_transfer_tokens,
    maskgit_masked_counts,
    philox4x32_10,
)
from helpers import chisquare_pvalue, rows

P_THRESHOLD = 1e-4
MASK = 7


def unmask(backend, logits, x, **kw):
    """fastar.diffusion_unmask on the backend: returns (x after the step, candidates, confidence, remaining)."""
    x_dev = backend.to(x).clone()
    kw = {k: backend.to(v) for k, v in kw.items()}
    with backend.using_ops():
        res = fastar.diffusion_unmask(backend.to(logits), x_dev, **kw)
    return x_dev.cpu(), res.candidates.cpu(), res.confidence.cpu(), res.remaining.cpu()


def random_case(gen, batch=3, length=24, vocab=50, spread=3.0, masked=0.7):
    """Logits [B, L, V] and x [B, L]: a random share of the positions (in and outside any block) hold MASK. The
    mask token's own logit is low (as a trained model's), so a committed position never holds MASK again."""
    logits = torch.randn(batch, length, vocab, generator=gen) * spread
    logits[..., MASK] = -30.0
    x = torch.randint(0, vocab, (batch, length), generator=gen)
    x[x == MASK] = MASK + 1
    x[torch.rand(batch, length, generator=gen) < masked] = MASK
    return logits, x


def philox_uniform(seed, offset, row, position, dtype=torch.float32):
    """accept::draw's 53-bit uniform of (row, position), as float32 (the random confidence) or float64 (the
    uniform of the Gumbel noise)."""
    r = philox4x32_10([position, row, offset & 0xFFFFFFFF, offset >> 32], [seed & 0xFFFFFFFF, seed >> 32])
    return float(torch.tensor((((r[0] << 32) | r[1]) >> 11) / 2.0**53, dtype=dtype))


# ----------------------------------------------------------------------------------------------------
# schedules, against hand-computed values
# ----------------------------------------------------------------------------------------------------


def test_llada_schedule_hand_values():
    mask = torch.ones(1, 32, dtype=torch.bool)
    assert fastar.num_transfer_tokens(mask, 10).tolist() == [[4, 4, 3, 3, 3, 3, 3, 3, 3, 3]]
    assert llada_num_transfer_tokens(mask, 10).tolist() == [[4, 4, 3, 3, 3, 3, 3, 3, 3, 3]]
    mask = torch.zeros(2, 32, dtype=torch.bool)
    mask[0, :7] = True
    assert fastar.num_transfer_tokens(mask, 4).tolist() == [[2, 2, 2, 1], [0, 0, 0, 0]]


def test_llada_schedule_matches_reference():
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(16, 40, generator=gen) < 0.6
    for steps in (1, 3, 7, 40):
        assert torch.equal(fastar.num_transfer_tokens(mask, steps), llada_num_transfer_tokens(mask, steps))


def test_maskgit_cosine_hand_values():
    # floor(256 cos(pi/2 t/8)) for t = 1..7: 251.08, 236.51, 212.86, 181.02, 142.23, 97.97, 49.94; then 0.
    masked = [251, 236, 212, 181, 142, 97, 49, 0]
    assert maskgit_masked_counts(256, 8) == masked
    assert fastar.maskgit_cosine_counts(256, 8) == [5, 15, 24, 31, 39, 45, 48, 49]
    assert sum(fastar.maskgit_cosine_counts(10, 12)) == 10 and min(fastar.maskgit_cosine_counts(10, 12)) >= 0


def test_fast_dllm_factor_thresholds_hand_values():
    # 1 - factor / (n + 1) for n = 1..4, the first forced to -1.
    assert fast_dllm_factor_thresholds(4, 1.0) == [-1, 1 - 1 / 3, 1 - 1 / 4, 1 - 1 / 5]
    assert fast_dllm_factor_thresholds(3, 0.5) == [-1, 1 - 0.5 / 3, 1 - 0.5 / 4]


# ----------------------------------------------------------------------------------------------------
# commits against the float64 reference
# ----------------------------------------------------------------------------------------------------

RULES = {
    "topk": lambda gen, b: dict(num_transfer=torch.randint(0, 6, (b,), generator=gen)),
    "topk-all": lambda gen, b: dict(num_transfer=torch.full((b,), 100, dtype=torch.int64)),
    "threshold": lambda gen, b: dict(threshold=0.35),
    "factor": lambda gen, b: dict(factor=1.0),
    "dinfer": lambda gen, b: dict(threshold=0.35, threshold_rule="dinfer"),
    "dimple": lambda gen, b: dict(threshold=0.5, threshold_rule="dimple",
                                  num_transfer=torch.randint(0, 6, (b,), generator=gen)),
    "sdar": lambda gen, b: dict(threshold=0.3, threshold_rule="sdar",
                                num_transfer=torch.randint(0, 4, (b,), generator=gen)),
}


@pytest.mark.parametrize("confidence", ["probability", "log_probability", "margin", "neg_entropy", "random"])
@pytest.mark.parametrize("rule", list(RULES))
def test_commits_match_reference(backend, confidence, rule):
    gen = torch.Generator().manual_seed(len(RULES) * list(RULES).index(rule) + len(confidence))
    for trial in range(3):
        logits, x = random_case(gen)
        block_start, block_end = 8, 20
        kw = dict(mask_id=MASK, block_start=block_start, block_end=block_end, confidence=confidence, seed=11 + trial,
                  offset=3, **RULES[rule](gen, x.shape[0]))
        got_x, cand, conf, remaining = unmask(backend, logits, x, **kw)
        rand = torch.tensor([[philox_uniform(11 + trial, 3, b, p) for p in range(x.shape[1])]
                             for b in range(x.shape[0])])
        ref_kw = {k: v for k, v in kw.items() if k not in ("seed", "offset")}
        want_x, x0, want_conf = diffusion_unmask_reference(logits, x.clone(), random_confidence=rand, **ref_kw)
        masked = x[:, block_start:block_end] == MASK
        assert torch.equal(got_x, want_x), f"trial {trial}: commits differ"
        assert torch.equal(cand[masked], x0[:, block_start:block_end][masked])
        assert torch.equal(cand[~masked], torch.full_like(cand[~masked], -1))
        assert torch.isneginf(conf[~masked]).all()
        torch.testing.assert_close(conf[masked].double(), want_conf[:, block_start:block_end][masked],
                                   rtol=1e-5, atol=1e-6)
        assert torch.equal(remaining, (want_x[:, block_start:block_end] == MASK).sum(1))
        # Never outside the block.
        assert torch.equal(got_x[:, :block_start], x[:, :block_start])
        assert torch.equal(got_x[:, block_end:], x[:, block_end:])


@pytest.mark.parametrize("rule", ["topk", "dimple"])
def test_maskgit_noise_matches_reference(backend, rule):
    """MaskGIT's annealed noise: log p(candidate) + s * Gumbel(u) with u the position's Philox uniform, sampled
    candidates; the same commits as the float64 formula."""
    gen = torch.Generator().manual_seed(21)
    for trial, noise in enumerate((0.3, 2.0, 4.5)):
        logits, x = random_case(gen, spread=1.5)
        kw = dict(mask_id=MASK, block_start=3, block_end=21, confidence="log_probability", confidence_noise=noise,
                  temperature=1.0, seed=40 + trial, offset=2, **RULES[rule](gen, x.shape[0]))
        if rule == "dimple":
            kw["threshold"] = -2.0
        got_x, cand, conf, _ = unmask(backend, logits, x, **kw)
        masked = x[:, 3:21] == MASK
        u = torch.tensor([[philox_uniform(40 + trial, 2, b, p, torch.float64) for p in range(x.shape[1])]
                          for b in range(x.shape[0])], dtype=torch.float64)
        # The candidates are the kernel's draws (checked elsewhere); given them, the confidences and commits.
        full_cand = x.clone()
        full_cand[:, 3:21] = torch.where(masked, cand, x[:, 3:21])
        log_p = torch.log_softmax(logits.double(), -1).gather(-1, full_cand.unsqueeze(-1)).squeeze(-1)
        want_conf = log_p + noise * -torch.log(-torch.log(u.clamp(min=2.0**-54)))
        torch.testing.assert_close(conf[masked].double(), want_conf[:, 3:21][masked], rtol=1e-6, atol=1e-6)
        ref_kw = {k: v for k, v in kw.items() if k not in ("seed", "offset", "temperature")}
        ref_kw["confidence_noise"] = 0.0
        ref_conf = torch.where(x == MASK, want_conf, torch.full_like(want_conf, -math.inf))
        want_x = _commit_by_confidence(x, full_cand, ref_conf, **ref_kw)
        assert torch.equal(got_x, want_x), f"trial {trial}: commits differ"


def _commit_by_confidence(x, cand, conf, **kw):
    """The reference's selection for given candidates and confidences: logits one-hot at the candidates with the
    confidences as the random confidence."""
    logits = torch.full(cand.shape + (int(max(cand.max(), x.max())) + 1,), -1e4, dtype=torch.float64)
    logits.scatter_(-1, cand.unsqueeze(-1), 0.0)
    kw["confidence"] = "random"
    new_x, _, _ = diffusion_unmask_reference(logits, x.clone(), random_confidence=conf, **kw)
    return new_x


def test_dream_alg_temp_distribution(backend):
    """Dream's alg_temp: committing the top-1 of confidence + s * Gumbel picks position j with probability
    softmax(confidence / s)[j] (Dream's torch.multinomial); chi-square over many independent rows."""
    n = rows(backend, 4000, 400)
    vocab, alg_temp = 16, 0.25
    base = torch.randn(6, vocab, generator=torch.Generator().manual_seed(8)) * 1.2
    logits = base.expand(n, 6, vocab)
    x = torch.full((n, 6), MASK)
    _, _, conf, _ = unmask(backend, logits, x, mask_id=MASK, block_start=0, block_end=6,
                           num_transfer=torch.zeros(n, dtype=torch.int64), confidence="probability")
    clean = conf[0].double()
    got_x, _, _, _ = unmask(backend, logits, x, mask_id=MASK, block_start=0, block_end=6,
                            num_transfer=torch.ones(n, dtype=torch.int64), confidence="probability",
                            confidence_noise=alg_temp, seed=123)
    chosen = (got_x != MASK).int().argmax(1)
    assert ((got_x != MASK).sum(1) == 1).all()
    probs = torch.softmax(clean / alg_temp, -1).tolist()
    p_value = chisquare_pvalue(Counter(chosen.tolist()), dict(enumerate(probs)), n)
    assert p_value > P_THRESHOLD, f"chi-square p-value {p_value:.2e}"


def test_dinfer_dimple_and_sdar_hand_cases(backend):
    """Equal rows give equal confidences: dInfer's min(threshold, top - 1e-5) commits every tie of the top,
    Fast-dLLM's rule only the first; Dimple falls back to the count when nothing passes its threshold, SDAR's
    dynamic rule commits the larger of the count and the passing positions."""
    logits = torch.zeros(1, 5, 6)
    logits[0, :, 2] = 2.0
    logits[0, 4, 3] = 2.0  # position 4 is less sure (two equal tokens: the candidate is 2, at 0.39)
    x = torch.full((1, 5), 5)
    kw = dict(mask_id=5, block_start=0, block_end=5)
    top_p = math.exp(2.0) / (math.exp(2.0) + 5)
    assert top_p < 0.9
    fast, _, _, _ = unmask(backend, logits, x, threshold=0.9, **kw)
    dinfer, _, _, _ = unmask(backend, logits, x, threshold=0.9, threshold_rule="dinfer", **kw)
    assert fast[0].tolist() == [2, 5, 5, 5, 5]
    assert dinfer[0].tolist() == [2, 2, 2, 2, 5]
    dimple, _, _, remaining = unmask(backend, logits, x, threshold=0.9, threshold_rule="dimple",
                                     num_transfer=torch.tensor([2]), **kw)
    assert dimple[0].tolist() == [2, 2, 5, 5, 5] and remaining.tolist() == [3]
    dimple, _, _, _ = unmask(backend, logits, x, threshold=top_p - 0.01, threshold_rule="dimple",
                             num_transfer=torch.tensor([1]), **kw)
    assert dimple[0].tolist() == [2, 2, 2, 2, 5]
    # SDAR's dynamic rule: the count when fewer pass the threshold, all that pass when they are more.
    sdar, _, _, _ = unmask(backend, logits, x, threshold=0.9, threshold_rule="sdar", num_transfer=torch.tensor([2]),
                           **kw)
    assert sdar[0].tolist() == [2, 2, 5, 5, 5]
    sdar, _, _, _ = unmask(backend, logits, x, threshold=top_p - 0.01, threshold_rule="sdar",
                           num_transfer=torch.tensor([1]), **kw)
    assert sdar[0].tolist() == [2, 2, 2, 2, 5]
    sdar, _, _, _ = unmask(backend, logits, x, threshold=top_p - 0.01, threshold_rule="sdar",
                           num_transfer=torch.tensor([5]), **kw)
    assert sdar[0].tolist() == [2, 2, 2, 2, 2]


def test_ties_go_to_the_lowest_position(backend):
    """Equal logits rows give equal confidences: top-k commits the lowest positions; argmax the lowest token."""
    logits = torch.zeros(1, 8, 5)
    logits[0, :, 2] = 1.0
    logits[0, :, 4] = 1.0
    x = torch.tensor([[1, 4, 4, 4, 4, 4, 4, 1]])  # mask_id 4 at positions 1..6
    got_x, cand, _, remaining = unmask(backend, logits, x, mask_id=4, block_start=0, block_end=8,
                                       num_transfer=torch.tensor([2]))
    assert cand[0].tolist() == [-1, 2, 2, 2, 2, 2, 2, -1]
    assert got_x[0].tolist() == [1, 2, 2, 4, 4, 4, 4, 1]
    assert remaining.tolist() == [4]


def test_dtypes_match_across_backends(backend):
    gen = torch.Generator().manual_seed(5)
    logits, x = random_case(gen, vocab=1100)  # the 256-thread CUDA kernel
    for dtype in (torch.float16, torch.bfloat16):
        kw = dict(mask_id=MASK, block_start=4, block_end=20, threshold=0.2, confidence="neg_entropy")
        got = unmask(backend, logits.to(dtype), x, **kw)
        want = unmask(_cpu_backend(), logits.to(dtype), x, **kw)
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def _cpu_backend():
    from conftest import Backend

    return Backend("cpu")


# ----------------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_sampling_is_bit_identical_to_cpu(backend, temperature):
    gen = torch.Generator().manual_seed(9)
    logits, x = random_case(gen, vocab=300, spread=1.0)
    kw = dict(mask_id=MASK, block_start=2, block_end=22, num_transfer=torch.tensor([3, 0, 9]), temperature=temperature,
              seed=1234, offset=5)
    got = unmask(backend, logits, x, **kw)
    want = unmask(_cpu_backend(), logits, x, **kw)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_sampling_distribution(backend):
    """Every position of one long block shares one logits row (stride 0); their draws follow softmax(l / t)."""
    n = rows(backend, 6000, 600)
    vocab, temperature = 12, 0.7
    row = torch.randn(vocab, generator=torch.Generator().manual_seed(2)) * 1.5
    logits = row.expand(1, n, vocab)
    x = torch.full((1, n), MASK)
    _, cand, conf, remaining = unmask(backend, logits, x, mask_id=MASK, block_start=0, block_end=n,
                                      num_transfer=torch.tensor([0]), temperature=temperature, seed=77)
    assert remaining.tolist() == [n]
    probs = torch.softmax(row.double() / temperature, -1).tolist()
    p_value = chisquare_pvalue(Counter(cand[0].tolist()), dict(enumerate(probs)), n)
    assert p_value > P_THRESHOLD, f"chi-square p-value {p_value:.2e}"
    # The confidence is the candidate's probability under softmax(logits), untempered.
    untempered = torch.softmax(row.double(), -1)
    torch.testing.assert_close(conf[0].double(), untempered[cand[0]], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------------
# Dream's top-p / top-k filters, fused
# ----------------------------------------------------------------------------------------------------

FILTERS = [dict(top_p=0.6), dict(top_k=4), dict(top_p=0.9, top_k=3), dict(top_p=0.3, top_k=8)]


def _filter_id(f):
    return "-".join(f"{k}{v}" for k, v in f.items())


@pytest.mark.parametrize("filters", FILTERS, ids=_filter_id)
@pytest.mark.parametrize("source", ["logits", "sampling"])
@pytest.mark.parametrize("confidence", ["probability", "log_probability", "margin", "neg_entropy"])
def test_filtered_confidences_match_reference(backend, filters, source, confidence):
    """At temperature 0 the candidate is the argmax whatever the filters; its confidence is under softmax(logits)
    ("logits") or under the filtered softmax (Dream's "sampling")."""
    logits, x = random_case(torch.Generator().manual_seed(21), vocab=60, spread=2.0)
    _, cand, conf, _ = unmask(backend, logits, x, mask_id=MASK, block_start=0, block_end=24,
                              num_transfer=torch.tensor([5, 5, 5]), confidence=confidence, confidence_source=source,
                              **filters)
    masked = x == MASK
    want_cand = logits.double().argmax(-1)
    assert torch.equal(cand[masked], want_cand[masked])
    probs = dream_sampling_probs(logits, 0.0, **filters) if source == "sampling" else torch.softmax(logits.double(), -1)
    if source == "sampling":
        assert not torch.equal(probs, torch.softmax(logits.double(), -1))  # the filters drop some mass
    want = diffusion_confidence_reference(probs.log(), want_cand, confidence)
    torch.testing.assert_close(conf[masked].double(), want[masked], rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("filters, want", [
    (dict(top_p=0.49), 1.0),            # excluded masses 0, .5, .8, .95: only the first is <= .49
    (dict(top_p=0.51), 0.5 / 0.8),
    (dict(top_p=0.81), 0.5 / 0.95),
    (dict(top_k=2), 0.5 / 0.8),
    (dict(top_k=2, top_p=0.49), 1.0),  # both filters keep a token
    (dict(top_k=3, top_p=0.81), 0.5 / 0.95),
])
def test_filter_hand_values(backend, filters, want):
    """p = (.5, .3, .15, .05) on tokens 0-3: the argmax's probability under the filtered softmax, by hand."""
    row = torch.full((8,), -40.0)
    row[:4] = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    _, cand, conf, _ = unmask(backend, row.expand(1, 2, 8), torch.full((1, 2), MASK), mask_id=MASK, block_start=0,
                              block_end=2, num_transfer=torch.tensor([1]), confidence_source="sampling", **filters)
    assert cand.tolist() == [[0, 0]]
    torch.testing.assert_close(conf.double(), torch.full((1, 2), want, dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("filters, want", [
    (dict(top_k=2), math.e**2 / (math.e**2 + 2 * math.e)),  # logits (2, 1, 1, 0): the tie at the 2nd keeps 3
    (dict(top_p=0.1), 0.5),  # logits (1, 1, 0): no larger logit above either maximum, so both stay
])
def test_filters_keep_ties(backend, filters, want):
    row = torch.full((8,), -40.0)
    row[:4] = torch.tensor([2.0, 1.0, 1.0, 0.0]) if "top_k" in filters else torch.tensor([1.0, 1.0, 0.0, -40.0])
    _, cand, conf, _ = unmask(backend, row.expand(1, 1, 8), torch.full((1, 1), MASK), mask_id=MASK, block_start=0,
                              block_end=1, num_transfer=torch.tensor([1]), confidence_source="sampling", **filters)
    assert cand.tolist() == [[0]]
    assert dream_filter_keep(row, **filters).sum() == (3 if "top_k" in filters else 2)
    torch.testing.assert_close(conf.double(), torch.tensor([[want]], dtype=torch.float64), rtol=1e-6, atol=0)


def test_filtered_sampling_distribution(backend):
    """Draws after the filters follow the tempered, filtered softmax (chi-square over the kept tokens, none
    outside them), and their "sampling" confidences are their probabilities under it."""
    n = rows(backend, 6000, 600)
    vocab, temperature, filters = 16, 0.7, dict(top_p=0.85, top_k=7)
    row = torch.randn(vocab, generator=torch.Generator().manual_seed(4)) * 1.5
    row[MASK] = -30.0
    x = torch.full((1, n), MASK)
    _, cand, conf, _ = unmask(backend, row.expand(1, n, vocab), x, mask_id=MASK, block_start=0, block_end=n,
                              num_transfer=torch.tensor([0]), temperature=temperature, confidence_source="sampling",
                              seed=91, **filters)
    probs = dream_sampling_probs(row, temperature, **filters)
    kept = probs > 0
    assert 1 < int(kept.sum()) < 7  # the nucleus binds
    assert kept[cand[0]].all(), "a token outside the filters was drawn"
    p_value = chisquare_pvalue(Counter(cand[0].tolist()), {t: float(probs[t]) for t in range(vocab) if kept[t]}, n)
    assert p_value > P_THRESHOLD, f"chi-square p-value {p_value:.2e}"
    torch.testing.assert_close(conf[0].double(), probs[cand[0]], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("vocab", [300, 1100])
def test_filtered_sampling_is_bit_identical_to_cpu(backend, vocab):
    logits, x = random_case(torch.Generator().manual_seed(13), vocab=vocab, spread=1.0)
    for dtype, filters in ((torch.float32, dict(top_p=0.7)), (torch.bfloat16, dict(top_p=0.95, top_k=40))):
        kw = dict(mask_id=MASK, block_start=2, block_end=22, num_transfer=torch.tensor([3, 0, 9]), temperature=0.8,
                  confidence="neg_entropy", confidence_source="sampling", seed=55, offset=2, **filters)
        got = unmask(backend, logits.to(dtype), x, **kw)
        want = unmask(_cpu_backend(), logits.to(dtype), x, **kw)
        for g, w in zip(got, want):
            assert torch.equal(g, w)


# ----------------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------------


def _case():
    logits, x = random_case(torch.Generator().manual_seed(1), vocab=20)
    return logits, x


@pytest.mark.parametrize("kw, match", [
    (dict(mask_id=20), "mask_id must be a token of the vocabulary"),
    (dict(mask_id=-1), "mask_id must be a token of the vocabulary"),
    (dict(block_start=5, block_end=5), "block"),
    (dict(block_start=0, block_end=25), "block"),
    (dict(block_start=-1, block_end=3), "block"),
    (dict(temperature=-1.0), "temperature"),
    (dict(confidence="low_confidence"), "confidence must be one of"),
    (dict(threshold_rule="fast"), "threshold_rule must be one of"),
    (dict(threshold_rule="dimple"), "needs threshold and num_transfer"),
    (dict(threshold_rule="sdar", threshold=0.5), "needs threshold and num_transfer"),
    (dict(confidence_noise=-1.0), "confidence_noise must be finite and >= 0"),
    (dict(confidence_noise=math.inf), "confidence_noise must be finite and >= 0"),
    (dict(confidence="random", confidence_noise=1.0), "confidence_noise does not apply"),
    (dict(top_p=0.0), "top_p must be None or a number in"),
    (dict(top_p=1.5), "top_p must be None or a number in"),
    (dict(top_p=math.nan), "top_p must be None or a number in"),
    (dict(top_k=0), "top_k must lie in"),
    (dict(confidence_source="dream"), "confidence_source must be"),
])
def test_bad_arguments_raise(backend, kw, match):
    logits, x = _case()
    args = dict(mask_id=MASK, block_start=0, block_end=24, threshold=0.5)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        unmask(backend, logits, x, **args)


def test_exactly_one_rule():
    logits, x = _case()
    with pytest.raises(ValueError, match="exactly one of"):
        fastar.diffusion_unmask(logits, x, mask_id=MASK, block_start=0, block_end=8, threshold=0.5, factor=1.0)
    with pytest.raises(ValueError, match="exactly one of"):
        fastar.diffusion_unmask(logits, x, mask_id=MASK, block_start=0, block_end=8)


@pytest.mark.parametrize("bad", ["nan", "inf", "all_neg_inf", "negative_count"])
def test_invalid_values(backend, bad):
    """CPU: ValueError, x untouched. CUDA (and SIMT): the row commits nothing and reports remaining = -1."""
    logits, x = _case()
    x[:, 10] = MASK
    count = torch.tensor([2, 2, 2])
    if bad == "nan":
        logits[1, 10, 3] = math.nan
    elif bad == "inf":
        logits[1, 10, 3] = math.inf
    elif bad == "all_neg_inf":
        logits[1, 10, :] = -math.inf
    else:
        count[1] = -1
    kw = dict(mask_id=MASK, block_start=4, block_end=20, num_transfer=count)
    if not backend.marks_invalid_rows:
        with pytest.raises(ValueError, match="invalid logits at batch row 1, position 10|num_transfer must be >= 0"):
            unmask(backend, logits, x, **kw)
        return
    got_x, _, _, remaining = unmask(backend, logits, x, **kw)
    assert remaining[1] == -1 and remaining[0] >= 0 and remaining[2] >= 0
    assert torch.equal(got_x[1], x[1])
    with pytest.raises(ValueError, match="invalid input in batch row 1"):
        diffusion.check_remaining(remaining)


def test_masked_positions_outside_the_block_are_ignored(backend):
    logits, x = _case()
    x[:] = MASK
    got_x, cand, _, remaining = unmask(backend, logits, x, mask_id=MASK, block_start=6, block_end=10,
                                       num_transfer=torch.tensor([50, 50, 50]))
    assert (got_x[:, 6:10] != MASK).all() and (got_x[:, :6] == MASK).all() and (got_x[:, 10:] == MASK).all()
    assert remaining.tolist() == [0, 0, 0]
    assert cand.shape == (3, 4)


def test_a_committed_mask_token_still_counts_as_masked(backend):
    """A candidate equal to mask_id is committed (x keeps mask_id there) and counted in remaining, as LLaDA's loop
    counts x == mask_id."""
    logits = torch.zeros(1, 4, 6)
    logits[0, 0, 5] = 4.0  # position 0's argmax is the mask token 5
    logits[0, 1:, 2] = 1.0
    x = torch.full((1, 4), 5)
    got_x, cand, _, remaining = unmask(backend, logits, x, mask_id=5, block_start=0, block_end=4, threshold=0.0)
    assert cand[0].tolist() == [5, 2, 2, 2]
    assert got_x[0].tolist() == [5, 2, 2, 2]
    assert remaining.tolist() == [1]
