"""Tests of fastar.sample_cfg on every backend.

The oracle is ``fastar.reference.sample_cfg_reference`` (float64 guidance, VAR's filtering rule with fastar's
tie rules); it is itself checked against VAR's own ``sample_with_top_k_top_p_`` code (``var_kept`` below, in
float64 and float32). Statistical tests are Pearson chi-square tests of the sampled tokens against the
reference distribution with fixed seeds, rejecting at p < 1e-4 (``P_THRESHOLD``): deterministic, and a correct
kernel passes them. Many positions share one logits row (an expanded, stride-0 input), so one call gives
thousands of samples.

The SIMT backend emulates CUDA on the CPU at a few milliseconds per (image, position) block, so it gets fewer
samples (``rows(backend, cpu, simt)``) and small vocabularies; one test runs a vocabulary above 1024 (the
256-thread kernel) on two positions.
"""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastar
from fastar import sampling
from fastar.reference import philox4x32_10, sample_cfg_reference, var_top_k_top_p_
from helpers import HYPOTHESIS, chisquare_pvalue, rows

P_THRESHOLD = 1e-4  # statistical tests fail when a p-value is below this (fixed seeds: deterministic)
LN2 = math.log(2)
VAR = dict(cfg=1.5, schedule="var", scale_index=6, num_scales=10)


