"""Tests of fastar.diffusion.generate (LLaDA's / Fast-dLLM's loop on fastar.diffusion_unmask) on every backend.

The oracle is ``fastar.reference.llada_generate_reference``: a transcription of LLaDA's ``generate`` and of
Fast-dLLM's threshold / factor rules and prefix / dual cache loops, each step in float64 (ties by the lowest
position, argmax by the lowest token id). The model is a small random-initialised bidirectional transformer
(``diffusion_model.py``) that supports both caches; both loops call it on the same inputs, so at temperature 0 the
final tokens must be identical. Random remasking draws fastar's Philox uniforms in the reference too. Sampling at
temperature > 0 is checked by properties and a chi-square test (p-value threshold 1e-4, fixed seeds).
"""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import fastar
from diffusion_model import TinyDiffusionLM
from fastar.reference import llada_generate_reference, philox4x32_10
from helpers import chisquare_pvalue, generate_on, one_torch_thread, rows  # noqa: F401 (fixture)

MASK = 47
VOCAB = 48
P_THRESHOLD = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return TinyDiffusionLM(vocab=VOCAB, mask_id=MASK, head_scale=6.0)


def prompt_of(batch=2, length=5, seed=0):
    return torch.randint(0, MASK, (batch, length), generator=torch.Generator().manual_seed(seed))


def generate(backend, model, prompt, **kw):
    return generate_on(backend, fastar.diffusion.generate, model, prompt, mask_id=MASK, **kw)


def philox_confidence(seed):
    """The reference's random remasking values: fastar's 53-bit Philox uniform of (row, position in the scored
    tokens) at offset = the step, as float32."""

    def draw(step, view):
        out = torch.empty(view.shape, dtype=torch.float64)
        for b in range(view.shape[0]):
            for p in range(view.shape[1]):
                r = philox4x32_10([p, b, step, 0], [seed & 0xFFFFFFFF, seed >> 32])
                out[b, p] = float(torch.tensor((((r[0] << 32) | r[1]) >> 11) / 2.0**53, dtype=torch.float32))
        return out

    return draw


RULES = {"schedule": {}, "threshold": {"threshold": 0.5}, "factor": {"factor": 1.0},
         "dinfer": {"threshold": 0.5, "threshold_rule": "dinfer"}, "sdar": {"threshold": 0.5, "threshold_rule": "sdar"}}
SHAPES = [(16, 16, 16), (16, 8, 4), (24, 8, 12), (16, 4, 16)]  # (gen_length, block_length, steps)


@pytest.mark.parametrize("cache", [None, "prefix", "dual"])
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_temperature0_matches_reference(backend, model, remasking, rule, cache):
    for gen_length, block_length, steps in SHAPES:
        seed = 5 + gen_length + block_length
        kw = dict(steps=steps, gen_length=gen_length, block_length=block_length, remasking=remasking, cache=cache,
                  **RULES[rule])
        got, nfe = generate(backend, model, prompt_of(), seed=seed, **kw)
        want, want_nfe = llada_generate_reference(model, prompt_of(), mask_id=MASK,
                                                  random_confidence=philox_confidence(seed), **kw)
        assert torch.equal(got, want), f"{gen_length}/{block_length}/{steps}: tokens differ"
        assert nfe == want_nfe
        assert not (got == MASK).any()
        if rule == "schedule":
            assert nfe == steps
        if rule == "sdar":
            assert nfe <= steps


@pytest.mark.parametrize("cache", [None, "prefix", "dual"])
def test_cfg_matches_reference(backend, model, cache):
    kw = dict(steps=8, gen_length=16, block_length=8, cfg_scale=1.5, cache=cache)
    got, _ = generate(backend, model, prompt_of(), **kw)
    want, _ = llada_generate_reference(model, prompt_of(), mask_id=MASK, **kw)
    assert torch.equal(got, want)
    # The guidance changes the text (else the test above proves little about it).
    plain, _ = generate(backend, model, prompt_of(), **{**kw, "cfg_scale": 0.0})
    assert not torch.equal(got, plain)


