"""Tests of fastar.diffusion.generate_dream (Dream's ``_sample`` loop on fastar.diffusion_unmask) on every backend.

The oracle is ``fastar.reference.dream_generate_reference``: a transcription of Dream's ``_sample`` (shifted
logits, the ``linspace(1, eps, steps + 1)`` schedule, ``sample_tokens`` with ``top_p_logits`` / ``top_k_logits``,
the ``topk`` or ``multinomial`` selection, ``origin``'s independent transfers), the logits in float64, ties by the
lowest position and token id. The model is the small random-initialised bidirectional transformer of
``diffusion_model.py``; both loops call it on the same inputs, so at temperature 0 the final tokens must be
identical (``origin`` from the same Philox uniforms). The sampled modes (temperature > 0, ``alg_temp``, ``origin``)
are checked by chi-square tests of one step's commits against their law computed here in float64 by enumeration
(p-value threshold 1e-3, fixed seeds).
"""
from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch

import fastar
from diffusion_model import TinyDiffusionLM
from fastar.reference import dream_generate_reference, philox4x32_10
from helpers import chisquare_pvalue, generate_on, one_torch_thread, rows  # noqa: F401 (fixture)

MASK = 47
VOCAB = 48
P_THRESHOLD = 1e-3
ALGS = ["maskgit_plus", "topk_margin", "entropy"]
# (max_new_tokens, steps, eps); in the last two Dream's float32 count int(n * (1 - s / t)) is one below the exact
# one at a step
SHAPES = [(16, 1, 1e-3), (16, 5, 1e-3), (16, 16, 1e-3), (12, 20, 1e-3), (16, 8, 0.0), (16, 4, 0.5)]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return TinyDiffusionLM(vocab=VOCAB, mask_id=MASK, head_scale=6.0)


def prompt_of(batch=3, length=5, seed=0):
    return torch.randint(0, MASK, (batch, length), generator=torch.Generator().manual_seed(seed))


def generate(backend, model, prompt, mask_id=MASK, **kw):
    return generate_on(backend, fastar.diffusion.generate_dream, model, prompt, mask_id=mask_id, **kw)


class Through(torch.nn.Module):
    """``model``'s logits passed through ``post(ids, logits)``; a module, so that generate_on moves ``model`` to the
    backend's device."""

    def __init__(self, model, post):
        super().__init__()
        self.model, self.post = model, post

    def forward(self, ids):
        return self.post(ids, self.model(ids).logits)


def counting(model, counts):
    """``model`` that appends the masked count of each row of every call's ids to ``counts``."""

    def count(ids, logits):
        counts.append((ids == MASK).sum(1).tolist())
        return logits

    return Through(model, count)


@pytest.mark.parametrize("alg", ALGS)
def test_temperature0_matches_reference(backend, model, alg):
    for max_new_tokens, steps, eps in SHAPES:
        kw = dict(max_new_tokens=max_new_tokens, steps=steps, eps=eps, alg=alg)
        got_counts, want_counts = [], []
        got, nfe = generate(backend, counting(model, got_counts), prompt_of(), **kw)
        want, want_nfe = dream_generate_reference(counting(model, want_counts), prompt_of(), mask_id=MASK, **kw)
        assert got_counts == want_counts, f"{max_new_tokens} tokens, {steps} steps: the schedules differ"
        assert torch.equal(got, want), f"{max_new_tokens} tokens, {steps} steps: tokens differ"
        assert nfe == want_nfe == steps
        assert not (got == MASK).any()


