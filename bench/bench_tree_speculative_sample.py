"""fastar.tree_speculative_sample against the tree acceptance loop of EAGLE's / Medusa's repositories.

The tree: Medusa's and EAGLE-1's default mc_sim_7b_63 (64 nodes with the root, depth 5). The baseline follows
EAGLE's ``evaluate_posterior`` for sampling: per sequence, a Python loop over depths and candidate paths, one
``random.random()`` and a ``.item()`` per tried child, the rejected token zeroed (or, with draft probabilities,
SpecInfer's ``norm(max(p - q, 0))``) and the row renormalised in PyTorch, then ``torch.multinomial`` from the
final row. Both sides take the same probabilities ``[B, N+1, V]`` (EAGLE's loop computes the softmax of the rows
it visits; here it reads them as given, which only favours the baseline).

Drafts: the children of a node are the top-k tokens of a draft distribution close to the target's there
(EAGLE-2's top-k, one-hot), or i.i.d. samples from it (with draft probabilities).
"""
from __future__ import annotations

import dataclasses
import functools
import random
import statistics

import pytest
import torch

import fastar
from bench import common
from bench.bench_attention import MC_SIM_7B_63
from fastar.masks import Tree

GOAL = 20.0
TREE = Tree.from_choices(MC_SIM_7B_63)  # node 0: the verified root
N = TREE.num_nodes - 1


@dataclasses.dataclass(frozen=True)
class TreeCase:
    """B sequences, each verifying the 63 drafted nodes of mc_sim_7b_63 over a vocabulary of V."""

    B: int
    V: int
    dtype: torch.dtype = torch.float32
    draft_probs: bool = True

    @property
    def id(self) -> str:
        return f"B{self.B}-N{N}-V{self.V}-{common.DTYPE_NAMES[self.dtype]}" + ("" if self.draft_probs else "-noq")

    @property
    def shape(self) -> str:
        return f"B={self.B} tree {N + 1} V={self.V}" + ("" if self.draft_probs else " no q")


CASES = [
    TreeCase(32, 32000),
    TreeCase(32, 32000, draft_probs=False),
    TreeCase(32, 128256, torch.bfloat16),
    TreeCase(32, 128256, torch.bfloat16, draft_probs=False),
]


def make_inputs(case: TreeCase, device: str = "cpu") -> dict:
    gen = torch.Generator(device).manual_seed(0)
    parents = TREE.parents.tolist()
    target = torch.randn(case.B, N + 1, case.V, generator=gen, device=device).mul_(common.TEMPERATURE)
    target = target.log_softmax(-1)
    # q_of[:, k]: the draft distribution at tree node k (node 0 the root), close to the target's there.
    q_of = torch.randn(case.B, N + 1, case.V, generator=gen, device=device).mul_(common.DRAFT_NOISE)
    q_of = q_of.add_(target).softmax(-1)
    ids = torch.empty(case.B, N + 1, dtype=torch.int64, device=device)
    ids[:, 0] = -2  # the root's token: not a draft
    for k in range(N + 1):
        children = [c for c in range(1, N + 1) if parents[c] == k]
        if not children:
            continue
        if case.draft_probs:
            ids[:, children] = torch.multinomial(q_of[:, k], len(children), replacement=True, generator=gen)
        else:
            ids[:, children] = q_of[:, k].topk(len(children), -1).indices
    draft_probs = q_of[:, [parents[c] for c in range(1, N + 1)]]  # node c drafted from its parent's row
    paths = TREE.retrieve_paths()
    return {
        "draft_token_ids": ids[:, 1:].contiguous(),
        "draft_probs": draft_probs.to(case.dtype) if case.draft_probs else None,
        "target_probs": target.exp_().to(case.dtype),
        "paths": paths,  # [n_paths, depth + 1] tree nodes, root first, -1 padded
        "candidates": torch.where(paths >= 0, ids[:, paths.clamp(min=0)], -1),  # [B, n_paths, depth + 1]
    }


def run_fastar(x: dict, seed: int):
    return fastar.tree_speculative_sample(x["draft_token_ids"], TREE, x["draft_probs"], x["target_probs"], seed=seed)


def eagle_row(candidates, paths, target_probs, draft_probs):
    """EAGLE's evaluate_posterior (sampling) for one sequence: (best path index, accepted drafts, final row)."""
    accept_length, best = 1, 0
    accept_cand = candidates[0, :1]
    adjusted = False
    gtp = None
    for i in range(1, candidates.shape[1]):
        if i != accept_length:
            break
        adjusted = False
        is_eq = (candidates[:, :accept_length] == accept_cand).all(dim=1)
        fi = int(torch.nonzero(is_eq, as_tuple=True)[0][0])
        gtp = target_probs[int(paths[fi, i - 1])].float()
        seen = []
        for j in range(candidates.shape[0]):
            if not is_eq[j]:
                continue
            x = candidates[j, i]
            xi = x.item()
            if xi in seen or xi == -1:
                continue
            seen.append(xi)
            r = random.random()
            if draft_probs is None:
                accept = r <= gtp[xi]
            else:
                q = draft_probs[int(paths[j, i]) - 1].float()
                accept = r * q[xi] <= gtp[xi]
            if accept:
                accept_cand = torch.cat((accept_cand, x[None]), dim=0)
                accept_length += 1
                best = j
                break
            if draft_probs is None:
                gtp = gtp.clone()
                gtp[xi] = 0
            else:
                gtp = (gtp - q).clamp_(min=0)
            gtp = gtp / gtp.sum()
            adjusted = True
    if adjusted and accept_length != candidates.shape[1]:
        sample_p = gtp
    else:
        sample_p = target_probs[int(paths[best, accept_length - 1])].float()
    return best, accept_length - 1, sample_p


