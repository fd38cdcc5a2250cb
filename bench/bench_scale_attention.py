"""Next-scale (VAR) attention: fastar.scale_attention's full block-causal pass against SDPA with the dense mask
and compiled FlexAttention; VAR's cached sampling loop (ScaleKVCache + sample_cfg against torch.cat + SDPA +
VAR's top-k/top-p sampler); attention over a ScaleKV-compressed cache."""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

import fastar
from bench import bench_attention, bench_sample_cfg, common
from fastar.reference import sample_cfg_reference

VAR_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # 680 tokens
VAR_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)  # 2240 tokens
# VAR's FID sampling settings (docs/sampling.md): CFG 1.5 ramped over the scales, top-k 900, top-p 0.96.
CFG, TOP_K, TOP_P = 1.5, 900, 0.96
# Spread of the random logits (VAR-d16's codebook of 4096): softmax(3 * randn) over 4096 leaves ~40% of the
# vocabulary in the top-p 0.96 mass, so top-k and top-p both cut.
LOGIT_SCALE = 3.0


@dataclasses.dataclass(frozen=True)
class ScaleCase:
    """kind "full": the whole sequence's block-causal pass ([B, H, L, D] q, k, v); "loop": VAR's cached
    sampling loop over `layers` layers, B images with CFG (2B rows), a codebook of `vocab`; "cached": the last
    scale's attention over a layer's cache, compressed by ScaleKV to `budget` keys at every scale (None: not
    compressed)."""

    kind: str
    scales: Tuple[int, ...]
    B: int
    H: int
    D: int
    dtype: torch.dtype
    goal: Optional[float] = None  # the speed-up over the PyTorch way aimed at
    local_window: Optional[int] = None
    layers: int = 0
    vocab: int = 0
    budget: Optional[int] = None

    @property
    def layout(self) -> fastar.ScaleLayout:
        return fastar.ScaleLayout(self.scales, local_window=self.local_window)

    @property
    def tokens(self) -> int:
        return sum(s * s for s in self.scales)

    @property
    def rows(self) -> int:
        """Batch rows of the attention: 2B (CFG) in the loop."""
        return 2 * self.B if self.kind == "loop" else self.B

    @property
    def id(self) -> str:
        extra = {"full": f"-W{self.local_window}" if self.local_window is not None else "",
                 "loop": f"-layers{self.layers}-V{self.vocab}",
                 "cached": f"-budget{self.budget}" if self.budget is not None else "-full"}[self.kind]
        return f"L{self.tokens}-B{self.B}-H{self.H}-D{self.D}{extra}-{common.DTYPE_NAMES[self.dtype]}"

    @property
    def shape(self) -> str:
        if self.kind == "full":
            window = f" W={self.local_window}" if self.local_window is not None else ""
            return f"L={self.tokens} B={self.B} H={self.H} D={self.D}{window}"
        if self.kind == "loop":
            return f"VAR-d16 {self.layers} of 16 layers, B={self.B}x2 cfg, L={self.tokens}, V={self.vocab}"
        keys = f"ScaleKV {self.budget}" if self.budget is not None else "full cache"
        return f"last scale, {keys}, L={self.tokens} B={self.B} H={self.H}"

    def small(self) -> ScaleCase:
        """One image (or sequence) and two heads over the first seven scales (91 tokens), one layer and a
        budget of 32: pytest's smoke run."""
        budget = None if self.budget is None else 32
        return dataclasses.replace(self, scales=self.scales[:7], B=1, H=2, layers=min(self.layers, 1), budget=budget)


CASES = [
    *(ScaleCase("full", scales, 2, 16, 64, dtype, goal=1.6) for scales in (VAR_256, VAR_512)
      for dtype in (torch.float32, torch.bfloat16)),
    *(ScaleCase("full", scales, 2, 16, 64, dtype, goal=2.5, local_window=2) for scales in (VAR_256, VAR_512)
      for dtype in (torch.float32, torch.bfloat16)),
    ScaleCase("loop", VAR_256, 8, 16, 64, torch.float32, goal=1.5, layers=4, vocab=4096),
    ScaleCase("cached", VAR_512, 2, 16, 64, torch.float32),
    ScaleCase("cached", VAR_512, 2, 16, 64, torch.float32, budget=256),
]


# ---------------------------------------------------------------------------------------------------------
# Full block-causal pass


def make_full(case: ScaleCase, device: str) -> dict:
    """q, k, v [B, H, L, D], the layout and the dense bool mask [L, L] users build from it once for SDPA."""
    gen = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(case.B, case.H, case.tokens, case.D, generator=gen, device=device, dtype=case.dtype)
               for _ in range(3))
    layout = case.layout
    return {"case": case, "layout": layout, "q": q, "k": k, "v": v, "dense": layout.materialize(device)}