@pytest.mark.parametrize("alg", ALGS)
def test_top_k_and_top_p_at_temperature0_match_reference(backend, model, alg):
    """Dream filters before its softmax, so at temperature 0 the filters change the confidences (renormalised
    probabilities), hence the order of the commits."""
    changed = 0
    for filters in (dict(top_k=3), dict(top_p=0.5), dict(top_p=0.8, top_k=6), dict(top_k=1)):
        kw = dict(max_new_tokens=16, steps=5, alg=alg, **filters)
        got, _ = generate(backend, model, prompt_of(), **kw)
        want, _ = dream_generate_reference(model, prompt_of(), mask_id=MASK, **kw)
        assert torch.equal(got, want), f"{filters}: tokens differ"
        plain, _ = dream_generate_reference(model, prompt_of(), mask_id=MASK, max_new_tokens=16, steps=5, alg=alg)
        changed += not torch.equal(got, plain)
    assert changed >= 2  # else the comparison proves little about the filters


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_match_reference(backend, model, dtype):
    """A model returning bfloat16 / float16 logits (Dream's checkpoints are bfloat16): the op reads them as they are,
    the reference converts them to float64."""
    half = Through(model, lambda ids, logits: logits.to(dtype))
    for alg, filters in (("maskgit_plus", {}), ("entropy", dict(top_k=4))):
        kw = dict(max_new_tokens=16, steps=5, alg=alg, **filters)
        got, _ = generate(backend, half, prompt_of(), **kw)
        want, _ = dream_generate_reference(half, prompt_of(), mask_id=MASK, **kw)
        assert torch.equal(got, want), f"{alg} {filters}: tokens differ"


def philox_rand(seed, prompt_len):
    """``origin``'s ``torch.rand`` as the loop draws it: ``1 - u``, ``u`` fastar's Philox uniform (as float32) of
    (row, generated position) at offset = the step; the loop commits where ``u > s / t``, Dream where
    ``rand < 1 - s / t``."""

    def draw(step, shape):
        out = torch.ones(shape, dtype=torch.float64)
        for b in range(shape[0]):
            for p in range(shape[1] - prompt_len):
                r = philox4x32_10([p, b, step, 0], [seed & 0xFFFFFFFF, seed >> 32])
                u = float(torch.tensor((((r[0] << 32) | r[1]) >> 11) / 2.0**53, dtype=torch.float32))
                out[b, prompt_len + p] = 1.0 - u
        return out

    return draw


@pytest.mark.parametrize("filters", [{}, dict(top_k=3)])
def test_origin_at_temperature0_matches_reference(backend, model, filters):
    for max_new_tokens, steps, eps in SHAPES[1:]:
        seed = 11 + steps
        kw = dict(max_new_tokens=max_new_tokens, steps=steps, eps=eps, alg="origin", **filters)
        got, _ = generate(backend, model, prompt_of(), seed=seed, **kw)
        want, _ = dream_generate_reference(model, prompt_of(), mask_id=MASK, rand=philox_rand(seed, 5), **kw)
        assert torch.equal(got, want), f"{max_new_tokens} tokens, {steps} steps: tokens differ"
        assert not (got == MASK).any()


def test_left_padded_batch(backend, model):
    """Dream's padded batches: with an attention_mask holding zeros the model gets Dream's [B, 1, L, L] mask and
    positions counted from each row's first token. The same tokens as the reference, and each row's new tokens
    those of its prompt generated alone (padding invisible)."""
    lengths = [5, 3, 4]
    prompt = prompt_of()
    attention_mask = torch.ones_like(prompt)
    for b, n in enumerate(lengths):
        prompt[b, : 5 - n] = 0  # the pad token
        attention_mask[b, : 5 - n] = 0
    for alg in ("maskgit_plus", "entropy"):
        kw = dict(max_new_tokens=12, steps=5, alg=alg)
        got, _ = generate(backend, model, prompt, attention_mask=backend.to(attention_mask), **kw)
        want, _ = dream_generate_reference(model, prompt, mask_id=MASK, attention_mask=attention_mask, **kw)
        assert torch.equal(got, want)
        for b, n in enumerate(lengths):
            alone, _ = dream_generate_reference(model, prompt[b:b + 1, 5 - n:], mask_id=MASK, **kw)
            assert torch.equal(got[b, 5:], alone[0, n:]), f"{alg}: row {b} differs from its prompt alone"
    unpadded, _ = generate(backend, model, prompt, max_new_tokens=12, steps=5)
    assert not torch.equal(unpadded, got)  # else the mask proves nothing
    ones, _ = generate(backend, model, prompt, attention_mask=backend.to(torch.ones_like(prompt)), max_new_tokens=12,
                       steps=5)
    assert torch.equal(ones, unpadded)


