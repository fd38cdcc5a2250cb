"""fastar.lantern_accept against LANTERN's relaxed acceptance written in vectorised PyTorch."""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

import fastar
from bench import common
from bench.bench_speculative_sample import agree_with_moments, chain_moments, nbytes, torch_chain_outputs
from bench.common import AcceptanceCase

# Image-token logits are flat (a visual AR model spreads its mass over many interchangeable codes): softmax of
# this scale times a smooth function of the code's latent vector plus noise gives a top-1 of a few percent.
IMAGE_TEMPERATURE = 2.0
CODEBOOK_DIM = 8  # the latent space the neighbours are found in (LlamaGen's VQ codes have 8 dimensions)
GOAL = 10.0


@dataclasses.dataclass(frozen=True)
class LanternCase(AcceptanceCase):
    """B sequences of n image-token drafts over a codebook of V codes, k neighbours per code, budget delta."""

    k: int = 1000
    delta: float = 0.1

    @property
    def id(self) -> str:
        return f"{super().id}-k{self.k}"

    @property
    def shape(self) -> str:
        return f"B={self.B} n={self.n} V={self.V} k={self.k}" + ("" if self.draft_probs else " no q")


CASES = [
    LanternCase(32, 8, 16384),  # LlamaGen's codebook, LANTERN's k = 1000 and delta = 0.1
    LanternCase(32, 8, 16384, draft_probs=False),
    LanternCase(8, 16, 8192, k=100),
]


def proximity_masses(draft_token_ids, draft_probs, target_probs, neighbors, delta):
    """float64 (p(A), q(A)) [B, n] of every draft at once, A its proximity set: the draft plus the prefix of
    its neighbour row (the draft itself skipped) whose cumulative target mass stays <= delta; q(A) = 1 without
    draft probabilities."""
    B, n = draft_token_ids.shape
    ids = draft_token_ids.long()[..., None]
    nb = neighbors[draft_token_ids.long()].long()  # [B, n, k]
    member = nb != ids

    def masses(probs):
        return probs[:, :n].gather(-1, ids).squeeze(-1).double(), probs[:, :n].gather(-1, nb.view(B, n, -1)).double()

    p_x, nb_p = masses(target_probs)
    member &= (nb_p * member).cumsum(-1) <= delta
    p_a = p_x + (nb_p * member).sum(-1)
    if draft_probs is None:
        return p_a, torch.ones_like(p_a)
    q_x, nb_q = masses(draft_probs)
    return p_a, q_x + (nb_q * member).sum(-1)


def torch_lantern_accept(draft_token_ids, draft_probs, target_probs, neighbors, delta):
    """LANTERN in vectorised PyTorch: the proximity masses of every draft at once, u * q(A) <= p(A), then the
    chain's residual sampling."""
    p_a, q_a = proximity_masses(draft_token_ids, draft_probs, target_probs, neighbors, delta)
    u = torch.rand(p_a.shape, dtype=torch.float64, device=p_a.device)
    return torch_chain_outputs(draft_token_ids, draft_probs, target_probs, u * q_a <= p_a)


def nearest_codes(codebook: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """int32 [V, k]: each code's k nearest other codes (squared L2 distance), nearest first."""
    rows = []
    for start in range(0, codebook.shape[0], chunk):
        d = torch.cdist(codebook[start:start + chunk], codebook)
        d[torch.arange(d.shape[0]), torch.arange(start, start + d.shape[0])] = float("inf")
        rows.append(d.topk(k, largest=False).indices.int())
    return torch.cat(rows)


def make_inputs(case: LanternCase, device: str = "cpu") -> dict:
    """A random codebook and its neighbour table; target logits smooth in the latent space (neighbours get
    similar probabilities, as in a VQ model) plus noise; the draft's a noisy copy; drafts sampled from q, or
    its argmax for a drafter without probabilities."""
    gen = torch.Generator().manual_seed(0)
    codebook = torch.randn(case.V, CODEBOOK_DIM, generator=gen)
    directions = torch.randn(case.B, case.n + 1, CODEBOOK_DIM, generator=gen)
    smooth = directions @ codebook.T
    target = (smooth + 0.5 * torch.randn(smooth.shape, generator=gen)).mul_(IMAGE_TEMPERATURE / 3).log_softmax(-1)
    draft = (target[:, : case.n] + common.DRAFT_NOISE * torch.randn(case.B, case.n, case.V, generator=gen))
    q = draft.log_softmax(-1).exp_()
    if case.draft_probs:
        draft_token_ids = torch.multinomial(q.view(-1, case.V), 1, generator=gen).view(case.B, case.n)
    else:
        draft_token_ids = q.argmax(-1)
    return {
        "draft_token_ids": draft_token_ids.to(device),
        "draft_probs": q.to(device, case.dtype) if case.draft_probs else None,
        "target_probs": target.exp_().to(device, case.dtype),
        "neighbors": nearest_codes(codebook, case.k).to(device),
        "delta": case.delta,
    }


def run_fastar(x: dict, seed: int):
    return fastar.lantern_accept(x["draft_token_ids"], x["draft_probs"], x["target_probs"], x["neighbors"],
                                 delta=x["delta"], seed=seed)


def run_torch(x: dict, seed: int):
    return torch_lantern_accept(x["draft_token_ids"], x["draft_probs"], x["target_probs"], x["neighbors"], x["delta"])


def lantern_nbytes(x: dict, num_accepted: torch.Tensor) -> int:
    """speculative_sample's bytes, plus each draft's neighbour row and one scalar read per neighbour of p (and
    of q when given)."""
    B, n = x["draft_token_ids"].shape
    k = x["neighbors"].shape[1]
    per_neighbour = 4 + (1 if x["draft_probs"] is None else 2) * common.SCALAR_READ_BYTES
    return nbytes(x, num_accepted) + B * n * k * per_neighbour


def agree(x: dict, fastar_runs: list, torch_runs: list) -> None:
    """Mean num_accepted of both within 5 standard errors of its expectation: draft i accepted with
    probability min(1, p(A) / q(A))."""
    p_a, q_a = proximity_masses(x["draft_token_ids"], x["draft_probs"], x["target_probs"], x["neighbors"], x["delta"])
    agree_with_moments(chain_moments((p_a / q_a).clamp(max=1)), fastar_runs, torch_runs)


BENCH = common.OpBench(
    "lantern_accept", CASES, make_inputs, run_fastar, run_torch, common.check_acceptance, agree,
    common.acceptance_metrics(lantern_nbytes), common.ACCEPTANCE_TABLE, goal=GOAL,
)

inputs = functools.cache(make_inputs)
parametrize_cases = pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)


@parametrize_cases
def test_lantern_accept_fastar(benchmark, case):
    common.benchmark_op(benchmark, BENCH, run_fastar, case, inputs(case))


@parametrize_cases
def test_lantern_accept_torch(benchmark, case):
    common.benchmark_op(benchmark, BENCH, run_torch, case, inputs(case))


@parametrize_cases
def test_lantern_accept_baseline_agrees(case):
    x = inputs(case)
    runs = [[fn(x, seed) for seed in range(16)] for fn in (run_fastar, run_torch)]
    for out in runs[0] + runs[1]:
        common.check_acceptance(case, x, out)
    agree(x, *runs)
