"""Tests of fastar.diffusion.generate_blocks (block-diffusion decoding, SDAR-style, on fastar.diffusion_unmask) on
every backend.

The oracle is ``sdar_reference`` below: the loop transcribed from the algorithm in plain PyTorch, without a cache
(every step runs the model on everything up to the end of the block under the dense block-causal mask), each step
by ``fastar.reference.diffusion_unmask_reference`` (float64 softmax, ties by the lowest position, argmax by the
lowest token id). The model is a small random-initialised block-causal transformer (``block_diffusion_model.py``)
in float64, so that the cached path, whose forwards see other shapes, rounds the same logits to the same float32
values: at temperature 0 both paths must give the reference's tokens and model calls exactly. Sampling at
temperature > 0 is checked by properties.
"""
from __future__ import annotations

import math

import pytest
import torch

import fastar
from block_diffusion_model import TinyBlockDiffusionLM
from fastar.reference import diffusion_unmask_reference, llada_num_transfer_tokens
from helpers import generate_on, one_torch_thread  # noqa: F401 (fixture)
from test_diffusion_generate import philox_confidence

MASK = 47
VOCAB = 48


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return TinyBlockDiffusionLM(vocab=VOCAB, mask_id=MASK, head_scale=6.0, dtype=torch.float64)


def prompt_of(batch=2, length=5, seed=0):
    return torch.randint(0, MASK, (batch, length), generator=torch.Generator().manual_seed(seed))


