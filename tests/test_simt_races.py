"""Race checks of the CUDA kernels on the SIMT emulator (csrc/simt/simt.h).

Every op's kernels run under the reverse and shuffled schedules with the race check on and must give results
bit-identical to the default forward schedule (a race-free kernel's results do not depend on the order its
threads run in) and no race report. Planted bugs in the emulator's self-test kernels show that both the
detector and the schedule comparison catch a missing __syncthreads, and that a missing cp.async wait shows.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import fastar
from fastar import ScaleLayout, _simt

try:
    simt = _simt.load()
except ImportError as exc:  # conftest's REQUIRE check turns this into a failure in CI (test_build.py)
    pytest.skip(f"SIMT build not present: {exc}", allow_module_level=True)

from conftest import Backend  # noqa: E402
from test_attention import make, paged_layout, to_paged  # noqa: E402

# (schedule, race check) of the checked runs; the forward schedule without the check is the baseline.
MODES = [("forward", True), ("reverse", True), ("shuffle:1", True), ("shuffle:20261204", True)]


@contextlib.contextmanager
def emulator(schedule: str, race_check: bool):
    previous = simt.schedule(), simt.race_check()
    simt.set_schedule(schedule)
    simt.set_race_check(race_check)
    try:
        yield
    finally:
        simt.set_schedule(previous[0])
        simt.set_race_check(previous[1])


def as_bytes(result):
    """The result's tensors as raw bytes, so NaNs and signed zeros compare bit for bit."""
    tensors = result if isinstance(result, tuple) else (result,)
    return [(t.dtype, t.shape, t.contiguous().reshape(-1).view(torch.uint8)) for t in tensors]


def assert_order_independent(run):
    with emulator("forward", False):
        want = as_bytes(run())
    for schedule, race_check in MODES:
        with emulator(schedule, race_check):
            got = as_bytes(run())
        for (dtype, shape, g), (_, _, w) in zip(got, want):
            assert torch.equal(g, w), f"{dtype} {tuple(shape)} result differs under schedule {schedule}"


@pytest.fixture(scope="module")
def backend():
    return Backend("simt")


def test_settings_validate_and_round_trip():
    with emulator("shuffle:42", True):
        assert simt.schedule() == "shuffle:42" and simt.race_check()
    assert simt.schedule() == "forward" and not simt.race_check()
    for bad in ["", "backward", "shuffle", "shuffle:", "shuffle:-1", "shuffle:x", "reverse "]:
        with pytest.raises(ValueError, match="schedule"):
            simt.set_schedule(bad)
    assert simt.schedule() == "forward"


def test_speculative_sample(backend):
    gen = torch.Generator().manual_seed(0)
    B, K, V = 3, 4, 300
    drafts = torch.randint(0, V, (B, K), generator=gen)
    q = torch.softmax(torch.randn(B, K, V, generator=gen), -1)
    p = torch.softmax(torch.randn(B, K + 1, V, generator=gen), -1)
    num_draft = torch.tensor([4, 2, 0])
    assert_order_independent(lambda: backend.speculative_sample(drafts, q, p, num_draft_tokens=num_draft, seed=7))
    assert_order_independent(lambda: backend.speculative_sample(drafts, None, p, seed=7))


def test_greedy_verify(backend):
    gen = torch.Generator().manual_seed(1)
    B, K, V = 3, 4, 300
    logits = torch.randn(B, K + 1, V, generator=gen)
    drafts = logits[:, :K].argmax(-1)
    drafts[1, 2] = (drafts[1, 2] + 1) % V  # one rejection
    logits[2, 1, 5] = float("nan")
    assert_order_independent(lambda: backend.greedy_verify(drafts, logits))


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (20, 0.9)])
def test_sample_cfg(backend, top_k, top_p):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 3, 300, generator=gen) * 3
    assert_order_independent(
        lambda: backend.sample_cfg(logits, cfg=2.0, scale_index=3, num_scales=10, top_k=top_k, top_p=top_p, seed=9)
    )


