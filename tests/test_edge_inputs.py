"""Edge and bad inputs of the public wrappers, on every backend: mixed devices, autograd, index tensors,
overlapping caches, integer overflow in masks, the SDPA drop-in's mask dtypes and float 0/-inf masks, head
dim 0, integral seeds and sampling arguments, and torch.compile of masks and cache appends.

Results are checked against the float64 reference (``attention_reference`` over a mask written out in the
test) or PyTorch's own SDPA; errors by type and by the argument they name.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastar
from fastar import masked_attention
from fastar.masks import BlockCausal, Causal, Tree, Window
from fastar.reference import sample_cfg_reference, scale_attention_reference
from fastar.reference.attention import attention_reference, mask_from_args
from test_attention import assert_output_close, check_attention, make

META = torch.device("meta")


def qkv(B=1, Hq=2, Hkv=2, Lq=5, Lk=9, D=16, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return make((B, Hq, Lq, D), dtype, gen), make((B, Hkv, Lk, D), dtype, gen), make((B, Hkv, Lk, D), dtype, gen)


def acceptance_inputs(B=2, n=3, V=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(B, n + 1, V, generator=gen), -1)
    q = torch.softmax(torch.randn(B, n, V, generator=gen), -1)
    ids = torch.randint(0, V, (B, n), generator=gen)
    return ids, q, p


# ---------------------------------------------------------------------------------------------------------
# 1. Mixed devices: a meta tensor among real ones would run the fake kernel and return uninitialised memory.


def test_meta_tensor_among_real_ones_is_refused(backend):
    q, k, v = (backend.to(t) for t in qkv())
    with backend.using_ops():
        with pytest.raises(ValueError, match="k is on meta"):
            fastar.attention(q, k.to(META), v)
        with pytest.raises(ValueError, match="v is on meta"):
            fastar.attention(q, k, v.to(META), mask=Causal())
        cache = backend.to(torch.randn(1, 8, 2, 16))
        qc = backend.to(torch.randn(1, 2, 2, 16))
        with pytest.raises(ValueError, match="v_cache is on meta"):
            fastar.attention_with_kvcache(qc, cache, cache.to(META), cache_seqlens=3)
        with pytest.raises(ValueError, match="cache_seqlens is on meta"):
            fastar.attention_with_kvcache(qc, cache, cache, cache_seqlens=torch.tensor([3], device=META))

        ids, dq, p = (backend.to(t) for t in acceptance_inputs())
        with pytest.raises(ValueError, match="on meta"):
            fastar.speculative_sample(ids, dq, p.to(META), seed=torch.tensor(1), offset=torch.tensor(0))
        with pytest.raises(ValueError, match="draft_probs is on meta"):
            fastar.speculative_sample(ids, dq.to(META), p, seed=torch.tensor(1), offset=torch.tensor(0))
        with pytest.raises(ValueError, match="draft_token_ids is on meta"):
            fastar.greedy_verify(ids.to(META), p)
        with pytest.raises(ValueError, match="seed is on meta"):
            fastar.sample_cfg(p[:, 0], cfg=1.0, schedule="constant", seed=torch.tensor(1, device=META))


def test_meta_tensor_among_real_ones_is_refused_by_the_op_itself(backend):
    """Called directly (no Python wrapper), a meta input among real ones dispatches to the fake kernel, which
    must refuse instead of returning uninitialised memory."""
    q, k, v = (backend.to(t) for t in qkv())
    with pytest.raises(RuntimeError, match="all inputs must be on one device"):
        backend.ops.attention(q, k.to(META), v, torch.empty_like(q), 0.25)
    ids, _, p = (backend.to(t) for t in acceptance_inputs())
    with pytest.raises(RuntimeError, match="all inputs must be on one device"):
        backend.ops.greedy_verify(ids, p.to(META))


def test_all_meta_inputs_keep_working(backend):
    """Inputs all on meta (shape inference) give meta outputs of the right shapes."""
    q, k, v = (t.to(META) for t in qkv(Lq=5, Lk=9))
    ids, dq, p = (t.to(META) for t in acceptance_inputs())
    with backend.using_ops():
        out, lse = fastar.attention(q, k, v, mask=Causal(), return_lse=True)
        tokens, accepted = fastar.speculative_sample(ids, dq, p, seed=torch.tensor(1), offset=torch.tensor(0))
    assert out.device == META and out.shape == q.shape and lse.shape == q.shape[:3]
    assert tokens.device == META and tokens.shape == (2, 4) and accepted.shape == (2,)


# ---------------------------------------------------------------------------------------------------------
# 2. Inputs that require grad: the kernels compute no gradients, so they are refused under grad mode.


def test_inputs_that_require_grad_are_refused(backend):
    q, k, v = qkv()
    layout = fastar.ScaleLayout([1, 2])
    qs, ks, vs = qkv(Lq=5, Lk=5)
    for name, grad in (("q", (True, False, False)), ("k", (False, True, False)), ("v", (False, False, True))):
        args = [backend.to(t.clone()).requires_grad_(g) for t, g in zip((q, k, v), grad)]
        with pytest.raises(ValueError, match=f"{name} requires grad"):
            backend.attention(*args, mask=Causal())
        scale_args = [backend.to(t.clone()).requires_grad_(g) for t, g in zip((qs, ks, vs), grad)]
        with pytest.raises(ValueError, match=f"{name} requires grad"):
            backend.scale_attention(*scale_args, layout)
    qc = backend.to(torch.randn(1, 2, 2, 16)).requires_grad_()
    cache = backend.to(torch.randn(1, 8, 2, 16))
    with pytest.raises(ValueError, match="q requires grad"):
        backend.attention_with_kvcache(qc, cache, cache, cache_seqlens=3)
    kv_cache = backend.scale_kvcache(1, 2, 16, layout, torch.float32)
    kv_cache.append(backend.to(ks[:, :, :1]), backend.to(vs[:, :, :1]))
    with pytest.raises(ValueError, match="q requires grad"):
        kv_cache.attend(backend.to(qs[:, :, :1].clone()).requires_grad_())
    with pytest.raises(ValueError, match="k requires grad"):
        kv_cache.append(backend.to(ks[:, :, 1:].clone()).requires_grad_(), backend.to(vs[:, :, 1:]))

    # Under no_grad (or with detached tensors) the same inputs run and match the reference.
    with torch.no_grad():
        grads = (backend.to(t.clone()).requires_grad_() for t in (q, k, v))
        out, lse = backend.attention(*grads, mask=Causal(), return_lse=True)
    check_attention(out, lse, q, k, v, Causal().materialize(5, 9).unsqueeze(1))


def test_public_ops_with_grad_inputs_compile_when_no_grad():
    """The grad check is traceable: fullgraph compilation of the public op, under no_grad, and its refusal."""
    torch._dynamo.reset()
    q, k, v = qkv()

    def fn(q, k, v):
        return fastar.attention(q, k, v, mask=Causal())

    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    with torch.no_grad():
        got = compiled(q.clone().requires_grad_(), k, v)
    torch.testing.assert_close(got, fn(q, k, v))
    with pytest.raises(Exception, match="q requires grad"):
        compiled(q.clone().requires_grad_(), k, v)


# ---------------------------------------------------------------------------------------------------------
# 3. Index tensors: dtype and range are checked before any narrowing to int32.


def kvcache_inputs(B=2, S=8, Lq=2, H=2, D=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, H, D, generator=gen)
    return q, torch.randn(B, S, H, D, generator=gen), torch.randn(B, S, H, D, generator=gen)


def test_cache_seqlens_past_int32_do_not_wrap(backend):
    q, k_cache, v_cache = kvcache_inputs()
    lens = torch.tensor([3, 2**32 + 5])
    if backend.device.type == "cpu":
        with pytest.raises(ValueError, match="cache_seqlens"):
            backend.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens)
        return
    # On a device the lengths are not read on the host: out of range is clamped to the capacity, never wrapped.
    (out, lse), _, _ = backend.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, return_lse=True)
    clamped = torch.tensor([3, 8])
    dense = torch.arange(8).view(1, 1, 1, 8) < clamped.view(2, 1, 1, 1)
    check_attention(out.transpose(1, 2), lse, q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                    dense)


@pytest.mark.parametrize("lens", [torch.tensor([3.7, 2.0]), torch.tensor([True, False]), 3.0, [3, 2]])
def test_cache_seqlens_must_be_integers(backend, lens):
    q, k_cache, v_cache = kvcache_inputs()
    with pytest.raises(TypeError, match="cache_seqlens"):
        backend.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens)


def test_cache_seqlens_any_integer_type(backend):
    q, k_cache, v_cache = kvcache_inputs()
    want, _, _ = backend.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([5, 5]))
    for lens in (np.int64(5), 5, torch.tensor([5, 5], dtype=torch.int16), torch.tensor([5, 5], dtype=torch.uint8)):
        got, _, _ = backend.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_block_table_past_int32_does_not_wrap(backend):
    if backend.device.type != "cpu":
        pytest.skip("page indices are validated on the host for CPU tensors only")
    q = torch.randn(1, 2, 2, 64)
    pages = torch.randn(4, 3, 2, 64)
    with pytest.raises(IndexError, match="block_table"):
        backend.attention_with_kvcache(q, pages, pages, cache_seqlens=2, block_table=torch.tensor([[0, 2**32 + 1]]))
    with pytest.raises(TypeError, match="block_table"):
        backend.attention_with_kvcache(q, pages, pages, cache_seqlens=2, block_table=torch.tensor([[0.0, 1.0]]))


def test_negative_cache_seqlens_writes_nothing(backend):
    q, k_cache, v_cache = kvcache_inputs()
    k_new, v_new = torch.randn(2, 2, 2, 16), torch.randn(2, 2, 2, 16)
    lens = torch.tensor([-1, 2])
    if backend.device.type == "cpu":
        k_dev, v_dev = k_cache.clone(), v_cache.clone()
        with pytest.raises(ValueError, match="cache_seqlens"), backend.using_ops():
            fastar.attention_with_kvcache(q, k_dev, v_dev, cache_seqlens=lens, k_new=k_new, v_new=v_new)
        assert torch.equal(k_dev, k_cache) and torch.equal(v_dev, v_cache), "nothing is written before the error"
    else:
        # No host read on a device: the length is clamped to 0, so the append never wraps to the last slots.
        _, k_after, v_after = backend.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, k_new=k_new,
                                                             v_new=v_new)
        assert torch.equal(k_after[0, 2:], k_cache[0, 2:]) and torch.equal(k_after[0, :2], k_new[0])


# ---------------------------------------------------------------------------------------------------------
# 4. Caches whose elements share memory cannot take an in-place append.


def test_expanded_cache_refuses_append_but_reads(backend):
    q, k_cache, v_cache = kvcache_inputs()
    k_new, v_new = torch.randn(2, 2, 2, 16), torch.randn(2, 2, 2, 16)
    k_shared, v_shared = k_cache[:1].expand(2, -1, -1, -1), v_cache[:1].expand(2, -1, -1, -1)
    k_on, v_on = backend.to(k_cache), backend.to(v_cache)  # expanded on the device: a copy there is not expanded
    for k_dev, v_dev in ((k_on[:1].expand(2, -1, -1, -1), v_on), (k_on, v_on[:1].expand(2, -1, -1, -1)),
                         (k_on[:, :1].expand(-1, 8, -1, -1), v_on)):
        before = k_dev.clone(), v_dev.clone()
        with pytest.raises(ValueError, match="share memory"), backend.using_ops():
            fastar.attention_with_kvcache(backend.to(q), k_dev, v_dev, cache_seqlens=3, k_new=backend.to(k_new),
                                          v_new=backend.to(v_new))
        assert torch.equal(k_dev, before[0]) and torch.equal(v_dev, before[1])
    # Reading an expanded cache (no append) is fine.
    (out, lse), _, _ = backend.attention_with_kvcache(q, k_shared, v_shared, cache_seqlens=5, return_lse=True)
    dense = (torch.arange(8) < 5).view(1, 1, 1, 8)
    check_attention(out.transpose(1, 2), lse, q.transpose(1, 2), k_shared.transpose(1, 2), v_shared.transpose(1, 2),
                    dense)


# ---------------------------------------------------------------------------------------------------------
# 5. Integer overflow in masks, in the kernels and in fastar.reference alike.


@pytest.mark.parametrize("left", [2**31, 2**63 - 1, 2**64])
def test_huge_window_is_causal(backend, left):
    q, k, v = qkv(Lq=5, Lk=70)
    out, lse = backend.attention(q, k, v, mask=Window(left), return_lse=True)
    check_attention(out, lse, q, k, v, torch.ones(5, 70, dtype=torch.bool).tril(65), what=f"Window({left})")
    out, lse = backend.attention(q, k, v, mask=Window(left, sinks=2**64), return_lse=True)
    check_attention(out, lse, q, k, v, torch.ones(5, 70, dtype=torch.bool).tril(65), what="huge sinks")


def test_reference_window_does_not_overflow():
    causal = torch.ones(6, 9, dtype=torch.bool).tril(3)
    for left in (2**63 - 1, 2**64):
        assert torch.equal(Window(left).materialize(6, 9)[0], causal)
        assert torch.equal(mask_from_args(Window(left).lower(1, 6, 9, "cpu"), 1, 6, 9)[0], causal)


@pytest.mark.parametrize("relation", ["prev", "causal", "same"])
def test_block_ids_at_the_int32_limits(backend, relation):
    low, high = -(2**31), 2**31 - 1
    ids = [low, low + 1, low, 0, low, low, low + 1, high - 1, high]  # queries: the last 5
    q, k, v = qkv(Lq=5, Lk=9)
    qb, kb = torch.tensor(ids[4:]).view(-1, 1), torch.tensor(ids).view(1, -1)  # int64: no wrap-around
    rule = {"prev": (kb <= qb) & (kb >= qb - 1), "causal": kb <= qb, "same": kb == qb}[relation]
    mask = BlockCausal(ids, relation=relation)
    out, lse = backend.attention(q, k, v, mask=mask, return_lse=True)
    check_attention(out, lse, q, k, v, rule, what=f"BlockCausal {relation} at the int32 limits")
    assert torch.equal(mask.materialize(5, 9)[0], rule)
    assert torch.equal(mask_from_args(mask.lower(1, 5, 9, "cpu"), 1, 5, 9)[0], rule)


@pytest.mark.parametrize("window", [2**31, 2**64])
def test_huge_local_window_restricts_nothing(backend, window):
    layout = fastar.ScaleLayout([1, 2, 3, 4], local_window=window)
    plain = fastar.ScaleLayout([1, 2, 3, 4])
    assert torch.equal(layout.materialize(), plain.materialize())
    gen = torch.Generator().manual_seed(0)
    q, k, v = (make((1, 2, 30, 16), torch.float32, gen) for _ in range(3))
    out = backend.scale_attention(q, k, v, layout)
    ref, _ = scale_attention_reference(q.double(), k.double(), v.double(), plain)
    assert_output_close(out, ref, q, k, v, what=f"local_window={window}")


def test_huge_local_window_reaching_the_op_restricts_nothing(backend):
    """ScaleLayout clamps local_window; the op itself must not overflow on a larger one either."""
    layout = fastar.ScaleLayout([1, 2, 3, 4], local_window=4)
    layout.local_window = 2**31  # past the layout's clamp, as a direct caller of the op may pass
    gen = torch.Generator().manual_seed(1)
    q, k, v = (make((1, 2, 30, 16), torch.float32, gen) for _ in range(3))
    out = backend.scale_attention(q, k, v, layout)
    ref, _ = scale_attention_reference(q.double(), k.double(), v.double(), fastar.ScaleLayout([1, 2, 3, 4]))
    assert_output_close(out, ref, q, k, v, what="local_window=2**31 at the op")


# ---------------------------------------------------------------------------------------------------------
# 6. The SDPA drop-in takes the mask dtypes PyTorch takes, and refuses the others as PyTorch does.


@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.int32, torch.float64, torch.float16])
def test_sdpa_refuses_the_mask_dtypes_torch_refuses(backend, mask_dtype):
    q, k, v = qkv(Lq=4, Lk=4)
    mask = torch.zeros(4, 4, dtype=mask_dtype)
    with pytest.raises(RuntimeError) as want:
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with pytest.warns(UserWarning, match="attn_mask of dtype"), pytest.raises(RuntimeError) as got:
        masked_attention._warned.discard(f"attn_mask of dtype {mask_dtype} (PyTorch takes bool, float32 or the "
                                         f"query's dtype)")
        backend.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert str(got.value) == str(want.value)


# ---------------------------------------------------------------------------------------------------------
# 7. Head dim 0, integral seeds and sampling arguments.


def test_head_dim_zero(backend):
    q, k, v = qkv(D=0)
    with pytest.raises(ValueError, match="head dim"):
        backend.attention(q, k, v)
    with pytest.raises(ValueError, match="head dim"):
        backend.attention_with_kvcache(torch.randn(1, 2, 2, 0), torch.randn(1, 8, 2, 0), torch.randn(1, 8, 2, 0),
                                       cache_seqlens=3)
    with pytest.raises(ValueError, match="head dim"):
        backend.scale_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], fastar.ScaleLayout([1]))
    # The SDPA drop-in does what PyTorch does: an empty output.
    with pytest.warns(UserWarning, match="head dim 0"):
        masked_attention._warned.discard("head dim 0")
        out = backend.scaled_dot_product_attention(q, k, v)
    assert out.shape == q.shape


INTEGRAL_SEEDS = [np.int64(3), np.uint8(3), np.int32(3), torch.tensor(3), torch.tensor(3, dtype=torch.int32),
                  torch.tensor([3], dtype=torch.int16)]
BAD_SEEDS = [True, np.True_, 3.0, np.float64(3.0), torch.tensor(3.0), torch.tensor(True), "3"]


def test_integral_seeds_and_offsets(backend):
    ids, dq, p = acceptance_inputs(B=4, n=3, V=50)
    want = backend.speculative_sample(ids, dq, p, seed=3, offset=3)
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    want_cfg = backend.sample_cfg(logits, cfg=1.5, schedule="constant", seed=3, offset=3)
    for value in INTEGRAL_SEEDS:
        for got in (backend.speculative_sample(ids, dq, p, seed=value, offset=3),
                    backend.speculative_sample(ids, dq, p, seed=3, offset=value)):
            assert all(torch.equal(g, w) for g, w in zip(got, want)), value
        for got in (backend.sample_cfg(logits, cfg=1.5, schedule="constant", seed=value, offset=3),
                    backend.sample_cfg(logits, cfg=1.5, schedule="constant", seed=3, offset=value)):
            assert torch.equal(got, want_cfg), value
    for value in BAD_SEEDS:
        for name in ("seed", "offset"):
            kwargs = {"seed": 3, "offset": 3, name: value}
            with pytest.raises(TypeError, match=name):
                backend.speculative_sample(ids, dq, p, **kwargs)
            with pytest.raises(TypeError, match=name):
                backend.sample_cfg(logits, cfg=1.5, schedule="constant", **kwargs)


def test_sample_cfg_integral_arguments(backend):
    """top_k, scale_index and num_scales take any integral scalar (numpy integers too), as seed and offset do."""
    logits = torch.randn(4, 3, 50, generator=torch.Generator().manual_seed(2))
    kw = dict(cfg=1.5, schedule="var", top_p=0.9, seed=3)
    want = backend.sample_cfg(logits, scale_index=4, num_scales=10, top_k=7, **kw)
    argmax = sample_cfg_reference(logits, cfg=1.5, scale_index=4, num_scales=10, top_k=1).argmax(-1)
    for kind in (np.int64, np.int32, np.uint8):
        got = backend.sample_cfg(logits, scale_index=kind(4), num_scales=kind(10), top_k=kind(7), **kw)
        assert torch.equal(got, want), kind
        got = backend.sample_cfg(logits, scale_index=kind(4), num_scales=kind(10), top_k=kind(1), **kw)
        assert torch.equal(got, argmax), kind
    for name in ("top_k", "scale_index", "num_scales"):
        for value in (True, np.True_, 4.0, np.float64(4.0), "4"):
            args = {"scale_index": 4, "num_scales": 10, "top_k": 7, name: value}
            with pytest.raises(TypeError, match=name):
                backend.sample_cfg(logits, **args, **kw)


# ---------------------------------------------------------------------------------------------------------
# 8. torch.compile(fullgraph=True): masks with block ids, trees built in the function, cache appends.


def test_block_causal_and_tree_compile():
    torch._dynamo.reset()
    q, k, v = qkv(Lq=6, Lk=6)
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    lengths = BlockCausal(block_lengths=[2, 2, 2], relation="prev")

    def fn(q, k, v):
        return (fastar.attention(q, k, v, mask=BlockCausal(ids)),
                fastar.attention(q, k, v, mask=BlockCausal(block_size=2, relation="same")),
                fastar.attention(q, k, v, mask=lengths),
                fastar.attention(q, k, v, mask=Tree([-1, 0, 0, 1, 1, 2])))

    got = torch.compile(fn, fullgraph=True, backend="eager")(q, k, v)
    qb, kb = ids.view(-1, 1), ids.view(1, -1)
    parents = [-1, 0, 0, 1, 1, 2]
    tree = torch.eye(6, dtype=torch.bool)
    for t, p in enumerate(parents):
        if p >= 0:
            tree[t] |= tree[p]
    for out, dense in zip(got, (kb <= qb, kb == qb, (kb <= qb) & (kb >= qb - 1), tree)):
        ref, _ = attention_reference(q.double(), k.double(), v.double(), mask=dense)
        assert_output_close(out, ref, q, k, v, dense)


def test_kvcache_append_compiles():
    torch._dynamo.reset()
    q, k_cache, v_cache = kvcache_inputs()
    k_new, v_new = torch.randn(2, 2, 2, 16), torch.randn(2, 2, 2, 16)

    def fn(q, k_cache, v_cache, lens):
        return fastar.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, k_new=k_new, v_new=v_new,
                                             mask=Causal())

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    lens = torch.tensor([3, 6])
    k_got, v_got, k_want, v_want = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
    got = compiled(q, k_got, v_got, lens)
    want = fn(q, k_want, v_want, lens)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(k_got, k_want) and torch.equal(v_got, v_want)
    assert torch.equal(k_got[1, 6:], k_new[1]) and torch.equal(v_got[0, 3:5], v_new[0])
    k_bad = k_cache.clone()
    with pytest.raises(RuntimeError, match="overflows"):
        compiled(q, k_bad, v_cache.clone(), torch.tensor([3, 7]))


# ---------------------------------------------------------------------------------------------------------
# 9. Float masks of only 0 and -inf (VAR's attn_bias) run as bool masks, with PyTorch's results.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["2d", "b1", "bh"])
def test_sdpa_zero_neg_inf_float_masks(backend, monkeypatch, shape, dtype):
    B, H, Lq, Lk = 2, 2, 9, 21
    gen = torch.Generator().manual_seed(7)
    q, k, v = (make((B, H, L, 16), dtype, gen) for L in (Lq, Lk, Lk))
    dims = {"2d": (Lq, Lk), "b1": (B, 1, Lq, Lk), "bh": (B, H, Lq, Lk)}[shape]
    hidden = torch.rand(dims, generator=gen) < 0.4
    hidden[..., ::4, :] = True  # rows that see no key: 0 in PyTorch's convention
    # On the backend's device once, so every call sees the same tensor (the cache is keyed by it).
    mask = backend.to(torch.zeros(dims, dtype=dtype).masked_fill(hidden, float("-inf")))
    lowered = []
    run = masked_attention._run
    monkeypatch.setattr(masked_attention, "_run", lambda q, k, v, args, *a, **kw: lowered.append(args) or
                        run(q, k, v, args, *a, **kw))
    monkeypatch.setattr(masked_attention, "_mask_kinds", type(masked_attention._mask_kinds)())
    for _ in range(2):  # the second call finds the mask's kind in the cache
        out = backend.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.cpu())
        ref, _ = attention_reference(q.double(), k.double(), v.double(), mask=~hidden)
        assert torch.all(out[..., ::4, :] == 0) and torch.all(want[..., ::4, :] == 0)
        assert_output_close(out, ref, q, k, v, ~hidden)
        if dtype == torch.float32:
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert len(masked_attention._mask_kinds) == 1
    if shape != "bh":  # one mask for all heads: bit-packed, no additive bias
        assert all(a.bits is not None and a.bias is None for a in lowered)
    # Changed in place (a new version): no longer 0/-inf only, so it is an additive bias again.
    mask[..., 1, 0] = 0.5
    lowered.clear()
    out = backend.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert lowered[0].bias is not None and lowered[0].bits is None
    bias = torch.zeros(dims, dtype=torch.float64).masked_fill(hidden, float("-inf"))
    bias[..., 1, 0] = 0.5
    ref, _ = attention_reference(q.double(), k.double(), v.double(), bias=bias)
    assert_output_close(out, ref, q, k, v, None, bias.to(dtype))


def test_sdpa_mask_kind_cache_follows_views_and_is_bounded(backend):
    """VAR slices its attn_bias buffer on every call: each new view of the same buffer is a cache hit."""
    L = 12
    buffer = torch.full((1, 1, 16, 16), float("-inf")).triu(1)  # 0 on and below the diagonal
    q, k, v = qkv(Lq=L, Lk=L)
    masked_attention._mask_kinds.clear()
    for _ in range(3):
        out = backend.scaled_dot_product_attention(q, k, v, attn_mask=buffer[:, :, :L, :L])
    assert len(masked_attention._mask_kinds) == 1
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-5, atol=1e-5)
    for n in range(20):
        backend.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(L, L) + n)
    assert len(masked_attention._mask_kinds) <= masked_attention._MASK_KINDS_SIZE
