"""fastar.speculative_sample against the vectorised PyTorch rejection sampler users write today."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import fastar
from bench import common
from bench.common import AcceptanceCase

CASES = [
    AcceptanceCase(32, 5, 32000),
    AcceptanceCase(32, 8, 128256),
    AcceptanceCase(32, 5, 32000, torch.bfloat16),
    AcceptanceCase(32, 5, 32000, draft_probs=False),
]
GOAL = 20.0  # the project's target speed-up over the baseline


def torch_speculative_sample(draft_token_ids, draft_probs, target_probs):
    """Speculative sampling in plain PyTorch, as in vLLM's PyTorch path: whole-batch gathers, the residual
    of every position at once, then one multinomial draw per sequence. Same outputs format as fastar."""
    n = draft_token_ids.shape[1]
    ids = draft_token_ids.long().unsqueeze(-1)
    p_x = target_probs[:, :n].gather(-1, ids).squeeze(-1).double()
    u = torch.rand(p_x.shape, dtype=torch.float64, device=p_x.device)  # float64: float32 can give exactly 0
    if draft_probs is None:  # q is one-hot at the draft
        accepted = u <= p_x
    else:
        accepted = u * draft_probs.gather(-1, ids).squeeze(-1).double() <= p_x  # u <= p/q without dividing
    return torch_chain_outputs(draft_token_ids, draft_probs, target_probs, accepted)


def torch_chain_outputs(draft_token_ids, draft_probs, target_probs, accepted):
    """The chain's outputs in plain PyTorch given each draft's test `accepted` [B, n]: the residual
    norm(max(p - q, 0)) of every position at once (p without the draft when q is None), one multinomial draw
    per sequence at its first rejection, or from the bonus row when every draft was accepted."""
    B, n = draft_token_ids.shape
    ids = draft_token_ids.long().unsqueeze(-1)
    p = target_probs[:, :n]
    residual = p.scatter(-1, ids, 0) if draft_probs is None else (p - draft_probs).clamp_(min=0)
    residual /= residual.sum(-1, keepdim=True)
    num_accepted = accepted.long().cumprod(-1).sum(-1)
    rows = torch.where(
        (num_accepted < n)[:, None],
        residual[torch.arange(B, device=p.device), num_accepted.clamp(max=n - 1)],
        target_probs[:, n],
    )
    extra = torch.multinomial(rows, 1)
    pos = torch.arange(n + 1, device=p.device)
    tokens = torch.where(pos < num_accepted[:, None], F.pad(draft_token_ids.long(), (0, 1)), -1)
    tokens.scatter_(1, num_accepted[:, None], extra)
    return tokens.int(), num_accepted.int()


def make_inputs(case: AcceptanceCase, device: str = "cpu") -> dict:
    """Target and draft distributions from common.realistic_logits; the drafts are sampled from q, or, for
    a drafter without probabilities (which drafts greedily, as EAGLE-2/3 do), its argmax."""
    target_logp, draft_logp = common.realistic_logits(case, device)
    q = draft_logp.exp_()
    if case.draft_probs:
        gen = torch.Generator(device).manual_seed(1)
        draft_token_ids = torch.multinomial(q.view(-1, case.V), 1, generator=gen).view(case.B, case.n)
    else:
        draft_token_ids = q.argmax(-1)
    return {
        "draft_token_ids": draft_token_ids,
        "draft_probs": q.to(case.dtype) if case.draft_probs else None,
        "target_probs": target_logp.exp_().to(case.dtype),
    }


def run_fastar(x: dict, seed: int):
    return fastar.speculative_sample(x["draft_token_ids"], x["draft_probs"], x["target_probs"], seed=seed)


def run_torch(x: dict, seed: int):
    return torch_speculative_sample(x["draft_token_ids"], x["draft_probs"], x["target_probs"])


def nbytes(x: dict, num_accepted: torch.Tensor) -> int:
    """The draft ids, p(x) and q(x) of every draft, the one row sampled per sequence (p and q at a
    rejection, p alone without q or for the bonus token), and the outputs."""
    ids, q, p = x["draft_token_ids"], x["draft_probs"], x["target_probs"]
    B, n = ids.shape
    per_draft = 1 if q is None else 2
    rejected = int((num_accepted < n).sum())
    rows = rejected * per_draft + (B - rejected)
    scalars = B * n * per_draft * common.SCALAR_READ_BYTES
    outputs = B * (n + 1) * 4 + B * 4
    return ids.numel() * ids.element_size() + scalars + rows * p.shape[-1] * p.element_size() + outputs


def acceptance_moments(x: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-sequence mean and variance of num_accepted given the drafts: draft i is accepted with
    probability a_i = min(1, p_i(x_i) / q_i(x_i))."""
    ids, q, p = x["draft_token_ids"].long().unsqueeze(-1), x["draft_probs"], x["target_probs"]
    n = ids.shape[1]
    a = p[:, :n].gather(-1, ids).squeeze(-1).double()
    if q is not None:
        a = (a / q.gather(-1, ids).squeeze(-1).double()).clamp_(max=1)
    return chain_moments(a)


def chain_moments(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of num_accepted [B] when draft i is accepted with probability a [B, n],
    independently, up to the first rejection."""
    survive = a.cumprod(-1).cpu()  # P(num_accepted > i)
    mean = survive.sum(-1)
    second = (survive * (2 * torch.arange(a.shape[1]) + 1)).sum(-1)  # E[N^2] = sum_i (2i + 1) P(N > i)
    return mean, second - mean**2


def agree(x: dict, fastar_runs: list, torch_runs: list) -> None:
    agree_with_moments(acceptance_moments(x), fastar_runs, torch_runs)


def agree_with_moments(moments: tuple[torch.Tensor, torch.Tensor], fastar_runs: list, torch_runs: list) -> None:
    """Both samplers' mean num_accepted lies within 5 standard errors of its exact expectation (different
    RNGs, so only the statistics can agree)."""
    mean, var = moments
    for name, runs in (("fastar", fastar_runs), ("torch", torch_runs)):
        observed = torch.stack([na for _, na in runs]).double().mean().item()
        stderr = (var.sum() / (len(runs) * len(mean) ** 2)).sqrt().item()
        assert abs(observed - mean.mean().item()) <= 5 * stderr + 1e-9, (
            f"{name}: mean accepted {observed:.3f}, expected {mean.mean().item():.3f} +- {stderr:.3f}"
        )


BENCH = common.OpBench(
    "speculative_sample", CASES, make_inputs, run_fastar, run_torch, common.check_acceptance, agree,
    common.acceptance_metrics(nbytes), common.ACCEPTANCE_TABLE, goal=GOAL,
)

inputs = functools.cache(make_inputs)
parametrize_cases = pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)


@parametrize_cases
def test_speculative_sample_fastar(benchmark, case):
    common.benchmark_op(benchmark, BENCH, run_fastar, case, inputs(case))


@parametrize_cases
def test_speculative_sample_torch(benchmark, case):
    common.benchmark_op(benchmark, BENCH, run_torch, case, inputs(case))


@parametrize_cases
def test_speculative_sample_baseline_agrees(case):
    x = inputs(case)
    runs = [[fn(x, seed) for seed in range(16)] for fn in (run_fastar, run_torch)]
    for out in runs[0] + runs[1]:
        common.check_acceptance(case, x, out)
    agree(x, *runs)