# (B, Hq, Hkv, Lq, Lk, D): decode (G * Lq <= 8) with and without kv splits, tiled, D past one chunk, and the
# tensor-core kernel (bf16, G * Lq >= 16): swizzled and padded rows, two stages, kv splits.
ATTENTION_SHAPES = [
    (1, 4, 1, 2, 300, 64),  # decode, 3 kv splits
    (2, 2, 2, 1, 40, 32),  # decode, one split
    (1, 2, 1, 5, 300, 128),  # tiled, kv splits
    (1, 4, 2, 9, 70, 64),  # tensor cores, 18 rows
    (1, 4, 1, 16, 300, 128),  # tensor cores, 64 rows, kv splits
    (2, 2, 2, 20, 150, 80),  # tensor cores, padded rows, three tiles per block
    (1, 2, 1, 17, 100, 256),  # tensor cores, 32-key tiles
]


@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention(backend, shape):
    B, Hq, Hkv, Lq, Lk, D = shape
    gen = torch.Generator().manual_seed(3)
    q = make((B, Hq, Lq, D), torch.bfloat16, gen)
    k = make((B, Hkv, Lk, D), torch.bfloat16, gen)
    v = make((B, Hkv, Lk, D), torch.bfloat16, gen)
    assert_order_independent(lambda: backend.attention(q, k, v, mask=fastar.masks.Causal(), return_lse=True))


def test_paged_decode(backend):
    """The decode kernel's per-step page table in shared memory, on a paged cache of page size 3."""
    gen = torch.Generator().manual_seed(5)
    B, Hq, Hkv, D, S = 3, 4, 2, 64, 300
    block_table, total = paged_layout(B, S // 3, gen)
    k_pages = to_paged(torch.randn(B, S, Hkv, D, generator=gen).to(torch.bfloat16), block_table, total, gen)
    v_pages = to_paged(torch.randn(B, S, Hkv, D, generator=gen).to(torch.bfloat16), block_table, total, gen)
    q = make((B, 1, Hq, D), torch.bfloat16, gen)
    seqlens = torch.tensor([5, 150, 299], dtype=torch.int32)
    assert_order_independent(lambda: backend.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=seqlens,
                                                                     block_table=block_table)[0])


def test_scale_attention(backend):
    layout = ScaleLayout((1, 2, 4), local_window=1)
    L = layout.num_tokens
    gen = torch.Generator().manual_seed(4)
    q, k, v = (make((1, 2, L, 64), torch.float16, gen) for _ in range(3))
    assert_order_independent(lambda: backend.scale_attention(q, k, v, layout, qk_norm=True, return_lse=True))


def pairs(values):
    return list(zip(values[0::2], values[1::2]))


@pytest.mark.parametrize("name", ["pair_sum", "cp_async_reload"])
def test_race_free_selftests_pass_in_every_mode(name):
    for schedule, race_check in [("forward", False)] + MODES:
        with emulator(schedule, race_check):
            assert all(got == want for got, want in pairs(simt.selftest(name))), schedule


def test_missing_syncthreads_is_reported_by_the_race_check():
    with emulator("forward", True):
        with pytest.raises(RuntimeError, match=r"shared-memory race in kernel 'pair_sum_kernel'.*threads \(0,0,0\) and "
                           r"\(1,0,0\) both wrote word \d+ .* of the __shared__ variables"):
            simt.selftest("pair_sum_missing_sync")


@pytest.mark.parametrize("schedule", [schedule for schedule, _ in MODES[1:]])
def test_missing_syncthreads_changes_results_between_schedules(schedule):
    results = {}
    for s in ["forward", schedule]:
        with emulator(s, False):
            results[s] = simt.selftest("pair_sum_missing_sync")
    assert results["forward"] != results[schedule]


def test_missing_cp_async_wait_shows_under_the_race_check():
    with emulator("forward", False):  # the stale shared words equal the loaded ones: the bug hides
        assert all(got == want for got, want in pairs(simt.selftest("cp_async_reload_missing_wait")))
    with emulator("forward", True):  # cp.async poisons its destination until the wait
        got = [got for got, want in pairs(simt.selftest("cp_async_reload_missing_wait")) if got != want]
    assert got and set(got) == {float(0xFFFFFFFF)}
