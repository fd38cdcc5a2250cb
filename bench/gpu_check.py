"""`make gpu-check`: the one prepared check for a machine with an NVIDIA GPU, run unattended.

Steps, each under its own time limit, each recorded even when it fails (a failing step does not stop the next):
  1. build   fastar in place for the local GPU's arch with this interpreter (`setup.py build_ext --inplace`;
             setup.py picks the arch of the GPUs present), so it needs no network: `make gpu-check PY=python3`;
  2. tests   the cuda backend of the test suite (FASTAR_REQUIRE_CUDA_BUILD=1);
  3. sanitizer  compute-sanitizer's memcheck, racecheck, synccheck and initcheck over a small case of every op;
  4. bench   every attention row on the GPU against torch's scaled_dot_product_attention (its flash, cuDNN,
             efficient and math backends, with the mask a user would build) and, when importable, FlashInfer and
             flash-attn; each row's share of the HBM bandwidth (memory-bound rows) or of the tensor-core peak.
Writes bench/results/gpu.json and prints the table. Without a GPU it says so and runs every step's CPU part
instead (the cases, their masks and baselines at small sizes, the roofline arithmetic, the small case of every
op, the sanitizer commands), writing nothing: CI runs it so, to keep this script working. It exits 0 unless that
dry run fails.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "gpu.json"
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
# Seconds per step (the sanitizer's per tool): 460 s in all, under the 8 minutes the check is sized for.
LIMITS = {"build": 150, "tests": 100, "sanitizer": 25, "bench": 110}

# Largest |fastar - SDPA math| accepted on a row: outputs are weighted means of N(0, 1) values in bfloat16.
AGREE_ABS = 0.05
# Dense bf16 tensor-core FLOP/s with fp32 accumulation, and HBM bytes/s, from the vendors' data sheets, by a
# substring of torch.cuda.get_device_name(); a GPU not listed gets its bandwidth measured and no compute peak.
PEAKS = [
    ("H200", 989e12, 4.8e12),
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100", 989e12, 3.35e12),
    ("A100", 312e12, 2.0e12),
    ("L40S", 362e12, 0.864e12),
    ("RTX 4090", 165e12, 1.008e12),
]


@dataclasses.dataclass(frozen=True)
class GpuCase:
    """B sequences of Lq queries, the last of Lk key positions, Hq query heads over Hkv kv heads, bf16; with
    kv_format, K and V are quantized into a cache of that format (fastar.quantize_kv_append, per-token scales)
    that fastar.attention_with_kvcache reads, or (int4 / int2) into a fastar.QuantizedKVCache (KIVI, G = 32) that
    attends, while the SDPA baselines read the bf16 K and V."""

    name: str
    kind: str  # decode | tree | block_diff | var | causal
    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    memory_bound: bool = False
    kv_format: Optional[str] = None

    def small(self) -> "GpuCase":
        """The same case at a size the CPU dry run takes in a moment."""
        if self.kind == "var":
            return dataclasses.replace(self, B=1, Hq=2, Hkv=2)
        lq = self.Lq if self.kind == "tree" else min(self.Lq, 16)
        lk = lq if self.kind == "causal" else lq + 64  # a prefill's queries are all its keys
        return dataclasses.replace(self, B=1, Hq=self.Hq // self.Hkv, Hkv=1, Lq=lq, Lk=lk)


VAR_680 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
VAR_2240 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
CASES = [
    GpuCase("decode", "decode", 8, 16, 16, 1, 2048, 64, memory_bound=True),
    GpuCase("decode GQA 32k", "decode", 8, 32, 8, 1, 32768, 128, memory_bound=True),
    GpuCase("decode int8 GQA 32k", "decode", 8, 32, 8, 1, 32768, 128, memory_bound=True, kv_format="int8"),
    GpuCase("decode fp8 GQA 32k", "decode", 8, 32, 8, 1, 32768, 128, memory_bound=True, kv_format="fp8_e4m3"),
    GpuCase("decode int4 KIVI GQA 32k", "decode", 8, 32, 8, 1, 32768, 128, memory_bound=True, kv_format="int4"),
    GpuCase("tree verify", "tree", 4, 32, 8, 64, 4096 + 64, 128),
    GpuCase("tree verify int4 KIVI 16k", "tree", 4, 32, 8, 64, 16384 + 64, 128, kv_format="int4"),
    GpuCase("block diffusion", "block_diff", 8, 16, 16, 32, 2048 + 32, 128),
    GpuCase("VAR 680", "var", 2, 16, 16, 680, 680, 64),
    GpuCase("VAR 2240", "var", 2, 16, 16, 2240, 2240, 64),
    GpuCase("prefill 4k causal", "causal", 1, 32, 8, 4096, 4096, 128),
]


def scale_layout(case: GpuCase):
    import fastar

    return fastar.ScaleLayout(VAR_680 if case.Lk == 680 else VAR_2240)


def make_inputs(case: GpuCase, device: str) -> dict:
    """q, k, v [B, H, L, D] in bf16, fastar's mask or layout, and the dense bool mask [Lq, Lk] (True = attend)
    a user would give SDPA (None: every key, or SDPA's own is_causal)."""
    from bench.bench_attention import MC_SIM_7B_63
    from fastar.masks import BlockCausal, Tree

    gen = torch.Generator(device).manual_seed(0)

    def randn(heads, length):
        return torch.randn(case.B, heads, length, case.D, generator=gen, device=device, dtype=torch.bfloat16)

    x = {"case": case, "q": randn(case.Hq, case.Lq), "k": randn(case.Hkv, case.Lk), "v": randn(case.Hkv, case.Lk)}
    x["mask"], x["dense"], x["layout"] = None, None, None
    if case.kind == "tree":
        x["mask"] = Tree.from_choices(MC_SIM_7B_63)
    elif case.kind == "block_diff":
        x["mask"] = BlockCausal(block_size=case.Lq)
    elif case.kind == "var":
        x["layout"] = scale_layout(case)
        x["dense"] = x["layout"].materialize(device)
    if x["mask"] is not None:
        x["dense"] = x["mask"].materialize(case.Lq, case.Lk, device=device)[0]
    if case.kv_format is not None:
        quantize(x)
    return x


def quantize(x: dict) -> None:
    """The quantized cache of a kv_format row: codes [B, Lk, Hkv, D] and scales [B, Lk, Hkv] as
    x["k_codes"], x["v_codes"], x["k_scale"], x["v_scale"] (KIVI: the fastar.QuantizedKVCache as x["kivi"]), and
    its dequantized copy [B, Hkv, Lk, D] in float32 as x["k_deq"], x["v_deq"]."""
    import fastar
    from fastar.reference import KV_FORMATS, dequantize_reference

    case, device = x["case"], x["q"].device
    if case.kv_format in ("int4", "int2"):  # KIVI's defaults G = 32, R = 128 (the dry run's short cache: R = 32)
        cache = fastar.QuantizedKVCache(case.B, case.Hkv, case.D, capacity=-(-case.Lk // 32) * 32,
                                        format=case.kv_format, group_size=32, residual=128 if case.Lk > 1024 else 32,
                                        dtype=torch.bfloat16, device=device)
        cache.append(x["k"], x["v"])
        x["kivi"] = cache
        x["k_deq"], x["v_deq"] = cache.dequantize(torch.float32)
        return
    shape = (case.B, case.Lk, case.Hkv, case.D)
    rows = [x[n].transpose(1, 2).reshape(-1, case.Hkv, case.D) for n in ("k", "v")]
    codes = [torch.zeros(shape, dtype=torch.uint8, device=device).view(KV_FORMATS[case.kv_format]) for _ in "kv"]
    scales = [torch.zeros(shape[:-1], device=device) for _ in "kv"]
    fastar.quantize_kv_append(*rows, torch.arange(rows[0].shape[0], device=device), *codes, *scales)
    for n, c, sc in zip("kv", codes, scales):
        x[n + "_codes"], x[n + "_scale"] = c, sc
        x[n + "_deq"] = dequantize_reference(c, sc.unsqueeze(-1).expand(shape)).float().transpose(1, 2)


def visible_pairs(x: dict) -> int:
    case = x["case"]
    if x["dense"] is not None:
        return int(x["dense"].sum())
    if case.kind == "causal":
        return case.Lq * (case.Lq + 1) // 2
    return case.Lq * case.Lk


def roofline_s(x: dict, peak_flops: Optional[float], hbm_Bps: float) -> tuple[str, Optional[float]]:
    """What bounds the row and the least time it can take: K/V bytes over HBM bandwidth for memory-bound rows,
    4 D FLOPs per visible (query, key) pair and head over the tensor-core peak for the others."""
    case = x["case"]
    if case.memory_bound:
        kv = ("k", "v") if case.kv_format is None else ("k_codes", "v_codes", "k_scale", "v_scale")
        q_bytes = x["q"].numel() * x["q"].element_size()
        if "kivi" in x:  # codes, float16 scales and zeros, the window
            return "HBM", (x["kivi"].memory_bytes() + 2 * q_bytes) / hbm_Bps
        nbytes = sum(t.numel() * t.element_size() for t in (x["q"], *(x[n] for n in kv), x["q"]))
        return "HBM", nbytes / hbm_Bps
    flops = 4 * case.D * visible_pairs(x) * case.Hq * case.B
    return "tensor core", flops / peak_flops if peak_flops else None


def run_fastar(x: dict, out: torch.Tensor) -> torch.Tensor:
    import fastar

    if x["layout"] is not None:
        return fastar.scale_attention(x["q"], x["k"], x["v"], x["layout"])
    if "kivi" in x:  # out is not taken
        return x["kivi"].attend(x["q"], mask=x["mask"])
    if x["case"].kv_format is not None:  # [B, Lq, Hq, D] queries over the quantized cache; out is not taken
        o = fastar.attention_with_kvcache(x["q"].transpose(1, 2), x["k_codes"], x["v_codes"],
                                          cache_seqlens=x["case"].Lk, k_scale=x["k_scale"], v_scale=x["v_scale"])
        return o.transpose(1, 2)
    from fastar.masks import Causal

    mask = Causal() if x["case"].kind == "causal" else x["mask"]
    return fastar.attention(x["q"], x["k"], x["v"], mask=mask, out=out)


def sdpa(x: dict, backend) -> Callable[[], torch.Tensor]:
    """SDPA as users call it, pinned to one backend (torch.nn.attention.SDPBackend)."""
    from torch.nn.attention import sdpa_kernel

    case = x["case"]

    def call():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], attn_mask=x["dense"],
                                                  is_causal=case.kind == "causal", enable_gqa=case.Hq != case.Hkv)

    return call


