"""transformers integration: ``attn_implementation="fastar"`` gives the logits and greedy generations of
``attn_implementation="sdpa"`` on tiny random-initialised models (Llama with GQA, GPT-2), running fastar's
kernels (no fallback to PyTorch).

Tolerance: float32 logits within ``1e-5 * max(1, max|logits|)`` of SDPA's (both accumulate in float32; the
observed difference is ~1e-7).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastar  # noqa: E402
import fastar.integrations.huggingface  # noqa: E402,F401  (registers attn_implementation="fastar")
from fastar import masked_attention  # noqa: E402

VOCAB, PROMPT, NEW_TOKENS = 128, 12, 10

CONFIGS = {
    # GQA: 4 query heads share 2 kv heads; a larger init range than the default for sharper attention.
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, pad_token_id=0,
    ),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, initializer_range=0.2, pad_token_id=0,
    ),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def models(request):
    """(sdpa model, fastar model, number of layers) with the same random weights."""
    cfg = CONFIGS[request.param]()
    torch.manual_seed(0)
    # transformers mutates the config it is given: one copy per model.
    reference = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="fastar").eval()
    model.load_state_dict(reference.state_dict())
    assert model.config._attn_implementation == "fastar"
    assert reference.config._attn_implementation == "sdpa"
    return reference, model, cfg.num_hidden_layers


@pytest.fixture
def fastar_calls(monkeypatch):
    """Counts the calls of fastar's kernels; fails the test on a fallback warning."""
    calls = []
    run = masked_attention._run

    def counting_run(*args, **kwargs):
        calls.append(1)
        return run(*args, **kwargs)

    monkeypatch.setattr(masked_attention, "_run", counting_run)
    monkeypatch.setattr(masked_attention, "_warned", set())  # a fallback warns again in this test
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield calls
    fallbacks = [str(w.message) for w in record if "falls back" in str(w.message)]
    assert fallbacks == [], f"fastar fell back to PyTorch: {fallbacks}"


def inputs():
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, VOCAB, (3, PROMPT), generator=gen)
    attention_mask = torch.ones(3, PROMPT, dtype=torch.long)
    attention_mask[1, :4] = 0  # left padding
    attention_mask[2, :9] = 0
    input_ids[attention_mask == 0] = 0
    return input_ids, attention_mask


def assert_logits_close(got, want):
    tol = 1e-5 * max(1.0, want.abs().max().item())
    err = (got - want).abs().max().item()
    assert err <= tol, f"logits differ by {err:.3g} > {tol:.3g}"


@torch.no_grad()
def test_logits_match_sdpa(models, fastar_calls):
    reference, model, layers = models
    input_ids, attention_mask = inputs()
    want = reference(input_ids=input_ids, attention_mask=attention_mask).logits
    got = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert len(fastar_calls) == layers
    assert_logits_close(got, want)
    # The padding mask matters here (so a kernel ignoring it could not pass): without it row 1 changes.
    unmasked = reference(input_ids=input_ids).logits
    assert (unmasked[1] - want[1]).abs().max() > 1e-2
    # No padding: transformers may pass no mask and is_causal (SDPA's top-left causal).
    got = model(input_ids=input_ids[:1]).logits
    assert len(fastar_calls) == 2 * layers
    assert_logits_close(got, reference(input_ids=input_ids[:1]).logits)


@torch.no_grad()
def test_greedy_generate_matches_sdpa(models, fastar_calls):
    reference, model, layers = models
    input_ids, attention_mask = inputs()
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True,
                  pad_token_id=0)
    want = reference.generate(input_ids, **kwargs)
    got = model.generate(input_ids, **kwargs)
    assert got.shape == (3, PROMPT + NEW_TOKENS)
    assert torch.equal(got, want), f"fastar generated\n{got}\nSDPA generated\n{want}"
    # A prefill and NEW_TOKENS - 1 decode steps (one query against the KV cache), every layer through fastar.
    assert len(fastar_calls) == layers * NEW_TOKENS


