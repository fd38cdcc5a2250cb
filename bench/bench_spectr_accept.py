"""fastar.spectr_accept against SpecTr's K-SEQ written as vectorised PyTorch (bisection for rho*, level by level)."""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

import fastar
from bench import common
from bench.common import AcceptanceCase


@dataclasses.dataclass(frozen=True)
class SpectrCase(AcceptanceCase):
    """B sequences of k drafts of length n over a vocabulary of V."""

    k: int = 4

    @property
    def id(self) -> str:
        return f"{super().id}-k{self.k}"

    @property
    def shape(self) -> str:
        return f"B={self.B} k={self.k} n={self.n} V={self.V}"


CASES = [
    SpectrCase(8, 4, 32000, k=4),
    SpectrCase(8, 4, 32000, torch.bfloat16, k=4),
    SpectrCase(4, 3, 128256, k=8),
]
BISECTION_STEPS = 30  # the baseline's rho* to ~1e-9 relative, one pass over V per step


def torch_spectr_accept(draft_token_ids, draft_probs, target_probs):
    """K-SEQ level by level in plain PyTorch, vectorised over the batch: rho* by bisection over [1, k_t] (a pass over
    the rows per step), the candidates' tests at once, the residual drawn by torch.multinomial. Same outputs as
    fastar.spectr_accept (rows of the lowest draft alive)."""
    B, k, n = draft_token_ids.shape
    device = target_probs.device
    ids = draft_token_ids.long()
    rows = torch.arange(B, device=device)
    alive = torch.ones(B, k, dtype=torch.bool, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tokens = torch.full((B, n + 1), -1, dtype=torch.long, device=device)
    num_accepted = torch.zeros(B, dtype=torch.long, device=device)
    rep = torch.zeros(B, dtype=torch.long, device=device)
    for t in range(n + 1):
        rep = torch.where(done, rep, alive.int().argmax(1))
        p = target_probs[rows, rep, t].double()
        if t == n:
            bonus = torch.multinomial(p, 1).squeeze(1)
            tokens[:, n] = torch.where(done, tokens[:, n], bonus)
            break
        q = draft_probs[rows, rep, t].double()
        kt = alive.sum(1, keepdim=True).double()
        lo, hi = torch.ones_like(kt), kt.clone()
        for _ in range(BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            beta = torch.minimum(q, p / mid).sum(-1, keepdim=True)
            ok = 1 - (1 - beta) ** kt <= mid * beta
            lo, hi = torch.where(ok, lo, mid), torch.where(ok, mid, hi)
        rho = torch.where(kt == 1, torch.ones_like(hi), hi)
        beta = torch.minimum(q, p / rho).sum(-1, keepdim=True)
        accept = 1 - (1 - beta) ** kt
        x = ids[:, :, t]
        ratio = p.gather(1, x) / (rho * q.gather(1, x))
        passed = alive & (torch.rand(B, k, dtype=torch.float64, device=device) < ratio)
        any_passed = passed.any(1)
        y = x[rows, passed.int().argmax(1)]
        residual = (p - torch.minimum(q, p / rho) * accept / beta.clamp_min(1e-300)).clamp_min(0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
        drawn = torch.multinomial(residual, 1).squeeze(1)
        live = ~done
        tokens[:, t] = torch.where(live, torch.where(any_passed, y, drawn), tokens[:, t])
        num_accepted += (live & any_passed).long()
        done |= live & ~any_passed
        alive &= x == y[:, None]
    return rep.int(), tokens.int(), num_accepted.int()


def make_inputs(case: SpectrCase, device: str = "cpu") -> dict:
    """Target and draft rows per position from common.realistic_logits, the same for every draft (a drafter whose
    distribution does not depend on the earlier draft tokens); the k drafts are sampled i.i.d. from q."""
    target_logp, draft_logp = common.realistic_logits(case, device)
    q = draft_logp.exp_()
    gen = torch.Generator(device).manual_seed(1)
    ids = torch.multinomial(q.view(-1, case.V), case.k, replacement=True, generator=gen)
    draft_token_ids = ids.view(case.B, case.n, case.k).transpose(1, 2).contiguous()
    return {
        "draft_token_ids": draft_token_ids,
        "draft_probs": q.to(case.dtype)[:, None].expand(case.B, case.k, case.n, case.V),
        "target_probs": target_logp.exp_().to(case.dtype)[:, None].expand(case.B, case.k, case.n + 1, case.V),
    }


def run_fastar(x: dict, seed: int):
    return fastar.spectr_accept(x["draft_token_ids"], x["draft_probs"], x["target_probs"], seed=seed)


def run_torch(x: dict, seed: int):
    return torch_spectr_accept(x["draft_token_ids"], x["draft_probs"], x["target_probs"])


def check(case: SpectrCase, x: dict, out: tuple) -> None:
    draft_index, tokens, num_accepted = (t.cpu() for t in out)
    assert ((draft_index >= 0) & (draft_index < case.k)).all(), draft_index
    ids = x["draft_token_ids"].cpu()
    rows = torch.arange(case.B)
    common.check_output((tokens, num_accepted), ids[rows, draft_index.long()], case.V)


def nbytes(x: dict, num_accepted: torch.Tensor) -> int:
    """The draft ids, the p and q rows of every level reached (read once: what solving rho* needs at least), the
    bonus p row of the sequences that accepted every level, and the outputs."""
    ids, p = x["draft_token_ids"], x["target_probs"]
    B, _, n = ids.shape
    row = p.shape[-1] * p.element_size()
    levels = int(torch.clamp(num_accepted.long() + 1, max=n).sum())
    bonus = int((num_accepted == n).sum())
    return ids.numel() * ids.element_size() + (2 * levels + bonus) * row + B * (n + 1) * 4 + 2 * B * 4


def metrics(case: SpectrCase, x: dict, outputs: list) -> dict:
    return common.acceptance_metrics(nbytes)(case, x, [(t, na) for _, t, na in outputs])


def agree(x: dict, fastar_runs: list, torch_runs: list) -> None:
    """Both samplers' mean num_accepted agree within 5 standard errors (different RNGs: only statistics can)."""
    f = torch.stack([na for _, _, na in fastar_runs]).double().flatten()
    t = torch.stack([na for _, _, na in torch_runs]).double().flatten()
    stderr = (f.var() / f.numel() + t.var() / t.numel()).sqrt().item()
    assert abs(f.mean().item() - t.mean().item()) <= 5 * stderr + 1e-9, (
        f"mean accepted: fastar {f.mean().item():.3f}, torch {t.mean().item():.3f} +- {stderr:.3f}"
    )


BENCH = common.OpBench("spectr_accept", CASES, make_inputs, run_fastar, run_torch, check, agree, metrics,
                       common.ACCEPTANCE_TABLE)

inputs = functools.cache(make_inputs)
parametrize_cases = pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)


@parametrize_cases
def test_spectr_accept_fastar(benchmark, case):
    common.benchmark_op(benchmark, BENCH, run_fastar, case, inputs(case))


@parametrize_cases
def test_spectr_accept_torch(benchmark, case):
    common.benchmark_op(benchmark, BENCH, run_torch, case, inputs(case))


@parametrize_cases
def test_spectr_accept_baseline_agrees(case):
    x = inputs(case)
    runs = [[fn(x, seed) for seed in range(8)] for fn in (run_fastar, run_torch)]
    for out in runs[0] + runs[1]:
        check(case, x, out)
    agree(x, *runs)
