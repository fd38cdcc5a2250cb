"""Race checks of the CUDA kernels on the SIMT emulator (csrc/simt/simt.h).

Every op's kernels run under the reverse and shuffled schedules with the race check on (every shared-memory
access recorded) and must give results bit-identical to the default forward schedule (a race-free kernel's
results do not depend on the order its threads run in) and no race report. Planted bugs in the emulator's
self-test kernels show that the check reports each kind of race: write-write, read-after-write and
write-after-read across a missing __syncthreads, read-after-write across a missing __syncwarp, and a read before
the cp.async.wait_group that lands a copy.
"""
from __future__ import annotations

import contextlib
import pathlib
import re

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
from test_quantized_attention import quantized_cache  # noqa: E402
from test_tree_greedy_verify import LEVEL_PARENTS, level_case  # noqa: E402

# (schedule, race check) of the checked runs; the forward schedule without the check is the baseline. The check
# costs tens of microseconds per shared-memory access, so one shuffled run goes without it.
MODES = [("forward", True), ("reverse", True), ("shuffle:1", False), ("shuffle:20261204", True)]


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


def assert_order_independent(run, kernels):
    """run() gives the same bytes in every mode, with no race report, and launches exactly `kernels`."""
    simt.reset_launch_counts()
    with emulator("forward", False):
        want = as_bytes(run())
    assert set(simt.launch_counts()) == set(kernels)
    for schedule, race_check in MODES:
        with emulator(schedule, race_check):
            got = as_bytes(run())
        for (dtype, shape, g), (_, _, w) in zip(got, want):
            assert torch.equal(g, w), f"{dtype} {tuple(shape)} result differs under schedule {schedule}"


# Every kernel of the CUDA sources, each run under the race check by one of the tests below.
SPECULATIVE = {"speculative_sample_partial", "speculative_sample_finish"}
GSD = {"gsd_partial", "speculative_sample_finish"}
GREEDY = {"greedy_verify_partial", "greedy_verify_finish"}
TREE_GREEDY = {"tree_greedy_verify_partial", "tree_greedy_verify_finish"}
TYPICAL = {"typical_accept_partial", "typical_accept_finish"}
TREE_SAMPLE = {"tree_sample_step", "tree_sample_pass"}
SPECTR = {"spectr_solve", "spectr_walk", "spectr_draw_partial", "spectr_draw_finish"}
ALL_KERNELS = {*SPECULATIVE, *GSD, *TREE_SAMPLE, *GREEDY, *TREE_GREEDY, *TYPICAL, *SPECTR, "sample_cfg",
               "attention_vec_decode", "attention_decode", "attention_tiled", "attention_tc", "attention_merge",
               "attention_kivi_decode", "quantize_kv_append", "quantize_kivi_keys", "quantize_kivi_values",
               "diffusion_unmask", "compact_kv"}


def test_every_kernel_is_covered():
    root = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda"
    names = set()
    for path in [*root.glob("*.cu"), *root.glob("*.cuh")]:  # launchers, and launcher templates of several .cu
        for first_argument in re.findall(r"launch_kernel\(([^,]*),", path.read_text()):
            names |= set(re.findall(r'"(\w+)"', first_argument))
    assert names == ALL_KERNELS


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


@pytest.mark.parametrize("V", [300, 4500])  # 4500: rows split over several blocks
def test_speculative_sample(backend, V):
    gen = torch.Generator().manual_seed(0)
    B, K = 3, 4
    drafts = torch.randint(0, V, (B, K), generator=gen)
    q = torch.softmax(torch.randn(B, K, V, generator=gen), -1)
    p = torch.softmax(torch.randn(B, K + 1, V, generator=gen), -1)
    num_draft = torch.tensor([4, 2, 0])
    assert_order_independent(lambda: backend.speculative_sample(drafts, q, p, num_draft_tokens=num_draft, seed=7),
                             SPECULATIVE)
    assert_order_independent(lambda: backend.speculative_sample(drafts, None, p, seed=7), SPECULATIVE)


def test_lantern_accept(backend):
    # LANTERN's draft test in the speculative_sample kernels: threads read their drafts' neighbour rows.
    gen = torch.Generator().manual_seed(1)
    B, K, V = 3, 4, 300
    drafts = torch.randint(0, V, (B, K), generator=gen)
    q = torch.softmax(torch.randn(B, K, V, generator=gen), -1)
    p = torch.softmax(torch.randn(B, K + 1, V, generator=gen), -1)
    neighbors = torch.stack([torch.randperm(V, generator=gen)[:16] for _ in range(V)])
    num_draft = torch.tensor([4, 3, 1])
    for draft_probs in (q, None):
        run = lambda q=draft_probs: backend.lantern_accept(  # noqa: E731
            drafts, q, p, neighbors, delta=0.05, num_draft_tokens=num_draft, seed=9)
        assert_order_independent(run, SPECULATIVE)