def reference_output(x: dict) -> torch.Tensor:
    """SDPA's math backend over what fastar reads: K and V, or (kv_format rows) the cache's dequantized copy with
    q in float32."""
    from torch.nn.attention import SDPBackend

    if x["case"].kv_format is None:
        return sdpa(x, SDPBackend.MATH)()
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(x["q"].float(), x["k_deq"], x["v_deq"], attn_mask=x["dense"],
                                              enable_gqa=x["case"].Hq != x["case"].Hkv)


def flash_attn_baseline(x: dict) -> Optional[Callable[[], torch.Tensor]]:
    """flash-attn's flash_attn_func for the rows it expresses (no mask, or causal); None otherwise."""
    if x["dense"] is not None:
        return None
    from flash_attn import flash_attn_func

    q, k, v = (t.transpose(1, 2).contiguous() for t in (x["q"], x["k"], x["v"]))
    return lambda: flash_attn_func(q, k, v, causal=x["case"].kind == "causal")


def flashinfer_baseline(x: dict) -> Optional[Callable[[], torch.Tensor]]:
    """FlashInfer's single-sequence prefill (custom mask or causal) for B = 1 rows; None otherwise."""
    if x["case"].B != 1:
        return None
    import flashinfer

    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (x["q"], x["k"], x["v"]))
    mask = x["dense"]
    return lambda: flashinfer.single_prefill_with_kv_cache(q, k, v, custom_mask=mask,
                                                           causal=x["case"].kind == "causal")