class Fixed(torch.nn.Module):
    """A model that returns the same logits ``[L, V]`` for every row and records the ids of every call."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.calls = logits, []

    def forward(self, ids):
        self.calls.append(ids.cpu().clone())
        return self.logits.to(ids.device).expand(ids.shape[0], -1, -1).contiguous()


def test_logits_are_shifted_by_one_position(backend):
    """Position j is scored by the model's row j - 1: a model whose row r predicts token r."""
    logits = torch.full((12, 16), -5.0)
    logits[torch.arange(12), torch.arange(12)] = 5.0
    prompt = torch.zeros(2, 4, dtype=torch.int64)
    got, _ = generate(backend, Fixed(logits), prompt, mask_id=15, max_new_tokens=8, steps=3)
    assert got[:, 4:].tolist() == [list(range(3, 11))] * 2


def test_ties_take_the_lowest_position_and_token(backend):
    logits = torch.zeros(9, 16)
    logits[:, 9] = logits[:, 4] = 2.0
    model = Fixed(logits)
    prompt = torch.zeros(1, 1, dtype=torch.int64)
    got, _ = generate(backend, model, prompt, mask_id=15, max_new_tokens=8, steps=4, eps=0.5)
    assert got[0, 1:].tolist() == [4] * 8
    want, _ = dream_generate_reference(Fixed(logits), prompt, mask_id=15, max_new_tokens=8, steps=4, eps=0.5)
    assert torch.equal(got, want)
    masked = [(c[0, 1:] == 15).nonzero().flatten().tolist() for c in model.calls]
    assert masked[1][0] > 0 and masked == sorted(masked, key=len, reverse=True)
    assert all(m == list(range(8 - len(m), 8)) for m in masked)


# ----------------------------------------------------------------------------------------------------
# sampled modes: one step's commits against their law
# ----------------------------------------------------------------------------------------------------

V_SMALL, MASK_SMALL = 5, 4


def fixed_logits(n):
    """Logits of ``n`` generated positions after a one-token prompt: row j - 1 scores position j; the mask token
    at -inf (never drawn)."""
    logits = torch.randn(n + 1, V_SMALL, generator=torch.Generator().manual_seed(1)) * 1.5
    logits[:, MASK_SMALL] = -math.inf
    return logits


def confidence_of(probs, token, alg):
    if alg == "maskgit_plus":
        return float(probs[token])
    if alg == "topk_margin":
        top = torch.sort(probs, descending=True).values
        return float(top[0] - top[1])
    return float((probs * torch.log(probs + 1e-10)).sum())


@pytest.mark.parametrize("alg, temperature, alg_temp", [
    ("maskgit_plus", 1.5, None),
    ("maskgit_plus", 1.0, 0.3),
    ("topk_margin", 0.0, 0.2),
    ("entropy", 3.0, 0.5),  # tempering the confidences moves a quarter of this law
])
def test_one_step_law(backend, alg, temperature, alg_temp):
    """Three masked positions, two steps: the first commits int(3 * (1 - s / t)) = 1 position. Its (position,
    token) against the law: tokens drawn from softmax(logits / T) (the argmax at 0), the position the most
    confident one, or with alg_temp a draw from softmax(confidence / alg_temp); confidences under the tempered
    softmax."""
    n, num = rows(backend, 4000, 600), 3
    logits = fixed_logits(num)
    model = Fixed(logits)
    prompt = torch.zeros(n, 1, dtype=torch.int64)
    generate(backend, model, prompt, mask_id=MASK_SMALL, max_new_tokens=num, steps=2, alg=alg, alg_temp=alg_temp,
             temperature=temperature, seed=5)
    first = model.calls[1][:, 1:]
    committed = first != MASK_SMALL
    assert (committed.sum(1) == 1).all()
    pos = committed.int().argmax(1)
    observed = Counter(zip(pos.tolist(), first[torch.arange(n), pos].tolist()))

    rows_ = logits[:num].double()
    probs = torch.softmax(rows_ / (temperature or 1.0), -1)
    choices = [range(V_SMALL - 1) if temperature > 0 else [int(probs[p].argmax())] for p in range(num)]
    expected = Counter()
    for tokens in itertools.product(*choices):
        weight = math.prod(float(probs[p, v]) if temperature > 0 else 1.0 for p, v in enumerate(tokens))
        conf = torch.tensor([confidence_of(probs[p], v, alg) for p, v in enumerate(tokens)], dtype=torch.float64)
        if alg_temp:
            for p, w in enumerate(torch.softmax(conf / alg_temp, 0).tolist()):
                expected[(p, tokens[p])] += weight * w
        else:
            p = int(conf.argmax())
            expected[(p, tokens[p])] += weight
    p_value = chisquare_pvalue(observed, dict(expected), n)
    assert p_value > P_THRESHOLD, f"chi-square p-value {p_value:.2e}"