def test_gsd_accept(backend):
    # GSD's draft test: a warp per draft scans the target row and merges its lanes' windows by shuffles, in
    # every chunk block of the row (V = 2500: rows split over blocks in the emulator).
    gen = torch.Generator().manual_seed(2)
    B, K, V = 3, 4, 2500
    drafts = torch.randint(0, V, (B, K), generator=gen)
    q = torch.softmax(torch.randn(B, K, V, generator=gen), -1)
    p = torch.softmax(torch.randn(B, K + 1, V, generator=gen), -1)
    embeddings = torch.randn(V, 8, generator=gen) * 0.2
    num_draft = torch.tensor([4, 3, 1])
    for draft_probs in (q, None):
        run = lambda q=draft_probs: backend.gsd_accept(  # noqa: E731
            drafts, q, p, embeddings, prob_threshold=0.01, num_draft_tokens=num_draft, seed=9)
        assert_order_independent(run, GSD)


def test_sjd_accept(backend):
    # SJD's refresh: the finish block samples one whole row per refreshed position and writes next_drafts
    # between barriers.
    gen = torch.Generator().manual_seed(5)
    B, K, V = 3, 6, 2500
    drafts = torch.randint(0, V, (B, K), generator=gen)
    p = torch.softmax(2 * torch.randn(B, K + 1, V, generator=gen), -1)
    num_draft = torch.tensor([6, 4, 0])
    assert_order_independent(lambda: backend.sjd_accept(drafts, None, p, num_draft_tokens=num_draft, seed=3),
                             SPECULATIVE)


# 4500: the drawn rows split over several blocks; with 2 x 2 x 2 nodes, the solve's rows too (global merges)
@pytest.mark.parametrize("V, B, K", [(300, 3, 3), (4500, 3, 3), (4500, 2, 2)])
def test_spectr_accept(backend, V, B, K):
    # SpecTr: the solve launch (the nodes' shared prefixes counted with atomics, the shared-memory histograms of
    # the rho* solve, the block scan over the bins; split, the chunks' sums added in global memory and the last
    # block's solve), the walk's draft tests, then the residual and bonus draws' chunk sums and the finishing scan;
    # aligned rows (16-byte loads) and unaligned ones.
    gen = torch.Generator().manual_seed(6)
    n = 2
    q = torch.softmax(3 * torch.randn(B, K, n, V, generator=gen), -1)
    p = torch.softmax(3 * torch.randn(B, K, n + 1, V, generator=gen), -1)
    drafts = torch.multinomial(q.reshape(-1, V), 1, generator=gen).reshape(B, K, n)
    drafts[0, 1] = drafts[0, 0]  # row 0: two drafts share their prefix
    p[1] = torch.cat([q[1], q[1, :, :1]], 1)  # row 1: p == q, every level accepts and the bonus is sampled
    unaligned = torch.cat([p, p[..., :1]], -1)[..., 1:]
    for target in (p, unaligned):
        assert_order_independent(lambda t=target: backend.spectr_accept(drafts, q, t, seed=12), SPECTR)


@pytest.mark.parametrize("V", [300, 4500])  # 4500: rows split over several blocks
def test_tree_speculative_sample(backend, V):
    # A wide root whose children the target rarely takes: rows reject several children at a node, so the
    # kernels write weight rows (global memory, between barriers or launches) and draw from them.
    gen = torch.Generator().manual_seed(3)
    B = 3
    tree = fastar.masks.Tree([-1, -1, -1, -1, 0, 4])
    p = torch.softmax(4 * torch.randn(B, 7, V, generator=gen), -1)
    q = torch.softmax(torch.randn(B, 6, V, generator=gen), -1)
    drafts = torch.multinomial(q.reshape(-1, V), 1, generator=gen).reshape(B, 6)
    kernels = TREE_SAMPLE if V > 1024 else {"tree_sample_step"}  # one chunk: every pass in the row's block
    for draft_probs in (q, None):
        assert_order_independent(lambda q=draft_probs: backend.tree_speculative_sample(drafts, tree, q, p, seed=11),
                                 kernels)