def run_torch(x: dict, seed: int):
    """The baseline per sequence, its outputs in fastar's format (path in tree nodes, tokens, accepted)."""
    paths, B = x["paths"], x["candidates"].shape[0]
    width = paths.shape[1]
    path = torch.full((B, width), -1, dtype=torch.int32)
    tokens = torch.full((B, width), -1, dtype=torch.int32)
    accepted = torch.zeros(B, dtype=torch.int32)
    for b in range(B):
        q = None if x["draft_probs"] is None else x["draft_probs"][b]
        best, k, sample_p = eagle_row(x["candidates"][b], paths, x["target_probs"][b], q)
        token = torch.multinomial(sample_p, 1)
        path[b, : k + 1] = paths[best, : k + 1]
        tokens[b, :k] = x["candidates"][b, best, 1 : k + 1]
        tokens[b, k] = token
        accepted[b] = k
    return path, tokens, accepted


def check(case: TreeCase, x: dict, out: tuple) -> None:
    """Every output element written: a root-side path from node 0, its drafts, one token in [0, V), then -1."""
    path, tokens, accepted = (t.cpu() for t in out)
    width = x["paths"].shape[1]
    assert path.shape == tokens.shape == (case.B, width) and path.dtype == tokens.dtype == torch.int32
    parents = TREE.parents.tolist()
    drafts = x["draft_token_ids"].cpu()
    for b in range(case.B):
        k = int(accepted[b])
        nodes = path[b].tolist()
        assert 0 <= k < width and nodes[0] == 0 and all(v == -1 for v in nodes[k + 1:]), nodes
        assert all(parents[nodes[i]] == nodes[i - 1] for i in range(1, k + 1)), nodes
        assert tokens[b, :k].tolist() == [int(drafts[b, n - 1]) for n in nodes[1 : k + 1]]
        assert 0 <= int(tokens[b, k]) < case.V and (tokens[b, k + 1 :] == -1).all()


def agree(x: dict, fastar_runs: list, torch_runs: list) -> None:
    """Different random streams: the mean accepted drafts agree within 5 standard errors of their difference."""
    means, variances = [], []
    for runs in (fastar_runs, torch_runs):
        counts = torch.cat([na for _, _, na in runs]).double()
        means.append(counts.mean().item())
        variances.append(counts.var().item() / counts.numel())
    stderr = (variances[0] + variances[1]) ** 0.5
    assert abs(means[0] - means[1]) <= 5 * stderr + 1e-9, f"mean accepted {means[0]:.3f} vs {means[1]:.3f}"


def metrics(case: TreeCase, x: dict, outputs: list) -> dict:
    """Bytes: a lower bound, the node scalars tested (p and q at the accepted nodes and their parents' first
    child) and one row per sequence (the one its token is drawn from), read once; the outputs."""
    p = x["target_probs"]
    per_node = 1 if x["draft_probs"] is None else 2
    rows = statistics.median(
        case.B * p.shape[-1] * p.element_size() + int((na + 1).sum()) * per_node * common.SCALAR_READ_BYTES
        for _, _, na in outputs
    )
    return {
        "bytes": rows + 3 * case.B * x["paths"].shape[1] * 4,
        "mean_accepted": torch.cat([na for _, _, na in outputs]).double().mean().item(),
        "n": x["paths"].shape[1] - 1,
    }


BENCH = common.OpBench(
    "tree_speculative_sample", CASES, make_inputs, run_fastar, run_torch, check, agree, metrics,
    common.ACCEPTANCE_TABLE, goal=GOAL,
)

inputs = functools.cache(make_inputs)
parametrize_cases = pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)


@parametrize_cases
def test_tree_speculative_sample_fastar(benchmark, case):
    common.benchmark_op(benchmark, BENCH, run_fastar, case, inputs(case))


@parametrize_cases
def test_tree_speculative_sample_torch(benchmark, case):
    common.benchmark_op(benchmark, BENCH, run_torch, case, inputs(case))


@parametrize_cases
def test_tree_speculative_sample_baseline_agrees(case):
    x = inputs(case)
    runs = [[fn(x, seed) for seed in range(8)] for fn in (run_fastar, run_torch)]
    for out in runs[0] + runs[1]:
        check(case, x, out)
    agree(x, *runs)