def median_time(fn: Callable[[], object], device: str, budget_s: float = 0.5, max_runs: int = 30) -> float:
    """Median seconds per call (CUDA events on a GPU), after a warm-up call."""
    fn()
    times, spent = [], 0.0
    while len(times) < 3 or (spent < budget_s and len(times) < max_runs):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        spent += times[-1]
    return statistics.median(times)


def device_peaks(device: str) -> tuple[str, Optional[float], float]:
    if device != "cuda":
        from bench.common import device_name, read_bandwidth

        return device_name("cpu"), None, read_bandwidth("cpu", 64 << 20, 3)
    name = torch.cuda.get_device_name()
    for key, flops, bw in PEAKS:
        if key in name:
            return name, flops, bw
    from bench.common import read_bandwidth

    return name, None, read_bandwidth("cuda")


def bench_rows(device: str, small: bool) -> list[dict]:
    """Every attention case: fastar (output poisoned with NaN first, then checked), the baselines, the roofline
    share; then the acceptance cases (acceptance_rows)."""
    from torch.nn.attention import SDPBackend

    name, peak, hbm = device_peaks(device)
    backends = {"sdpa flash": SDPBackend.FLASH_ATTENTION, "sdpa cudnn": SDPBackend.CUDNN_ATTENTION,
                "sdpa efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa math": SDPBackend.MATH}
    if device != "cuda":
        backends = {"sdpa math": SDPBackend.MATH}
    rows = []
    for case in CASES:
        case = case.small() if small else case
        row = {"case": case.name, "shape": dataclasses.asdict(case), "device": name}
        try:
            x = make_inputs(case, device)
            out = torch.full_like(x["q"], float("nan"))
            result = run_fastar(x, out)
            if not torch.isfinite(result).all():
                raise RuntimeError("fastar left NaN in its output")
            reference = reference_output(x)
            err = (result.float() - reference.float()).abs().max().item()
            row["max_abs_diff_vs_math"] = err
            if not err <= AGREE_ABS:
                raise RuntimeError(f"fastar and SDPA's math backend differ by {err:.3g} (> {AGREE_ABS})")
            row["fastar_s"] = median_time(functools.partial(run_fastar, x, out), device)
            bound, least_s = roofline_s(x, peak, hbm)
            row["bound"] = bound
            row["roofline_share"] = least_s / row["fastar_s"] if least_s else None
            for label, backend in backends.items():
                try:
                    row[label + "_s"] = median_time(sdpa(x, backend), device)
                except RuntimeError as exc:  # a backend that does not take this mask or shape
                    row[label + "_s"] = f"n/a: {str(exc).splitlines()[0][:80]}"
            for label, make in (("flash-attn", flash_attn_baseline), ("flashinfer", flashinfer_baseline)):
                try:
                    fn = make(x) if device == "cuda" else None
                    row[label + "_s"] = median_time(fn, device) if fn else "n/a"
                except Exception as exc:  # not installed, or no kernel for this shape
                    row[label + "_s"] = f"n/a: {type(exc).__name__}"
        except Exception as exc:  # the row fails, the table goes on
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
        print_row(row)
    return rows + acceptance_rows(device, small, hbm, name)