def var_kept(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """bool [..., V]: the tokens VAR's sample_with_top_k_top_p_ leaves finite (its code, on a copy)."""
    return var_top_k_top_p_(logits.clone(), top_k, top_p) > -math.inf


def guided_logits(gen, images: int, vocab: int, spread: float = 2.0) -> torch.Tensor:
    """float32 [2 * images, vocab]: conditional rows, then unconditional ones correlated with them."""
    cond = torch.randn(images, vocab, generator=gen) * spread
    uncond = 0.6 * cond + torch.randn(images, vocab, generator=gen) * spread * 0.5
    return torch.cat([cond, uncond])


def exact(values, dtype=torch.float32) -> torch.Tensor:
    """Logits fed through unchanged: schedule 'constant' with cfg 1 mixes to the conditional rows exactly
    (fma(1, cond, 0 * uncond)), so tests can place the guided logits themselves."""
    cond = torch.tensor(values, dtype=dtype)
    return torch.stack([cond, torch.zeros_like(cond)])


IDENTITY = dict(cfg=1.0, schedule="constant")


def sample_many(backend, row_logits: torch.Tensor, n: int, **kw) -> torch.Tensor:
    """int64 [images, n]: n draws per image from [2 * images, V] logits (one call, positions expanded)."""
    return backend.sample_cfg(row_logits[:, None, :].expand(-1, n, -1), seed=1234, offset=7, **kw)


def assert_distribution(tokens: torch.Tensor, probs: torch.Tensor) -> None:
    """Chi-square of each image's tokens [images, n] against its reference probabilities [images, V]."""
    for b in range(tokens.shape[0]):
        expected = {t: p for t, p in enumerate(probs[b].tolist())}
        p_value = chisquare_pvalue(Counter(tokens[b].tolist()), expected, tokens.shape[1])
        assert p_value > P_THRESHOLD, f"image {b}: chi-square p-value {p_value:.2e}"


def support(tokens: torch.Tensor) -> set:
    return set(tokens.flatten().tolist())


# ----------------------------------------------------------------------------------------------------
# distributions
# ----------------------------------------------------------------------------------------------------

CONFIGS = {
    "var-topk-topp-temp": dict(VAR, top_k=9, top_p=0.8, temperature=0.7),
    "var-topk": dict(VAR, scale_index=9, top_k=6),
    "var-topp": dict(VAR, cfg=3.0, scale_index=2, top_p=0.7),
    "const-topp-temp": dict(cfg=4.0, schedule="constant", top_p=0.9, temperature=1.6),
    "const-topk-topp": dict(cfg=2.0, schedule="constant", top_k=12, top_p=0.95),
    "const-plain": dict(cfg=1.5, schedule="constant"),
}


@pytest.mark.parametrize("seed,config", list(enumerate(CONFIGS.values())), ids=CONFIGS.keys())
def test_distribution_matches_reference(backend, seed, config):
    gen = torch.Generator().manual_seed(seed)
    logits = guided_logits(gen, 2, 24, spread=1.0)
    tokens = sample_many(backend, logits, rows(backend, 20000, 300), **config)
    assert tokens.dtype == torch.int64 and tokens.shape[0] == 2
    assert_distribution(tokens, sample_cfg_reference(logits, **config))


def test_distribution_2d_bfloat16_large_spread(backend):
    """[2B, V] bf16 logits (one position per call: many rows instead), spread wide enough that most weights
    underflow the fixed point's 2^-40."""
    gen = torch.Generator().manual_seed(3)
    n = rows(backend, 8000, 300)
    base = guided_logits(gen, 1, 40, spread=12.0).bfloat16()
    logits = torch.cat([base[:1].expand(n, -1), base[1:].expand(n, -1)])
    config = dict(VAR, top_k=20, top_p=0.999)
    tokens = backend.sample_cfg(logits, seed=5, **config)
    assert tokens.shape == (n,)
    assert_distribution(tokens[None], sample_cfg_reference(base, **config))


# ----------------------------------------------------------------------------------------------------
# filtering rules
# ----------------------------------------------------------------------------------------------------


def test_top_k_keeps_every_tie_of_the_kth_logit(backend):
    values = [3.0, 1.0, 2.0, 2.0, 2.0, 0.0, -1.0, 2.5]  # top 3: 3, 2.5 and the three 2s
    logits = exact(values)
    kept = var_kept(torch.tensor(values), 3, 0.0)
    assert set(torch.nonzero(kept).flatten().tolist()) == {0, 2, 3, 4, 7}
    tokens = sample_many(backend, logits, rows(backend, 6000, 300), top_k=3, **IDENTITY)
    assert support(tokens) == {0, 2, 3, 4, 7}
    assert_distribution(tokens, sample_cfg_reference(logits, top_k=3, **IDENTITY))


@pytest.mark.parametrize(
    "top_p,kept,var_size",
    [(0.5, {1}, 1), (0.5 + 1e-6, {1, 3}, 2), (0.75, {1, 3}, 2), (0.75 + 1e-6, {0, 1, 2, 3}, 3), (1.0, {0, 1, 2, 3}, 4)],
)
def test_top_p_boundary(backend, top_p, kept, var_size):
    """Probabilities exactly (1/8, 1/2, 1/8, 1/4). At top_p = 0.75 the two 1/8 tokens have ascending cumsum 1/8
    and 1/4 = 1 - top_p (mass above them 3/4 = top_p) and are dropped, at 0.5 the 1/4 token too (mass above it
    1/2); just above those values they stay. Just above 0.75 VAR keeps one of the tied 1/8 tokens (whichever
    its sort puts second), fastar decides ties by value and keeps both."""
    values = [-2 * LN2, 0.0, -2 * LN2, -LN2]
    x = torch.tensor(values)
    assert x.softmax(-1).tolist() == [0.125, 0.5, 0.125, 0.25]  # exact in float32, so VAR's rule is exact
    var = set(torch.nonzero(var_kept(x, 0, top_p)).flatten().tolist())
    assert var <= kept and len(var) == var_size
    tokens = sample_many(backend, exact(values), rows(backend, 2000, 200), top_p=top_p, **IDENTITY)
    assert support(tokens) == kept


@pytest.mark.parametrize("top_p", [1e-6, 1e-30])
def test_tiny_top_p_keeps_the_argmax(backend, top_p):
    gen = torch.Generator().manual_seed(4)
    logits = guided_logits(gen, 3, 50)
    mixed = sample_cfg_reference(logits, **VAR)
    tokens = backend.sample_cfg(logits[:, None].expand(-1, 20, -1), top_p=top_p, seed=1, **VAR)
    assert torch.equal(tokens, mixed.argmax(-1, keepdim=True).expand(-1, 20))


def test_top_k_one_is_the_argmax_of_the_guided_logits(backend):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 4, 45, generator=gen) * 3
    for config in (VAR, dict(cfg=4.0, schedule="constant", temperature=0.5)):
        want = sample_cfg_reference(logits, **config).argmax(-1)
        assert torch.equal(backend.sample_cfg(logits, top_k=1, seed=2, **config), want)


