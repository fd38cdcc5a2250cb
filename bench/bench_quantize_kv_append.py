"""fastar.quantize_kv_append against the PyTorch way users write today: quantize with tensor ops, then index-put
the codes and scales into the cache slots."""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

import fastar
from bench import common
from fastar.reference import KV_FORMATS

POISON = 0x55


@dataclasses.dataclass(frozen=True)
class KvAppendCase:
    """N new tokens of Hkv heads of D channels, into a cache of 2N slots (alternate rounds use either half)."""

    N: int
    Hkv: int
    D: int
    fmt: str
    dtype: torch.dtype = torch.bfloat16

    @property
    def id(self) -> str:
        return f"N{self.N}-H{self.Hkv}-D{self.D}-{self.fmt}-{common.DTYPE_NAMES[self.dtype]}"

    @property
    def shape(self) -> str:
        return f"N={self.N} H={self.Hkv} D={self.D} {self.fmt}"


CASES = [KvAppendCase(64, 8, 128, "int8"), KvAppendCase(4096, 8, 128, "int8"), KvAppendCase(4096, 8, 128, "fp8_e4m3")]


def make_inputs(case: KvAppendCase, device: str = "cpu") -> dict:
    gen = torch.Generator().manual_seed(0)
    rows = lambda: (torch.randn(case.N, case.Hkv, case.D, generator=gen) * 3).to(case.dtype).to(device)  # noqa: E731
    perm = torch.randperm(2 * case.N, generator=gen).to(device)  # scattered slots, as in a paged cache
    dtype = KV_FORMATS[case.fmt]
    cache = lambda: torch.full((2 * case.N, case.Hkv, case.D), POISON, dtype=torch.uint8, device=device).view(dtype)  # noqa: E731
    scales = lambda: torch.full((2 * case.N, case.Hkv), float("nan"), device=device)  # noqa: E731
    x = {"key": rows(), "value": rows(), "slots": (perm[: case.N], perm[case.N:]), "code_max": float(
        torch.finfo(dtype).max if case.fmt != "int8" else 127), "dtype": dtype}
    x["fastar"] = (cache(), cache(), scales(), scales())
    x["torch"] = (cache(), cache(), scales(), scales())
    # The codes every output must hold: the PyTorch way's, once, into a scratch cache.
    scratch = (cache(), cache(), scales(), scales())
    torch_append(x, x["slots"][0], scratch)
    x["want"] = tuple(t[x["slots"][0]] for t in scratch)
    return x


def quantize(rows: torch.Tensor, code_max: float, dtype: torch.dtype):
    scale = rows.float().abs().amax(-1) / code_max
    q = rows.float() / torch.where(scale > 0, scale, 1.0).unsqueeze(-1)
    codes = torch.round(q).clamp(-127, 127).to(torch.int8) if dtype == torch.int8 else q.clamp(-code_max, code_max)
    return codes.to(dtype), scale


def torch_append(x: dict, slots: torch.Tensor, caches: tuple) -> None:
    k_cache, v_cache, k_scale, v_scale = caches
    for rows, cache, scale in ((x["key"], k_cache, k_scale), (x["value"], v_cache, v_scale)):
        codes, s = quantize(rows, x["code_max"], x["dtype"])
        cache.view(torch.uint8)[slots] = codes.view(torch.uint8)
        scale[slots] = s


def run_fastar(x: dict, seed: int):
    slots = x["slots"][seed % 2]
    fastar.quantize_kv_append(x["key"], x["value"], slots, *x["fastar"])
    return (*x["fastar"], slots)


def run_torch(x: dict, seed: int):
    slots = x["slots"][seed % 2]
    torch_append(x, slots, x["torch"])
    return (*x["torch"], slots)


def check(case: KvAppendCase, x: dict, out: tuple) -> None:
    """The written slots hold the expected codes and scales; they are poisoned again for the next round, so a
    call that writes nothing fails."""
    *caches, slots = out
    for got, want in zip(caches, x["want"]):
        assert torch.equal(got[slots].view(torch.uint8), want.view(torch.uint8)), "wrong or unwritten slots"
    for t in caches:
        if t.dtype == torch.float32:
            t[slots] = float("nan")
        else:
            t.view(torch.uint8)[slots] = POISON


def agree(x: dict, fastar_runs: list, torch_runs: list) -> None:
    """check compared every output of both with the same expected codes, bit for bit."""


def metrics(case: KvAppendCase, x: dict, runs: list) -> dict:
    rows = case.N * case.Hkv
    elt = torch.tensor([], dtype=case.dtype).element_size()
    return {"bytes": 2 * rows * case.D * (elt + 1) + 2 * rows * 4 + case.N * 8}


TABLE = common.Table(
    "fastar/torch: median time per call, cold caches; GB/s: K and V read, codes and scales written / time;"
    " others: share of the cores that other processes used meanwhile",
    common.op_columns(18, 24),
)

BENCH = common.OpBench("quantize_kv_append", CASES, make_inputs, run_fastar, run_torch, check, agree, metrics, TABLE)

inputs = functools.cache(make_inputs)
parametrize_cases = pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)


@parametrize_cases
def test_quantize_kv_append_fastar(benchmark, case):
    common.benchmark_op(benchmark, BENCH, run_fastar, case, inputs(case))


@parametrize_cases
def test_quantize_kv_append_torch(benchmark, case):
    common.benchmark_op(benchmark, BENCH, run_torch, case, inputs(case))