def gemma2_config(softcapping):
    return transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=8, initializer_range=0.2,
        pad_token_id=0, attn_logit_softcapping=softcapping,
    )


@torch.no_grad()
def test_gemma2_softcap_is_refused_with_a_fastar_message():
    """Gemma 2 soft-caps its attention logits, which fastar's kernels do not: the first forward says so."""
    model = transformers.AutoModelForCausalLM.from_config(gemma2_config(50.0), attn_implementation="fastar").eval()
    with pytest.raises(ValueError, match="attn_implementation='fastar' does not support .*soft-capping") as error:
        model(input_ids=inputs()[0])
    assert "sdpa" not in str(error.value)


@torch.no_grad()
def test_gemma2_without_softcap_matches_eager(fastar_calls):
    """The refusal is of soft-capping only: Gemma 2 without it (sliding-window layers included) runs fastar's
    kernels and gives the logits of transformers' eager attention (Gemma 2 has no SDPA path)."""
    cfg = gemma2_config(None)
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="fastar").eval()
    model.load_state_dict(reference.state_dict())
    input_ids, attention_mask = inputs()
    got = model(input_ids=input_ids, attention_mask=attention_mask).logits
    want = reference(input_ids=input_ids, attention_mask=attention_mask).logits
    assert len(fastar_calls) == cfg.num_hidden_layers
    # Padding positions see no key: eager gives them a uniform average, SDPA's convention (fastar's) 0.
    real = attention_mask.bool()
    assert_logits_close(got[real], want[real])


# FastarQuantizedCache: the model's attention reads the quantized cache (no dequantized copy).
QUANTIZED_FORMATS = ["int8", "fp8_e4m3", "fp8_e5m2"]


def quantized_layer_update(fmt):
    """A DynamicLayer.update that stores K and V as the reference quantizer rounds them (per-token scales): the
    cache fastar's should equal, built from plain PyTorch."""
    from fastar.reference import quantize_fp8_reference, quantize_int8_reference

    update = transformers.cache_utils.DynamicLayer.update

    def rounded(x):
        if fmt == "int8":
            codes, scale = quantize_int8_reference(x)
            return (codes.float() * scale.unsqueeze(-1)).to(x.dtype)
        scale = x.float().abs().amax(-1, keepdim=True) / torch.finfo(fastar.reference.KV_FORMATS[fmt]).max
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # a row of zeros: codes 0
        return (quantize_fp8_reference(x, safe, fmt).float() * scale).to(x.dtype)

    def quantized_update(self, key_states, value_states, *args, **kwargs):
        return update(self, rounded(key_states), rounded(value_states), *args, **kwargs)

    return quantized_update


@pytest.fixture
def no_dequantize(monkeypatch):
    """Fails the test if anything dequantizes a fastar.QuantizedKVCache."""
    def refuse(self, dtype=None):
        raise AssertionError("the quantized cache was dequantized")

    monkeypatch.setattr(fastar.QuantizedKVCache, "dequantize", refuse)


@pytest.mark.parametrize("fmt", QUANTIZED_FORMATS)
@torch.no_grad()
def test_quantized_cache_gives_the_logits_of_a_quantize_dequantize_cache(fmt, monkeypatch, fastar_calls,
                                                                          no_dequantize):
    """Prefill (with left padding) and three decode steps through FastarQuantizedCache give the logits of the
    SDPA model whose cache holds the reference's quantize-dequantized K/V (float32 model)."""
    from fastar.integrations.huggingface import FastarQuantizedCache

    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="fastar").eval()
    model.load_state_dict(reference.state_dict())
    input_ids, attention_mask = inputs()
    cache = FastarQuantizedCache(model.config, format=fmt, max_cache_len=32)
    with monkeypatch.context() as patch:
        patch.setattr(transformers.cache_utils.DynamicLayer, "update", quantized_layer_update(fmt))
        kwargs = dict(attention_mask=attention_mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                      output_logits=True, return_dict_in_generate=True)
        want = reference.generate(input_ids, **kwargs)
    got = model.generate(input_ids, past_key_values=cache, **kwargs)
    assert len(fastar_calls) == 2 * 4
    assert torch.equal(got.sequences, want.sequences)
    for g, w in zip(got.logits, want.logits):
        assert_logits_close(g, w)
    assert cache.get_seq_length() == PROMPT + 3


