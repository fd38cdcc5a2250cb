"""``fastar.generate.speculative``: greedy generations equal the target's own ``generate``; sampled ones follow
the target's warped distribution (chi-square against probabilities computed from the target alone, in float64);
``warp_logits`` equals transformers' warpers; bad arguments raise.

The loop runs on the CPU (it calls the acceptance ops of whatever device the models are on; those ops are tested
on every backend in their own files).
"""
from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastar.generate as generate  # noqa: E402
from helpers import chisquare_pvalue  # noqa: E402

P_MIN = 1e-3  # chi-square p-value threshold (fixed seeds: the test is deterministic)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run ~10x faster on one thread than on two when other jobs share the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def llama(vocab: int, layers: int, seed: int, init: float = 0.2):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   initializer_range=init, pad_token_id=0)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def pair():
    """A 3-layer target whose last two layers add little and a draft made of its first layer and head: they
    agree on part of the argmaxes."""
    target = llama(128, 3, 0)
    with torch.no_grad():
        for layer in target.model.layers[1:]:
            layer.self_attn.o_proj.weight.mul_(0.2)
            layer.mlp.down_proj.weight.mul_(0.2)
    draft = llama(128, 1, 0)
    draft.load_state_dict({k: v for k, v in target.state_dict().items() if k in draft.state_dict()})
    return target, draft


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("prompt_len", [1, 9])
def test_greedy_equals_target_generate(pair, k, prompt_len):
    target, draft = pair
    ids = torch.randint(0, 128, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    expected = target.generate(ids, do_sample=False, max_new_tokens=30, pad_token_id=0)
    out, stats = generate.speculative(target, draft, ids, max_new_tokens=30, num_draft_tokens=k, return_stats=True)
    assert torch.equal(out, expected)
    assert stats.new_tokens == 30 and stats.accepted + stats.target_forwards >= 30
    assert 0 < stats.accepted <= stats.drafted  # the draft is right sometimes: the acceptance path is exercised


@pytest.mark.parametrize("tree", [(1,), (3,), (4, 2, 2, 1), (2, 2, 2, 2, 2, 2)])
@pytest.mark.parametrize("prompt_len", [1, 9])
def test_tree_greedy_equals_target_generate(pair, tree, prompt_len):
    target, draft = pair
    ids = torch.randint(0, 128, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    expected = target.generate(ids, do_sample=False, max_new_tokens=30, pad_token_id=0)
    out, stats = generate.speculative(target, draft, ids, max_new_tokens=30, tree=tree, return_stats=True)
    assert torch.equal(out, expected)
    assert stats.new_tokens == 30 and 0 < stats.accepted <= stats.drafted


def test_greedy_stops_at_eos(pair):
    target, draft = pair
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    full = target.generate(ids, do_sample=False, max_new_tokens=20, pad_token_id=0)[0, 5:].tolist()
    eos = full[7]
    stop = full.index(eos) + 1
    out = generate.speculative(target, draft, ids, max_new_tokens=20, num_draft_tokens=4, eos_token_id=[eos, 127])
    assert out[0, 5:].tolist() == full[:stop]


def test_zero_new_tokens(pair):
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(generate.speculative(*pair, ids, max_new_tokens=0), ids)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 10, 0.6)])
def test_warp_logits_matches_transformers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    logits[0, :4] = logits[0, 4]  # ties at the top-k boundary
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    expected = warpers(None, logits.clone())
    assert torch.equal(generate.warp_logits(logits, temperature, top_k, top_p), expected)


def _exact_two_token_law(target, ids, temperature, top_k, top_p) -> dict:
    """P(first two generated tokens), float64, from the target's warped distributions."""
    vocab = target.config.vocab_size
    with torch.no_grad():
        first = generate.warp_logits(target(ids).logits[0, -1], temperature, top_k, top_p).double().softmax(-1)
        prefixes = torch.cat([ids.expand(vocab, -1), torch.arange(vocab)[:, None]], dim=1)
        second = generate.warp_logits(target(prefixes).logits[:, -1], temperature, top_k, top_p).double().softmax(-1)
    law = first[:, None] * second
    return {(a, b): float(law[a, b]) for a in range(vocab) for b in range(vocab) if law[a, b] > 0}


PLAIN, WARPED = (1.0, 0, 1.0), (0.8, 4, 0.9)


@pytest.mark.parametrize("k,settings", [(1, PLAIN), (3, PLAIN), (3, WARPED), ((3, 2), PLAIN), ((2, 2), WARPED)])
def test_sampling_follows_the_target(k, settings):
    """Chi-square of the first two emitted tokens against the target's law; the draft is another random model,
    so drafts are rejected often and the residual path is exercised. A tuple ``k`` drafts trees of those widths."""
    vocab, runs = 5, 1000
    target, draft = llama(vocab, 2, 1, init=0.5), llama(vocab, 1, 2, init=0.5)
    ids = torch.tensor([[1, 4, 2]])
    temperature, top_k, top_p = settings
    law = _exact_two_token_law(target, ids, temperature, top_k, top_p)
    seen, accepted = Counter(), 0
    for seed in range(runs):
        shape = {"tree": k} if isinstance(k, tuple) else {"num_draft_tokens": k}
        out, stats = generate.speculative(target, draft, ids, max_new_tokens=2, do_sample=True, temperature=temperature,
                                          top_k=top_k, top_p=top_p, seed=seed, return_stats=True, **shape)
        seen[tuple(out[0, 3:].tolist())] += 1
        accepted += stats.accepted
    assert 0 < accepted < runs  # both acceptance and rejection happened
    p = chisquare_pvalue(seen, law, runs)
    assert p > P_MIN, f"p = {p:.2e}"


def test_same_seed_same_tokens(pair):
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    a = generate.speculative(*pair, ids, max_new_tokens=12, do_sample=True, seed=11)
    b = generate.speculative(*pair, ids, max_new_tokens=12, do_sample=True, seed=11)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs,error", [
    ({"input_ids": torch.tensor([[1, 2], [3, 4]])}, "one non-empty prompt"),
    ({"input_ids": torch.zeros(1, 0, dtype=torch.int64)}, "one non-empty prompt"),
    ({"input_ids": torch.tensor([[1.0, 2.0]])}, "integer tensor"),
    ({"num_draft_tokens": 0}, "num_draft_tokens"),
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"temperature": 0.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": 2.5}, "top_k"),
    ({"do_sample": 1}, "do_sample"),
    ({"tree": ()}, "tree"),
    ({"tree": (2, 0)}, "tree"),
    ({"tree": 3}, "tree"),
    ({"tree": (1, 129)}, "tree"),
])
def test_bad_arguments(pair, kwargs, error):
    args = {"input_ids": torch.tensor([[1, 2, 3]])} | kwargs
    with pytest.raises((ValueError, TypeError), match=error):
        generate.speculative(*pair, **args)


def test_vocabulary_mismatch(pair):
    with pytest.raises(ValueError, match="vocabulary"):
        generate.speculative(pair[0], llama(64, 1, 0), torch.tensor([[1, 2]]))