def test_tokens_fully_written_over_poisoned_memory(backend):
    """Every position is written: the allocator is dirtied with freed blocks of the output's size first, and
    every token must then be the deterministic top-1 choice (no poison value is an argmax in [0, V))."""
    gen = torch.Generator().manual_seed(21)
    logits = torch.randn(10, 7, 33, generator=gen) * 3
    want = sample_cfg_reference(logits, **VAR).argmax(-1)
    for _ in range(3):
        poison = [torch.full((5, 7), 0x7F7F7F7F, dtype=torch.int64, device=backend.device) for _ in range(4)]
        del poison
        tokens = backend.sample_cfg(logits, top_k=1, seed=3, **VAR)
        assert torch.equal(tokens, want)


def test_top_k_at_least_vocab_is_no_top_k(backend):
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 8, 30, generator=gen)
    unfiltered = backend.sample_cfg(logits, seed=3, **VAR)
    for top_k in (30, 31, 1000):
        assert torch.equal(backend.sample_cfg(logits, top_k=top_k, seed=3, **VAR), unfiltered)


def test_reference_matches_var_code():
    """The reference keeps what VAR's sample_with_top_k_top_p_ keeps (float64, random logits: no ties)."""
    gen = torch.Generator().manual_seed(7)
    cond = torch.randn(20, 3, 200, generator=gen, dtype=torch.float64) * 3
    logits = torch.cat([cond, torch.zeros_like(cond)])
    for top_k, top_p in [(0, 0.9), (50, 0.0), (50, 0.96), (150, 0.5), (0, 0.3)]:
        probs = sample_cfg_reference(logits, top_k=top_k, top_p=top_p or 1.0, **IDENTITY)
        assert torch.equal(probs > 0, var_kept(cond, top_k, top_p))


# ----------------------------------------------------------------------------------------------------
# randomness: Philox keyed by (seed, offset, row, position); same tokens on every backend
# ----------------------------------------------------------------------------------------------------


def test_uniform_logits_follow_the_documented_philox_draw(backend):
    """With V equal logits every weight is 2^40, so the token is floor(V * bits / 2^64), bits the last two words
    of Philox4x32-10 at counter (position, row, offset lo, offset hi) and key (seed lo, seed hi)."""
    B, L, V, seed, offset = 2, 5, 13, 2**40 + 17, 2**33 + 5
    tokens = backend.sample_cfg(torch.zeros(2 * B, L, V), seed=seed, offset=offset, **VAR)
    for b in range(B):
        for pos in range(L):
            r = philox4x32_10([pos, b, offset & 0xFFFFFFFF, offset >> 32], [seed & 0xFFFFFFFF, seed >> 32])
            assert int(tokens[b, pos]) == (V * ((r[2] << 32) | r[3])) >> 64


