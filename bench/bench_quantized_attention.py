"""Decode and tree verification over a quantized KV cache: fastar.attention_with_kvcache on the int8 / fp8 codes
against the PyTorch way (dequantize the cache, then SDPA, at every step, as transformers' QuantizedCache does),
and beside it SDPA over an unquantized float32 cache and fastar over a bfloat16 one (issue 14's goals: decode 3x
and 1.6x; a 64-node tree over a 16k prefix 2x SDPA with the dense mask over float32)."""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F

import fastar
from bench import common
from bench.bench_attention import MC_SIM_7B_63, TREE_NODES
from fastar.masks import Tree
from fastar.reference import KV_FORMATS


@dataclasses.dataclass(frozen=True)
class QuantDecodeCase:
    """One decode step (one query per sequence) of B sequences over S cached tokens; with ``tree``, the
    verification of Medusa's 64-node tree appended after S cached tokens (64 queries per sequence)."""

    B: int
    Hq: int
    Hkv: int
    S: int
    D: int
    fmt: str
    dtype: torch.dtype = torch.bfloat16
    tree: bool = False

    @property
    def Lq(self) -> int:
        return TREE_NODES if self.tree else 1

    @property
    def cached(self) -> int:
        """Tokens in each sequence's cache: the prefix, then a tree's nodes."""
        return self.S + (self.Lq if self.tree else 0)

    @property
    def id(self) -> str:
        return f"B{self.B}-H{self.Hq}x{self.Hkv}-S{self.S}-D{self.D}-{self.fmt}" + ("-tree" if self.tree else "")

    @property
    def shape(self) -> str:
        tree = f" tree of {TREE_NODES}" if self.tree else ""
        return f"B={self.B} Hq={self.Hq} Hkv={self.Hkv} S={self.S}{tree} D={self.D} {self.fmt}"


CASES = [QuantDecodeCase(8, 32, 8, 4096, 128, "int8"), QuantDecodeCase(8, 32, 8, 4096, 128, "fp8_e4m3"),
         QuantDecodeCase(8, 32, 8, 16384, 128, "int8"), QuantDecodeCase(4, 32, 8, 16384, 128, "int8", tree=True)]


def make_inputs(case: QuantDecodeCase, device: str = "cpu") -> dict:
    gen = torch.Generator().manual_seed(0)
    B, S, Hkv, D = case.B, case.cached, case.Hkv, case.D
    k = torch.randn(B, S, Hkv, D, generator=gen) * (torch.rand(B, S, Hkv, 1, generator=gen) + 0.5)
    v = torch.randn(B, S, Hkv, D, generator=gen)
    codes = [torch.empty(B, S, Hkv, D, dtype=KV_FORMATS[case.fmt]) for _ in range(2)]
    scales = [torch.empty(B, S, Hkv) for _ in range(2)]
    fastar.quantize_kv_append(k.flatten(0, 1), v.flatten(0, 1), torch.arange(B * S), *codes, *scales)
    x = {"q": torch.randn(B, case.Lq, case.Hq, D, generator=gen).to(case.dtype), "codes": codes, "scales": scales,
         "k32": k.transpose(1, 2).contiguous(), "v32": v.transpose(1, 2).contiguous(),
         "k16": k.to(case.dtype), "v16": v.to(case.dtype), "lens": torch.full((B,), S)}
    x = {name: [t.to(device) for t in value] if isinstance(value, list) else value.to(device)
         for name, value in x.items()}
    x["mask"] = Tree.from_choices(MC_SIM_7B_63) if case.tree else None
    # The tree's own [T, T] mask (node t sees itself and its ancestors), as Medusa / EAGLE keep it.
    x["tree_visible"] = x["mask"].materialize(case.Lq, case.Lq).to(device)[0] if case.tree else None
    return x


def run_fastar(x: dict, seed: int):
    return fastar.attention_with_kvcache(x["q"], *x["codes"], cache_seqlens=x["lens"], mask=x["mask"],
                                         k_scale=x["scales"][0], v_scale=x["scales"][1])


