"""Attention over quantized KV caches (fastar.attention_with_kvcache with k_scale / v_scale).

Oracle: float64 attention (fastar.reference.attention_reference) over the cache's dequantized copy, codes *
scales. Folding the scales into the kernel is exact arithmetic, so the tolerance is the float32 accumulation's
(and, for bf16 queries, bf16's roundings of P and of the output). Every backend: the CPU kernels' decode and GEMM
paths; on CUDA (and the SIMT build) the decode kernel (few rows), the tensor-core kernel (bf16 / fp16, 16 rows or
more) and the CUDA-core tiled kernel (fp32 with many rows, other head dims, unaligned rows): which one a shape
takes is asserted in test_simt_races.py."""
from __future__ import annotations

import pytest
import torch

import fastar
from fastar.masks import BlockCausal, Causal, Dense, Tree, Window
from fastar.reference import KV_FORMATS, attention_reference
from test_attention import paged_layout, to_paged

FORMATS = ["int8", "fp8_e4m3", "fp8_e5m2"]


def quantized_cache(gen, B, S, Hkv, D, fmt, dtype, block_table=None, num_pages=None, fixed=False):
    """A cache filled by fastar.quantize_kv_append: (k_codes, v_codes, k_scale, v_scale, k_deq, v_deq) with the
    dequantized copies [B, Hkv, S, D] in float64."""
    k = torch.randn(B, S, Hkv, D, generator=gen) * (torch.rand(B, S, Hkv, 1, generator=gen) + 0.2)
    v = torch.randn(B, S, Hkv, D, generator=gen)
    k[:, :, :, 3] *= 6  # an outlier channel
    k, v = k.to(dtype), v.to(dtype)
    if block_table is None:
        shape, slots = (B, S, Hkv, D), torch.arange(B * S)
    else:
        page = num_pages[1]
        shape = (num_pages[0], page, Hkv, D)
        pos = torch.arange(S)
        slots = (block_table.long()[:, pos // page] * page + pos % page).reshape(-1)
    codes = [torch.zeros(shape, dtype=torch.uint8).view(KV_FORMATS[fmt]) for _ in range(2)]
    if fixed:  # fp8 at fixed per-head scales
        scales = [torch.rand(Hkv, generator=gen) * 0.05 + 0.01 for _ in range(2)]
    else:
        scales = [torch.zeros(shape[:-1]) for _ in range(2)]
    fastar.quantize_kv_append(k.reshape(B * S, Hkv, D), v.reshape(B * S, Hkv, D), slots, *codes, *scales)
    deq = []
    for c, s in zip(codes, scales):
        flat = c.reshape(-1, Hkv, D).float().double()
        scale = s.double().expand(flat.shape[0], Hkv) if fixed else s.reshape(-1, Hkv).double()
        deq.append((flat * scale.unsqueeze(-1))[slots].reshape(B, S, Hkv, D).transpose(1, 2))
    return (*codes, *scales, *deq)


def reference(q, k_deq, v_deq, lens, mask=None):
    """float64 attention per sequence over its first lens[b] keys, under mask (a fastar.masks mask, by its
    materialize); q [B, Lq, Hq, D] -> [B, Lq, Hq, D]."""
    out = []
    B, Lq = q.shape[:2]
    dense = None if mask is None else mask.materialize(Lq, k_deq.shape[2], batch=B, kv_lens=lens)
    for b in range(B):
        n = int(lens[b])
        qb = q[b:b + 1].transpose(1, 2).double()
        o, _ = attention_reference(qb, k_deq[b:b + 1, :, :n], v_deq[b:b + 1, :, :n],
                                   mask=None if dense is None else dense[b % dense.shape[0], :, :n])
        out.append(o.transpose(1, 2))
    return torch.cat(out)


# (queries' dtype, tolerance): float32 shows the kernel's own error; bfloat16 adds the output's rounding.
DTYPES = [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("Lq", [1, 4, 40, 130])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("dtype, tol", DTYPES, ids=["f32", "bf16"])
def test_matches_float64_over_the_dequantized_cache(backend, fmt, Lq, paged, dtype, tol):
    """CPU: decode (Lq = 1, 4 with G = 4: streaming) and the GEMM path (40, 130: converted tiles, the per-head
    cache across query tiles). CUDA: the decode kernel (Lq = 1), the tensor-core kernel (bf16, Lq >= 4) and the
    tiled kernel (fp32, Lq >= 4). GQA, ragged lengths, contiguous and paged."""
    gen = torch.Generator().manual_seed(Lq + 3 * paged)
    B, Hq, Hkv, D, S = 3, 8, 2, 64, 160
    bt, total = paged_layout(B, S // 16, gen) if paged else (None, None)
    k_codes, v_codes, k_scale, v_scale, k_deq, v_deq = quantized_cache(
        gen, B, S, Hkv, D, fmt, dtype, bt, (total, 16) if paged else None)
    q = torch.randn(B, Lq, Hq, D, generator=gen).to(dtype)
    lens = torch.tensor([S, 147, 133])
    got, _, _ = backend.attention_with_kvcache(q, k_codes, v_codes, cache_seqlens=lens, block_table=bt,
                                               k_scale=k_scale, v_scale=v_scale, mask=Causal() if Lq > 1 else None)
    want = reference(q, k_deq, v_deq, lens, Causal() if Lq > 1 else None)
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 80, 128])
@pytest.mark.parametrize("Hq, Hkv", [(8, 2), (4, 4)], ids=["gqa", "mha"])
def test_16bit_queries_over_int8_logits_to_float32_precision(backend, dtype, D, Hq, Hkv):
    """The CPU decode rounds 16-bit queries to int16 per row for integer logits over int8 codes (AVX2, AVX-512;
    D = 80 takes the float path on AVX-512): the LSE, which carries the logits' error undiluted by the output's
    16-bit rounding, stays within 1e-4 of float64 from the same queries (measured: <= 2.5e-5; the float path 5e-7)."""
    gen = torch.Generator().manual_seed(D + Hq)
    B, S = 2, 300
    k_codes, v_codes, k_scale, v_scale, k_deq, v_deq = quantized_cache(gen, B, S, Hkv, D, "int8", dtype)
    q = torch.randn(B, 1, Hq, D, generator=gen).to(dtype)
    lens = torch.tensor([S, 201])
    (out, lse), _, _ = backend.attention_with_kvcache(q, k_codes, v_codes, cache_seqlens=lens, k_scale=k_scale,
                                                      v_scale=v_scale, return_lse=True)
    for b in range(B):
        n = int(lens[b])
        want_out, want_lse = attention_reference(q[b:b + 1].transpose(1, 2).double(), k_deq[b:b + 1, :, :n],
                                                 v_deq[b:b + 1, :, :n])
        torch.testing.assert_close(lse[b].double(), want_lse[0].double(), atol=1e-4, rtol=0)
        torch.testing.assert_close(out[b].double(), want_out[0].transpose(0, 1), atol=2e-2, rtol=2e-2)


def masks_of(Lq, S):
    """Every mask kind over Lq queries and a cache of S keys (each query sees at least its own key)."""
    gen = torch.Generator().manual_seed(Lq)
    dense = torch.rand(Lq, S, generator=gen) < 0.5
    dense[:, :4] = True
    return {"causal": Causal(), "window": Window(9, sinks=2), "block-causal": BlockCausal(block_size=4),
            "block-same": BlockCausal(block_size=4, relation="same"), "tree": Tree([-1, 0, 0, 1, 3, -1][:Lq]),
            "dense": Dense(dense)}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("D", [40, 72])
@pytest.mark.parametrize("Lq", [3, 6], ids=["decode", "gemm"])
@pytest.mark.parametrize("kind", ["causal", "window", "block-causal", "block-same", "tree", "dense"])
def test_cpu_every_mask_kind_and_head_dims_off_the_vector_widths(fmt, D, Lq, kind):
    """The decode path (3 positions x G = 2: 6 query rows, the micro-kernels' 4-row block and a 2-row one) and the
    GEMM path (12 rows) under each mask kind, with D = 40 and 72: whole vectors and scalar tails of the codes on
    every ISA."""
    gen = torch.Generator().manual_seed(D + Lq)
    B, Hq, Hkv, S = 2, 4, 2, 100
    k_codes, v_codes, k_scale, v_scale, k_deq, v_deq = quantized_cache(gen, B, S, Hkv, D, fmt, torch.float32)
    q = torch.randn(B, Lq, Hq, D, generator=gen)
    lens = torch.tensor([S, 77])
    mask = masks_of(Lq, S)[kind]
    got = fastar.attention_with_kvcache(q, k_codes, v_codes, cache_seqlens=lens, k_scale=k_scale, v_scale=v_scale,
                                        mask=mask)
    torch.testing.assert_close(got.double(), reference(q, k_deq, v_deq, lens, mask), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("Lq", [1, 40])
def test_fixed_fp8_scales_per_kv_head(backend, fmt, Lq):
    """D = 32 (no decode or tensor-core instance: the CUDA-core tiled kernel on CUDA)."""
    gen = torch.Generator().manual_seed(7)
    B, Hq, Hkv, D, S = 2, 4, 2, 32, 96
    k_codes, v_codes, k_scale, v_scale, k_deq, v_deq = quantized_cache(gen, B, S, Hkv, D, fmt, torch.float32,
                                                                       fixed=True)
    q = torch.randn(B, Lq, Hq, D, generator=gen)
    lens = torch.tensor([S, 70])
    got, _, _ = backend.attention_with_kvcache(q, k_codes, v_codes, cache_seqlens=lens, k_scale=k_scale,
                                               v_scale=v_scale)
    torch.testing.assert_close(got.double(), reference(q, k_deq, v_deq, lens), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("Lq, dtype", [(1, torch.float32), (16, torch.float32), (1, torch.bfloat16),
                                       (16, torch.bfloat16)],
                         ids=["decode-f32", "rows-f32", "decode-bf16", "rows-bf16"])
def test_every_fp8_code_dequantizes_as_torch_converts_it(backend, fmt, Lq, dtype):
    """A one-key cache returns its value row: V holds all 256 codes (NaN and inf included) at scale 1, so the
    output is the kernel's dequantization of each, compared with torch's float8 -> float32 conversion (every fp8
    value is a bf16 value). CUDA: the decode kernel (1 query), the tiled kernel (fp32, 16) and the tensor-core
    kernel (bf16, 16)."""
    v = torch.arange(256, dtype=torch.uint8).view(KV_FORMATS[fmt]).reshape(1, 1, 1, 256)
    k = torch.zeros_like(v)
    one = torch.ones(())
    got, _, _ = backend.attention_with_kvcache(torch.ones(1, Lq, 1, 256, dtype=dtype), k, v, cache_seqlens=1,
                                               k_scale=one, v_scale=one)
    want = v.float().reshape(1, 256).expand(Lq, 256)
    got = got.float().reshape(Lq, 256)
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    assert torch.equal(got[finite], want[finite])  # -0 reads as 0: the output accumulates from 0


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("Lq, dtype", [(1, torch.float32), (16, torch.bfloat16), (16, torch.float32)],
                         ids=["decode", "rows-bf16", "rows-f32"])
def test_a_nan_scale_reaches_only_the_rows_that_see_its_key(backend, fmt, Lq, dtype):
    """The last key's K and V scales are NaN. Under a bottom-right causal mask only the last query sees it: that
    row is NaN and the others equal the reference (a hidden key's scale is never multiplied in, even by 0). One
    query (decode): the key is past cache_seqlens of the second sequence, which stays finite."""
    gen = torch.Generator().manual_seed(11)
    B, Hq, Hkv, D, S = 2, 4, 2, 64, 80
    k_codes, v_codes, k_scale, v_scale, k_deq, v_deq = quantized_cache(gen, B, S, Hkv, D, fmt, dtype)
    lens = torch.tensor([S, S - 1])
    k_scale[:, S - 1], v_scale[:, S - 1] = float("nan"), float("nan")
    q = torch.randn(B, Lq, Hq, D, generator=gen).to(dtype)
    got, _, _ = backend.attention_with_kvcache(q, k_codes, v_codes, cache_seqlens=lens, k_scale=k_scale,
                                               v_scale=v_scale, mask=Causal() if Lq > 1 else None)
    want = reference(q, k_deq, v_deq, lens, Causal() if Lq > 1 else None)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert got[0, -1].isnan().all()
    if Lq > 1:
        torch.testing.assert_close(got[0, :-1].double(), want[0, :-1], atol=tol, rtol=tol)
    torch.testing.assert_close(got[1].double(), want[1], atol=tol, rtol=tol)


# Decode shapes of the CPU kernel's lockstep (a sequence's kv heads run together, key tile by key tile, when a kv
# head has fewer than 8 query rows): (B, Hq, Hkv, Lq). G = 1, 2, 4, and 8 (8 rows: the GEMM path instead); B = 1
# splits the keys over more work units.
LOCKSTEP_SHAPES = [(3, 16, 16, 1), (1, 16, 16, 3), (3, 16, 4, 1), (1, 16, 4, 1), (3, 6, 3, 2), (3, 16, 2, 1)]
LOCKSTEP_CASES = [(shape, kind) for shape in LOCKSTEP_SHAPES
                  for kind in (["none"] if shape[3] == 1 else ["causal", "tree", "window", "dense"])]


@pytest.mark.parametrize("fmt", ["int8", "fp8_e5m2", "f32", "bf16"])
@pytest.mark.parametrize("shape, kind", LOCKSTEP_CASES, ids=lambda x: "-".join(map(str, x)) if isinstance(x, tuple)
                         else x)
@pytest.mark.parametrize("paged", [False, True])
def test_cpu_decode_runs_the_kv_heads_in_lockstep(fmt, shape, kind, paged):
    """Quantized and 16 / 32-bit caches: ragged lengths (300 keys, a partial tile, 7), kv splits, pages of 16
    slots over shuffled pages, each mask kind with several query positions, against float64."""
    B, Hq, Hkv, Lq = shape
    D, S = 64, 320
    gen = torch.Generator().manual_seed(Hq * Hkv + Lq + B)
    bt, total = paged_layout(B, S // 16, gen) if paged else (None, None)
    q = torch.randn(B, Lq, Hq, D, generator=gen)
    if fmt in ("f32", "bf16"):
        dtype = torch.float32 if fmt == "f32" else torch.bfloat16
        k, v = (torch.randn(B, S, Hkv, D, generator=gen).to(dtype) for _ in range(2))
        k_deq, v_deq = (x.double().transpose(1, 2) for x in (k, v))
        if paged:
            k, v = (to_paged(x, bt, total, gen) for x in (k, v))
        scales = {}
    else:
        dtype = torch.float32
        k, v, k_scale, v_scale, k_deq, v_deq = quantized_cache(gen, B, S, Hkv, D, fmt, dtype, bt,
                                                               (total, 16) if paged else None)
        scales = {"k_scale": k_scale, "v_scale": v_scale}
    q = q.to(dtype)
    lens = torch.tensor([300, 129, 7][:B])
    mask = None if kind == "none" else masks_of(Lq, S)[kind]
    got = fastar.attention_with_kvcache(q, k, v, cache_seqlens=lens, block_table=bt, mask=mask, **scales)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), reference(q, k_deq, v_deq, lens, mask), atol=tol, rtol=tol)


def test_cpu_a_nan_value_of_one_kv_head_in_lockstep():
    """One kv head's value scale at the last key is NaN; a causal mask hides that key from the first of two query
    positions. That head is rerun alone (its products may not reach the hidden rows through 0 * NaN): its rows of
    the last position are NaN, every other row equals the reference."""
    gen = torch.Generator().manual_seed(3)
    B, Hq, Hkv, D, S = 2, 8, 4, 64, 150
    k_codes, v_codes, k_scale, v_scale, k_deq, v_deq = quantized_cache(gen, B, S, Hkv, D, "int8", torch.float32)
    v_scale[0, S - 1, 2] = float("nan")
    v_deq[0, 2, S - 1] = float("nan")
    q = torch.randn(B, 2, Hq, D, generator=gen)
    lens = torch.tensor([S, S])
    got = fastar.attention_with_kvcache(q, k_codes, v_codes, cache_seqlens=lens, k_scale=k_scale, v_scale=v_scale,
                                        mask=Causal())
    want = reference(q, k_deq, v_deq, lens, Causal())
    nan = torch.zeros_like(got, dtype=torch.bool)
    nan[0, 1, 4:6] = True  # query heads 4 and 5 share kv head 2
    assert torch.equal(got.isnan().all(-1, keepdim=True).expand_as(got), nan)
    torch.testing.assert_close(got.double()[~nan], want[~nan], atol=2e-5, rtol=2e-5)


def test_op_writes_a_poisoned_out_and_empty_sequences(backend):
    """The op itself, on [B, Hkv, S, D] views: out starts as NaN and every element must be written; a sequence
    of 0 keys gives 0 output and -inf LSE, as for an unquantized cache; an empty batch runs."""
    gen = torch.Generator().manual_seed(5)
    B, Hq, Hkv, D, S = 3, 4, 2, 32, 48
    k_codes, v_codes, k_scale, v_scale, k_deq, v_deq = quantized_cache(gen, B, S, Hkv, D, "int8", torch.float32)
    q, k_codes, v_codes, k_scale, v_scale = backend.to((torch.randn(B, Hq, 2, D, generator=gen), k_codes, v_codes,
                                                        k_scale, v_scale))
    out = torch.full_like(q, float("nan"))
    lens = backend.to(torch.tensor([S, 0, 17], dtype=torch.int32))
    lse = backend.ops.attention(q, k_codes.transpose(1, 2), v_codes.transpose(1, 2), out, D ** -0.5, kv_lens=lens,
                                k_scale=k_scale.transpose(1, 2), v_scale=v_scale.transpose(1, 2)).cpu()
    out = out.cpu()
    want = reference(q.cpu().transpose(1, 2), k_deq, v_deq, lens.cpu()).transpose(1, 2)
    torch.testing.assert_close(out[[0, 2]].double(), want[[0, 2]], atol=2e-5, rtol=2e-5)
    assert (out[1] == 0).all() and (lse[1] == float("-inf")).all() and lse[[0, 2]].isfinite().all()
    empty = backend.ops.attention(q[:0], k_codes.transpose(1, 2)[:0], v_codes.transpose(1, 2)[:0], out[:0].to(q),
                                  1.0, k_scale=k_scale.transpose(1, 2)[:0], v_scale=v_scale.transpose(1, 2)[:0])
    assert empty.shape == (0, Hq, 2)


def test_cpu_scales_on_another_device_or_not_tensors():
    with pytest.raises(ValueError, match="k_scale is on meta"):
        bad_call(k_scale=torch.zeros(1, 16, 2, device="meta"))()
    with pytest.raises(TypeError, match="k_scale and v_scale must be tensors"):
        bad_call(v_scale=1.0)()


def bad_call(**change):
    gen = torch.Generator().manual_seed(2)
    k_codes, v_codes, k_scale, v_scale, *_ = quantized_cache(gen, 1, 16, 2, 32, "int8", torch.float32)
    kwargs = {**dict(k_cache=k_codes, v_cache=v_codes, cache_seqlens=16, k_scale=k_scale, v_scale=v_scale), **change}
    return lambda: fastar.attention_with_kvcache(torch.randn(1, 1, 2, 32), **kwargs)


@pytest.mark.parametrize("change, error, match", [
    (dict(v_scale=None), ValueError, "give both k_scale and v_scale"),
    (dict(k_scale=torch.zeros(1, 16, 2, dtype=torch.float16)), TypeError, "k_scale must be float32"),
    (dict(v_scale=torch.zeros(1, 15, 2)), ValueError, "v_scale must broadcast to k's rows"),
    (dict(k_new=torch.zeros(1, 1, 2, 32), v_new=torch.zeros(1, 1, 2, 32)), ValueError, "quantize_kv_append"),
    (dict(v_cache=torch.zeros(1, 16, 2, 32, dtype=torch.float8_e4m3fn)), TypeError, "k and v must have the same"),
    (dict(k_scale=None, v_scale=None), TypeError, "int8 / fp8 k and v with k_scale and v_scale"),
], ids=["one-scale", "scale-dtype", "scale-shape", "k_new", "mixed-codes", "no-scales"])
def test_cpu_bad_arguments(change, error, match):
    with pytest.raises(error, match=match):
        bad_call(**change)()


def test_cpu_compiles_without_graph_breaks():
    gen = torch.Generator().manual_seed(3)
    k_codes, v_codes, k_scale, v_scale, *_ = quantized_cache(gen, 2, 32, 2, 32, "fp8_e4m3", torch.float32)
    q = torch.randn(2, 1, 4, 32, generator=gen)
    lens = torch.tensor([32, 20])

    def step(q):
        return fastar.attention_with_kvcache(q * 1, k_codes, v_codes, cache_seqlens=lens, k_scale=k_scale,
                                             v_scale=v_scale)

    torch.testing.assert_close(torch.compile(step, fullgraph=True)(q), step(q), atol=0, rtol=0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("amx", ["1", "0"], ids=["amx", "no-amx"])
@pytest.mark.parametrize("Hq, Hkv, D, nodes", [(8, 2, 128, 24), (2, 2, 64, 40), (4, 1, 96, 7)],
                         ids=["gqa4-tree", "mha-tree", "gqa4-odd-rows"])
def test_cpu_bf16_tree_over_a_prefix_on_either_gemm_path(monkeypatch, fmt, amx, Hq, Hkv, D, nodes):
    """bfloat16 queries of a tree verified over a cached prefix: on a CPU with AMX-BF16 the GEMM path runs on AMX
    tiles (codes in bfloat16, P rounded to bfloat16), with FASTAR_CPU_AMX=0 (or another CPU) on float32 vectors;
    both within bfloat16's tolerance of float64. Rows (heads x nodes) off multiples of 16 and keys off multiples of
    32 take the tiles' zero padding; with one query head per kv head each step computes a subset of the rows."""
    monkeypatch.setenv("FASTAR_CPU_AMX", amx)
    gen = torch.Generator().manual_seed(D + nodes)
    B, S = 2, 300
    k_codes, v_codes, k_scale, v_scale, k_deq, v_deq = quantized_cache(gen, B, S, Hkv, D, fmt, torch.bfloat16)
    parents = [-1] + [int(torch.randint(0, i, (), generator=gen)) for i in range(1, nodes)]
    q = torch.randn(B, nodes, Hq, D, generator=gen).to(torch.bfloat16)
    lens = torch.tensor([S, S - 37])
    got = fastar.attention_with_kvcache(q, k_codes, v_codes, cache_seqlens=lens, k_scale=k_scale, v_scale=v_scale,
                                        mask=Tree(parents))
    torch.testing.assert_close(got.double(), reference(q, k_deq, v_deq, lens, Tree(parents)), atol=2e-2, rtol=2e-2)