@pytest.mark.parametrize("V", [300, 4500])  # 4500: rows split over several blocks
def test_tree_greedy_verify(backend, V):
    gen = torch.Generator().manual_seed(4)
    B = 2
    tree = fastar.masks.Tree([-1, -1, 0, 0, 2, 1])
    logits = torch.randn(B, 7, V, generator=gen)
    drafts = logits[:, [0, 0, 1, 1, 3, 2]].argmax(-1)  # every node the argmax after its parent: all match
    drafts[1, 2] = (drafts[1, 2] + 1) % V
    drafts[0, 5] = -1  # an absent node: its row's chunks are skipped
    assert_order_independent(lambda: backend.tree_greedy_verify(drafts, tree, logits), TREE_GREEDY)


def test_tree_greedy_verify_by_level(backend):
    # A wide tree over float32 rows of V = 20000: the logits are read level by level (test_tree_greedy_verify.py).
    logits, drafts, _ = level_case(1, torch.float32)
    tree = fastar.masks.Tree(LEVEL_PARENTS)
    simt.reset_launch_counts()
    backend.tree_greedy_verify(drafts, tree, logits)
    assert simt.launch_counts()["tree_greedy_verify_partial"] == 3  # levels 0, 1 and 2
    assert_order_independent(lambda: backend.tree_greedy_verify(drafts, tree, logits), TREE_GREEDY)


@pytest.mark.parametrize("V", [300, 4500])  # 4500: rows split over several blocks
def test_typical_accept(backend, V):
    gen = torch.Generator().manual_seed(5)
    B = 3
    tree = fastar.masks.Tree([-1, -1, 0, 0, 2, 1])
    logits = torch.randn(B, 7, V, generator=gen) * 3
    drafts = logits[:, [0, 0, 1, 1, 3, 2]].argmax(-1)
    drafts[1, 2] = logits[1, 1].argmin()
    drafts[0, 5] = -1  # an absent node: its row's chunks are skipped
    for temperature in (1.0, 0.0):
        assert_order_independent(lambda t=temperature: backend.typical_accept(drafts, logits, tree=tree, temperature=t),
                                 TYPICAL)


def test_typical_accept_by_level(backend):
    # test_tree_greedy_verify.py's wide tree over float32 rows of V = 20000: the logits are read level by level.
    logits, drafts, _ = level_case(1, torch.float32)
    tree = fastar.masks.Tree(LEVEL_PARENTS)
    simt.reset_launch_counts()
    backend.typical_accept(drafts, logits, tree=tree)
    assert simt.launch_counts()["typical_accept_partial"] == 3  # levels 0, 1 and 2
    assert_order_independent(lambda: backend.typical_accept(drafts, logits, tree=tree), TYPICAL)


@pytest.mark.parametrize("V", [300, 4500])  # 4500: rows split over several blocks
def test_greedy_verify(backend, V):
    gen = torch.Generator().manual_seed(1)
    B, K = 3, 4
    logits = torch.randn(B, K + 1, V, generator=gen)
    drafts = logits[:, :K].argmax(-1)
    drafts[1, 2] = (drafts[1, 2] + 1) % V  # one rejection
    logits[2, 1, 5] = float("nan")
    assert_order_independent(lambda: backend.greedy_verify(drafts, logits), GREEDY)


@pytest.mark.parametrize("top_k, top_p, V", [(0, 1.0, 300), (20, 0.9, 300), (20, 0.9, 2000)])
def test_sample_cfg(backend, top_k, top_p, V):
    """Two warps a row up to 1024 tokens, eight beyond."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 3, V, generator=gen) * 3
    assert_order_independent(
        lambda: backend.sample_cfg(logits, cfg=2.0, scale_index=3, num_scales=10, top_k=top_k, top_p=top_p, seed=9),
        {"sample_cfg"},
    )


@pytest.mark.parametrize("V, kw", [
    (300, dict(num_transfer=torch.tensor([2, 5]), confidence="margin")),
    (300, dict(threshold=0.3, confidence="neg_entropy", temperature=0.8)),
    (2000, dict(factor=1.0, temperature=1.0)),
])
def test_diffusion_unmask(backend, V, kw):
    """The scoring kernel (two warps a row up to 1024 tokens, eight beyond; argmax and sampling) and the selection
    kernel; x is written in place, so each run starts from a copy."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 12, V, generator=gen) * 3
    x = torch.randint(0, V - 1, (2, 12), generator=gen)
    x[:, 2:11:2] = V - 1
    x[1, 3] = V - 1

    def run():
        out = x.clone()
        with backend.using_ops():
            res = fastar.diffusion_unmask(logits, out, mask_id=V - 1, block_start=1, block_end=11, seed=5, **kw)
        return (out, *res)

    assert_order_independent(run, {"diffusion_unmask"})