CROSS_CASES = {
    "3d-f32-topk-topp": (lambda g: torch.randn(6, 5, 37, generator=g) * 3, dict(VAR, top_k=7, top_p=0.9)),
    "2d-bf16-var-d16-like": (lambda g: (torch.randn(4, 3000, generator=g) * 3).bfloat16(),
                             dict(VAR, scale_index=9, top_k=900, top_p=0.96)),
    "3d-f16-constant": (lambda g: torch.randn(4, 3, 130, generator=g).half(),
                        dict(cfg=4.0, schedule="constant", top_p=0.5, temperature=0.8)),
    "transposed": (lambda g: (torch.randn(4, 64, 9, generator=g) * 2).transpose(1, 2)[:, ::2], dict(VAR, top_k=10)),
    "strided-rows": (lambda g: torch.randn(4, 10, 80, generator=g)[:, ::2, 5:70], dict(VAR, top_p=0.8)),
    "-inf tokens": (lambda g: torch.randn(4, 3, 37, generator=g).index_fill_(2, torch.arange(0, 37, 3), -math.inf)
                    .index_fill_(0, torch.tensor([2, 3]), 0.0), dict(VAR, top_k=30, top_p=0.9)),
    "ties": (lambda g: torch.randint(-3, 3, (4, 6, 40), generator=g).float(), dict(VAR, top_k=5, top_p=0.7)),
}


@pytest.mark.parametrize("case", CROSS_CASES.values(), ids=CROSS_CASES.keys())
def test_same_tokens_as_the_cpu_kernel(backend, case):
    make, config = case
    logits = make(torch.Generator().manual_seed(8))
    tokens = backend.sample_cfg(logits, seed=99, offset=3, **config)
    assert torch.equal(tokens, fastar.sample_cfg(logits, seed=99, offset=3, **config))
    assert torch.equal(tokens, fastar.sample_cfg(logits.contiguous(), seed=99, offset=3, **config))


@settings(max_examples=80, **HYPOTHESIS)
@given(
    images=st.integers(1, 3),
    positions=st.integers(1, 3),
    vocab=st.integers(1, 300),
    levels=st.sampled_from([3, 20, None]),  # logits from a few values (many ties), or continuous
    spread=st.sampled_from([0.5, 4.0, 40.0]),
    top_k=st.integers(0, 60),
    top_p=st.sampled_from([1.0, 0.999, 0.9, 0.5, 0.1, 1e-9]),
    var=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**64 - 1),
)
def test_same_tokens_as_the_cpu_kernel_random(backend, images, positions, vocab, levels, spread, top_k, top_p, var,
                                              dtype, seed):
    gen = torch.Generator().manual_seed(seed % 2**63)
    shape = (2 * images, positions, vocab)
    if levels is None:
        logits = torch.randn(shape, generator=gen) * spread
    else:
        logits = torch.randint(0, levels, shape, generator=gen) * (spread / levels)
    config = dict(VAR, scale_index=seed % 10) if var else dict(cfg=spread / 8, schedule="constant")
    config.update(top_k=top_k, top_p=top_p)
    logits = logits.to(dtype)
    tokens = backend.sample_cfg(logits, seed=seed, offset=positions, **config)
    assert torch.equal(tokens, fastar.sample_cfg(logits, seed=seed, offset=positions, **config))
    assert ((tokens >= 0) & (tokens < vocab)).all()


def test_seed_and_offset_select_the_stream(backend):
    logits = torch.zeros(2, 40, 64)
    draw = lambda seed, offset: backend.sample_cfg(logits, seed=seed, offset=offset, **VAR)  # noqa: E731
    base = draw(1, 0)
    assert torch.equal(base, draw(1, 0))
    assert torch.equal(base, draw(torch.tensor(1), torch.tensor(0)))
    assert torch.equal(draw(-1, 0), draw(2**64 - 1, 0))
    for other in (draw(1, 1), draw(2, 0), draw(1, 2**32)):
        assert (other != base).sum() > 30  # independent draws agree on ~1/64 of the positions


def test_unseeded_calls_use_torchs_generator(backend):
    logits = torch.zeros(2, 40, 64)
    torch.manual_seed(11)
    a = backend.sample_cfg(logits, **VAR)
    torch.manual_seed(11)
    assert torch.equal(a, backend.sample_cfg(logits, **VAR))
    assert (backend.sample_cfg(logits, **VAR) != a).sum() > 30


