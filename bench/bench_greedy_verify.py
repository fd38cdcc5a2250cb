"""fastar.greedy_verify against the vectorised PyTorch argmax verification users write today."""
from __future__ import annotations

import functools

import pytest
import torch

import fastar
from bench import common
from bench.common import AcceptanceCase

CASES = [AcceptanceCase(32, 5, 32000), AcceptanceCase(32, 8, 128256)]


def torch_greedy_verify(draft_token_ids, target_logits):
    """Greedy verification in plain PyTorch: argmax of every row, compare, cumprod. Same outputs as fastar."""
    n = draft_token_ids.shape[1]
    argmax = target_logits.argmax(-1)
    num_accepted = (draft_token_ids == argmax[:, :n]).long().cumprod(-1).sum(-1)
    # Accepted drafts equal the argmax, so every emitted slot holds the target's argmax.
    pos = torch.arange(n + 1, device=argmax.device)
    tokens = torch.where(pos <= num_accepted[:, None], argmax, -1)
    return tokens.int(), num_accepted.int()


def make_inputs(case: AcceptanceCase, device: str = "cpu") -> dict:
    """Target logits from common.realistic_logits; each draft is the argmax of the draft's distribution."""
    target_logp, draft_logp = common.realistic_logits(case, device)
    return {"draft_token_ids": draft_logp.argmax(-1), "target_logits": target_logp.to(case.dtype)}


def run_fastar(x: dict, seed: int):
    return fastar.greedy_verify(x["draft_token_ids"], x["target_logits"])


def run_torch(x: dict, seed: int):
    return torch_greedy_verify(x["draft_token_ids"], x["target_logits"])


def nbytes(x: dict, num_accepted: torch.Tensor) -> int:
    """The draft ids, the logits rows up to the first mismatch (or the bonus row), and the outputs."""
    ids, logits = x["draft_token_ids"], x["target_logits"]
    B, n = ids.shape
    rows = int(num_accepted.sum()) + B
    return ids.numel() * ids.element_size() + rows * logits.shape[-1] * logits.element_size() + B * (n + 2) * 4


def agree(x: dict, fastar_runs: list, torch_runs: list) -> None:
    """Greedy verification is deterministic: the outputs are identical."""
    for (tokens, na), (torch_tokens, torch_na) in zip(fastar_runs, torch_runs):
        assert torch.equal(tokens, torch_tokens) and torch.equal(na, torch_na), "fastar and torch disagree"


BENCH = common.OpBench(
    "greedy_verify", CASES, make_inputs, run_fastar, run_torch, common.check_acceptance, agree,
    common.acceptance_metrics(nbytes), common.ACCEPTANCE_TABLE,
)

inputs = functools.cache(make_inputs)
parametrize_cases = pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)


@parametrize_cases
def test_greedy_verify_fastar(benchmark, case):
    common.benchmark_op(benchmark, BENCH, run_fastar, case, inputs(case))


@parametrize_cases
def test_greedy_verify_torch(benchmark, case):
    common.benchmark_op(benchmark, BENCH, run_torch, case, inputs(case))


@parametrize_cases
def test_greedy_verify_baseline_agrees(case):
    x = inputs(case)
    outs = [run_fastar(x, 0), run_torch(x, 0)]
    for out in outs:
        common.check_acceptance(case, x, out)
    agree(x, [outs[0]], [outs[1]])