def sdar_reference(model, prompt, *, gen_length, block_length, steps_per_block, mask_id, remasking="low_confidence",
                   threshold=None, factor=None, threshold_rule="fast_dllm", seed=0):
    """The block-diffusion loop without a cache. Blocks of ``block_length`` from position 0; the prompt's last
    partial block is denoised first, its prompt tokens kept; the generation covers ``P + gen_length`` positions
    rounded up to whole blocks and is cut there. A block of ``n`` masked positions takes at most
    ``min(steps_per_block, n)`` steps: LLaDA's split of ``n`` over them, or the threshold / factor rule until the
    block is complete, the last allowed step committing all (SDAR's dynamic rule: the split's counts with the
    threshold, until the block is complete). Returns (tokens, model calls)."""
    batch, prompt_len = prompt.shape
    num_blocks = math.ceil((prompt_len + gen_length) / block_length)
    length = num_blocks * block_length
    x = torch.full((batch, length), mask_id, dtype=torch.int64)
    x[:, :prompt_len] = prompt
    blocks = torch.arange(length) // block_length
    dense = blocks[None, :] <= blocks[:, None]  # query i sees key j: j's block is i's or an earlier one
    calls = step = 0
    for block in range(prompt_len // block_length, num_blocks):
        start, end = block * block_length, (block + 1) * block_length
        masked = x[:, start:end] == mask_id
        steps = min(steps_per_block, int(masked[0].sum()))
        counts = llada_num_transfer_tokens(masked, steps)
        for i in range(steps):
            logits = model(x[:, :end], attention_mask=dense[:end, :end].expand(batch, 1, end, end),
                           position_ids=torch.arange(end).expand(batch, end)).logits[:, start:end]
            calls += 1
            if threshold is None and factor is None:
                rule = {"num_transfer": counts[:, i]}
            elif threshold_rule == "sdar":
                rule = {"num_transfer": counts[:, i], "threshold": threshold, "threshold_rule": "sdar"}
            elif i == steps - 1:
                rule = {"num_transfer": torch.full((batch,), block_length)}
            else:
                rule = {"threshold": threshold, "factor": factor, "threshold_rule": threshold_rule}
            random = philox_confidence(seed)(step, x[:, start:end]) if remasking == "random" else None
            new, _, _ = diffusion_unmask_reference(
                logits, x[:, start:end].clone(), mask_id=mask_id, block_start=0, block_end=block_length,
                confidence="random" if remasking == "random" else "probability", random_confidence=random, **rule)
            x[:, start:end] = new
            step += 1
            if not (new == mask_id).any():
                break
    return x[:, :prompt_len + gen_length], calls


def generate(backend, model, prompt, **kw):
    return generate_on(backend, fastar.diffusion.generate_blocks, model, prompt, mask_id=MASK, **kw)


RULES = {"schedule": {}, "threshold": {"threshold": 0.5}, "factor": {"factor": 1.0},
         "dinfer": {"threshold": 0.5, "threshold_rule": "dinfer"}, "sdar": {"threshold": 0.5, "threshold_rule": "sdar"}}
# (gen_length, block_length, steps_per_block, prompt length): a prompt ending inside a block, on a block boundary,
# shorter than a block, none; blocks of 1 (autoregressive) to 16; fewer steps than masked positions and more.
SHAPES = [(16, 4, 4, 5), (16, 8, 3, 8), (16, 16, 16, 3), (12, 4, 2, 0), (6, 1, 1, 5), (16, 8, 12, 6)]


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_temperature0_matches_reference(backend, model, remasking, rule, use_cache):
    for gen_length, block_length, steps, prompt_len in SHAPES:
        seed = 5 + gen_length + block_length
        kw = dict(gen_length=gen_length, block_length=block_length, steps_per_block=steps, remasking=remasking,
                  **RULES[rule])
        prompt = prompt_of(length=prompt_len)
        got, nfe = generate(backend, model, prompt, use_cache=use_cache, seed=seed, **kw)
        want, want_nfe = sdar_reference(model, prompt, mask_id=MASK, seed=seed, **kw)
        shape = f"{gen_length}/{block_length}/{steps}/P={prompt_len}"
        assert torch.equal(got, want), f"{shape}: tokens differ"
        assert nfe == want_nfe, shape
        assert got.shape == (2, prompt_len + gen_length) and not (got == MASK).any()
        if rule == "schedule":  # every block takes min(steps, its masked count) steps
            masked = math.ceil((prompt_len + gen_length) / block_length) * block_length - prompt_len
            first = block_length - prompt_len % block_length
            blocks = [first] + [block_length] * ((masked - first) // block_length)
            assert nfe == sum(min(steps, n) for n in blocks), shape


def test_a_float32_model_the_same_tokens_with_and_without_the_cache(backend):
    """A float32 model: the cached path's logits differ from the uncached ones in the last bits only, which on
    this model moves no commit (the tokens agree)."""
    model32 = TinyBlockDiffusionLM(vocab=VOCAB, mask_id=MASK, head_scale=6.0)
    kw = dict(gen_length=16, block_length=4, steps_per_block=2, threshold=0.5)
    got, _ = generate(backend, model32, prompt_of(), **kw)
    assert torch.equal(got, generate(backend, model32, prompt_of(), use_cache=False, **kw)[0])


def test_calls_and_cache(model):
    """What the model receives: per block, its first step runs the last committed block (its keys and values
    computed once, with its final tokens) and the block against the cache cut to the committed blocks before
    them; its other steps the block alone against the cache of every committed block. The attention mask is
    block-causal over absolute positions, the positions absolute. Without the cache every step runs the whole
    prefix."""
    seen = []

    def recording(ids, **kw):
        seen.append(kw)
        return model(ids, **kw)

    prompt = prompt_of()  # P = 5: blocks 1 (prompt 4, then 3 masked), 2, 3; 13 positions, 16 generated
    for use_cache, shapes in ((True, [(8, 0), (4, 4), (8, 4), (4, 8), (8, 8), (4, 12)]),
                              (False, [(8, 0), (8, 0), (12, 0), (12, 0), (16, 0), (16, 0)])):
        model.calls.clear()
        seen.clear()
        fastar.diffusion.generate_blocks(recording, prompt, gen_length=8, block_length=4, steps_per_block=2,
                                         mask_id=MASK, use_cache=use_cache)
        assert [(c[0][1], c[1]) for c in model.calls] == shapes
        for (n, past), kw in zip(shapes, seen):
            q, k = torch.arange(past, past + n) // 4, torch.arange(past + n) // 4
            assert torch.equal(kw["attention_mask"], (k[None, :] <= q[:, None]).expand(2, 1, n, past + n))
            assert torch.equal(kw["position_ids"], torch.arange(past, past + n).expand(2, n))
            assert ("past_key_values" in kw) == use_cache


def test_a_transformers_cache(model):
    """A model that appends to a transformers DynamicCache in place: the loop crops it back to the committed
    blocks after every step, so the tokens equal those of the legacy tuple cache."""
    kw = dict(gen_length=16, block_length=4, steps_per_block=4, mask_id=MASK, threshold=0.5)
    want = fastar.diffusion.generate_blocks(model, prompt_of(), **kw)
    model.dynamic_cache = True
    try:
        got = fastar.diffusion.generate_blocks(model, prompt_of(), **kw)
    finally:
        model.dynamic_cache = False
    assert torch.equal(got, want)


def test_a_model_returning_a_tensor(model):
    kw = dict(gen_length=8, block_length=4, steps_per_block=2, mask_id=MASK, use_cache=False)
    got = fastar.diffusion.generate_blocks(lambda ids, **k: model(ids, **k).logits, prompt_of(), **kw)
    assert torch.equal(got, fastar.diffusion.generate_blocks(model, prompt_of(), **kw))


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_model_returning_the_block_logits_only(model, use_cache):
    """transformers' logits_to_keep=block_length: the logits of the last block_length positions suffice."""
    def last(ids, **k):
        out = model(ids, **k)
        out.logits = out.logits[:, -4:]
        return out

    kw = dict(gen_length=8, block_length=4, steps_per_block=2, mask_id=MASK, use_cache=use_cache)
    assert torch.equal(fastar.diffusion.generate_blocks(last, prompt_of(), **kw),
                       fastar.diffusion.generate_blocks(model, prompt_of(), **kw))


# ----------------------------------------------------------------------------------------------------
# temperature > 0
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", list(RULES))
def test_sampling_properties(backend, model, rule):
    """Every position committed, tokens in range, the prompt kept; the same seed the same tokens on every backend
    and with or without the cache, another seed other tokens."""
    kw = dict(gen_length=16, block_length=4, steps_per_block=2, temperature=1.0, **RULES[rule])
    prompt = prompt_of(batch=3)
    got, _ = generate(backend, model, prompt, seed=3, **kw)
    assert torch.equal(got[:, :5], prompt)
    assert ((got[:, 5:] >= 0) & (got[:, 5:] < MASK)).all()
    from conftest import Backend

    assert torch.equal(got, generate(Backend("cpu"), model, prompt, seed=3, **kw)[0])
    assert torch.equal(got, generate(backend, model, prompt, seed=3, use_cache=False, **kw)[0])
    assert not torch.equal(got, generate(backend, model, prompt, seed=4, **kw)[0])
    greedy, _ = generate(backend, model, prompt, **{**kw, "temperature": 0.0})
    assert not torch.equal(got, greedy)


# ----------------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, error, match", [
    (dict(mask_id=VOCAB), ValueError, "mask_id 48 is outside the vocabulary of 48"),
    (dict(mask_id=-1), ValueError, "mask_id"),
    (dict(block_length=6), ValueError, "block_length 6 must divide gen_length 16"),
    (dict(steps_per_block=0), ValueError, "steps_per_block"),
    (dict(gen_length=0), ValueError, "gen_length"),
    (dict(remasking="entropy"), ValueError, "remasking must be one of"),
    (dict(threshold=0.5, factor=1.0), ValueError, "threshold or factor, not both"),
    (dict(threshold=0.5, threshold_rule="dimple"), ValueError, "threshold_rule must be one of"),
    (dict(threshold_rule="sdar"), ValueError, "threshold_rule='sdar' needs threshold"),
    (dict(temperature=-1.0), ValueError, "temperature must be a finite number >= 0"),
    (dict(temperature=math.inf), ValueError, "temperature must be a finite number >= 0"),
    (dict(mask_id=3), ValueError, "the prompt holds mask_id 3"),
])
def test_bad_arguments_raise(kw, error, match):
    args = dict(gen_length=16, block_length=4, steps_per_block=2, mask_id=MASK, use_cache=False)
    args.update(kw)
    prompt = prompt_of()
    prompt[0, 1] = 3
    with pytest.raises(error, match=match):
        fastar.diffusion.generate_blocks(lambda ids, **k: torch.zeros(*ids.shape, VOCAB), prompt, **args)