def sdpa(x: dict, k, v):
    """SDPA over k, v [B, Hkv, S, D] float32 for x's queries [B, Lq, Hq, D] (the cache's layout); a tree's dense
    mask built as users do at each call: the prefix visible to every node, then the tree's own mask."""
    q, mask = x["q"], None
    if x["tree_visible"] is not None:
        Lq, S = q.shape[1], k.shape[2]
        mask = torch.ones(Lq, S, dtype=torch.bool, device=q.device)
        mask[:, S - Lq:] = x["tree_visible"]
    out = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k, v, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2).to(q.dtype)


def run_torch(x: dict, seed: int):
    """The QuantizedCache way: dequantize the whole cache to float32, then SDPA."""
    k, v = (c.float() * s.unsqueeze(-1) for c, s in zip(x["codes"], x["scales"]))
    return sdpa(x, k.transpose(1, 2), v.transpose(1, 2))


def more_baselines(case: QuantDecodeCase, x: dict, device: str, quick: bool) -> tuple[dict, dict]:
    return {
        "sdpa_f32_cache": lambda x, seed: sdpa(x, x["k32"], x["v32"]),
        "fastar_bf16_cache": lambda x, seed: fastar.attention_with_kvcache(x["q"], x["k16"], x["v16"],
                                                                           cache_seqlens=x["lens"], mask=x["mask"]),
    }, {}


def check(case: QuantDecodeCase, x: dict, out: torch.Tensor) -> None:
    """Every element written: the outputs are new tensors, so a finite value everywhere is the check."""
    assert out.shape == x["q"].shape and torch.isfinite(out.float()).all(), "output not written"


def agree(x: dict, fastar_runs: list, other_runs: list) -> None:
    """Within the formats' quantization error of each other (the unquantized baselines differ by exactly that):
    a tenth of the output's largest magnitude."""
    for a, b in zip(fastar_runs, other_runs):
        scale = b.float().abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= 0.1 * scale + 1e-3, "fastar and the baseline disagree"


def metrics(case: QuantDecodeCase, x: dict, runs: list) -> dict:
    """Bytes read: the codes and scales of K and V, the queries."""
    rows = case.B * case.cached * case.Hkv
    return {"bytes": 2 * rows * (case.D + 4) + x["q"].numel() * x["q"].element_size()}


TABLE = common.Table(
    "fastar: attention_with_kvcache on the codes; torch: dequantize the cache to float32 then SDPA (transformers'"
    " QuantizedCache); SDPA f32: SDPA over an unquantized float32 cache; fastar bf16: fastar over a bfloat16 cache;"
    " median time per call, cold caches; GB/s, % read: codes and scales read / time",
    [
        ("op", 20, lambda r: r["op"]),
        ("shape", 46, lambda r: r["shape"]),
        ("dtype", 5, lambda r: r["dtype"]),
        ("fastar", 9, lambda r: common.format_time(r["fastar_s"])),
        ("torch", 9, lambda r: common.format_time(r["torch_s"])),
        ("speed-up", 8, lambda r: f"{r['speedup']:.1f}x"),
        ("vs SDPA f32", 11, lambda r: f"{r['speedup_vs_sdpa_f32_cache']:.1f}x"),
        ("vs bf16", 7, lambda r: f"{r['speedup_vs_fastar_bf16_cache']:.1f}x"),
        ("GB/s", 6, lambda r: f"{r['fastar_GBps']:.1f}"),
        ("% read", 6, lambda r: f"{r['fastar_pct_read']:.0f}%"),
        ("others", 6, lambda r: common.format_share(r["others_cpu_share"])),
    ],
)

BENCH = common.OpBench("quantized decode", CASES, make_inputs, run_fastar, run_torch, check, agree, metrics, TABLE,
                       more_baselines)

inputs = functools.cache(make_inputs)
parametrize_cases = pytest.mark.parametrize("case", CASES[:1], ids=lambda c: c.id)


@parametrize_cases
def test_quantized_decode_fastar(benchmark, case):
    common.benchmark_op(benchmark, BENCH, run_fastar, case, inputs(case))


@parametrize_cases
def test_quantized_decode_torch(benchmark, case):
    common.benchmark_op(benchmark, BENCH, run_torch, case, inputs(case))
