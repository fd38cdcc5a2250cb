"""The tensor-core attention kernel (csrc/cuda/attention_tc.cuh): bf16 / fp16 items of 16+ query rows.

On the simt backend the emulator executes its cp.async, ldmatrix and mma.sync; each case asserts that the
tensor-core kernel is the one that ran, then checks output and LSE against the float64 reference with
test_attention's tolerances (the error of PyTorch's own low-precision SDPA, doubled). Cases cover every head
dim it is built for, every mask kind, GQA groups, paged caches, kv splits and unaligned inputs (which must
fall back to the CUDA-core kernel).
"""
from __future__ import annotations

import pytest
import torch

from fastar import _simt
from fastar.masks import BlockCausal, Causal, Dense, Tree, Window
from fastar.reference import attention_reference
from test_attention import assert_output_close, check_attention, dense4, make, random_parents, run_kvcache_case

HEAD_DIMS = (64, 80, 96, 128, 256)
MASKS = ("none", "causal", "tree", "block", "window", "dense", "bias")


@pytest.fixture
def gpu_backend(backend):
    if backend.name == "cpu":
        pytest.skip("the tensor-core kernel is CUDA code (simt and cuda backends)")
    return backend


class KernelsRun:
    """The emulator's launch counts over a block (simt); nothing to count on a GPU."""

    def __init__(self, backend):
        self.module = _simt.load() if backend.name == "simt" else None

    def __enter__(self):
        if self.module:
            self.module.reset_launch_counts()
        return self

    def __exit__(self, *exc):
        self.counts = self.module.launch_counts() if self.module else None

    def assert_ran(self, name, expected=True):
        if self.counts is not None:
            assert (self.counts.get(name, 0) > 0) == expected, f"{name} ran: {self.counts}"


def build(kind, B, Lq, Lk, gen):
    """(mask, bias, dense [B or 1, 1, Lq, Lk]) of a case; bias is SDPA's float mask for "bias"."""
    if kind == "bias":
        return None, torch.randn(B, 1, Lq, Lk, generator=gen), None
    mask = {"none": None, "causal": Causal(), "tree": Tree([random_parents(Lq, gen) for _ in range(B)]),
            "block": BlockCausal(block_size=7), "window": Window(left=40, sinks=3),
            "dense": Dense(torch.rand(B, Lq, Lk, generator=gen) < 0.5)}[kind]
    return mask, None, None if mask is None else dense4(mask, Lq, Lk, B)


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_head_dims_and_masks(gpu_backend, D, dtype, mask_kind):
    """B=2, 4 query heads over 2 kv heads (rows = 2 heads x 20 positions), 150 keys: two full 64-key tiles
    (32 at D=256) and a ragged last one."""
    gen = torch.Generator().manual_seed(D * 7 + MASKS.index(mask_kind))
    B, Hq, Hkv, Lq, Lk = 2, 4, 2, 20, 150
    q, k, v = make((B, Hq, Lq, D), dtype, gen), make((B, Hkv, Lk, D), dtype, gen), make((B, Hkv, Lk, D), dtype, gen)
    mask, bias, dense = build(mask_kind, B, Lq, Lk, gen)
    with KernelsRun(gpu_backend) as run:
        if bias is None:  # into an output poisoned with NaN: check_attention fails on any element not written
            poisoned = torch.full_like(q, float("nan"))
            out, lse = gpu_backend.attention(q, k, v, mask=mask, return_lse=True, out=poisoned)
        else:
            out = gpu_backend.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(dtype), enable_gqa=True)
    run.assert_ran("attention_tc")
    if bias is None:
        check_attention(out, lse, q, k, v, dense, what=f"D={D} {mask_kind}")
    else:
        ref, _ = attention_reference(q.double(), k.double(), v.double(), bias=bias.to(dtype).double())
        assert_output_close(out, ref, q, k, v, None, bias.to(dtype), what=f"D={D} bias")


@pytest.mark.parametrize("page_size", [None, 16, 3])
@pytest.mark.parametrize("mask_kind", ["causal", "tree"])
def test_paged_kvcache_with_gqa(gpu_backend, page_size, mask_kind):
    """Verification through attention_with_kvcache: 8 query heads over 2 kv heads (GQA rows grouped), ragged
    lengths, 16 new tokens appended; contiguous and paged caches."""
    with KernelsRun(gpu_backend) as run:
        run_kvcache_case(gpu_backend, B=3, Hq=8, Hkv=2, D=128, S=96, Lq=16, seqlens=[0, 37, 80], with_new=True,
                         page_size=page_size, mask_kind=mask_kind, dtype=torch.bfloat16, seed=5)
    run.assert_ran("attention_tc")


def test_kv_splits(gpu_backend):
    """One item (B * Hkv = 1) over 600 keys: the emulator's 4 'SMs' make the launcher split the keys, and the
    merge kernel combines the tensor-core kernel's partial states."""
    gen = torch.Generator().manual_seed(11)
    q = make((1, 4, 16, 64), torch.float16, gen)
    k, v = make((1, 1, 600, 64), torch.float16, gen), make((1, 1, 600, 64), torch.float16, gen)
    with KernelsRun(gpu_backend) as run:
        out, lse = gpu_backend.attention(q, k, v, mask=Causal(), return_lse=True)
    run.assert_ran("attention_tc")
    run.assert_ran("attention_merge")
    check_attention(out, lse, q, k, v, dense4(Causal(), 16, 600, 1), what="kv splits")


def test_unaligned_rows_fall_back(gpu_backend):
    """Rows that do not start 16-byte aligned (a head dim sliced at an odd offset) take the CUDA-core kernel,
    with the same results."""
    gen = torch.Generator().manual_seed(12)
    q = torch.randn(1, 2, 32, 65, generator=gen).to(torch.bfloat16)[..., 1:]
    k, v = make((1, 2, 70, 64), torch.bfloat16, gen), make((1, 2, 70, 64), torch.bfloat16, gen)
    with KernelsRun(gpu_backend) as run:
        out, lse = gpu_backend.attention(q, k, v, mask=Causal(), return_lse=True)
    run.assert_ran("attention_tc", expected=False)
    check_attention(out, lse, q, k, v, dense4(Causal(), 32, 70, 1), what="unaligned q")


def test_fully_hidden_rows_and_empty_cache(gpu_backend):
    """Rows that see no key give 0 and LSE -inf (a dense mask with empty rows; no keys at all)."""
    gen = torch.Generator().manual_seed(13)
    q, k, v = (make((1, 2, 24, 64), torch.bfloat16, gen) for _ in range(3))
    dense = torch.rand(1, 24, 24, generator=gen) < 0.5
    dense[0, ::5] = False
    with KernelsRun(gpu_backend) as run:
        out, lse = gpu_backend.attention(q, k, v, mask=Dense(dense), return_lse=True)
        empty, empty_lse = gpu_backend.attention(q, k[:, :, :0], v[:, :, :0], return_lse=True)
    run.assert_ran("attention_tc")
    check_attention(out, lse, q, k, v, dense.unsqueeze(1), what="hidden rows")
    assert torch.equal(empty, torch.zeros_like(empty)) and torch.all(empty_lse == float("-inf"))

