"""fastar.sample_cfg against the PyTorch sampler VAR and LlamaGen users run today: the CFG mix of the doubled
batch, then VAR's sample_with_top_k_top_p_ (topk threshold, ascending sort, cumsum softmax, masked_fill,
softmax, multinomial)."""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import pytest
import torch

import fastar
from bench import common
from fastar.reference import cfg_mix, sample_cfg_reference, var_top_k_top_p_


@dataclasses.dataclass(frozen=True)
class SampleCase:
    """B images (2B logits rows: conditional, then unconditional), L positions sampled per call (VAR: a
    scale's pn² tokens; LlamaGen: one token, [2B, V] logits), a codebook of V."""

    model: str
    B: int
    L: Optional[int]  # None: [2B, V] logits
    V: int
    cfg: float
    schedule: str
    top_k: int
    top_p: float
    scale_index: Optional[int] = None
    num_scales: Optional[int] = None
    logit_scale: float = 3.0  # spread of the random conditional logits
    dtype: torch.dtype = torch.float32

    @property
    def id(self) -> str:
        dtype = common.DTYPE_NAMES[self.dtype]
        return f"{self.model}-B{self.B}-L{self.L or 1}-V{self.V}-k{self.top_k}-p{self.top_p:g}-{dtype}"

    @property
    def shape(self) -> str:
        rows = f"2x{self.B}" + (f" L={self.L}" if self.L else "")
        return f"{self.model} {rows} V={self.V} k={self.top_k} p={self.top_p:g}"

    @property
    def kwargs(self) -> dict:
        return dict(cfg=self.cfg, schedule=self.schedule, scale_index=self.scale_index, num_scales=self.num_scales,
                    top_k=self.top_k, top_p=self.top_p)


CASES = [
    # VAR-d16 256px, last scale (16x16 tokens), FID settings: CFG 1.5 ramped over 10 scales, top-k 900, top-p 0.96.
    SampleCase("VAR-d16", 8, 256, 4096, 1.5, "var", 900, 0.96, scale_index=9, num_scales=10),
    # LlamaGen (16384 codes), one token per step, constant CFG 4.0, without and with top-k 1000.
    SampleCase("LlamaGen", 8, None, 16384, 4.0, "constant", 0, 1.0, logit_scale=1.5),
    SampleCase("LlamaGen", 8, None, 16384, 4.0, "constant", 1000, 1.0, logit_scale=1.5),
]
# Tokens fastar may draw outside the float64 reference's top-p set: its float32 guidance rounds differently,
# which can move a token sitting on the top-p boundary.
TOP_P_SLACK = 0.01


def torch_sample_cfg(logits: torch.Tensor, *, cfg: float, schedule: str = "var", scale_index: Optional[int] = None,
                     num_scales: Optional[int] = None, top_k: int = 0, top_p: float = 1.0,
                     temperature: float = 1.0) -> torch.Tensor:
    """The PyTorch way, as VAR and LlamaGen sample today: CFG mix of [2B, (L,) V] logits (conditional rows first;
    VAR's ramp (1 + t) cond - t uncond, t = cfg * scale_index / (num_scales - 1), or LlamaGen's
    uncond + cfg (cond - uncond)), temperature, then VAR's sample_with_top_k_top_p_: mask below the k-th
    largest, sort ascending, drop cumsum(softmax) <= 1 - top_p but the last, softmax, multinomial. Draws from
    torch's global generator; int64 tokens [B] or [B, L], fastar.sample_cfg's signature and outputs."""
    mixed = cfg_mix(logits.float(), cfg, schedule, scale_index, num_scales)
    if temperature != 1.0:
        mixed = mixed / temperature
    var_top_k_top_p_(mixed, top_k, top_p if top_p < 1.0 else 0.0)
    return torch.multinomial(mixed.softmax(dim=-1).view(-1, mixed.shape[-1]), num_samples=1).view(mixed.shape[:-1])


def make_inputs(case: SampleCase, device: str = "cpu") -> dict:
    """Conditional logits of spread logit_scale and unconditional ones correlated with them (0.6 cond + noise,
    the same spread); the float64 reference's probabilities and its top-k set, for the checks."""
    gen = torch.Generator(device).manual_seed(0)
    shape = (case.B, case.L or 1, case.V)
    cond = torch.randn(shape, generator=gen, device=device) * case.logit_scale
    uncond = 0.6 * cond + torch.randn(shape, generator=gen, device=device) * (0.8 * case.logit_scale)
    logits = torch.cat([cond, uncond]).to(case.dtype)
    probs, in_top_k = [], []
    for b in range(case.B):  # one image at a time: float64 [L, V] temporaries, not [B, L, V]
        pair = logits[[b, case.B + b]]
        probs.append(sample_cfg_reference(pair, **case.kwargs).float())
        in_top_k.append(sample_cfg_reference(pair, **dict(case.kwargs, top_p=1.0)) > 0)
    return {"logits": logits if case.L else logits[:, 0], "probs": torch.cat(probs).cpu(),
            "in_top_k": torch.cat(in_top_k).cpu()}