# ----------------------------------------------------------------------------------------------------
# dtypes, shapes, strides
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_sample_their_float_values(backend, dtype):
    logits = (torch.randn(4, 6, 50, generator=torch.Generator().manual_seed(9)) * 3).to(dtype)
    config = dict(VAR, top_k=20, top_p=0.9)
    assert torch.equal(backend.sample_cfg(logits, seed=4, **config),
                       backend.sample_cfg(logits.float(), seed=4, **config))


def test_shapes(backend):
    gen = torch.Generator().manual_seed(10)
    logits = torch.randn(6, 33, generator=gen)
    flat = backend.sample_cfg(logits, seed=5, top_k=8, **VAR)
    assert flat.shape == (3,) and flat.dtype == torch.int64
    assert torch.equal(flat, backend.sample_cfg(logits[:, None], seed=5, top_k=8, **VAR)[:, 0])
    assert backend.sample_cfg(torch.randn(6, 4, 33, generator=gen), **VAR).shape == (3, 4)
    assert backend.sample_cfg(torch.randn(0, 4, 33), **VAR).shape == (0, 4)
    assert backend.sample_cfg(torch.randn(2, 0, 33), **VAR).shape == (1, 0)
    assert backend.sample_cfg(torch.randn(2, 1), top_k=5, top_p=0.5, **VAR).tolist() == [0]


def test_var_schedule_is_constant_guidance_with_cfg_one_plus_t(backend):
    """VAR at t = 1.5 * 2 / 3 = 1 mixes 2 cond - uncond, LlamaGen's constant schedule with cfg 2 too; at scale
    0 it is the conditional logits alone. The weights are exact, so the tokens are identical."""
    logits = torch.randn(4, 10, 40, generator=torch.Generator().manual_seed(12)) * 2
    kw = dict(top_k=15, top_p=0.9, seed=6)
    var = backend.sample_cfg(logits, cfg=1.5, schedule="var", scale_index=2, num_scales=4, **kw)
    assert torch.equal(var, backend.sample_cfg(logits, cfg=2.0, schedule="constant", **kw))
    first = backend.sample_cfg(logits, cfg=1.5, schedule="var", scale_index=0, num_scales=4, **kw)
    assert torch.equal(first, backend.sample_cfg(logits, **IDENTITY, **kw))


# ----------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------

BAD_ARGUMENTS = [
    (dict(logits=torch.randn(3, 8)), ValueError, "must be even"),
    (dict(logits=torch.randn(8)), ValueError, r"\[2B, V\] or \[2B, L, V\]"),
    (dict(logits=torch.randn(2, 1, 1, 8)), ValueError, r"\[2B, V\] or \[2B, L, V\]"),
    (dict(logits=torch.randn(2, 0)), ValueError, "vocabulary dimension of logits is empty"),
    (dict(logits=torch.randn(2, 8).double()), TypeError, "float32, float16 or bfloat16"),
    (dict(logits=torch.ones(2, 8, dtype=torch.int32)), TypeError, "float32, float16 or bfloat16"),
    (dict(cfg=-0.5), ValueError, "cfg must be finite and >= 0"),
    (dict(cfg=math.nan), ValueError, "cfg must be finite and >= 0"),
    (dict(cfg=math.inf), ValueError, "cfg must be finite and >= 0"),
    (dict(cfg="1.5"), TypeError, "cfg must be a number"),
    (dict(temperature=0.0), ValueError, "temperature must be finite and > 0"),
    (dict(temperature=-1.0), ValueError, "temperature must be finite and > 0"),
    (dict(temperature=math.nan), ValueError, "temperature must be finite and > 0"),
    (dict(temperature=1e-40), ValueError, "guidance weights overflow float32"),
    (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(top_p=-0.1), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(top_p=math.nan), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), ValueError, "top_k must be >= 0"),
    (dict(top_k=2.0), TypeError, "top_k must be an int"),
    (dict(top_k=True), TypeError, "top_k must be an int"),
    (dict(schedule="linear"), ValueError, "schedule must be 'var' or 'constant'"),
    (dict(schedule=None), TypeError, "schedule must be 'var' or 'constant'"),
    (dict(scale_index=None), ValueError, "schedule='var' needs scale_index and num_scales"),
    (dict(num_scales=None), ValueError, "schedule='var' needs scale_index and num_scales"),
    (dict(scale_index=0, num_scales=1), ValueError, "num_scales must be >= 2"),
    (dict(scale_index=-1), ValueError, r"scale_index must be in \[0, num_scales\)"),
    (dict(scale_index=10), ValueError, r"scale_index must be in \[0, num_scales\)"),
    (dict(scale_index=1.0), TypeError, "scale_index must be an int"),
    (dict(schedule="constant"), ValueError, "apply to schedule='var' only"),
    (dict(seed=1.5), TypeError, "seed must be an integer"),
    (dict(seed=torch.tensor(1.0)), TypeError, "seed must hold an integer"),
    (dict(seed=torch.tensor([1, 2])), ValueError, "seed must hold one value"),
    (dict(offset="0"), TypeError, "offset must be an integer"),
]


