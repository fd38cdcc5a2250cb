"""fastar.typical_accept against Medusa's typical acceptance (``evaluate_posterior``) in PyTorch.

The tree, drafts and target rows are bench_tree_speculative_sample's (mc_sim_7b_63; the target rows' log serves
as logits). The baseline is Medusa's rule batched over the sequences: the softmax of every tree node's row at the
temperature (once per node, where Medusa takes it per candidate path), each candidate's probability, the entropy
(exact, ``xlogy``; Medusa adds 1e-5 inside the log), the threshold, ``cumprod`` for the accepted lengths, the first
longest path and the argmax after it. Among passing paths of equal length the two pick differently (see agree).
"""
from __future__ import annotations

import functools

import pytest
import torch

import fastar
from bench import common
from bench.bench_tree_greedy_verify import CASES, metrics
from bench.bench_tree_speculative_sample import TREE, make_inputs

GOAL = 10.0
EPSILON, ALPHA, TEMPERATURE = 0.09, 0.3, 1.0


def make_logits(case, device: str = "cpu") -> dict:
    x = make_inputs(case, device)
    x["target_probs"] = x["target_probs"].float().log_().to(case.dtype)  # logits
    return x


def run_fastar(x: dict, seed: int):
    return fastar.typical_accept(x["draft_token_ids"], x["target_probs"], tree=TREE, posterior_threshold=EPSILON,
                                 posterior_alpha=ALPHA, temperature=TEMPERATURE)


def run_torch(x: dict, seed: int):
    logits, paths, candidates = x["target_probs"], x["paths"], x["candidates"]
    probs = torch.softmax(logits.float() / TEMPERATURE, -1)  # [B, N+1, V]
    entropy = -torch.special.xlogy(probs, probs).sum(-1)
    threshold = torch.minimum(torch.full_like(entropy, EPSILON), torch.exp(-entropy) * ALPHA)  # [B, N+1]
    parents = paths[:, :-1].clamp(min=0)  # [n_paths, depth]: the node before each path position
    B = len(candidates)
    rows = torch.arange(B)[:, None, None]
    tokens_p = probs[rows, parents[None], candidates[:, :, 1:].clamp(min=0)]  # [B, n_paths, depth]
    passes = (tokens_p > threshold[:, parents]) & (paths[:, 1:] >= 0)
    lengths = passes.int().cumprod(-1).sum(-1)
    best = lengths.argmax(-1)
    accepted = lengths.gather(1, best[:, None])[:, 0]
    steps = torch.arange(paths.shape[1])
    best_paths = paths[best]
    path = torch.where(steps <= accepted[:, None], best_paths, -1)
    drafted = candidates[torch.arange(B), best, 1:]
    next_token = logits.argmax(-1).gather(1, best_paths.gather(1, accepted[:, None]))[:, 0]
    tokens = torch.where(steps[:-1] < accepted[:, None], drafted, -1)
    tokens = torch.cat([tokens, torch.full_like(accepted[:, None], -1)], 1).scatter_(1, accepted[:, None],
                                                                                    next_token[:, None])
    return path.int(), tokens.int(), accepted.int()


def check(case, x: dict, out: tuple) -> None:
    """Every element written: a root-side path from node 0 with its drafts, one token in [0, V), then -1."""
    path, tokens, accepted = (t.cpu() for t in out)
    width = x["paths"].shape[1]
    assert path.shape == tokens.shape == (case.B, width) and path.dtype == tokens.dtype == torch.int32
    parents = TREE.parents.tolist()
    drafts = x["draft_token_ids"]
    for b in range(case.B):
        k = int(accepted[b])
        nodes = path[b].tolist()
        assert 0 <= k < width and nodes[0] == 0 and all(v == -1 for v in nodes[k + 1 :]), nodes
        assert all(parents[nodes[i]] == nodes[i - 1] for i in range(1, k + 1)), nodes
        assert tokens[b, :k].tolist() == [int(drafts[b, n - 1]) for n in nodes[1 : k + 1]]
        assert 0 <= int(tokens[b, k]) < case.V and (tokens[b, k + 1 :] == -1).all()


def agree(x: dict, fastar_runs: list, torch_runs: list) -> None:
    """Deterministic: the same accepted counts. Unlike greedy verification several children of a node may pass, so
    paths of equal length may differ: fastar takes the earliest in node order, Medusa's code the first in its
    candidate list (leaves in decreasing node order)."""
    for (_, _, accepted), (_, _, want_accepted) in zip(fastar_runs, torch_runs):
        assert torch.equal(accepted.cpu(), want_accepted.cpu())


BENCH = common.OpBench(
    "typical_accept", CASES, make_logits, run_fastar, run_torch, check, agree, metrics, common.ACCEPTANCE_TABLE,
    goal=GOAL,
)

inputs = functools.cache(make_logits)
parametrize_cases = pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)


@parametrize_cases
def test_typical_accept_fastar(benchmark, case):
    common.benchmark_op(benchmark, BENCH, run_fastar, case, inputs(case))


@parametrize_cases
def test_typical_accept_torch(benchmark, case):
    common.benchmark_op(benchmark, BENCH, run_torch, case, inputs(case))


@parametrize_cases
def test_typical_accept_baseline_agrees(case):
    x = inputs(case)
    runs = [[fn(x, 0)] for fn in (run_fastar, run_torch)]
    for out in runs[0] + runs[1]:
        check(case, x, out)
    agree(x, *runs)