@dataclasses.dataclass(frozen=True)
class AcceptanceGpuCase:
    """fastar.greedy_verify or fastar.speculative_sample (with_q: with draft probabilities) over B sequences of n
    drafts, or fastar.tree_greedy_verify / fastar.typical_accept (T = 1) / fastar.tree_speculative_sample (with_q
    as above) over mc_sim_7b_63's 63 drafted nodes (n = 63), and a vocabulary of V, bf16
    (docs/design/sampling-kernels.md); or one fastar.diffusion_unmask step over a block of n positions
    (bench/bench_diffusion_unmask.py's case: temperature 0, or with top_p Dream's recipe at temperature 0.2, checked
    against the CPU's draws); or fastar.compact_kv after verifying a 64-node tree, B sequences, every one of 32
    layers in one paged bf16 buffer (bench/bench_compact_kv.py's case)."""

    name: str
    op: str  # greedy_verify | speculative_sample | tree_greedy_verify | typical_accept | tree_speculative_sample
    # | diffusion_unmask | compact_kv
    B: int
    n: int
    V: int
    with_q: bool = False
    top_p: Optional[float] = None

    def small(self) -> "AcceptanceGpuCase":
        return dataclasses.replace(self, B=min(self.B, 2), V=4096)


ACCEPTANCE_CASES = [
    AcceptanceGpuCase("greedy_verify B=1", "greedy_verify", 1, 4, 131072),
    AcceptanceGpuCase("greedy_verify B=32", "greedy_verify", 32, 4, 131072),
    AcceptanceGpuCase("spec_sample B=1", "speculative_sample", 1, 4, 131072, with_q=True),
    AcceptanceGpuCase("spec_sample B=32", "speculative_sample", 32, 4, 131072, with_q=True),
    AcceptanceGpuCase("spec_sample B=32 no q", "speculative_sample", 32, 4, 131072),
    AcceptanceGpuCase("tree_greedy B=1", "tree_greedy_verify", 1, 63, 131072),
    AcceptanceGpuCase("tree_greedy B=32", "tree_greedy_verify", 32, 63, 131072),
    AcceptanceGpuCase("typical B=1", "typical_accept", 1, 63, 131072),
    AcceptanceGpuCase("typical B=32", "typical_accept", 32, 63, 131072),
    AcceptanceGpuCase("tree_sample B=1", "tree_speculative_sample", 1, 63, 131072),
    AcceptanceGpuCase("tree_sample B=32 q", "tree_speculative_sample", 32, 63, 131072, with_q=True),
    AcceptanceGpuCase("unmask B=1", "diffusion_unmask", 1, 32, 126464),
    AcceptanceGpuCase("unmask B=8", "diffusion_unmask", 8, 32, 126464),
    AcceptanceGpuCase("unmask dream B=8", "diffusion_unmask", 8, 32, 126464, top_p=0.95),
    AcceptanceGpuCase("compact_kv B=32 32 layers", "compact_kv", 32, 64, 0),
]
TREE_OPS = ("tree_greedy_verify", "typical_accept")


def mc_sim_tree():
    from bench.bench_attention import MC_SIM_7B_63
    from fastar.masks import Tree

    return Tree.from_choices(MC_SIM_7B_63)  # node 0: the verified root, so n = 63 drafted nodes