# Share of greedy tokens equal to the bf16 cache's, at least. A random model's logits are nearly tied, so one
# flipped token sends the rest of its sequence elsewhere, and the shares move with the machine's bf16 matmuls: over
# 16 sequences at this seed, 0.87-0.88 (int8), 0.78 (fp8 e4m3) and 0.67-0.69 (fp8 e5m2, two mantissa bits) on an
# AMD EPYC with each CPU kernel ISA; 4 sequences gave 0.98 / 0.90 / 0.39 on a Xeon and 0.89 / 0.82 / 0.41 on the EPYC.
AGREEMENT = {"int8": 0.8, "fp8_e4m3": 0.65, "fp8_e5m2": 0.25}


@torch.no_grad()
def test_quantized_caches_generate_like_the_bf16_cache(no_dequantize):
    """A random-initialised bf16 Llama (the default init) generates greedily with each quantized cache; its tokens
    are compared position by position with the same model's generation over its usual bf16 cache."""
    from fastar.integrations.huggingface import FastarQuantizedCache

    cfg = transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="fastar",
                                                          dtype=torch.bfloat16).eval()
    input_ids = torch.randint(1, 512, (16, 32), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=48, do_sample=False, pad_token_id=0)
    want = model.generate(input_ids, **kwargs)[:, 32:]
    for fmt, share in AGREEMENT.items():
        got = model.generate(input_ids, past_key_values=FastarQuantizedCache(model.config, format=fmt,
                                                                             max_cache_len=96), **kwargs)[:, 32:]
        agreement = (got == want).float().mean().item()
        assert agreement >= share, f"{fmt}: {agreement:.2f} of the tokens agree with the bf16 cache's, < {share}"


def test_quantized_cache_crops_and_refuses_other_attention():
    from fastar.integrations.huggingface import FastarQuantizedCache

    cfg = CONFIGS["llama"]()
    with pytest.raises(ValueError, match="read only by attn_implementation='fastar'"):
        FastarQuantizedCache(transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").config)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="fastar").eval()
    cache = FastarQuantizedCache(model.config, max_cache_len=32)
    with torch.no_grad():
        model(input_ids=inputs()[0], past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == PROMPT
    cache.crop(-5)  # assisted generation rolls back rejected candidates
    assert cache.get_seq_length() == PROMPT - 5
    assert cache.layers[1].cache.lengths.tolist() == [PROMPT - 5] * 3


@torch.no_grad()
def test_kivi_cache_generates_through_the_quantized_attention(no_dequantize, fastar_calls):
    """KIVI int4 with a small group and window, so that most of the cache is quantized: generation runs every
    step's attention through fastar on the packed codes, and the layers hold the tokens kivi_split says."""
    from fastar.integrations.huggingface import FastarQuantizedCache
    from fastar.reference import kivi_split

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS["llama"](), attn_implementation="fastar").eval()
    input_ids = inputs()[0][:1]
    cache = FastarQuantizedCache(model.config, format="int4", max_cache_len=32, group_size=4, residual=4)
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         do_sample=False, pad_token_id=0)
    assert out.shape == (1, PROMPT + NEW_TOKENS)
    assert len(fastar_calls) == 2 * NEW_TOKENS
    n = PROMPT + NEW_TOKENS - 1
    assert cache.layers[0].cache._store.split == [list(kivi_split(n, 4, 4))]
