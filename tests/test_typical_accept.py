"""fastar.typical_accept on every backend, against fastar.reference.typical_accept_row (float64), on chains and
trees; hand-computed thresholds; every bad input.

The kernels compute the softmax statistics in float32, so the tests choose drafts whose probability lies well
away from the threshold (the argmax, the argmin, or a token at 0.6x or 1.6x the threshold): a wrong entropy or
threshold still flips those.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastar import _simt
from fastar.masks import Tree
from fastar.reference import typical_accept_row
from test_tree_greedy_verify import LEVEL_PARENTS, LEVEL_VOCAB, level_case

STATUS_BAD_ID, STATUS_BAD_VALUE = 2, 4


def threshold_of(logits: torch.Tensor, temperature: float, eps=0.09, alpha=0.3):
    p = torch.softmax(logits.double() / temperature, -1)
    entropy = -float(torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum())
    return p, min(eps, alpha * math.exp(-entropy))


def pick(gen, logits: torch.Tensor, temperature: float) -> int:
    """A token of the row: its argmax, its argmin, or one whose probability is about 0.6x or 1.6x the threshold."""
    if temperature == 0:
        choice = int(torch.randint(0, 2, (1,), generator=gen))
        return int(logits.argmax()) if choice == 0 else int(logits.argmin())
    p, thr = threshold_of(logits, temperature)
    choice = int(torch.randint(0, 4, (1,), generator=gen))
    if choice < 2:
        return int(p.argmax()) if choice == 0 else int(p.argmin())
    target = thr * (0.6 if choice == 2 else 1.6)
    token = int((p / target).log().abs().argmin())
    return token if abs(float(p[token]) / thr - 1) > 0.2 else int(p.argmin())  # none near target: a clear fail


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
@pytest.mark.parametrize("form", ["chain", "drafted", "rooted"])
def test_matches_reference(backend, dtype, temperature, form):
    gen = torch.Generator().manual_seed(int(temperature * 10) + 100 * ["chain", "drafted", "rooted"].index(form))
    B, N, V = 6, 8, 300
    parents = list(range(-1, N - 1)) if form == "chain" else [int(torch.randint(-1, t, (1,), generator=gen))
                                                              for t in range(N)]
    logits = (torch.randn(B, N + 1, V, generator=gen) * 3).to(dtype)
    drafts = [[pick(gen, logits[b, parent + 1].float(), temperature) for parent in parents] for b in range(B)]
    drafts[1][-1] = -1  # a ragged row
    tree = {"chain": None, "drafted": Tree(parents), "rooted": Tree([-1] + [t + 1 for t in parents])}[form]
    path, tokens, accepted = backend.typical_accept(torch.tensor(drafts), logits, tree=tree, temperature=temperature)
    for b in range(B):
        want_path, want_tokens, k = typical_accept_row(parents, drafts[b], logits[b].float(), temperature=temperature)
        if form == "rooted":
            want_path = [0] + [t + 1 for t in want_path]
        assert int(accepted[b]) == k, (b, drafts[b])
        assert path[b].tolist() == want_path + [-1] * (path.shape[1] - len(want_path))
        assert tokens[b].tolist() == want_tokens + [-1] * (tokens.shape[1] - len(want_tokens))


@pytest.mark.parametrize("temperature", [1.0, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_split_and_read_level_by_level(backend, dtype, temperature):
    """test_tree_greedy_verify.py's wide tree over V = 20000: the CUDA kernels split each row over blocks and read
    float32 rows level by level (only the rows the walk reads). Node 0 (the root's argmin) fails, so a NaN in the
    row after it is never read."""
    logits, drafts, _ = level_case(2, dtype)
    drafts[:, 0] = torch.argmin(logits[:, 0].double(), -1)
    drafts[-1, 8] = -1  # an absent node
    want = [typical_accept_row(LEVEL_PARENTS, drafts[b].tolist(), logits[b].float(), temperature=temperature)
            for b in range(2)]
    logits[:, 1, 5] = float("nan")
    simt = _simt.load() if backend.name == "simt" else None
    if simt:
        simt.reset_launch_counts()
    path, tokens, accepted = backend.typical_accept(drafts, logits, tree=Tree(LEVEL_PARENTS), temperature=temperature)
    for b, (want_path, want_tokens, k) in enumerate(want):
        assert int(accepted[b]) == k and k >= 1
        assert path[b].tolist() == want_path + [-1] * (path.shape[1] - len(want_path))
        assert tokens[b].tolist() == want_tokens + [-1] * (tokens.shape[1] - len(want_tokens))
    if simt:  # levels 0, 1 and 2 of the tree, or every row at once
        by_level = 2 * 10 * LEVEL_VOCAB * logits.element_size() > 2 * 4 * 76 * 1024
        assert simt.launch_counts()["typical_accept_partial"] == (3 if by_level else 1)


def test_by_hand(backend):
    # Root row uniform over 4 of 6 tokens: H = log 4, threshold min(0.09, 0.3 / 4) = 0.075, so token 2 (p = 0.25)
    # passes. The rows after: almost one-hot on 4 (threshold 0.09): 4 passes, 1 does not.
    uniform = torch.tensor([0.0, 0.0, 0.0, 0.0, -math.inf, -math.inf])
    peaked = torch.full((6,), -20.0)
    peaked[4] = 0.0
    logits = torch.stack([uniform, peaked, peaked, peaked])[None]
    tree = Tree([-1, 0, -1])
    path, tokens, accepted = backend.typical_accept(torch.tensor([[2, 4, 5]]), logits, tree=tree)
    assert path.tolist() == [[0, 1, -1]] and tokens.tolist() == [[2, 4, 4]] and accepted.tolist() == [2]
    path, tokens, accepted = backend.typical_accept(torch.tensor([[2, 1, 5]]), logits, tree=tree)
    assert path.tolist() == [[0, -1, -1]] and tokens.tolist() == [[2, 4, -1]] and accepted.tolist() == [1]
    # Other parameters: the root's threshold becomes min(0.3, 1.2 / 4) = 0.3, above p(2) = 0.25.
    path, tokens, accepted = backend.typical_accept(torch.tensor([[2, 4, 5]]), logits, tree=tree,
                                                    posterior_threshold=0.3, posterior_alpha=1.2)
    assert accepted.tolist() == [0] and tokens.tolist() == [[0, -1, -1]]
    # temperature 0: only the argmax (the root's is token 0, ties to the smallest id).
    path, tokens, accepted = backend.typical_accept(torch.tensor([[0, 4, 5]]), logits, tree=tree, temperature=0.0)
    assert accepted.tolist() == [2] and tokens.tolist() == [[0, 4, 4]]


def test_chain_default(backend):
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(4, 6, 50, generator=gen) * 3
    drafts = logits[:, :5].argmax(-1)
    drafts[2, 2] = logits[2, 2].argmin()
    path, tokens, accepted = backend.typical_accept(drafts, logits)
    assert accepted.tolist() == [5, 5, 2, 5]
    chain = backend.typical_accept(drafts, logits, tree=Tree([-1, 0, 1, 2, 3]))
    assert torch.equal(path, chain[0]) and torch.equal(tokens, chain[1])


def test_bad_inputs(backend):
    logits = torch.randn(1, 3, 10)
    drafts = torch.tensor([[int(logits[0, 0].argmax()), 1]])
    with pytest.raises(ValueError, match="temperature must be finite and >= 0"):
        backend.typical_accept(drafts, logits, temperature=-1.0)
    with pytest.raises(ValueError, match="posterior_threshold and posterior_alpha"):
        backend.typical_accept(drafts, logits, posterior_threshold=float("nan"))
    with pytest.raises(ValueError, match=r"target_logits must have shape \[B, n\+1, V\]"):
        backend.typical_accept(drafts, logits[:, :2])
    bad = drafts.clone()
    bad[0, 1] = 10
    nan = logits.clone()
    nan[0, 1, 3] = float("nan")  # the row after node 0, which passes (the argmax of the root)
    if backend.marks_invalid_rows:
        assert backend.typical_accept(bad, logits)[2].tolist() == [-STATUS_BAD_ID]
        assert backend.typical_accept(drafts, nan)[2].tolist() == [-STATUS_BAD_VALUE]
    else:
        with pytest.raises(IndexError, match="draft token id"):
            backend.typical_accept(bad, logits)
        with pytest.raises(ValueError, match="NaN"):
            backend.typical_accept(drafts, nan)