@pytest.mark.parametrize("alg, temperature", [("topk_margin", 0.0), ("maskgit_plus", 1.0)])
def test_alg_temp_draws_without_replacement(backend, alg, temperature):
    """Five masked positions, two steps: the first commits int(5 * (1 - s / t)) = 2, drawn without replacement
    from softmax(confidence / alg_temp) (Dream's multinomial); their (position, token) pairs against that law."""
    n, num, alg_temp = rows(backend, 4000, 600), 5, 0.15
    logits = fixed_logits(num)
    model = Fixed(logits)
    generate(backend, model, torch.zeros(n, 1, dtype=torch.int64), mask_id=MASK_SMALL, max_new_tokens=num, steps=2,
             alg=alg, alg_temp=alg_temp, temperature=temperature, seed=13)
    first = model.calls[1][:, 1:]
    assert ((first != MASK_SMALL).sum(1) == 2).all()
    observed = Counter(tuple((p, int(r[p])) for p in range(num) if r[p] != MASK_SMALL) for r in first)

    probs = torch.softmax(logits[:num].double() / (temperature or 1.0), -1)
    choices = [range(V_SMALL - 1) if temperature > 0 else [int(probs[p].argmax())] for p in range(num)]
    expected = Counter()
    for tokens in itertools.product(*choices):
        weight = math.prod(float(probs[p, v]) if temperature > 0 else 1.0 for p, v in enumerate(tokens))
        conf = torch.tensor([confidence_of(probs[p], v, alg) for p, v in enumerate(tokens)], dtype=torch.float64)
        w = torch.softmax(conf / alg_temp, 0).tolist()
        for a, b in itertools.permutations(range(num), 2):
            expected[tuple(sorted([(a, tokens[a]), (b, tokens[b])]))] += weight * w[a] * w[b] / (1 - w[a])
    p_value = chisquare_pvalue(observed, dict(expected), n)
    assert p_value > P_THRESHOLD, f"chi-square p-value {p_value:.2e}"


@pytest.mark.parametrize("temperature", [0.0, 1.2])
def test_origin_one_step_law(backend, temperature):
    """``origin``: two masked positions, three steps; the first commits each independently with probability
    1 - s / t (0.333 here) to a draw from softmax(logits / T) (the argmax at 0)."""
    n, num = rows(backend, 4000, 600), 2
    logits = fixed_logits(num)
    model = Fixed(logits)
    generate(backend, model, torch.zeros(n, 1, dtype=torch.int64), mask_id=MASK_SMALL, max_new_tokens=num, steps=3,
             alg="origin", temperature=temperature, seed=9)
    observed = Counter(tuple(r) for r in model.calls[1][:, 1:].tolist())
    timesteps = torch.linspace(1, 1e-3, 4)
    p_commit = float(1 - timesteps[1] / timesteps[0])
    per_position = []
    for p in range(num):
        if temperature > 0:
            probs = torch.softmax(logits[p].double() / temperature, -1).tolist()
        else:
            probs = [float(v == int(logits[p].argmax())) for v in range(V_SMALL)]
        law = {v: p_commit * probs[v] for v in range(V_SMALL - 1) if probs[v] > 0}
        law[MASK_SMALL] = 1 - p_commit
        per_position.append(law)
    expected = {(a, b): per_position[0][a] * per_position[1][b] for a in per_position[0] for b in per_position[1]}
    p_value = chisquare_pvalue(observed, expected, n)
    assert p_value > P_THRESHOLD, f"chi-square p-value {p_value:.2e}"