def acceptance_inputs(case: AcceptanceGpuCase, device: str) -> dict:
    """Drafts that copy the target's argmax up to position 2 (greedy), after their parent for a node's first child
    (tree: the path of first children is accepted) or are drawn from q or p (sampling; tree sampling: from the
    node's own draft row, or its parent's target row)."""
    gen = torch.Generator().manual_seed(1)
    x = {"case": case}
    if case.op in TREE_OPS:
        tree = mc_sim_tree()
        parents = tree.parents[1:] - 1  # the drafted nodes' parents, -1 for the root's children
        logits = torch.randn(case.B, case.n + 1, case.V, generator=gen).to(torch.bfloat16)
        drafts = torch.randint(0, case.V, (case.B, case.n), generator=gen)
        first = torch.tensor([t == 0 or int(parents[t]) != int(parents[t - 1]) for t in range(case.n)])
        drafts[:, first] = logits.float().argmax(-1)[:, parents[first] + 1]
        x["args"] = (drafts.to(device), tree, logits.to(device))
        return x
    if case.op == "compact_kv":
        from bench.bench_compact_kv import CompactCase, make_inputs

        x["compact_case"] = CompactCase(case.B, 512, page_size=16, layers=32)
        x["compact"] = make_inputs(x["compact_case"], device)
        return x
    if case.op == "diffusion_unmask":
        from bench.bench_diffusion_unmask import UnmaskCase, make_inputs

        temperature = 0.0 if case.top_p is None else 0.2
        x["unmask"] = make_inputs(UnmaskCase(case.B, temperature, V=case.V, block_length=case.n, top_p=case.top_p),
                                  device)
        return x
    if case.op == "tree_speculative_sample":
        tree = mc_sim_tree()
        parents = tree.parents[1:] - 1
        p = torch.softmax(2 * torch.randn(case.B, case.n + 1, case.V, generator=gen), -1).to(torch.bfloat16)
        q = torch.softmax(2 * torch.randn(case.B, case.n, case.V, generator=gen), -1).to(torch.bfloat16)
        src = q if case.with_q else p[:, parents + 1]
        drafts = torch.multinomial(src.float().reshape(-1, case.V), 1, generator=gen).reshape(case.B, case.n)
        x["args"] = (drafts.to(device), tree, q.to(device) if case.with_q else None, p.to(device))
        return x
    if case.op == "greedy_verify":
        logits = torch.randn(case.B, case.n + 1, case.V, generator=gen).to(torch.bfloat16)
        drafts = logits[:, :case.n].float().argmax(-1)
        drafts[:, 2:] = torch.randint(0, case.V, (case.B, case.n - 2), generator=gen)
        x["args"] = (drafts.to(device), logits.to(device))
        return x
    p = torch.softmax(2 * torch.randn(case.B, case.n + 1, case.V, generator=gen), -1).to(torch.bfloat16)
    q = torch.softmax(2 * torch.randn(case.B, case.n, case.V, generator=gen), -1).to(torch.bfloat16)
    src = q if case.with_q else p[:, :case.n]
    drafts = torch.multinomial(src.float().reshape(-1, case.V), 1, generator=gen).reshape(case.B, case.n)
    x["args"] = (drafts.to(device), q.to(device) if case.with_q else None, p.to(device))
    return x


def run_acceptance(x: dict):
    import fastar

    if x["case"].op == "greedy_verify":
        return fastar.greedy_verify(*x["args"])
    if x["case"].op == "tree_greedy_verify":
        return fastar.tree_greedy_verify(*x["args"])[1:]
    if x["case"].op == "typical_accept":
        drafts, tree, logits = x["args"]
        return fastar.typical_accept(drafts, logits, tree=tree)[1:]
    if x["case"].op == "tree_speculative_sample":
        return fastar.tree_speculative_sample(*x["args"], seed=5)[1:]
    if x["case"].op == "diffusion_unmask":
        from bench.bench_diffusion_unmask import run_fastar

        return (run_fastar(x["unmask"], 5),)
    if x["case"].op == "compact_kv":
        from bench.bench_compact_kv import run_fastar

        return (run_fastar(x["compact"], 5),)
    return fastar.speculative_sample(*x["args"], seed=5)


def acceptance_reference(x: dict):
    from fastar.reference import (
        greedy_verify_reference,
        speculative_sample_reference,
        tree_greedy_verify_row,
        tree_speculative_sample_row,
        typical_accept_row,
    )

    if x["case"].op == "compact_kv":  # the PyTorch way's new lengths (on copies); fastar's caches checked row by row
        from bench.bench_compact_kv import check, run_torch

        want = run_torch(dict(x["compact"], k=x["compact"]["k"].clone(), v=x["compact"]["v"].clone()), 5)
        check(x["compact_case"], x["compact"], want)
        return (want.cpu(),)
    if x["case"].op == "diffusion_unmask":  # LLaDA's step as written, on the same device; Dream's draws: the CPU's
        from bench.bench_diffusion_unmask import run_fastar, run_torch

        if x["case"].top_p is not None:
            return (run_fastar({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in x["unmask"].items()}, 5),)
        return (run_torch(x["unmask"], 5).cpu(),)
    args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in x["args"]]
    if x["case"].op == "greedy_verify":
        return greedy_verify_reference(*args)
    if x["case"].op in (*TREE_OPS, "tree_speculative_sample"):
        drafts, tree, probs = args[0], args[1], args[2:]
        parents, depths = (tree.parents[1:] - 1).tolist(), []
        for parent in parents:
            depths.append(1 if parent < 0 else depths[parent] + 1)
        tokens, accepted = torch.full((x["case"].B, max(depths) + 1), -1), torch.zeros(x["case"].B, dtype=torch.long)
        for b in range(x["case"].B):
            ids = drafts[b].tolist()
            if x["case"].op == "tree_speculative_sample":
                q, p = probs
                _, row, accepted[b] = tree_speculative_sample_row(parents, ids, None if q is None else q[b], p[b],
                                                                  row=b, seed=5)
            elif x["case"].op == "typical_accept":
                _, row, accepted[b] = typical_accept_row(parents, ids, probs[0][b].float())
            else:
                _, row, accepted[b] = tree_greedy_verify_row(parents, ids, probs[0][b])
            tokens[b, :len(row)] = torch.tensor(row)
        return tokens, accepted
    return speculative_sample_reference(*args, seed=5)


