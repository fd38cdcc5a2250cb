"""fastar.tree_greedy_verify against EAGLE's / Medusa's greedy evaluate_posterior in PyTorch.

The tree and drafts are bench_tree_speculative_sample's (mc_sim_7b_63, children the top-k of a draft distribution
close to the target's, so that the target's argmax is often among them). The baseline is the official greedy rule
batched over the sequences: the target's argmax after every tree node (one pass over all N+1 rows; the official
code takes it over the rows gathered per candidate path, several times more), matched against every candidate
path, ``cumprod`` for the accepted lengths, the first longest path, its next token.
"""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

import fastar
from bench import common
from bench.bench_tree_speculative_sample import TREE, TreeCase, make_inputs

GOAL = 5.0


@dataclasses.dataclass(frozen=True)
class GreedyCase(TreeCase):
    """bench_tree_speculative_sample's case without draft probabilities; the target rows serve as logits."""

    draft_probs: bool = False

    @property
    def id(self) -> str:
        return f"B{self.B}-V{self.V}-{common.DTYPE_NAMES[self.dtype]}"

    @property
    def shape(self) -> str:
        return f"B={self.B} tree 64 V={self.V}"


CASES = [GreedyCase(32, 32000), GreedyCase(32, 128256, torch.bfloat16)]


def run_fastar(x: dict, seed: int):
    return fastar.tree_greedy_verify(x["draft_token_ids"], TREE, x["target_probs"])


def run_torch(x: dict, seed: int):
    logits, paths, candidates = x["target_probs"], x["paths"], x["candidates"]
    argmax = logits.argmax(-1)  # [B, N+1]: after each tree node
    after = argmax[:, paths[:, :-1].clamp(min=0)]  # [B, n_paths, depth]
    match = (candidates[:, :, 1:] == after) & (paths[:, 1:] >= 0)
    lengths = match.int().cumprod(-1).sum(-1)  # [B, n_paths]
    best = lengths.argmax(-1)
    accepted = lengths.gather(1, best[:, None])[:, 0]
    steps = torch.arange(paths.shape[1])
    best_paths = paths[best]  # [B, depth + 1]
    path = torch.where(steps <= accepted[:, None], best_paths, -1)
    drafted = candidates[torch.arange(len(best)), best, 1:]  # the best path's drafts
    next_token = argmax.gather(1, best_paths.gather(1, accepted[:, None]))[:, 0]
    tokens = torch.where(steps[:-1] < accepted[:, None], drafted, -1)
    tokens = torch.cat([tokens, torch.full_like(accepted[:, None], -1)], 1).scatter_(1, accepted[:, None],
                                                                                    next_token[:, None])
    return path.int(), tokens.int(), accepted.int()


def check(case: TreeCase, x: dict, out: tuple) -> None:
    """Every element written: a root-side path from node 0 whose drafts are the argmax after their parents, the
    argmax after its last node, then -1."""
    path, tokens, accepted = (t.cpu() for t in out)
    width = x["paths"].shape[1]
    assert path.shape == tokens.shape == (case.B, width) and path.dtype == tokens.dtype == torch.int32
    argmax = x["target_probs"].argmax(-1)
    parents = TREE.parents.tolist()
    for b in range(case.B):
        k = int(accepted[b])
        nodes = path[b].tolist()
        assert 0 <= k < width and nodes[0] == 0 and all(v == -1 for v in nodes[k + 1 :]), nodes
        assert all(parents[nodes[i]] == nodes[i - 1] for i in range(1, k + 1)), nodes
        assert tokens[b, :k].tolist() == [int(argmax[b, parents[n]]) for n in nodes[1 : k + 1]]
        assert int(tokens[b, k]) == int(argmax[b, nodes[k]]) and (tokens[b, k + 1 :] == -1).all()


def agree(x: dict, fastar_runs: list, torch_runs: list) -> None:
    """Deterministic: the same accepted counts and tokens (the bench's siblings never repeat a token, so the
    longest path's tokens are unique)."""
    for (_, tokens, accepted), (_, want_tokens, want_accepted) in zip(fastar_runs, torch_runs):
        assert torch.equal(accepted.cpu(), want_accepted.cpu()) and torch.equal(tokens.cpu(), want_tokens.cpu())


def metrics(case: TreeCase, x: dict, outputs: list) -> dict:
    """Bytes: a lower bound, the rows the rule must read (the root's and each accepted node's: accepted + 1 per
    sequence), the draft ids and the outputs."""
    p = x["target_probs"]
    accepted = outputs[0][2]
    rows = int((accepted + 1).sum())
    return {
        "bytes": rows * p.shape[-1] * p.element_size() + x["draft_token_ids"].numel() * 8
        + 3 * case.B * x["paths"].shape[1] * 4,
        "mean_accepted": torch.cat([na for _, _, na in outputs]).double().mean().item(),
        "n": x["paths"].shape[1] - 1,
    }


BENCH = common.OpBench(
    "tree_greedy_verify", CASES, make_inputs, run_fastar, run_torch, check, agree, metrics, common.ACCEPTANCE_TABLE,
    goal=GOAL,
)

inputs = functools.cache(make_inputs)
parametrize_cases = pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)


@parametrize_cases
def test_tree_greedy_verify_fastar(benchmark, case):
    common.benchmark_op(benchmark, BENCH, run_fastar, case, inputs(case))


@parametrize_cases
def test_tree_greedy_verify_torch(benchmark, case):
    common.benchmark_op(benchmark, BENCH, run_torch, case, inputs(case))


@parametrize_cases
def test_tree_greedy_verify_baseline_agrees(case):
    x = inputs(case)
    runs = [[fn(x, 0)] for fn in (run_fastar, run_torch)]
    for out in runs[0] + runs[1]:
        check(case, x, out)
    agree(x, *runs)