def run_fastar_full(x: dict, seed: int) -> torch.Tensor:
    return fastar.scale_attention(x["q"], x["k"], x["v"], x["layout"])


def run_sdpa_full(x: dict, seed: int) -> torch.Tensor:
    return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], attn_mask=x["dense"])


def flex_mask_mod(layout: fastar.ScaleLayout, device: str):
    """FlexAttention's mask_mod of the layout's rule (fastar.ScaleLayout's docstring), over its token tables."""
    # Separate tensors, not views of one: inductor's CPU flex template rejects views as mask_mod buffers.
    scale_id, y, x = (t.clone() for t in layout.token_info(device).long())
    h, w = (t.contiguous() for t in layout.scale_hw(device).long().unbind(1))
    r = layout.local_window

    def mask_mod(b, head, q_idx, kv_idx):
        sq, sk = scale_id[q_idx], scale_id[kv_idx]
        visible = sk <= sq
        if r is None:
            return visible
        # The key's cell centre on the query's grid.
        my = ((2 * y[kv_idx] + 1) * h[sq]) // (2 * h[sk])
        mx = ((2 * x[kv_idx] + 1) * w[sq]) // (2 * w[sk])
        near = ((my - y[q_idx]).abs() <= r) & ((mx - x[q_idx]).abs() <= r)
        return visible & ((sk == sq) | near)

    return mask_mod


def compile_flex(case: ScaleCase, x: dict, device: str):
    """torch.compile'd flex_attention with the layout's block mask built once: compile_flex_mask's."""
    L = case.tokens
    return bench_attention.compile_flex_mask(flex_mask_mod(x["layout"], device), L, L, False, x, device,
                                             f"scale_attention[{case.id}]")


def more_full(case: ScaleCase, x: dict, device: str, quick: bool) -> tuple[dict, dict]:
    """Compiled FlexAttention, not in a --quick run (compiling takes 10-15 s a shape)."""
    if quick:
        return {}, {}
    run_flex, prepared = compile_flex(case, x, device)
    return {"flex": run_flex}, prepared


def agree_full(x: dict, fastar_runs: list, baseline_runs: list) -> None:
    """float32: the last outputs match to rounding (bench_attention.agree). bfloat16: FlashAttention's error
    ratio (docs/attention.md) against float32 attention over the same inputs, max|fastar - ref| <= 2 max|baseline -
    ref| + 1e-5: outputs of the first scales (a few keys) are values of v, where one bfloat16 rounding of the
    output is larger than a fixed tolerance."""
    if x["q"].dtype == torch.float32:
        bench_attention.agree(x, fastar_runs, baseline_runs)
        return
    ref = F.scaled_dot_product_attention(x["q"].float(), x["k"].float(), x["v"].float(), attn_mask=x["dense"])
    err = (fastar_runs[-1].float() - ref).abs().max().item()
    base = (baseline_runs[-1].float() - ref).abs().max().item()
    assert err <= 2 * base + 1e-5, f"fastar's error {err:.3g} > 2 * the baseline's {base:.3g} + 1e-5"


def metrics_full(case: ScaleCase, x: dict, outputs: list) -> dict:
    """bytes: q, k, v and the output once; flops: 4·D per visible (query, key) pair and head."""
    nbytes = 4 * x["q"].numel() * x["q"].element_size()
    flops = 4 * case.D * case.B * case.H * int(x["dense"].sum())
    return {"bytes": nbytes, "flops": flops, "bound": "compute", "goal": case.goal}


# ---------------------------------------------------------------------------------------------------------
# VAR's cached sampling loop


def make_loop(case: ScaleCase, device: str) -> dict:
    """Per scale: q, k, v [2B, H, h*w, D] (the same for every layer: the timing does not depend on the
    values) and the logits [2B, h*w, V] of the conditional rows then the unconditional ones; VAR's per-head
    query factor."""
    gen = torch.Generator(device).manual_seed(0)
    layout = case.layout
    steps = []
    for h, w in layout.hw:
        q, k, v = (torch.randn(case.rows, case.H, h * w, case.D, generator=gen, device=device, dtype=case.dtype)
                   for _ in range(3))
        logits = torch.randn(case.rows, h * w, case.vocab, generator=gen, device=device).mul_(LOGIT_SCALE)
        steps.append((q, k, v, logits))
    # exp(min(s_h, log 100)) of VAR's learned scale_mul_1H11, which starts at log 4 and spreads in training.
    q_scale = torch.empty(case.H, device=device).uniform_(2.0, 8.0, generator=gen)
    return {"case": case, "layout": layout, "steps": steps, "q_scale": q_scale}