def test_bad_prompt_raises(model):
    with pytest.raises(ValueError, match="prompt must be an int64"):
        fastar.diffusion.generate_blocks(model, prompt_of().int(), gen_length=4, block_length=4, steps_per_block=1,
                                         mask_id=MASK)


def test_bad_model_outputs_raise(model):
    kw = dict(gen_length=4, block_length=4, steps_per_block=1, mask_id=MASK)
    for wrong in (torch.zeros(1, VOCAB), torch.zeros(2, 3, VOCAB), torch.zeros(1, 4, VOCAB)):
        with pytest.raises(ValueError, match="must return logits \\[B, m, V\\] of the last m"):
            fastar.diffusion.generate_blocks(lambda ids, w=wrong, **k: w, prompt_of(), **kw)
    with pytest.raises(ValueError, match="must return .past_key_values"):
        fastar.diffusion.generate_blocks(lambda ids, **k: model(ids).logits, prompt_of(), **kw)


@pytest.mark.parametrize("rule", ["schedule", "threshold"])
def test_nan_logits_raise(backend, model, rule):
    def poisoned(ids, **kw):
        out = model(ids, **kw)
        out.logits[1, -1, 3] = math.nan
        return out

    with pytest.raises(ValueError, match="invalid"):
        generate(backend, poisoned, prompt_of(), gen_length=8, block_length=8, steps_per_block=4, **RULES[rule])


@pytest.mark.parametrize("rule", list(RULES))
def test_a_model_that_commits_the_mask_raises(backend, rule):
    """A block still masked after its last step is never cached: the loop raises."""
    masky = TinyBlockDiffusionLM(vocab=VOCAB, mask_id=MASK, predict_mask=True)
    with torch.no_grad():
        masky.head.bias[MASK] = 100.0
    with pytest.raises(RuntimeError, match="still holds mask_id after"):
        generate(backend, masky, prompt_of(), gen_length=8, block_length=8, steps_per_block=4, **RULES[rule])