def test_ties_take_the_lowest_position_and_token(backend):
    """A model whose logits are the same everywhere, two tokens tied for the maximum: every step commits the
    lowest masked positions, each to the lower of the two tokens."""

    class Flat(torch.nn.Module):
        def forward(self, ids):
            logits = torch.zeros(*ids.shape, VOCAB, device=ids.device)
            logits[..., 9] = logits[..., 4] = 2.0
            return logits

    prompt = prompt_of(batch=1)
    got, _ = generate(backend, Flat(), prompt, steps=2, gen_length=8, block_length=8)
    assert got[0, 5:].tolist() == [4] * 8
    assert torch.equal(llada_generate_reference(Flat(), prompt, steps=2, gen_length=8, block_length=8,
                                                mask_id=MASK)[0], got)
    calls = []

    class Recording(Flat):
        def forward(self, ids):
            calls.append(ids[0, 5:].clone())
            return super().forward(ids)

    generate(backend, Recording(), prompt, steps=4, gen_length=8, block_length=8)
    masked = [(c == MASK).nonzero().flatten().tolist() for c in calls]
    assert masked == [list(range(8)), list(range(2, 8)), list(range(4, 8)), list(range(6, 8))]


def test_cache_protocol(model):
    """What the model is called with: a full forward per block with use_cache, then the block and everything
    after it on the prefix cache, or the block alone with replace_position on the dual cache."""
    prompt = prompt_of()
    for cache, tail in (("prefix", [8, 8, 8, 4, 4, 4]), ("dual", [4] * 6)):
        model.calls.clear()
        fastar.diffusion.generate(model, prompt, steps=8, gen_length=8, block_length=4, mask_id=MASK, cache=cache)
        full = (2, 13)
        assert [c[0] for c in model.calls] == [full] + [(2, n) for n in tail[:3]] + [full] + [(2, n) for n in tail[3:]]
        assert [c[1] for c in model.calls] == [False, True, True, True] * 2
        assert [c[2] for c in model.calls] == [False] + [cache == "dual"] * 3 + [False] + [cache == "dual"] * 3


def test_prefix_cache_with_a_transformers_cache(model):
    """A model that appends to a transformers DynamicCache in place: the loop crops it back to the prefix after
    every step, so the tokens equal those of the legacy tuple cache."""
    kw = dict(steps=8, gen_length=16, block_length=8, mask_id=MASK, cache="prefix", threshold=0.5)
    want = fastar.diffusion.generate(model, prompt_of(), **kw)
    model.dynamic_cache = True
    try:
        got = fastar.diffusion.generate(model, prompt_of(), **kw)
    finally:
        model.dynamic_cache = False
    assert torch.equal(got, want)


def test_a_model_returning_a_tensor(model):
    kw = dict(steps=8, gen_length=16, block_length=8, mask_id=MASK)
    got = fastar.diffusion.generate(lambda ids: model(ids).logits, prompt_of(), **kw)
    assert torch.equal(got, fastar.diffusion.generate(model, prompt_of(), **kw))


# ----------------------------------------------------------------------------------------------------
# temperature > 0
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("cache", [None, "dual"])
def test_sampling_properties(backend, model, rule, cache):
    """Every position committed, tokens in range, the prompt kept; the same seed the same tokens (on every
    backend, bit for bit), another seed other tokens."""
    kw = dict(steps=8, gen_length=16, block_length=8, temperature=1.0, cache=cache, **RULES[rule])
    prompt = prompt_of(batch=3)
    got, _ = generate(backend, model, prompt, seed=3, **kw)
    assert torch.equal(got[:, :5], prompt)
    assert ((got[:, 5:] >= 0) & (got[:, 5:] < MASK)).all()
    from conftest import Backend

    assert torch.equal(got, generate(Backend("cpu"), model, prompt, seed=3, **kw)[0])
    assert not torch.equal(got, generate(backend, model, prompt, seed=4, **kw)[0])
    greedy, _ = generate(backend, model, prompt, **{**kw, "temperature": 0.0})
    assert not torch.equal(got, greedy)