def sampling(layout: fastar.ScaleLayout, scale_index: int) -> dict:
    """fastar.sample_cfg's keyword arguments (but seed and offset) at scale scale_index: VAR's FID settings."""
    return {"cfg": CFG, "schedule": "var", "scale_index": scale_index, "num_scales": layout.num_scales,
            "top_k": TOP_K, "top_p": TOP_P}


def run_fastar_loop(x: dict, seed: int) -> tuple:
    """Per scale and layer, ScaleKVCache.append + attend (qk_norm in the kernel); per scale, fastar.sample_cfg.
    Returns (tokens int64 [B, L], the last attention output)."""
    case, layout = x["case"], x["layout"]
    caches = [fastar.ScaleKVCache(case.rows, case.H, case.D, layout, case.dtype, x["q_scale"].device)
              for _ in range(case.layers)]
    tokens = []
    for s, (q, k, v, logits) in enumerate(x["steps"]):
        for cache in caches:
            cache.append(k, v)
            out = cache.attend(q, qk_norm=True, q_scale=x["q_scale"])
        tokens.append(fastar.sample_cfg(logits, seed=seed, offset=layout.starts[s], **sampling(layout, s)))
    return torch.cat(tokens, 1), out


def run_torch_loop(x: dict, seed: int) -> tuple:
    """VAR's loop today: per layer, L2-normalise q and k, torch.cat k and v onto the cache, SDPA; per scale,
    bench_sample_cfg.torch_sample_cfg (VAR's sampler). Returns (tokens int64 [B, L], the last attention output)."""
    case, layout = x["case"], x["layout"]
    scale_mul = x["q_scale"].view(1, case.H, 1, 1)
    cached = [None] * case.layers
    tokens = []
    for s, (q, k, v, logits) in enumerate(x["steps"]):
        for layer in range(case.layers):
            qn, kn = F.normalize(q, dim=-1).mul(scale_mul), F.normalize(k, dim=-1)
            ck, cv = (kn, v) if cached[layer] is None else (torch.cat((cached[layer][0], kn), 2),
                                                            torch.cat((cached[layer][1], v), 2))
            cached[layer] = ck, cv
            out = F.scaled_dot_product_attention(qn, ck, cv, scale=1.0)
        tokens.append(bench_sample_cfg.torch_sample_cfg(logits, **sampling(layout, s)))
    return torch.cat(tokens, 1), out


def check_loop(case: ScaleCase, x: dict, out: tuple) -> None:
    """Tokens int64 [B, L], every one in its position's top-k set and (but for a few on the top-p boundary,
    where float rounding differs) in its top-p set of the float64 reference; the attention output finite."""
    tokens, attention = out
    assert tokens.dtype == torch.int64 and tokens.shape == (case.B, case.tokens), (tokens.dtype, tokens.shape)
    assert ((tokens >= 0) & (tokens < case.vocab)).all(), "a token outside [0, V)"
    outside_top_k = outside_top_p = 0
    layout = x["layout"]
    for s, (*_, logits) in enumerate(x["steps"]):
        chosen = tokens[:, layout.starts[s] : layout.ends[s]].to(logits.device).unsqueeze(-1)
        kwargs = sampling(layout, s)
        outside_top_k += int((sample_cfg_reference(logits, **dict(kwargs, top_p=1.0)).gather(-1, chosen) == 0).sum())
        outside_top_p += int((sample_cfg_reference(logits, **kwargs).gather(-1, chosen) == 0).sum())
    assert outside_top_k == 0, f"{outside_top_k} tokens outside the top-{TOP_K}"
    assert outside_top_p <= bench_sample_cfg.TOP_P_SLACK * tokens.numel(), (
        f"{outside_top_p} of {tokens.numel()} tokens outside top-p")
    assert attention.shape == x["steps"][-1][0].shape and torch.isfinite(attention).all()


def agree_loop(x: dict, fastar_runs: list, baseline_runs: list) -> None:
    """The last attention outputs match (the tokens come from different random streams: check_loop)."""
    torch.testing.assert_close(baseline_runs[-1][1].float(), fastar_runs[-1][1].float(),
                               **bench_attention.TOLERANCES[x["case"].dtype])


def attention_pairs(layout: fastar.ScaleLayout) -> int:
    """(query, key) pairs of cached inference: each scale's tokens against every token so far."""
    return sum((end - start) * end for start, end in zip(layout.starts, layout.ends))