def test_sampling_properties(backend, model):
    """Every position committed, the prompt kept; the same seed the same tokens (on every backend, bit for bit),
    another seed other tokens."""
    from conftest import Backend

    kw = dict(max_new_tokens=16, steps=6, temperature=1.0, alg_temp=0.5, top_p=0.95)
    prompt = prompt_of()
    got, _ = generate(backend, model, prompt, seed=3, **kw)
    assert torch.equal(got[:, :5], prompt) and not (got == MASK).any()
    assert torch.equal(got, generate(Backend("cpu"), model, prompt, seed=3, **kw)[0])
    assert not torch.equal(got, generate(backend, model, prompt, seed=4, **kw)[0])


# ----------------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, error, match", [
    (dict(alg="low_confidence"), ValueError, "alg must be one of"),
    (dict(steps=0), ValueError, "steps"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(mask_id=VOCAB), ValueError, "mask_id 48 is outside the vocabulary of 48"),
    (dict(mask_id=-1), ValueError, "mask_id"),
    (dict(temperature=-1.0), ValueError, "temperature must be a finite number >= 0"),
    (dict(temperature=math.inf), ValueError, "temperature must be a finite number >= 0"),
    (dict(eps=1.0), ValueError, "eps must be a number in"),
    (dict(alg_temp=math.nan), ValueError, "alg_temp must be"),
    (dict(top_p=0.0), ValueError, "top_p must be"),
    (dict(top_k=0), ValueError, "top_k"),
])
def test_bad_arguments_raise(kw, error, match):
    args = dict(max_new_tokens=8, steps=4, mask_id=MASK)
    args.update(kw)
    with pytest.raises(error, match=match):
        fastar.diffusion.generate_dream(lambda ids: torch.zeros(*ids.shape, VOCAB), prompt_of(), **args)


def test_bad_prompts_raise(model):
    kw = dict(max_new_tokens=4, steps=2, mask_id=MASK)
    with pytest.raises(ValueError, match="input_ids must be an int64"):
        fastar.diffusion.generate_dream(model, prompt_of().int(), **kw)
    with pytest.raises(ValueError, match="at least one token"):
        fastar.diffusion.generate_dream(model, prompt_of(length=0), **kw)
    prompt = prompt_of()
    prompt[1, 2] = MASK
    with pytest.raises(ValueError, match="input_ids hold mask_id 47"):
        fastar.diffusion.generate_dream(model, prompt, **kw)


def test_bad_attention_mask_raises(model):
    with pytest.raises(ValueError, match="attention_mask must be a tensor of input_ids' shape"):
        fastar.diffusion.generate_dream(model, prompt_of(), max_new_tokens=4, steps=2, mask_id=MASK,
                                        attention_mask=torch.ones(3, 4, dtype=torch.int64))


def test_mask_id_outside_the_configured_vocabulary_raises_before_a_forward(model):
    model.calls.clear()
    with pytest.raises(ValueError, match="mask_id 48 is outside the vocabulary of 48 tokens"):
        fastar.diffusion.generate_dream(model, prompt_of(), max_new_tokens=4, steps=2, mask_id=VOCAB)
    assert model.calls == []


def test_wrong_logits_shape_raises():
    with pytest.raises(ValueError, match="expected \\[B, len, V\\]"):
        fastar.diffusion.generate_dream(lambda ids: torch.zeros(1, VOCAB), prompt_of(), max_new_tokens=4, steps=2,
                                        mask_id=MASK)


@pytest.mark.parametrize("alg", ["maskgit_plus", "origin"])
def test_nan_logits_raise(backend, model, alg):
    def poison(ids, logits):
        logits = logits.clone()
        logits[1, -2, 3] = math.nan  # row -2 scores the last position
        return logits

    poisoned = Through(model, poison)
    with pytest.raises(ValueError, match="invalid"):
        generate(backend, poisoned, prompt_of(), max_new_tokens=8, steps=4, alg=alg)