def acceptance_bytes(x: dict, num_accepted: torch.Tensor) -> int:
    """HBM bytes the op must move: greedy, every position up to the row's drafts (the split kernel reads them all
    at once); tree greedy and typical, the rows after the root and the accepted nodes (at least what the walk
    reads); sampling, the row it samples from (the target's, and the draft's after a rejection); tree sampling, a
    lower bound: one pass over the row it draws from; diffusion_unmask, the masked positions' logits."""
    case, elem = x["case"], 2
    if case.op == "greedy_verify":
        return case.B * (case.n + 1) * case.V * elem
    if case.op in TREE_OPS:
        return int((num_accepted.cpu().long() + 1).sum()) * case.V * elem
    if case.op == "compact_kv":  # the kept rows that move, read and written
        from bench.bench_compact_kv import metrics

        return metrics(x["compact_case"], x["compact"], [])["bytes"]
    if case.op == "diffusion_unmask":  # the logits of the block's masked positions, once
        return case.B * x["unmask"]["case"].still_masked * case.V * elem
    if case.op == "tree_speculative_sample":  # at least the row it draws from, and its draft row with q
        return case.B * (2 if case.with_q else 1) * case.V * elem
    rejected = int((num_accepted.cpu() < case.n).sum())
    return (case.B + (rejected if case.with_q else 0)) * case.V * elem


def acceptance_rows(device: str, small: bool, hbm: float, name: str) -> list[dict]:
    """The acceptance cases: fastar's tokens checked against the reference, timed, the HBM roofline time beside
    (roofline_s) and its share; torch.argmax over the same logits beside greedy_verify, LLaDA's step as written
    beside diffusion_unmask."""
    rows = []
    for case in ACCEPTANCE_CASES:
        case = case.small() if small else case
        row = {"case": case.name, "shape": dataclasses.asdict(case), "device": name}
        try:
            x = acceptance_inputs(case, device)
            got = run_acceptance(x)
            if not all(torch.equal(g.cpu().long(), w.long()) for g, w in zip(got, acceptance_reference(x))):
                raise RuntimeError("fastar's tokens differ from the reference")
            row["fastar_s"] = median_time(functools.partial(run_acceptance, x), device)
            row["bound"] = "HBM"
            row["roofline_s"] = acceptance_bytes(x, got[-1]) / hbm
            row["roofline_share"] = row["roofline_s"] / row["fastar_s"]
            if case.op == "greedy_verify":
                row["torch argmax_s"] = median_time(functools.partial(torch.argmax, x["args"][1], -1), device)
            if case.op == "diffusion_unmask":
                from bench.bench_diffusion_unmask import run_torch

                step = "dream step_s" if case.top_p is not None else "llada step_s"
                row[step] = median_time(functools.partial(run_torch, x["unmask"], 5), device)
            if case.op == "compact_kv":
                from bench.bench_compact_kv import run_torch

                row["torch index_select + index_copy__s"] = median_time(
                    functools.partial(run_torch, x["compact"], 5), device)
        except Exception as exc:  # the row fails, the table goes on
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
        print_row(row)
    return rows


def print_row(row: dict) -> None:
    def fmt(v):
        return f"{v * 1e3:9.3f} ms" if isinstance(v, float) else f"{str(v)[:12]:>12}"

    if "error" in row:
        print(f"{row['case']:<24} ERROR {row['error']}", flush=True)
        return
    share = row.get("roofline_share")
    others = "  ".join(f"{k[:-2]} {fmt(v)}" for k, v in row.items() if k.endswith("_s") and k != "fastar_s")
    print(f"{row['case']:<24} fastar {fmt(row['fastar_s'])}  {row['bound']} "
          f"{'-' if share is None else f'{share:.0%}'}  {others}", flush=True)