def metrics_loop(case: ScaleCase, x: dict, outputs: list) -> dict:
    """bytes: per layer and scale, q, the cache's K/V so far and the output; plus the logits once. flops:
    4·D per (query, key) pair and head, per layer."""
    layout = x["layout"]
    element = torch.finfo(case.dtype).bits // 8
    per_layer = sum(2 * (e - s) + 2 * e for s, e in zip(layout.starts, layout.ends)) * case.rows * case.H * case.D
    logits = sum(step[3].numel() * step[3].element_size() for step in x["steps"])
    pairs = attention_pairs(layout)
    return {"bytes": case.layers * per_layer * element + logits, "bound": "compute", "goal": case.goal,
            "flops": 4 * case.D * case.rows * case.H * pairs * case.layers}


# ---------------------------------------------------------------------------------------------------------
# Attention over a (ScaleKV-compressed) cache


def make_cached(case: ScaleCase, device: str) -> dict:
    """A layer's ScaleKVCache after every scale (compressed after each one, from the first that exceeds the
    budget, when there is a budget), the last scale's queries, and the same K/V as PyTorch holds them:
    contiguous, L2-normalised keys (VAR caches normalised keys)."""
    gen = torch.Generator(device).manual_seed(0)
    layout = case.layout
    cache = fastar.ScaleKVCache(case.B, case.H, case.D, layout, case.dtype, device)
    q_scale = torch.empty(case.H, device=device).uniform_(2.0, 8.0, generator=gen)
    full_bytes = cache.memory_bytes()
    for h, w in layout.hw:
        q, k, v = (torch.randn(case.B, case.H, h * w, case.D, generator=gen, device=device, dtype=case.dtype)
                   for _ in range(3))
        cache.append(k, v)
        if case.budget is not None and (h, w) != layout.hw[-1]:
            cache.compress(q, case.budget, qk_norm=True, q_scale=q_scale)
    return {"case": case, "cache": cache, "q": q, "q_scale": q_scale, "k": F.normalize(cache.keys, dim=-1),
            "v": cache.values.contiguous(), "full_bytes": full_bytes}


def run_fastar_cached(x: dict, seed: int) -> torch.Tensor:
    return x["cache"].attend(x["q"], qk_norm=True, q_scale=x["q_scale"])


def run_sdpa_cached(x: dict, seed: int) -> torch.Tensor:
    q = F.normalize(x["q"], dim=-1).mul(x["q_scale"].view(1, -1, 1, 1))
    return F.scaled_dot_product_attention(q, x["k"], x["v"], scale=1.0)


def metrics_cached(case: ScaleCase, x: dict, outputs: list) -> dict:
    """bytes: q, the cache's K/V and the output; flops: 4·D per (query, key) pair and head; the layer's cache
    memory with and without compression."""
    q, cache = x["q"], x["cache"]
    nbytes = (2 * q.numel() + 2 * cache.keys.numel()) * q.element_size()
    flops = 4 * case.D * q.shape[0] * case.H * q.shape[2] * cache.length
    return {"bytes": nbytes, "flops": flops, "bound": "compute", "goal": case.goal,
            "kv_bytes": cache.memory_bytes(), "kv_full_bytes": x["full_bytes"], "kv_length": cache.length}


def _memory(row: dict) -> str:
    if "kv_bytes" not in row:
        return "-"
    return f"{row['kv_bytes'] / 2**20:.0f}/{row['kv_full_bytes'] / 2**20:.0f} MB"


TABLE = common.Table(
    "scale_attention: fastar.scale_attention over the layout vs SDPA with the dense bool mask built once from"
    " it (W: local_window); flex: torch.compile'd flex_attention, block mask built once, compilation not timed"
    " (not in --quick)\n"
    "scale_kvcache_loop: per scale and layer ScaleKVCache.append + attend (qk_norm fused), then fastar.sample_cfg"
    " vs VAR's loop (normalise, torch.cat the cache, SDPA; CFG mix, top-k, sort/cumsum top-p, multinomial)\n"
    "scale_kvcache_cached: the 1024 queries of the last 512px scale over one layer's cache (ScaleKV: compressed"
    " to budget + 16 keys after every scale) vs SDPA over the same K/V; KV: the layer's cache memory / uncompressed\n"
    "median time per call, cold caches; GFLOP/s: 4·D per visible (query, key) pair and head / time; goal: the"
    " speed-up aimed at; others: share of the cores other processes used meanwhile",
    [
        ("op", 22, lambda r: r["op"]),
        ("shape", 48, lambda r: r["shape"]),
        ("dtype", 5, lambda r: r["dtype"]),
        ("fastar", 9, lambda r: common.format_time(r["fastar_s"])),
        ("torch", 9, lambda r: common.format_time(r["torch_s"])),
        ("speed-up", 8, lambda r: f"{r['speedup']:.1f}x"),
        ("goal", 9, lambda r: "-" if r["goal"] is None else f"{r['goal']:g}x " + ("ok" if r["speedup"] >= r["goal"]
                                                                                 else "MISS")),
        ("GFLOP/s", 7, lambda r: f"{r['fastar_GFLOPs']:.1f}"),
        ("flex", 9, lambda r: bench_attention._if(r, "flex_s", common.format_time)),
        ("vs flex", 7, lambda r: bench_attention._if(r, "speedup_vs_flex", lambda s: f"{s:.1f}x")),
        ("KV", 11, _memory),
        ("others", 6, lambda r: common.format_share(r["others_cpu_share"])),
    ],
)