def bad_argument_id(bad: dict) -> str:
    """A test id that is the same in every process (a tensor's values are not)."""
    name, value = next(iter(bad.items()))
    shown = f"{tuple(value.shape)}:{value.dtype}" if isinstance(value, torch.Tensor) else repr(value)
    return f"{name}={shown}"[:40]


@pytest.mark.parametrize("bad,exc,match", BAD_ARGUMENTS, ids=[bad_argument_id(b) for b, _, _ in BAD_ARGUMENTS])
def test_bad_arguments_raise(backend, bad, exc, match):
    kw = dict(logits=torch.randn(4, 3, 8), seed=0, **VAR)
    kw.update(bad)
    with pytest.raises(exc, match=match):
        backend.sample_cfg(**kw)


# (logits rows, token, value) written at position 2 of [4, 3, 8] logits: image 0 is rows 0 (cond) and 2 (uncond)
BAD_VALUES = {
    "nan": ([0], 5, math.nan),
    "nan-uncond": ([2], 0, math.nan),
    "+inf": ([0], 1, math.inf),
    "all -inf": ([0], slice(None), -math.inf),
    "inf - inf": ([0, 2], 3, -math.inf),  # (1 + t)(-inf) - t(-inf) is NaN in VAR too
}


@pytest.mark.parametrize("poison", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_values_are_reported_for_their_position(backend, poison):
    logits = torch.randn(4, 3, 8)
    for row in poison[0]:
        logits[row, 2, poison[1]] = poison[2]
    message = r"invalid logits at batch row 0, position 2"
    if backend.marks_invalid_rows:
        tokens = backend.sample_cfg(logits, seed=0, **VAR)
        assert tokens[0, 2] == -1 and (tokens[0, :2] >= 0).all() and (tokens[1] >= 0).all()
        with pytest.raises(ValueError, match=message):
            fastar.check_tokens(tokens)
    else:
        with pytest.raises(ValueError, match=message):
            backend.sample_cfg(logits, seed=0, **VAR)


def test_debug_checks_raise_for_marked_positions(backend, debug_checks):
    logits = torch.randn(2, 8)
    logits[1, 0] = math.nan
    with pytest.raises(ValueError, match="invalid logits at batch row 0"):
        backend.sample_cfg(logits, seed=0, **VAR)


def test_check_tokens():
    fastar.check_tokens(torch.tensor([[0, 5], [3, 1]]))
    with pytest.raises(ValueError, match="batch row 1, position 0"):
        fastar.check_tokens(torch.tensor([[0, 5], [-1, 1]]))
    with pytest.raises(ValueError, match="batch row 2:"):
        sampling.check_tokens(torch.tensor([0, 5, -1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_seed_on_another_device_raises():
    with pytest.raises(ValueError, match="seed must be on the CPU or on cpu"):
        fastar.sample_cfg(torch.randn(2, 8), seed=torch.tensor(0, device="cuda"), **VAR)