def small_cases(device: str) -> None:
    """One small call of every public op on `device`: what compute-sanitizer runs."""
    import fastar
    from fastar.masks import Causal, Tree

    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 4, 50, generator=gen), -1).to(device)
    ids = torch.randint(0, 50, (2, 3), generator=gen).to(device)
    fastar.speculative_sample(ids, probs[:, :3], probs, seed=1)
    fastar.greedy_verify(ids, probs)
    fastar.tree_greedy_verify(ids, Tree([-1, 0, 0]), probs)
    fastar.sample_cfg(torch.randn(4, 3, 50, generator=gen).to(device), cfg=1.5, scale_index=2, num_scales=4,
                      top_k=5, top_p=0.9, seed=3)
    # The acceptance ops past the chain (3 drafted nodes or tokens over V = 50), KV compaction, one unmasking step.
    tree, drafts = Tree([-1, 0, 0]), probs[:, :3]
    fastar.tree_speculative_sample(ids, tree, drafts, probs, seed=4)
    fastar.tree_speculative_sample(ids, tree, None, probs, seed=4)
    fastar.typical_accept(ids, probs.log(), tree=tree)
    fastar.lantern_accept(ids, drafts, probs, (torch.arange(50, device=device)[:, None] + torch.arange(1, 4,
                          device=device)) % 50, delta=0.2, seed=5)
    fastar.sjd_accept(ids, drafts, probs, seed=6)
    fastar.gsd_accept(ids, drafts, probs, torch.randn(50, 8, generator=gen).to(device), seed=7)
    fastar.spectr_accept(ids.reshape(2, 3, 1), drafts.reshape(2, 3, 1, 50),
                         probs[:, :2].repeat(1, 3, 1).reshape(2, 3, 2, 50), seed=8)
    kv = [torch.randn(2, 9, 2, 16, generator=gen).to(device, torch.bfloat16) for _ in range(2)]
    i32 = lambda *values: torch.tensor(values, dtype=torch.int32, device=device)  # noqa: E731
    fastar.compact_kv(*kv, i32([0, 2, 3], [0, 1, -1]), i32(2, 1), i32(3, 0), num_nodes=5, root_in_path=True)
    unmask_x = torch.full((2, 10), 299, device=device)
    fastar.diffusion_unmask(torch.randn(2, 10, 300, generator=gen).to(device, torch.bfloat16), unmask_x, mask_id=299,
                            block_start=2, block_end=8, num_transfer=torch.tensor([2, 3], device=device),
                            temperature=0.7, top_p=0.9, top_k=20, confidence="margin", confidence_source="sampling",
                            seed=9)
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(1, 4, 16, 64, generator=gen).to(device, dtype)
        k, v = (torch.randn(1, 2, 80, 64, generator=gen).to(device, dtype) for _ in range(2))
        fastar.attention(q, k, v, mask=Causal())
        fastar.attention(q[:, :, :1], k, v)
        fastar.attention(q[:, :, :7], k, v, mask=Tree(torch.tensor([-1, 0, 0, 1, 1, 2, 3])))
        cache_k = torch.zeros(2, 96, 2, 64, device=device, dtype=dtype)  # [B, capacity, Hkv, D]
        cache_v = torch.zeros_like(cache_k)
        new = torch.randn(2, 4, 2, 64, generator=gen).to(device, dtype)
        fastar.attention_with_kvcache(q.transpose(1, 2)[:, :4].expand(2, -1, -1, -1), cache_k, cache_v,
                                      cache_seqlens=torch.tensor([10, 30], device=device), k_new=new, v_new=new)
        layout = fastar.ScaleLayout((1, 2, 3), local_window=1)
        qs = torch.randn(1, 2, 14, 64, generator=gen).to(device, dtype)
        fastar.scale_attention(qs, qs, qs, layout)
        # quantize_kv_append: int8 from aligned rows (16-byte chunks), fp8 at fixed scales from a view one
        # element in (the element-wise kernel).
        rows = torch.randn(3, 2, 72, generator=gen).to(device, dtype)
        slots = torch.tensor([4, -1, 0], device=device)
        codes = lambda dt: torch.zeros(6, 2, 64, dtype=torch.uint8, device=device).view(dt)  # noqa: E731
        scales = lambda *shape: torch.ones(*shape, device=device)  # noqa: E731
        int8 = [codes(torch.int8), codes(torch.int8), scales(6, 2), scales(6, 2)]
        fp8 = [codes(torch.float8_e4m3fn), codes(torch.float8_e4m3fn), scales(2), scales(2)]
        fastar.quantize_kv_append(rows[..., :64], rows[..., 8:], slots, *int8)
        fastar.quantize_kv_append(rows[..., 1:65], rows[..., 1:65], slots, *fp8)
        # Attention over those caches ([1, 6, 2, 64]): the decode kernel (1 query) and the tensor-core one (16).
        for kc, vc, *sc in (int8, fp8):
            ks, vs = (x if x.dim() == 1 else x[None] for x in sc)  # per kv head, or per token of one sequence
            for lq in (1, 16):
                fastar.attention_with_kvcache(q.transpose(1, 2)[:, :lq], kc[None], vc[None], cache_seqlens=6,
                                              k_scale=ks, v_scale=vs)
        # quantize_kivi_append: one int4 key group of 4 tokens and two value rows (slot -1 skipped) into 8 slots.
        packed = lambda: torch.zeros(8, 2, 32, dtype=torch.uint8, device=device)  # noqa: E731
        halves = lambda *shape: torch.zeros(*shape, dtype=torch.float16, device=device)  # noqa: E731
        ids = lambda *values: torch.tensor(values, device=device)  # noqa: E731
        fastar.quantize_kivi_append(rows[:2].repeat(2, 1, 1)[..., :64], rows[:2, :, 8:], ids(1), ids(5, -1),
                                    packed(), packed(), halves(2, 2, 64), halves(2, 2, 64), halves(8, 2, 16),
                                    halves(8, 2, 16), group_size=4)
        # Attention over KIVI caches: the KIVI decode kernel (G = 32, 1 query) and the tiled kernel (G = 8, 3).
        for G, lq in ((32, 1), (8, 3)):
            kivi = fastar.QuantizedKVCache(1, 2, 64, capacity=96, format="int4", group_size=G, residual=G,
                                           dtype=dtype, device=device)
            kivi.append(k, v)
            kivi.attend(q[:, :, :lq], mask=Causal())
    if device == "cuda":
        torch.cuda.synchronize()


