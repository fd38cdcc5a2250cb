"""The 16-byte-load decode kernel (csrc/cuda/attention_decode.cuh): items of at most 8 query rows.

On the simt backend each case asserts that the decode kernel is the one that ran, then checks output and LSE
against the float64 reference (test_attention's tolerances): every head dim and dtype it is built for, every
mask kind, GQA, paged caches with ragged lengths (short sequences in a long cache use fewer kv splits, chosen
on the device), qk_norm, and rows it must refuse (unaligned K).
"""
from __future__ import annotations

import pytest
import torch

from fastar import ScaleLayout
from fastar.masks import BlockCausal, Causal, Dense, Tree, Window
from fastar.reference import scale_attention_reference
from test_attention import DTYPES, check_attention, dense4, make, random_parents, run_kvcache_case
from test_attention_tc import KernelsRun

HEAD_DIMS = (64, 80, 96, 128, 256)
MASKS = ("none", "causal", "tree", "block", "window", "dense")


@pytest.fixture
def gpu_backend(backend):
    if backend.name == "cpu":
        pytest.skip("the decode kernel is CUDA code (simt and cuda backends)")
    return backend


def build(kind, B, Lq, gen, Lk):
    return {"none": None, "causal": Causal(), "tree": Tree([random_parents(Lq, gen) for _ in range(B)]),
            "block": BlockCausal(block_size=2), "window": Window(left=70, sinks=2),
            "dense": Dense(torch.rand(B, Lq, Lk, generator=gen) < 0.5)}[kind]


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_head_dims_and_masks(gpu_backend, D, dtype, mask_kind):
    """B=2, 8 query heads over 4 kv heads, 3 query positions (6 rows per item), 300 keys (kv splits on the
    emulator's 4 'SMs')."""
    gen = torch.Generator().manual_seed(D * 11 + MASKS.index(mask_kind))
    B, Hq, Hkv, Lq, Lk = 2, 8, 4, 3, 300
    q, k, v = make((B, Hq, Lq, D), dtype, gen), make((B, Hkv, Lk, D), dtype, gen), make((B, Hkv, Lk, D), dtype, gen)
    mask = build(mask_kind, B, Lq, gen, Lk)
    poisoned = torch.full_like(q, float("nan"))  # check_attention fails on any element the kernel did not write
    with KernelsRun(gpu_backend) as run:
        out, lse = gpu_backend.attention(q, k, v, mask=mask, return_lse=True, out=poisoned)
    run.assert_ran("attention_vec_decode", expected=dtype != torch.float32 or D <= 128)  # fp32 D=256: CUDA cores
    check_attention(out, lse, q, k, v, None if mask is None else dense4(mask, Lq, Lk, B), what=f"D={D} {mask_kind}")


@pytest.mark.parametrize("page_size", [None, 16, 5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_paged_ragged_decode(gpu_backend, page_size, dtype):
    """One new token per sequence appended to paged caches of 640 slots holding 0, 3, 130 and 600 tokens: the
    short ones take fewer kv splits than the launch has (the rest write empty states)."""
    with KernelsRun(gpu_backend) as run:
        run_kvcache_case(gpu_backend, B=4, Hq=8, Hkv=2, D=128, S=640, Lq=1, seqlens=[0, 3, 130, 600], with_new=True,
                         page_size=page_size, mask_kind="none", dtype=dtype, seed=21)
    run.assert_ran("attention_vec_decode")


def test_qk_norm_scale_attention_decode(gpu_backend):
    """VAR's cached inference with qk_norm: the last token of a 3-scale layout against all 14 keys."""
    gen = torch.Generator().manual_seed(22)
    layout = ScaleLayout((1, 2, 3))
    L = layout.num_tokens
    q = make((2, 4, 1, 64), torch.float16, gen)
    k, v = make((2, 4, L, 64), torch.float16, gen), make((2, 4, L, 64), torch.float16, gen)
    q_scale = torch.rand(4, generator=gen) + 0.5
    with KernelsRun(gpu_backend) as run:
        out, lse = gpu_backend.scale_attention(q, k, v, layout, qk_norm=True, q_scale=q_scale, return_lse=True)
    run.assert_ran("attention_vec_decode")
    ref, ref_lse = scale_attention_reference(q.double(), k.double(), v.double(), layout, qk_norm=True,
                                             q_scale=q_scale.double())
    torch.testing.assert_close(lse, ref_lse.float(), rtol=1e-3, atol=1e-3)
    assert (out.double() - ref).abs().max().item() < 5e-3, "fp16 output against the float64 reference"


def test_unaligned_rows_fall_back(gpu_backend):
    """K rows that do not start 16-byte aligned take the CUDA-core decode kernel, with the same results."""
    gen = torch.Generator().manual_seed(23)
    q = make((1, 4, 1, 64), torch.bfloat16, gen)
    k = torch.randn(1, 2, 90, 65, generator=gen).to(torch.bfloat16)[..., 1:]
    v = make((1, 2, 90, 64), torch.bfloat16, gen)
    with KernelsRun(gpu_backend) as run:
        out, lse = gpu_backend.attention(q, k, v, return_lse=True)
    run.assert_ran("attention_vec_decode", expected=False)
    run.assert_ran("attention_decode")
    check_attention(out, lse, q, k, v, what="unaligned k")