# (B, Hq, Hkv, Lq, Lk, D, dtype), kernels: decode (G * Lq <= 8) with and without kv splits, tiled, D past one
# chunk, and the tensor-core kernel (16-bit, G * Lq >= 16): swizzled and padded rows, two stages, kv splits.
DECODE, SPLIT = {"attention_vec_decode"}, {"attention_merge"}
ATTENTION_SHAPES = [
    ((1, 4, 1, 2, 300, 64, torch.bfloat16), DECODE | SPLIT),  # 3 kv splits
    ((2, 2, 2, 1, 40, 32, torch.bfloat16), {"attention_decode"}),  # D = 32: the CUDA-core decode kernel
    ((1, 2, 1, 5, 260, 32, torch.bfloat16), {"attention_tiled"} | SPLIT),
    ((1, 4, 2, 9, 70, 64, torch.bfloat16), {"attention_tc"}),  # 18 rows
    ((1, 4, 1, 16, 300, 128, torch.float16), {"attention_tc"} | SPLIT),  # 64 rows
    ((2, 2, 2, 20, 150, 80, torch.bfloat16), {"attention_tc"}),  # padded rows, three tiles per block
    ((1, 2, 1, 17, 100, 256, torch.bfloat16), {"attention_tc"}),  # 32-key tiles
]


@pytest.mark.parametrize("shape, kernels", ATTENTION_SHAPES,
                         ids=lambda s: "x".join(map(str, s)).replace("torch.", "") if isinstance(s, tuple) else "")
def test_attention(backend, shape, kernels):
    B, Hq, Hkv, Lq, Lk, D, dtype = shape
    gen = torch.Generator().manual_seed(3)
    q = make((B, Hq, Lq, D), dtype, gen)
    k = make((B, Hkv, Lk, D), dtype, gen)
    v = make((B, Hkv, Lk, D), dtype, gen)
    assert_order_independent(lambda: backend.attention(q, k, v, mask=fastar.masks.Causal(), return_lse=True), kernels)


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
                                                                     block_table=block_table)[0], DECODE | SPLIT)


def test_scale_attention(backend):
    layout = ScaleLayout((1, 2, 4), local_window=1)
    L = layout.num_tokens
    gen = torch.Generator().manual_seed(4)
    q, k, v = (make((1, 2, L, 64), torch.float16, gen) for _ in range(3))
    assert_order_independent(lambda: backend.scale_attention(q, k, v, layout, qk_norm=True, return_lse=True),
                             {"attention_tc"})


# Quantized caches: (B, Hq, Hkv, Lq, Lk, D, q dtype, format, paged), kernels. Every kernel that reads codes: the
# decode kernel (with kv splits, paged), the tensor-core kernel (two stages of code tiles, a causal partial tile,
# padded rows at D = 80) and the tiled kernel (fp32 with many rows; a head dim of no decode instance).
QUANTIZED_SHAPES = [
    ((1, 4, 1, 1, 300, 64, torch.float32, "int8", False), DECODE | SPLIT),
    ((2, 4, 2, 1, 100, 128, torch.bfloat16, "fp8_e4m3", True), DECODE),
    ((1, 4, 2, 9, 150, 64, torch.bfloat16, "fp8_e5m2", False), {"attention_tc"}),
    ((1, 4, 2, 9, 70, 80, torch.float16, "int8", True), {"attention_tc"}),
    ((1, 2, 1, 9, 70, 64, torch.float32, "fp8_e4m3", False), {"attention_tiled"}),
    ((2, 2, 2, 1, 40, 32, torch.bfloat16, "int8", False), {"attention_tiled"}),
]


@pytest.mark.parametrize("shape, kernels", QUANTIZED_SHAPES,
                         ids=lambda s: "x".join(map(str, s)).replace("torch.", "") if isinstance(s, tuple) else "")