def test_sampling_distribution(backend, model):
    """One masked position per row, one step: its token is a draw from softmax(logits / T) of the model's logits
    (all rows share them), computed here in float64."""
    n, temperature = rows(backend, 4000, 600), 1.5
    prompt = prompt_of(batch=1).expand(n, -1).contiguous()
    got, _ = generate(backend, model, prompt, steps=1, gen_length=1, block_length=1, temperature=temperature, seed=21)
    logits = model(torch.cat([prompt[:1], torch.tensor([[MASK]])], 1)).logits[0, -1].double()
    probs = torch.softmax(logits / temperature, -1).tolist()
    p_value = chisquare_pvalue(Counter(got[:, -1].tolist()), dict(enumerate(probs)), n)
    assert p_value > P_THRESHOLD, f"chi-square p-value {p_value:.2e}"


# ----------------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, error, match", [
    (dict(mask_id=VOCAB), ValueError, "mask_id 48 is outside the vocabulary of 48"),
    (dict(mask_id=-1), ValueError, "mask_id"),
    (dict(block_length=6), ValueError, "block_length 6 must divide gen_length 16"),
    (dict(steps=6), ValueError, "steps 6 must be a multiple of the number of blocks 4"),
    (dict(remasking="entropy"), ValueError, "remasking must be one of"),
    (dict(cache="full"), ValueError, "cache must be one of"),
    (dict(threshold=0.5, factor=1.0), ValueError, "threshold or factor, not both"),
    (dict(threshold=0.5, threshold_rule="dimple"), ValueError, "threshold_rule must be one of"),
    (dict(threshold_rule="dinfer"), ValueError, "threshold_rule='dinfer' needs threshold"),
    (dict(temperature=-1.0), ValueError, "temperature must be a finite number >= 0"),
    (dict(cfg_scale=math.nan), ValueError, "cfg_scale must be a finite number >= 0"),
    (dict(steps=0), ValueError, "steps"),
])
def test_bad_arguments_raise(kw, error, match):
    args = dict(steps=8, gen_length=16, block_length=4, mask_id=MASK)
    args.update(kw)
    with pytest.raises(error, match=match):
        fastar.diffusion.generate(lambda ids: torch.zeros(*ids.shape, VOCAB), prompt_of(), **args)


def test_mask_id_outside_the_configured_vocabulary_raises_before_a_forward(model):
    """A model with ``config.vocab_size`` (transformers') is checked before it is called: an embedding would
    fail on the masked ids with an IndexError first."""
    model.calls.clear()
    with pytest.raises(ValueError, match="mask_id 48 is outside the vocabulary of 48 tokens"):
        fastar.diffusion.generate(model, prompt_of(), steps=4, gen_length=4, block_length=4, mask_id=VOCAB)
    assert model.calls == []


def test_bad_prompt_raises(model):
    with pytest.raises(ValueError, match="prompt must be an int64"):
        fastar.diffusion.generate(model, prompt_of().int(), steps=4, gen_length=4, block_length=4, mask_id=MASK)


def test_wrong_logits_shape_raises():
    with pytest.raises(ValueError, match="expected \\[B, len, V\\]"):
        fastar.diffusion.generate(lambda ids: torch.zeros(1, VOCAB), prompt_of(), steps=4, gen_length=4,
                                  block_length=4, mask_id=MASK)


@pytest.mark.parametrize("rule", ["schedule", "threshold"])
def test_nan_logits_raise(backend, model, rule):
    def poisoned(ids):
        logits = model(ids).logits.clone()
        logits[1, -1, 3] = math.nan
        return logits

    with pytest.raises(ValueError, match="invalid"):
        generate(backend, poisoned, prompt_of(), steps=4, gen_length=8, block_length=8, **RULES[rule])


def test_a_model_that_keeps_predicting_the_mask_raises(backend):
    """Fast-dLLM's loop would spin forever; fastar stops after block_length steps."""
    masky = TinyDiffusionLM(vocab=VOCAB, mask_id=MASK, predict_mask=True)
    with torch.no_grad():
        masky.head.bias[MASK] = 100.0
    with pytest.raises(RuntimeError, match="keeps predicting mask_id"):
        generate(backend, masky, prompt_of(), steps=4, gen_length=8, block_length=8, threshold=0.9)