BENCHES = [
    common.OpBench("scale_attention", [c for c in CASES if c.kind == "full"], make_full, run_fastar_full,
                   run_sdpa_full, bench_attention.check, agree_full, metrics_full, TABLE, more_full),
    common.OpBench("scale_kvcache_loop", [c for c in CASES if c.kind == "loop"], make_loop, run_fastar_loop,
                   run_torch_loop, check_loop, agree_loop, metrics_loop, TABLE),
    common.OpBench("scale_kvcache_cached", [c for c in CASES if c.kind == "cached"], make_cached,
                   run_fastar_cached, run_sdpa_cached, bench_attention.check, bench_attention.agree, metrics_cached,
                   TABLE),
]

# ---------------------------------------------------------------------------------------------------------
# pytest-benchmark (`pytest bench`): the same implementations; at the small shapes under --benchmark-disable.

OPS = {op.name: op for op in BENCHES}
PARAMS = [pytest.param(op, case, id=f"{op.name}-{case.id}") for op in BENCHES for case in op.cases]


@pytest.fixture
def case_inputs(request, op, case):
    if request.config.getoption("benchmark_disable") and not request.config.getoption("benchmark_enable"):
        case = case.small()
    return case, inputs(op.name, case)


@functools.cache
def inputs(op_name: str, case: ScaleCase) -> dict:
    return OPS[op_name].make_inputs(case, "cpu")


@pytest.mark.parametrize("op, case", PARAMS)
def test_scale_fastar(benchmark, op, case_inputs):
    common.benchmark_op(benchmark, op, op.fastar, *case_inputs, rounds=3)


@pytest.mark.parametrize("op, case", PARAMS)
def test_scale_torch(benchmark, op, case_inputs):
    common.benchmark_op(benchmark, op, op.baseline, *case_inputs, rounds=3)


@pytest.mark.parametrize("op, case", PARAMS)
def test_scale_baseline_agrees(op, case_inputs):
    case, x = case_inputs
    out, baseline = op.fastar(x, 0), op.baseline(x, 0)
    op.check(case, x, out)
    op.check(case, x, baseline)
    op.agree(x, [out], [baseline])


@pytest.mark.parametrize("op, case", [p for p in PARAMS if p.values[1].kind == "full"])
def test_scale_flex_agrees(benchmark, op, case_inputs):
    if benchmark.disabled:
        pytest.skip("compiling flex_attention takes 10-15 s a shape")
    case, x = case_inputs
    run_flex, _ = compile_flex(case, x, "cpu")
    op.agree(x, [run_fastar_full(x, 0)], [run_flex(x, 0)])


def test_scale_agree_catches_a_wrong_mask():
    """Attending to every key instead of the block-causal ones fails `agree`: its tolerances are tight enough."""
    for case in CASES[:2]:
        x = make_full(case.small(), "cpu")
        with pytest.raises(AssertionError):
            agree_full(x, [fastar.attention(x["q"], x["k"], x["v"])], [run_sdpa_full(x, 0)])


def test_scale_check_loop_catches_tokens_outside_top_k():
    """check_loop rejects tokens drawn without the top-k filter."""
    case = next(c for c in CASES if c.kind == "loop").small()
    x = make_loop(case, "cpu")
    tokens, attention = run_torch_loop(x, 0)
    layout = x["layout"]
    least = torch.cat([sample_cfg_reference(step[3], **sampling(layout, s)).argmin(-1)
                       for s, step in enumerate(x["steps"])], 1)
    check_loop(case, x, (tokens, attention))
    with pytest.raises(AssertionError, match="outside the top"):
        check_loop(case, x, (least, attention))
