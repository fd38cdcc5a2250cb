"""fastar.attention against torch's scaled_dot_product_attention as users call it today, and against compiled
FlexAttention for the masked rows: decoding, tree verification, a block-diffusion step, a sliding window."""
from __future__ import annotations

import dataclasses
import functools
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import fastar
from bench import common
from fastar.masks import BlockCausal, Tree, Window

# Medusa's default tree, mc_sim_7b_63 of medusa/model/medusa_choices.py: 63 choices, so 64 nodes with the root.
MC_SIM_7B_63 = [
    [0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0], [0, 5], [0, 0, 1],
    [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2], [3, 0], [0, 9], [8], [9], [1, 0, 0],
    [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1], [0, 0, 4], [0, 0, 5], [0, 0, 0, 0], [0, 1, 1], [0, 0, 6],
    [0, 3, 0], [5, 0], [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0], [1, 4], [7, 0], [0, 1, 2],
    [2, 0, 0], [3, 1], [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1], [9, 0], [0, 6, 0], [0, 0, 0, 1],
    [1, 6], [0, 7, 0],
]
TREE_NODES = len(MC_SIM_7B_63) + 1
# A baseline's output against fastar's (outputs ~0.02-0.1, weighted means of random values): float32 rounding, or
# an output ulp or two of bfloat16; tight enough to catch a wrong mask (test_attention_agree_catches_a_wrong_mask).
TOLERANCES = {torch.float32: {"rtol": 1e-4, "atol": 1e-5}, torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-3}}


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    """B sequences of Lq queries, the last Lq of their Lk key positions; Hq query heads over Hkv kv heads."""

    kind: str  # "decode" (no mask), "tree" (Tree), "block_diff" (BlockCausal), "window" (Window)
    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    dtype: torch.dtype
    goal: float  # the speed-up over SDPA the project aims at
    # % of the read bandwidth the goal stands for, met instead of the speed-up (decode f32: issue 3 aims at
    # 1.5x SDPA "(>= 75% of measured read bandwidth)", SDPA then reaching 50%; where SDPA reaches more than
    # two thirds of it, 1.5x is beyond what memory delivers)
    read_goal: float = 0.0
    window: int = 0  # Window(left=window): the query's own key and the `window` before it
    block: int = 0  # BlockCausal(block_size=block)

    @property
    def id(self) -> str:
        heads = f"H{self.Hq}" + (f"-{self.Hkv}" if self.Hkv != self.Hq else "")
        window = f"-W{self.window}" if self.window else ""
        return f"B{self.B}-{heads}-q{self.Lq}-kv{self.Lk}-D{self.D}{window}-{common.DTYPE_NAMES[self.dtype]}"

    @property
    def shape(self) -> str:
        heads = f"H={self.Hq}" + (f"/{self.Hkv}" if self.Hkv != self.Hq else "")
        keys = f"kv={self.Lk - self.Lq}+{self.Lq}" if self.Lq > 1 else f"kv={self.Lk}"
        window = f" W={self.window}" if self.window else ""
        return f"B={self.B} {heads} q={self.Lq} {keys} D={self.D}{window}"

    @property
    def bound(self) -> str:
        """What bounds the row: memory to decode (each key is read for one query), else compute."""
        return "memory" if self.Lq == 1 else "compute"

    def small(self) -> AttentionCase:
        """At most 2 sequences and 1/8 of the keys before the queries (and of the window): pytest's smoke run."""
        prefix = (self.Lk - self.Lq) // 8
        return dataclasses.replace(self, B=min(self.B, 2), Lk=prefix + self.Lq, window=self.window // 8)


CASES = [
    AttentionCase("decode", 8, 16, 16, 1, 2048, 64, torch.float32, goal=1.5, read_goal=75.0),
    AttentionCase("decode", 8, 16, 16, 1, 2048, 64, torch.bfloat16, goal=3.0),
    AttentionCase("tree", 4, 32, 8, TREE_NODES, 4096 + TREE_NODES, 128, torch.bfloat16, goal=1.3),
    AttentionCase("block_diff", 8, 16, 16, 32, 2048 + 32, 128, torch.float32, goal=1.2, block=32),
    AttentionCase("window", 1, 32, 8, 1, 32768, 128, torch.float32, goal=8.0, window=4096),
]


def fastar_mask(case: AttentionCase):
    if case.kind == "tree":
        return Tree.from_choices(MC_SIM_7B_63)
    if case.kind == "block_diff":  # the queries are the last block, so every key is visible
        return BlockCausal(block_size=case.block)
    if case.kind == "window":
        return Window(case.window)
    return None


def make_inputs(case: AttentionCase, device: str = "cpu") -> dict:
    """Random q, k, v ([B, H, L, D]: the KV cache and the queries' own keys), fastar's mask, and the bool
    [Lq, Lk] mask it stands for (the same for every sequence)."""
    gen = torch.Generator(device).manual_seed(0)

    def randn(heads: int, length: int) -> torch.Tensor:
        return torch.randn(case.B, heads, length, case.D, generator=gen, dtype=case.dtype, device=device)

    mask = fastar_mask(case)
    visible = (
        torch.ones(case.Lq, case.Lk, dtype=torch.bool, device=device)
        if mask is None
        else mask.materialize(case.Lq, case.Lk, device=device)[0]
    )
    q, k, v = randn(case.Hq, case.Lq), randn(case.Hkv, case.Lk), randn(case.Hkv, case.Lk)
    return {"case": case, "q": q, "k": k, "v": v, "mask": mask, "visible": visible}


def sdpa_mask(x: dict):
    """The bool mask [Lq, Lk] (True = attend) users build for SDPA at every call today, or None."""
    case, device = x["case"], x["q"].device
    if case.kind == "tree":
        # Medusa / EAGLE keep the tree's own [T, T] mask and put it after the prefix, which every node sees.
        mask = torch.ones(case.Lq, case.Lk, dtype=torch.bool, device=device)
        mask[:, case.Lk - case.Lq :] = x["visible"][:, case.Lk - case.Lq :]
        return mask
    if case.kind == "window":
        pos = torch.arange(case.Lk, device=device)
        query_pos = torch.arange(case.Lk - case.Lq, case.Lk, device=device).unsqueeze(1)
        return (pos <= query_pos) & (pos >= query_pos - case.window)
    return None  # decoding, and a block-diffusion step: every key is visible


def run_fastar(x: dict, seed: int) -> torch.Tensor:
    return fastar.attention(x["q"], x["k"], x["v"], mask=x["mask"])


def run_sdpa(x: dict, seed: int) -> torch.Tensor:
    case = x["case"]
    return F.scaled_dot_product_attention(
        x["q"], x["k"], x["v"], attn_mask=sdpa_mask(x), enable_gqa=case.Hq != case.Hkv
    )


def run_sdpa_slice(x: dict, seed: int) -> torch.Tensor:
    """SDPA on a view of the window's keys alone (one query: no mask left), for users who slice the cache."""
    case = x["case"]
    start = case.Lk - 1 - case.window
    k, v = x["k"][:, :, start:], x["v"][:, :, start:]
    return F.scaled_dot_product_attention(x["q"], k, v, enable_gqa=case.Hq != case.Hkv)


def flex_mask_mod(x: dict):
    """FlexAttention's mask_mod for the case's mask: query q_idx sits at key position q_idx + Lk - Lq."""
    case = x["case"]
    offset = case.Lk - case.Lq
    if case.kind == "tree":
        tree = x["visible"][:, offset:].contiguous()  # [T, T]: node t sees itself and its ancestors

        def mask_mod(b, h, q_idx, kv_idx):
            node = kv_idx - offset
            return (node < 0) | tree[q_idx, node.clamp(min=0)]

    elif case.kind == "block_diff":

        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx // case.block <= (q_idx + offset) // case.block

    else:

        def mask_mod(b, h, q_idx, kv_idx):
            pos = q_idx + offset
            return (kv_idx <= pos) & (kv_idx >= pos - case.window)

    return mask_mod


def compile_flex(case: AttentionCase, x: dict, device: str):
    """torch.compile'd flex_attention with the case's block mask built once (the same at every step: the
    tree's own mask is a tensor mask_mod reads; the mask's blocks do not change): compile_flex_mask's."""
    return compile_flex_mask(flex_mask_mod(x), case.Lq, case.Lk, case.Hq != case.Hkv, x, device,
                             f"attention_{case.kind}[{case.id}]")


def compile_flex_mask(mask_mod, Lq: int, Lk: int, gqa: bool, x: dict, device: str, label: str):
    """torch.compile'd flex_attention of x's q, k, v with mask_mod's block mask built once, and its first call,
    which compiles. Returns (fn, the seconds the block mask and the first call took)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    start = time.perf_counter()
    block_mask = create_block_mask(mask_mod, None, None, Lq, Lk, device=device)
    built = time.perf_counter()
    # Every case's shapes and mask recompile the one flex_attention frame; past dynamo's recompile limit (8)
    # it would run uncompiled (and warn), so each case starts from a fresh cache.
    torch._dynamo.reset()
    flex = torch.compile(flex_attention, dynamic=False)

    def run_flex(x: dict, seed: int) -> torch.Tensor:
        return flex(x["q"], x["k"], x["v"], block_mask=block_mask, enable_gqa=gqa)

    run_flex(x, 0)
    compiled = time.perf_counter()
    print(f"{label}: flex_attention compiled in {compiled - built:.1f} s (first call), block mask built in "
          f"{built - start:.1f} s; neither is timed", file=sys.stderr, flush=True)
    return run_flex, {"flex_compile_s": compiled - built, "flex_block_mask_s": built - start}


def more_baselines(case: AttentionCase, x: dict, device: str, quick: bool) -> tuple[dict, dict]:
    """SDPA on the window's keys alone for the window rows; compiled FlexAttention for the masked rows, but
    not in a --quick run (compiling takes 10-15 s a shape)."""
    more, prepared = {}, {}
    if case.kind == "window":
        more["sdpa_slice"] = run_sdpa_slice
    if case.kind in ("tree", "block_diff", "window") and not quick:
        more["flex"], prepared = compile_flex(case, x, device)
    return more, prepared


def check(case: AttentionCase, x: dict, out: torch.Tensor) -> None:
    """One call's output has q's shape and dtype and is finite; its values are checked by `agree`."""
    q = x["q"]
    assert isinstance(out, torch.Tensor) and out.shape == q.shape and out.dtype == q.dtype, (type(out), out.shape)
    assert torch.isfinite(out).all(), "the output holds NaN or inf"


def agree(x: dict, fastar_runs: list, baseline_runs: list) -> None:
    """The baseline's output of the last round is fastar's, up to the dtype's rounding."""
    torch.testing.assert_close(baseline_runs[-1].float(), fastar_runs[-1].float(), **TOLERANCES[x["q"].dtype])


def metrics(case: AttentionCase, x: dict, outputs: list) -> dict:
    """bytes: q, the K and V rows of the keys some query sees, and the output; flops: 4·D per visible (query,
    key) pair and query head (q·k and p·v, a multiply-add per element each), masked-out pairs not counted."""
    visible = x["visible"]
    keys = int(visible.any(0).sum())
    nbytes = x["q"].element_size() * (2 * x["q"].numel() + 2 * case.B * case.Hkv * keys * case.D)
    flops = 4 * case.D * case.B * case.Hq * int(visible.sum())
    return {"bytes": nbytes, "flops": flops, "bound": case.bound, "goal": case.goal, "read_goal": case.read_goal}


def goal_status(r: dict) -> str:
    """The goal column: the speed-up aimed at and whether it was reached, or its share of the read bandwidth."""
    if r["speedup"] >= r["goal"]:
        return f"{r['goal']:g}x ok"
    if r.get("read_goal") and r["fastar_pct_read"] >= r["read_goal"]:
        return f"{r['read_goal']:g}%rd ok"
    return f"{r['goal']:g}x MISS"


def _if(row: dict, key: str, text) -> str:
    return text(row[key]) if key in row else "-"


TABLE = common.Table(
    "fastar: fastar.attention with the row's fastar.masks mask; SDPA: F.scaled_dot_product_attention as users call"
    " it today (tree, window: the dense bool mask built at each call; H=Hq/Hkv: enable_gqa); median time per call,"
    " cold caches\n"
    "GB/s, % copy, % read (memory-bound rows): q, the K/V of the keys some query sees, the output / time, and its"
    " share of the copy and read bandwidths; %rd ok: the row's goal stated as a share of the read bandwidth; GFLOP/s"
    " (compute-bound rows): 4·D per visible (query, key) pair and query head / time; goal: the speed-up over SDPA"
    " aimed at\n"
    "SDPA slice: SDPA on the window's keys alone; flex: torch.compile'd flex_attention, block mask built once,"
    " compilation not timed (not in --quick); others: share of the cores other processes used meanwhile",
    [
        ("op", 20, lambda r: r["op"]),
        ("shape", 36, lambda r: r["shape"]),
        ("dtype", 5, lambda r: r["dtype"]),
        ("fastar", 9, lambda r: common.format_time(r["fastar_s"])),
        ("SDPA", 9, lambda r: common.format_time(r["torch_s"])),
        ("speed-up", 8, lambda r: f"{r['speedup']:.1f}x"),
        ("goal", 9, goal_status),
        ("GB/s", 6, lambda r: f"{r['fastar_GBps']:.1f}" if r["bound"] == "memory" else "-"),
        ("% copy", 6, lambda r: f"{r['fastar_pct_copy']:.0f}%" if r["bound"] == "memory" else "-"),
        ("% read", 6, lambda r: f"{r['fastar_pct_read']:.0f}%" if r["bound"] == "memory" else "-"),
        ("GFLOP/s", 7, lambda r: f"{r['fastar_GFLOPs']:.1f}" if r["bound"] == "compute" else "-"),
        ("SDPA slice", 10, lambda r: _if(r, "sdpa_slice_s", common.format_time)),
        ("flex", 9, lambda r: _if(r, "flex_s", common.format_time)),
        ("vs flex", 7, lambda r: _if(r, "speedup_vs_flex", lambda s: f"{s:.1f}x")),
        ("others", 6, lambda r: common.format_share(r["others_cpu_share"])),
    ],
)

BENCHES = [
    common.OpBench(
        f"attention_{kind}", [c for c in CASES if c.kind == kind], make_inputs, run_fastar, run_sdpa, check, agree,
        metrics, TABLE, more_baselines,
    )
    for kind in ("decode", "tree", "block_diff", "window")
]

inputs = functools.cache(make_inputs)
PARAMS = [pytest.param(op, case, id=f"{op.name}-{case.id}") for op in BENCHES for case in op.cases]


def params(*kinds: str) -> list:
    return [p for p in PARAMS if p.values[1].kind in kinds]


@pytest.fixture
def case_inputs(request, case):
    """(case, inputs), at 1/8 of the keys under --benchmark-disable (a smoke run)."""
    if request.config.getoption("benchmark_disable") and not request.config.getoption("benchmark_enable"):
        case = case.small()
    return case, inputs(case)


@pytest.mark.parametrize("op, case", PARAMS)
def test_attention_fastar(benchmark, op, case_inputs):
    common.benchmark_op(benchmark, op, op.fastar, *case_inputs, rounds=5)


@pytest.mark.parametrize("op, case", PARAMS)
def test_attention_sdpa(benchmark, op, case_inputs):
    common.benchmark_op(benchmark, op, op.baseline, *case_inputs, rounds=5)


@pytest.mark.parametrize("op, case", params("window"))
def test_attention_sdpa_slice(benchmark, op, case_inputs):
    common.benchmark_op(benchmark, op, run_sdpa_slice, *case_inputs, rounds=5)


@pytest.mark.parametrize("op, case", params("tree", "block_diff", "window"))
def test_attention_flex(benchmark, op, case_inputs):
    if benchmark.disabled:
        pytest.skip("compiling flex_attention takes 10-15 s a shape")
    case, x = case_inputs
    run_flex, _ = compile_flex(case, x, "cpu")
    agree(x, [run_fastar(x, 0)], [run_flex(x, 0)])
    common.benchmark_op(benchmark, op, run_flex, case, x, rounds=5)


@pytest.mark.parametrize("op, case", PARAMS)
def test_attention_baseline_agrees(op, case_inputs):
    case, x = case_inputs
    more, _ = more_baselines(case, x, "cpu", quick=True)  # FlexAttention: test_attention_flex
    out = run_fastar(x, 0)
    check(case, x, out)
    for fn in (run_sdpa, *more.values()):
        baseline = fn(x, 0)
        check(case, x, baseline)
        agree(x, [out], [baseline])


@pytest.mark.parametrize("op, case", params("tree", "window"))
def test_attention_agree_catches_a_wrong_mask(op, case_inputs):
    """Attending to every key instead of the masked ones fails `agree`: its tolerance is tight enough."""
    case, x = case_inputs
    with pytest.raises(AssertionError):
        agree(x, [fastar.attention(x["q"], x["k"], x["v"])], [run_sdpa(x, 0)])