def test_quantized_attention(backend, shape, kernels):
    B, Hq, Hkv, Lq, Lk, D, dtype, fmt, paged = shape
    gen = torch.Generator().manual_seed(8)
    bt, total = paged_layout(B, Lk // 10, gen) if paged else (None, None)
    k_codes, v_codes, k_scale, v_scale, *_ = quantized_cache(gen, B, Lk, Hkv, D, fmt, dtype, bt,
                                                             (total, 10) if paged else None)
    q = make((B, Lq, Hq, D), dtype, gen)
    lens = torch.tensor([Lk - 3 * b for b in range(B)])
    assert_order_independent(lambda: backend.attention_with_kvcache(
        q, k_codes, v_codes, cache_seqlens=lens, block_table=bt, k_scale=k_scale, v_scale=v_scale,
        mask=fastar.masks.Causal() if Lq > 1 else None)[0], kernels)


# KIVI caches: (format, G, Lq, paged, cache length), kernels. The KIVI decode kernel (G = 32: several chunks per
# warp, the window, kv splits), the tiled kernel (G = 8, which the decode kernel does not take; a shorter cache, as
# it is the slowest under the race check) and the tensor-core kernel (18 rows: GQA 2 x 9 positions; tiles across
# the splits, a partial causal tile).
KIVI_SHAPES = [
    (("int4", 32, 1, True, 200), {"attention_kivi_decode", "attention_merge"}),
    (("int2", 64, 2, False, 200), {"attention_kivi_decode", "attention_merge"}),
    (("int4", 8, 3, False, 72), {"attention_tiled", "attention_merge"}),
    (("int4", 32, 9, True, 200), {"attention_tc", "attention_merge"}),
    (("int2", 8, 9, False, 200), {"attention_tc", "attention_merge"}),
]


@pytest.mark.parametrize("shape, kernels", KIVI_SHAPES,
                         ids=lambda s: "-".join(map(str, s)) if isinstance(s, tuple) else "")
def test_kivi_attention(backend, shape, kernels):
    fmt, G, Lq, paged, L = shape
    gen = torch.Generator().manual_seed(9)
    B, Hkv, Hq, D = 2, 2, 4, 64
    layout = dict(num_pages=8, page_size=64) if paged else dict(capacity=256)
    cache = backend.quantized_kvcache(B, Hkv, D, format=fmt, group_size=G, residual=G, dtype=torch.bfloat16, **layout)
    k, v = (make((B, Hkv, L, D), torch.bfloat16, gen) for _ in range(2))
    cache.append(k, v, lengths=[L, L // 2 - 10])
    q = make((B, Hq, Lq, D), torch.bfloat16, gen)
    assert_order_independent(lambda: cache.attend(q, mask=fastar.masks.Causal() if Lq > 1 else None, return_lse=True),
                             kernels)


@pytest.mark.parametrize("fmt", [torch.int8, torch.float8_e5m2])
def test_quantize_kv_append(backend, fmt):
    gen = torch.Generator().manual_seed(6)
    key, value = (torch.randn(5, 3, 64, generator=gen).to(torch.bfloat16) for _ in range(2))
    slots = torch.tensor([2, -1, 0, 6, 3])

    def run():
        caches = [torch.zeros(7, 3, 64, dtype=torch.uint8).view(fmt) for _ in range(2)]
        scales = [torch.zeros(7, 3) for _ in range(2)]
        with backend.using_ops():
            fastar.quantize_kv_append(key, value, slots, *caches, *scales)
        return tuple(t.view(torch.uint8) if t.dtype == fmt else t for t in caches + scales)

    assert_order_independent(run, {"quantize_kv_append"})


def test_quantize_kivi_append(backend):
    gen = torch.Generator().manual_seed(7)
    key, value = (torch.randn(8, 3, 32, generator=gen).to(torch.bfloat16) for _ in range(2))

    def run():
        codes = [torch.zeros(16, 3, 16, dtype=torch.uint8) for _ in range(2)]
        meta = [torch.zeros(4, 3, 32, dtype=torch.float16) for _ in range(2)]
        meta += [torch.zeros(16, 3, 8, dtype=torch.float16) for _ in range(2)]
        with backend.using_ops():
            fastar.quantize_kivi_append(key, value, torch.tensor([2, 0]), torch.arange(8) * 2, *codes, *meta,
                                        group_size=4)
        return tuple(codes + meta)

    assert_order_independent(run, {"quantize_kivi_keys", "quantize_kivi_values"})


def pairs(values):
    return list(zip(values[0::2], values[1::2]))


RACE_FREE = ["pair_sum", "cp_async_reload", "table_refill", "warp_exchange"]


@pytest.mark.parametrize("name", RACE_FREE)
def test_race_free_selftests_pass_in_every_mode(name):
    for schedule, race_check in [("forward", False)] + MODES:
        with emulator(schedule, race_check):
            assert all(got == want for got, want in pairs(simt.selftest(name))), schedule


RACE = (r"shared-memory race in kernel '{kernel}', block \(0,0,0\): thread \({a},0,0\) {did_a} word \d+ .* of the "
        r"__shared__ variables and thread \({b},0,0\) {did_b} it ")


def race(kernel, a, did_a, b, did_b):
    return RACE.format(kernel=kernel, a=a, did_a=did_a, b=b, did_b=did_b)


# (planted bug, schedule, what the report must say): each kind of race, as the schedule meets it first. Under
# forward the thread that releases a barrier runs on, then the others in thread order; reverse runs the highest first.
PLANTED = [
    ("pair_sum_missing_sync", "forward",
     race("pair_sum_kernel", 0, "wrote", 1, "wrote") + "since the start of the block, with no __syncthreads"),
    ("missing_syncthreads", "forward",
     race("neighbour_kernel", 127, "read", 0, "wrote") + r"since the __syncthreads at .*selftest\.cpp:\d+:\d+, with"),
    ("missing_syncthreads", "reverse", race("neighbour_kernel", 127, "wrote", 126, "read")),
    ("table_refill_missing_sync", "forward", race("table_refill_kernel", 3, "wrote", 5, "read")),
    ("table_refill_missing_sync", "reverse", race("table_refill_kernel", 41, "read", 31, "wrote")),
    ("warp_exchange_missing_syncwarp", "forward",
     race("warp_exchange_kernel", 0, "read", 1, "wrote") + r".*\(or __syncwarp over both\)"),
    ("warp_exchange_missing_syncwarp", "reverse", race("warp_exchange_kernel", 63, "read", 62, "wrote")),
    ("cp_async_reload_missing_wait", "forward",
     race("cp_async_reload_kernel", r"\d+", "issued a cp.async into", r"\d+", "read")
     + "since the __syncthreads .* before the cp.async.wait_group that lands the copy"),
]


@pytest.mark.parametrize("name, schedule, report", PLANTED, ids=lambda v: v if len(str(v)) < 40 else "")
def test_planted_race_is_reported(name, schedule, report):
    with emulator(schedule, True):
        with pytest.raises(RuntimeError, match=report):
            simt.selftest(name)


@pytest.mark.parametrize("schedule", [schedule for schedule, _ in MODES[1:]])
def test_missing_syncthreads_changes_results_between_schedules(schedule):
    results = {}
    for s in ["forward", schedule]:
        with emulator(s, False):
            results[s] = simt.selftest("pair_sum_missing_sync")
    assert results["forward"] != results[schedule]


def test_missing_cp_async_wait_in_an_mma_tile_is_reported():
    args = (True, True, [1.0] * 256, [1.0] * 128, [0.0] * 128)
    with emulator("forward", True):
        assert simt.mma_tile(*args, False) == [16.0] * 128
        with pytest.raises(RuntimeError, match=r"race in kernel 'mma_tile_kernel'.* read it .* before the "
                           r"cp\.async\.wait_group that lands the copy"):
            simt.mma_tile(*args, True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["16-byte chunks", "2-byte chunks"])
def test_compact_kv(backend, dtype):
    """Paged caches of two stacked layers whose rows are 16-byte chunks (D = 32 bf16) or 2-byte ones (D = 5 fp16,
    30-byte rows); paths that read positions later steps write (an in-order move per thread)."""
    gen = torch.Generator().manual_seed(8)
    D = 32 if dtype == torch.bfloat16 else 5
    caches = [torch.randn(2, 9, 4, 3, D, generator=gen).to(dtype) for _ in range(2)]
    path = torch.tensor([[0, 2, 3, 6], [0, 1, 5, -1], [1, 2, 4, 7]], dtype=torch.int32)
    accepted = torch.tensor([3, 2, 4], dtype=torch.int32)
    table = torch.tensor([[3, 0, 5], [1, 8, 2], [7, 4, 6]], dtype=torch.int32)

    def run():
        k, v = (c.clone() for c in caches)
        with backend.using_ops():
            lengths = fastar.compact_kv(k, v, path, accepted, torch.tensor([2, 3, 1]), num_nodes=8,
                                        root_in_path=False, block_table=table, stacked=True)
        return lengths, k, v

    assert_order_independent(run, {"compact_kv"})
