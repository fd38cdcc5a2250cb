"""Tests of fastar.ScaleKVCache (cached next-scale inference, ScaleKV compression) on every backend.

* Cached inference over VAR's 256px layout (10 scales, 680 tokens): each scale's ``attend`` equals the rows
  of that scale in the full block-causal ``scale_attention`` pass, and the float64 reference
  (``scale_attention_reference`` over the layout of the scales so far), with and without qk_norm, GQA.
* ``compress`` keeps exactly the keys ``scalekv_keep_reference`` (loops, float64) keeps, moves exactly their
  K/V, frees memory, and the cache goes on appending and attending over the kept keys.

Tolerances (``test_attention.py``'s): float32 ``max|out - ref64| <= 1e-5 * max(1, max|ref64|)``; bfloat16
``max|out - ref64| <= 2 * max|sdpa_bf16 - ref64| + 1e-5`` (FlashAttention's error ratio against PyTorch's
SDPA run in bfloat16 on the same inputs, normalised for qk_norm, docs/attention.md). Two fastar results of the
same rows (cached step, full pass) agree to ``2e-6`` (float32) or one bfloat16 rounding (``1.6e-2``).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastar
from fastar.reference.scale import scale_attention_reference
from fastar.reference.scale_kvcache import scalekv_keep_reference
from fastar.scale_kvcache import observation_positions
from test_attention import assert_output_close, assert_same

VAR_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
# (batch, query heads, kv heads, head dim) per backend: the SIMT emulator runs the CUDA kernels on CPU fibers.
SHAPES = {"cpu": (2, 4, 2, 64), "cuda": (2, 4, 2, 64), "simt": (1, 2, 1, 64)}
DTYPES = (torch.float32, torch.bfloat16)


def sequence(backend, dtype, layout, seed=0, integers=False):
    """Random q [B, Hq, L, D], k, v [B, Hkv, L, D] of the whole sequence (the CPU) and a float32 q_scale [Hq].
    ``integers``: small integer values, so many scores tie exactly (compress's tie-breaking)."""
    B, Hq, Hkv, D = SHAPES[backend.name]
    gen = torch.Generator().manual_seed(seed)
    L = layout.num_tokens

    def draw(heads):
        x = torch.randn(B, heads, L, D, generator=gen)
        return (x * 1.5).round().clamp(-2, 2) if integers else x

    q_scale = torch.rand(Hq, generator=gen) * 9 + 1  # VAR's exp(min(s_h, log 100)) lies in (0, 100]
    return draw(Hq).to(dtype), draw(Hkv).to(dtype), draw(Hkv).to(dtype), q_scale


def attention64(q, k, v, *, qk_norm=False, q_scale=None, scale=None):
    """float64 attention of q over every key: a one-scale layout, in which every token sees every token."""
    layout = fastar.ScaleLayout([(1, k.shape[2])])
    return scale_attention_reference(q, k, v, layout, qk_norm=qk_norm, q_scale=q_scale, scale=scale)[0].double()


def assert_close_to_reference(out, ref, q, k, v, qk_norm, q_scale, what):
    """``out`` (the cached attention, q's dtype) against the float64 reference; tolerances of the docstring."""
    assert out.shape == q.shape and out.dtype == q.dtype, (out.shape, out.dtype)
    if qk_norm:  # the low-precision SDPA of the error ratio sees the normalised inputs, rounded, and scale 1
        qn = F.normalize(q.double(), dim=-1) * (1.0 if q_scale is None else q_scale.double().view(1, -1, 1, 1))
        q, k = qn.to(q.dtype), F.normalize(k.double(), dim=-1).to(k.dtype)
    assert_output_close(out, ref, q, k, v, scale=1.0 if qk_norm else None, what=what)


def scale_rows(layout, s):
    return slice(layout.starts[s], layout.ends[s])


# ---------------------------------------------------------------------------------------------------------
# Cached inference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
def test_cached_inference_equals_full_pass(backend, dtype, qk_norm):
    """VAR 256px, scale by scale: append the scale's K/V, attend with its queries; every scale's output is
    the full block-causal pass's rows of that scale, and the float64 reference's."""
    layout = fastar.ScaleLayout(VAR_256)
    assert layout.num_tokens == 680
    q, k, v, q_scale = sequence(backend, dtype, layout)
    q_scale = q_scale if qk_norm else None
    B, Hq, Hkv, D = SHAPES[backend.name]
    full = backend.scale_attention(q, k, v, layout, qk_norm=qk_norm, q_scale=q_scale)
    cache = backend.scale_kvcache(B, Hkv, D, layout, dtype)
    for s in range(layout.num_scales):
        rows = scale_rows(layout, s)
        cache.append(backend.to(k[:, :, rows]), backend.to(v[:, :, rows]))
        assert cache.length == layout.ends[s] and cache.scales_appended == s + 1
        out = cache.attend(backend.to(q[:, :, rows]), qk_norm=qk_norm, q_scale=backend.to(q_scale)).cpu()
        what = f"scale {s} {layout.hw[s]}"
        assert_same(out, full[:, :, rows], f"{what}: cached step vs full pass")
        prefix = fastar.ScaleLayout(VAR_256[: s + 1])
        ref = scale_attention_reference(q[:, :, rows], k[:, :, : rows.stop], v[:, :, : rows.stop], prefix,
                                        qk_norm=qk_norm, q_scale=q_scale)[0].double()
        assert_close_to_reference(out, ref, q[:, :, rows], k[:, :, : rows.stop], v[:, :, : rows.stop], qk_norm,
                                  q_scale, what)


def test_attend_scale_argument(backend):
    """An explicit softmax scale (VAR without attn_l2_norm: 0.25/sqrt(D)) is the one used."""
    layout = fastar.ScaleLayout(VAR_256[:4])
    q, k, v, _ = sequence(backend, torch.float32, layout)
    B, Hq, Hkv, D = SHAPES[backend.name]
    cache = backend.scale_kvcache(B, Hkv, D, layout, torch.float32)
    for s in range(layout.num_scales):
        rows = scale_rows(layout, s)
        cache.append(backend.to(k[:, :, rows]), backend.to(v[:, :, rows]))
    rows = scale_rows(layout, layout.num_scales - 1)
    out = cache.attend(backend.to(q[:, :, rows]), scale=0.25 / math.sqrt(D)).cpu()
    ref = attention64(q[:, :, rows], k, v, scale=0.25 / math.sqrt(D))
    assert_close_to_reference(out, ref, q[:, :, rows], k, v, False, None, "scale 0.25/sqrt(D)")
    default = attention64(q[:, :, rows], k, v)
    assert (out.double() - default).abs().max() > 1e-3, "the scale argument made no difference"


# ---------------------------------------------------------------------------------------------------------
# ScaleKV compression


def test_observation_positions():
    """The 4x4 grid at the cells' centres, rounded down; small scales repeat rows/columns (kept once)."""
    assert observation_positions(16, 16) == [y * 16 + x for y in (2, 6, 10, 14) for x in (2, 6, 10, 14)]
    assert observation_positions(13, 13) == [y * 13 + x for y in (1, 4, 8, 11) for x in (1, 4, 8, 11)]
    assert observation_positions(1, 1) == [0]
    assert observation_positions(2, 2) == [0, 1, 2, 3]
    assert observation_positions(3, 5) == [y * 5 + x for y in (0, 1, 2) for x in (0, 1, 3, 4)]
    assert observation_positions(16, 16, window=4) == [y * 16 + x for y in (4, 12) for x in (4, 12)]
    with pytest.raises(ValueError, match="perfect square"):
        observation_positions(16, 16, window=8)


def test_compress_hand_example(backend):
    """Scales (1, 2, 4): 21 tokens, the current scale's 16 all observed. Keys 0..4 are zero except key 2,
    which points along the observation queries: budget 1 keeps it; with pool 3 and budget 3 its pooled
    neighbours 1 and 3 too (ties: the earlier keys first, so 1 before 4's equal zero score)."""
    layout = fastar.ScaleLayout([1, 2, 4])
    for pool, budget, extra in ((1, 1, [2]), (3, 3, [1, 2, 3]), (1, 3, [0, 1, 2])):
        cache = backend.scale_kvcache(1, 1, 4, layout, torch.float32)
        k = torch.zeros(1, 1, 21, 4)
        k[0, 0, 2] = torch.tensor([1.0, 0, 0, 0])
        k[0, 0, 5:] = torch.randn(16, 4)
        q = torch.zeros(1, 1, 16, 4)
        q[..., 0] = 1.0
        for s in range(3):
            rows = scale_rows(layout, s)
            cache.append(backend.to(k[:, :, rows]), backend.to(k[:, :, rows]))
        kept = cache.compress(backend.to(q), budget, pool=pool).cpu()
        assert kept.tolist() == [[extra + list(range(5, 21))]], (pool, budget)


@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
@pytest.mark.parametrize("params", [dict(budget=64), dict(budget=24, pool=3, window=9), dict(budget=40, pool=1),
                                    dict(budget=100, integers=True)],
                         ids=["budget64", "budget24-pool3-window9", "budget40-pool1", "budget100-ties"])
def test_compress_matches_reference(backend, qk_norm, params):
    """From scale 3 on, compress after every attend: the kept positions are the reference's, the cache holds
    exactly their K/V (then the new scales'), and every attend is attention over that cache."""
    params = dict(params)
    integers = params.pop("integers", False)
    dtype = torch.float32
    layout = fastar.ScaleLayout(VAR_256)
    q, k, v, q_scale = sequence(backend, dtype, layout, seed=1, integers=integers)
    q_scale = q_scale if qk_norm else None
    B, Hq, Hkv, D = SHAPES[backend.name]
    cache = backend.scale_kvcache(B, Hkv, D, layout, dtype)
    want_k, want_v = k[:, :, :0], v[:, :, :0]  # what the cache must hold, built independently
    for s in range(layout.num_scales):
        rows = scale_rows(layout, s)
        cache.append(backend.to(k[:, :, rows]), backend.to(v[:, :, rows]))
        want_k, want_v = torch.cat([want_k, k[:, :, rows]], 2), torch.cat([want_v, v[:, :, rows]], 2)
        qs = q[:, :, rows]
        out = cache.attend(backend.to(qs), qk_norm=qk_norm, q_scale=backend.to(q_scale)).cpu()
        ref = attention64(qs, want_k, want_v, qk_norm=qk_norm, q_scale=q_scale)
        assert_close_to_reference(out, ref, qs, want_k, want_v, qk_norm, q_scale, f"scale {s}")
        if s < 3:
            continue
        kept = cache.compress(backend.to(qs), qk_norm=qk_norm, q_scale=backend.to(q_scale), **params).cpu()
        expected = scalekv_keep_reference(qs, want_k, layout.hw[s], qk_norm=qk_norm, q_scale=q_scale, **params)
        assert torch.equal(kept, expected), f"scale {s}: kept positions differ from the reference"
        index = expected.unsqueeze(-1).expand(-1, -1, -1, D)
        want_k, want_v = want_k.gather(2, index), want_v.gather(2, index)
        assert cache.length == want_k.shape[2]
        assert torch.equal(cache.keys.cpu(), want_k) and torch.equal(cache.values.cpu(), want_v), f"scale {s}"
    assert cache.length < layout.num_tokens


def test_compress_frees_memory(backend):
    """After compress the buffers hold the kept keys and room for the remaining scales only."""
    layout = fastar.ScaleLayout(VAR_256)
    q, k, v, _ = sequence(backend, torch.bfloat16, layout)
    B, Hq, Hkv, D = SHAPES[backend.name]
    cache = backend.scale_kvcache(B, Hkv, D, layout, torch.bfloat16)
    token_bytes = 2 * B * Hkv * D * 2  # K and V, bfloat16
    assert cache.memory_bytes() == token_bytes * 680 and cache.capacity == 680
    for s in range(8):
        rows = scale_rows(layout, s)
        cache.append(backend.to(k[:, :, rows]), backend.to(v[:, :, rows]))
    rows = scale_rows(layout, 7)
    kept = cache.compress(backend.to(q[:, :, rows]), 64)
    assert kept.shape == (B, Hkv, 64 + 16) and cache.length == 80
    with pytest.raises(RuntimeError, match="compressed after scale 7 already"):
        cache.compress(backend.to(q[:, :, rows]), 32)
    remaining = 13 * 13 + 16 * 16
    assert cache.capacity == 80 + remaining and cache.memory_bytes() == token_bytes * (80 + remaining)
    for s in (8, 9):
        rows = scale_rows(layout, s)
        cache.append(backend.to(k[:, :, rows]), backend.to(v[:, :, rows]))
        assert cache.attend(backend.to(q[:, :, rows])).isfinite().all()
    assert cache.length == cache.capacity == 80 + remaining


def test_compress_within_budget_keeps_everything(backend):
    """A cache of at most budget + observation keys is left as it is."""
    layout = fastar.ScaleLayout(VAR_256[:3])
    q, k, v, _ = sequence(backend, torch.float32, layout)
    B, Hq, Hkv, D = SHAPES[backend.name]
    cache = backend.scale_kvcache(B, Hkv, D, layout, torch.float32)
    for s in range(3):
        rows = scale_rows(layout, s)
        cache.append(backend.to(k[:, :, rows]), backend.to(v[:, :, rows]))
    kept = cache.compress(backend.to(q[:, :, scale_rows(layout, 2)]), 14 - 9).cpu()
    assert kept.tolist() == [[list(range(14))] * Hkv] * B
    assert cache.length == 14 and cache.capacity == 14 and torch.equal(cache.keys.cpu(), k)


# ---------------------------------------------------------------------------------------------------------
# Errors


def test_bad_inputs_raise_clear_errors():
    layout = fastar.ScaleLayout([1, 2, 4])
    cache = fastar.ScaleKVCache(2, 2, 8, layout, torch.float32, "cpu")
    one = torch.zeros(2, 2, 1, 8)
    with pytest.raises(RuntimeError, match="needs a scale appended first"):
        cache.attend(torch.zeros(2, 2, 1, 8))
    with pytest.raises(ValueError, match=r"\[2, 2, 1, 8\] for scale 0"):
        cache.append(torch.zeros(2, 2, 4, 8), torch.zeros(2, 2, 4, 8))
    with pytest.raises(ValueError, match=r"must be torch.float32 on cpu"):
        cache.append(one.bfloat16(), one.bfloat16())
    with pytest.raises(ValueError, match=r"on cpu like the cache"):
        cache.append(one.to("meta"), one.to("meta"))
    with pytest.raises(TypeError, match="must be a tensor"):
        cache.append(one, None)
    assert cache.length == 0 and cache.scales_appended == 0  # a refused append leaves the cache as it was
    cache.append(one, one)
    cache.append(torch.zeros(2, 2, 4, 8), torch.zeros(2, 2, 4, 8))
    cache.append(torch.zeros(2, 2, 16, 8), torch.zeros(2, 2, 16, 8))
    with pytest.raises(RuntimeError, match="all 3 scales of the layout are appended"):
        cache.append(one, one)
    q = torch.zeros(2, 4, 16, 8)
    with pytest.raises(ValueError, match="a multiple of 2"):
        cache.attend(torch.zeros(2, 3, 16, 8))
    with pytest.raises(ValueError, match=r"\[2, a multiple of 2, 16, 8\] for scale 2"):
        cache.attend(torch.zeros(2, 4, 4, 8))
    with pytest.raises(ValueError, match="q_scale applies only with qk_norm=True"):
        cache.attend(q, q_scale=torch.ones(4))
    with pytest.raises(ValueError, match=r"q_scale must have shape \[Hq=4\]"):
        cache.attend(q, qk_norm=True, q_scale=torch.ones(2))
    with pytest.raises(ValueError, match=r"budget must lie in \[0, inf\], got -1"):
        cache.compress(q, -1)
    with pytest.raises(TypeError, match="budget must be an integer, got float"):
        cache.compress(q, 4.0)
    with pytest.raises(ValueError, match="pool must be odd"):
        cache.compress(q, 4, pool=4)
    with pytest.raises(ValueError, match="perfect square"):
        cache.compress(q, 4, window=10)
    with pytest.raises(ValueError, match="relation='causal'"):
        fastar.ScaleKVCache(1, 1, 8, fastar.ScaleLayout([1, 2], relation="prev"))
    with pytest.raises(ValueError, match="relation='causal'"):
        fastar.ScaleKVCache(1, 1, 8, fastar.ScaleLayout([1, 2], local_window=1))
    with pytest.raises(ValueError, match="dtype must be"):
        fastar.ScaleKVCache(1, 1, 8, layout, torch.float64)
    with pytest.raises(ValueError, match=r"head_dim must lie in \[1, inf\]"):
        fastar.ScaleKVCache(1, 1, 0, layout)
