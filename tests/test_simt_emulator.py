"""Self-tests of the SIMT emulator (csrc/simt/simt.h) that runs the CUDA kernels on the CPU.

The kernels live in csrc/simt/selftest.cpp; each returns numbers whose layout selftest.h documents.
Abort cases run in a subprocess: a divergent barrier or a skipped shuffle must end the process with a
message naming the kernel, never hang.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fastar import _simt

try:
    simt = _simt.load()
except ImportError as exc:  # conftest's REQUIRE check turns this into a failure in CI (test_build.py)
    pytest.skip(f"SIMT build not present: {exc}", allow_module_level=True)

EXACT_PAIRS = [
    "warp0_reduction",
    "partial_warp",
    "shuffle_types",
    "disjoint_masks",
    "atomics",
    "dynamic_smem",
    "ballot",
    "block_vote",
    "kernel_exception",
    "launch_errors",
    "cp_async",
    "pair_sum",
    "cp_async_reload",
    "table_refill",
    "warp_exchange",
    "global16",
]
# Planted bugs that only some emulator modes show: tests/test_simt_races.py.
MODE_DEPENDENT = [
    "pair_sum_missing_sync",
    "cp_async_reload_missing_wait",
    "table_refill_missing_sync",
    "warp_exchange_missing_syncwarp",
]
ABORTS = [
    "divergent_barrier",
    "skipped_shuffle",
    "bad_mask",
    "warp_mismatch",
    "trap",
    "mma_partial_warp",
    "mma_divergent",
    "ldmatrix_misaligned",
    "cp_async_misaligned",
    "global16_misaligned",
]


def pairs(values):
    assert len(values) % 2 == 0 and values
    return list(zip(values[0::2], values[1::2]))


def test_every_selftest_is_covered():
    others = ["missing_syncthreads", "half_rounding", "bf16_rounding", "half_arith"]
    covered = set(EXACT_PAIRS + ABORTS + MODE_DEPENDENT + others)
    assert set(simt.selftest_names()) == covered


@pytest.mark.parametrize("name", EXACT_PAIRS)
def test_exact(name):
    for computed, expected in pairs(simt.selftest(name)):
        assert computed == expected, name


def test_missing_syncthreads_gives_a_detectable_wrong_result():
    results = pairs(simt.selftest("missing_syncthreads"))
    assert any(read != correct for read, correct in results)
    assert results == pairs(simt.selftest("missing_syncthreads"))  # deterministic schedule


@pytest.mark.parametrize("name,dtype", [("half_rounding", torch.float16), ("bf16_rounding", torch.bfloat16)])
def test_low_precision_rounding_matches_torch(name, dtype):
    got = pairs(simt.selftest(name))
    inputs = torch.tensor([x for x, _ in got], dtype=torch.float32)
    expected = inputs.to(dtype).to(torch.float64)
    assert torch.equal(torch.tensor([y for _, y in got], dtype=torch.float64), expected)


def test_half_arithmetic_matches_torch():
    values = simt.selftest("half_arith")
    quads = [values[i : i + 4] for i in range(0, len(values), 4)]
    a = torch.tensor([q[0] for q in quads], dtype=torch.float16)
    b = torch.tensor([q[1] for q in quads], dtype=torch.float16)
    assert torch.equal(torch.tensor([q[2] for q in quads], dtype=torch.float16), a + b)
    assert torch.equal(torch.tensor([q[3] for q in quads], dtype=torch.float16), a * b)


@pytest.mark.parametrize("name", ABORTS)
def test_misuse_aborts_naming_the_kernel(name):
    code = f"from fastar import _simt; _simt.load().selftest({name!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "kernel" in proc.stderr.lower(), proc.stderr