def run_step(name: str, cmd: list[str], limit: int, env: Optional[dict] = None) -> dict:
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                              timeout=limit)
        ok = proc.returncode == 0
        log = proc.stdout + proc.stderr
        (RESULTS.parent / f"gpu-{name.replace(' ', '-')}.log").write_text(log)
        tail = log[-2000:]
    except subprocess.TimeoutExpired:
        ok, tail = False, f"timed out after {limit} s"
    except OSError as exc:
        ok, tail = False, str(exc)
    result = {"step": name, "ok": ok, "seconds": round(time.time() - start, 1), "command": " ".join(cmd),
              "output_tail": tail}
    print(f"== {name}: {'ok' if ok else 'FAILED'} in {result['seconds']} s ({result['command']})", flush=True)
    if not ok:
        print(tail, flush=True)
    return result


def sanitizer_commands() -> list[tuple[str, list[str]]]:
    tool = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    return [(f"sanitizer {t}", [tool, "--tool", t, "--error-exitcode", "1", sys.executable, "-m", "bench.gpu_check",
                                "--small-cases"]) for t in SANITIZER_TOOLS]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-cases", action="store_true", help="one small call of every op on the GPU")
    args = parser.parse_args(argv)
    has_gpu = torch.cuda.is_available()
    if args.small_cases:
        small_cases("cuda" if has_gpu else "cpu")
        return 0
    if not has_gpu:
        print("gpu-check: no CUDA GPU on this machine (torch.cuda.is_available() is False): nothing to run on a GPU.")
        print("dry run: the bench cases at small sizes on the CPU, the small case of every op, the commands")
        small_cases("cpu")
        rows = bench_rows("cpu", small=True)
        failed = [r for r in rows if "error" in r]
        for _, cmd in sanitizer_commands():
            print(f"would run: {' '.join(cmd)}")
        print(f"dry run: {len(rows) - len(failed)} of {len(rows)} cases ran; nothing written")
        return 1 if failed else 0

    steps = [run_step("build", [sys.executable, "setup.py", "build_ext", "--inplace"], LIMITS["build"],
                      {"FASTAR_BUILD_SIMT": "0"}),
             run_step("tests", [sys.executable, "-m", "pytest", "tests", "-q", "-rfE", "-k", "cuda"],
                      LIMITS["tests"], {"FASTAR_REQUIRE_CUDA_BUILD": "1"})]
    steps += [run_step(name, cmd, LIMITS["sanitizer"]) for name, cmd in sanitizer_commands()]
    bench = run_step("bench", [sys.executable, "-c", "import bench.gpu_check as g, json, sys; "
                               "json.dump(g.bench_rows('cuda', small=False), open(sys.argv[1], 'w'), default=str)",
                               str(RESULTS) + ".rows"], LIMITS["bench"])
    rows_path = Path(str(RESULTS) + ".rows")
    rows = json.loads(rows_path.read_text()) if rows_path.exists() else []
    rows_path.unlink(missing_ok=True)
    print(bench["output_tail"])
    RESULTS.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": torch.cuda.get_device_name(),
                                   "steps": steps + [bench], "rows": rows}, indent=1, default=str))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