def poison_output(case: SampleCase, device: str) -> None:
    """Fill memory of the output's size with -1 and free it, so the output likely reuses it: a position the
    kernel does not write then fails the check instead of showing a token of an earlier call."""
    torch.full((case.B, case.L or 1), -1, dtype=torch.int64, device=device)


def runner(fn):
    def run(x: dict, seed: int):
        case = x["case"]
        poison_output(case, x["logits"].device.type)
        return fn(x["logits"], seed, **case.kwargs)

    return run


run_fastar = runner(lambda logits, seed, **kw: fastar.sample_cfg(logits, seed=seed, **kw))
run_torch = runner(lambda logits, seed, **kw: torch_sample_cfg(logits, **kw))


def check(case: SampleCase, x: dict, tokens: torch.Tensor) -> None:
    """int64 tokens of the right shape, every one written (no -1 poison) in [0, V), in its position's top-k
    set, and all but TOP_P_SLACK of them in its top-p set."""
    shape = (case.B, case.L) if case.L else (case.B,)
    assert tokens.dtype == torch.int64 and tokens.shape == shape, (tokens.dtype, tokens.shape)
    assert ((tokens >= 0) & (tokens < case.V)).all(), "a token outside [0, V) (an unwritten output?)"
    chosen = tokens.cpu().view(case.B, -1, 1)
    outside_top_k = int((~x["in_top_k"].gather(-1, chosen)).sum())
    outside_top_p = int((x["probs"].gather(-1, chosen) == 0).sum())
    assert outside_top_k == 0, f"{outside_top_k} tokens outside the top-{case.top_k}"
    assert outside_top_p <= TOP_P_SLACK * tokens.numel(), f"{outside_top_p} of {tokens.numel()} tokens outside top-p"


def agree(x: dict, fastar_runs: list, torch_runs: list) -> None:
    """Both samplers draw from the reference distribution (different RNGs, so only statistics can agree): the
    mean probability of the drawn tokens lies within 5 standard errors of its exact expectation sum(p^2)."""
    probs = x["probs"].double()
    per_position_mean = (probs**2).sum(-1)
    per_position_var = (probs**3).sum(-1) - per_position_mean**2
    for name, runs in (("fastar", fastar_runs), ("torch", torch_runs)):
        tokens = torch.stack([t.view(probs.shape[:-1]) for t in runs])
        observed = probs.expand(len(runs), *probs.shape).gather(-1, tokens.unsqueeze(-1)).mean().item()
        expected = per_position_mean.mean().item()
        stderr = math.sqrt(per_position_var.sum().item() / (len(runs) * per_position_mean.numel() ** 2))
        assert abs(observed - expected) <= 5 * stderr + 1e-12, (
            f"{name}: mean probability of the drawn tokens {observed:.5f}, expected {expected:.5f} +- {stderr:.5f}"
        )


def metrics(case: SampleCase, x: dict, outputs: list) -> dict:
    """bytes: the logits read once and the tokens written."""
    return {"bytes": x["logits"].numel() * x["logits"].element_size() + 8 * case.B * (case.L or 1)}


TABLE = common.Table(
    "sample_cfg: fastar.sample_cfg vs the PyTorch way (CFG mix, VAR's sample_with_top_k_top_p_: topk, sort,"
    " cumsum softmax, masked_fill, softmax, multinomial); median time per call, cold caches; GB/s: the logits"
    " read once and the tokens / time; others: share of the cores other processes used meanwhile",
    common.op_columns(10, 40),
)


def make_case_inputs(case: SampleCase, device: str = "cpu") -> dict:
    return {"case": case, **make_inputs(case, device)}


BENCH = common.OpBench("sample_cfg", CASES, make_case_inputs, run_fastar, run_torch, check, agree, metrics, TABLE)

# ---------------------------------------------------------------------------------------------------------
# pytest-benchmark (`pytest bench`)

inputs = functools.cache(make_case_inputs)
parametrize_cases = pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)


@parametrize_cases
def test_sample_cfg_fastar(benchmark, case):
    common.benchmark_op(benchmark, BENCH, run_fastar, case, inputs(case))


@parametrize_cases
def test_sample_cfg_torch(benchmark, case):
    common.benchmark_op(benchmark, BENCH, run_torch, case, inputs(case))


@parametrize_cases
def test_sample_cfg_baseline_agrees(case):
    x = inputs(case)
    runs = [[fn(x, seed) for seed in range(4)] for fn in (run_fastar, run_torch)]
    for out in runs[0] + runs[1]:
        check(case, x, out)
    agree(x, *runs)


def test_sample_cfg_checks_catch_wrong_tokens():
    """check rejects an unwritten (poisoned) output and tokens outside the top-k; agree rejects tokens drawn
    without the filters (uniformly)."""
    case = CASES[0]
    x = inputs(case)
    tokens = run_fastar(x, 0)
    with pytest.raises(AssertionError, match="outside"):
        check(case, x, tokens.clone().fill_(-1))
    least = x["probs"].argmin(-1).view_as(tokens)
    with pytest.raises(AssertionError, match="outside the top"):
        check(case, x, least)
    uniform = torch.randint(0, case.V, tokens.shape, generator=torch.Generator().manual_seed(0))
    with pytest.raises(AssertionError, match="mean probability"):
        agree(x, [uniform], [tokens])
