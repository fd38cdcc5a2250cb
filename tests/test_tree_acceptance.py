"""The tree acceptance rules (fastar.reference.tree_acceptance) and the Tree converter from SGLang's links.

Exactness is checked by chi-square (reject at p-value < 1e-3, fixed seeds): the first emitted token of the tree
rule follows the target's root distribution, for drafts sampled from q and for one-hot drafts, on trees with
shared prefixes and repeated tokens among siblings. On a chain the rule returns the chain rule's tokens.
"""
from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch

from fastar.masks import Tree
from fastar.reference.acceptance import speculative_sample_reference
from fastar.reference.tree_acceptance import (
    tree_first_token_distribution,
    tree_greedy_verify_row,
    tree_speculative_sample_row,
    typical_accept_row,
)
from helpers import chisquare_pvalue

P_THRESHOLD = 1e-3


def random_probs(gen: torch.Generator, shape) -> torch.Tensor:
    x = torch.rand(shape, generator=gen, dtype=torch.float64) ** 3 + 1e-3
    return (x / x.sum(-1, keepdim=True)).float()


def links_of(parents):
    """SGLang's first-child / next-sibling links of a tree whose node 0 is its only root; siblings ascending."""
    n = len(parents)
    first, sibling = [-1] * n, [-1] * n
    for node in reversed(range(1, n)):  # prepending in descending order leaves each list ascending
        sibling[node], first[parents[node]] = first[parents[node]], node
    return first, sibling


# --- Tree.from_next_links ---

def test_from_next_links_by_hand():
    # root 0 -> {1, 2}; 1 -> {3, 4}; 2 -> {5}; 4 -> {6}
    first = [1, 3, 5, -1, 6, -1, -1]
    sibling = [-1, 2, -1, 4, -1, -1, -1]
    tree = Tree.from_next_links(first, sibling)
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 2, 4]
    assert tree.position_ids.tolist() == [0, 1, 1, 2, 2, 2, 3]


@pytest.mark.parametrize("seed", range(5))
def test_from_next_links_round_trip(seed):
    gen = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(3):
        parents = [-1]
        for t in range(1, 24):
            parents.append(int(torch.randint(0, t, (1,), generator=gen)))
        batch.append(parents)
    links = [links_of(p) for p in batch]
    first = torch.tensor([f for f, _ in links])
    sibling = torch.tensor([s for _, s in links])
    assert Tree.from_next_links(first, sibling).parents.tolist() == batch
    assert Tree.from_next_links(first[1], sibling[1]).parents.tolist() == batch[1]


@pytest.mark.parametrize("first, sibling, message", [
    ([1, 2, 1], [-1, -1, -1], "reached twice"),  # 2 -> 1: a cycle back to node 1
    ([1, -1, -1], [-1, 7, -1], r"outside \[1, 3\)"),
    ([2, -1, -1], [-1, -1, 1], "earlier sibling"),  # siblings 2 then 1: descending
    ([2, -1, 1], [-1, -1, -1], "before its parent"),  # 1 is a child of 2
    ([1, -1, -1], [-1, -1, -1], r"not reached from the root"),
    ([1], [-1], "at least one more node"),
    ([1, -1, -1], [-1, -1], "differ"),
])
def test_from_next_links_refuses_malformed(first, sibling, message):
    with pytest.raises(ValueError, match=message):
        Tree.from_next_links(first, sibling)


# --- tree speculative sampling ---

@pytest.mark.parametrize("one_hot", [False, True])
def test_chain_tree_is_the_chain_rule(one_hot):
    gen = torch.Generator().manual_seed(5)
    n, vocab = 4, 7
    for trial in range(60):
        p = random_probs(gen, (n + 1, vocab))
        q = random_probs(gen, (n, vocab))
        drafts = torch.stack([torch.multinomial(q[i].double(), 1, generator=gen)[0] for i in range(n)])
        if trial % 3 == 0:  # a draft the target cannot follow, and one it takes for sure
            p[1, drafts[1]] = 0
            p[2] = q[2]
        q_arg = None if one_hot else q
        tokens, accepted = speculative_sample_reference(drafts[None], None if q_arg is None else q_arg[None],
                                                        p[None], seed=trial, offset=3)
        path, tree_tokens, tree_accepted = tree_speculative_sample_row(
            [-1, 0, 1, 2], drafts.tolist(), q_arg, p, seed=trial, offset=3)
        k = int(accepted[0])
        assert tree_accepted == k and path == list(range(k))
        assert tree_tokens == tokens[0, : k + 1].tolist()


# A root with three children (two of them repeating a token), a shared prefix under the first child, and a leaf.
TREE = [-1, -1, -1, 0, 0, 3, 1]


def draft_rows(parents, q_of_parent):
    """q row of each node: every child of a node is drafted i.i.d. from that node's draft distribution."""
    return torch.stack([q_of_parent[p + 1] for p in parents])


def test_first_token_distribution_is_exact_in_expectation():
    # Averaging the rule's exact first-token law over all draft combinations of the root's children (i.i.d.
    # from q) gives the target's root row, in float64.
    gen = torch.Generator().manual_seed(11)
    vocab = 4
    p = random_probs(gen, (len(TREE) + 1, vocab)).double()
    q_parent = random_probs(gen, (len(TREE) + 1, vocab)).double()
    q = draft_rows(TREE, q_parent / q_parent.sum(-1, keepdim=True))  # rows summing to 1 in float64
    roots = [c for c, parent in enumerate(TREE) if parent == -1]
    law = torch.zeros(vocab, dtype=torch.float64)
    for combo in itertools.product(range(vocab), repeat=len(roots)):
        drafts = [0] * len(TREE)
        weight = 1.0
        for c, x in zip(roots, combo):
            drafts[c] = x
            weight *= float(q[c, x])
        law += weight * tree_first_token_distribution(TREE, drafts, q, p)
    torch.testing.assert_close(law, p[0] / p[0].sum(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("one_hot", [False, True])
def test_first_token_follows_target(one_hot):
    gen = torch.Generator().manual_seed(2024 + one_hot)
    vocab, trials = 5, 6000
    p = random_probs(gen, (len(TREE) + 1, vocab))
    q_parent = random_probs(gen, (len(TREE) + 1, vocab))
    q = draft_rows(TREE, q_parent)
    fixed = [2, 2, 0, 1, 1, 3, 4]  # one-hot drafts: the root's first two children repeat token 2
    counts = Counter()
    for trial in range(trials):
        if one_hot:
            drafts = fixed
        else:
            drafts = [int(torch.multinomial(q[c].double(), 1, generator=gen)) for c in range(len(TREE))]
        path, tokens, accepted = tree_speculative_sample_row(TREE, drafts, None if one_hot else q, p, row=trial,
                                                             seed=99)
        assert accepted == len(path) and len(tokens) == accepted + 1
        assert all(TREE[a] == (path[i - 1] if i else -1) for i, a in enumerate(path))  # a root-side path
        assert tokens[:-1] == [drafts[a] for a in path]
        counts[tokens[0]] += 1
    p0 = p[0].double() / p[0].double().sum()
    expected = {t: float(p0[t]) for t in range(vocab)}
    assert chisquare_pvalue(counts, expected, trials) > P_THRESHOLD


@pytest.mark.parametrize("one_hot", [False, True])
def test_first_token_law_given_the_drafts(one_hot):
    # Four children of the root, one token repeated, drafts the target rarely takes: most rows reject two or
    # more children, so the residual of a residual decides the token. Its law for these fixed drafts is
    # tree_first_token_distribution's (float64, normalised at every step).
    wide, drafts = [-1, -1, -1, -1], [2, 3, 1, 1]
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1]] + [[0.25] * 4] * 4)
    q = None if one_hot else torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 4)
    trials = 8000
    counts = Counter(tree_speculative_sample_row(wide, drafts, q, p, row=r, seed=5)[1][0] for r in range(trials))
    law = tree_first_token_distribution(wide, drafts, q, p)
    expected = {t: float(law[t]) for t in range(4) if law[t] > 0}
    assert chisquare_pvalue(counts, expected, trials) > P_THRESHOLD


def test_one_hot_repeated_sibling_is_not_accepted_twice():
    # Root children 0 and 1 both draft token 1. Once child 0 is rejected, token 1 has no mass left, so child 1
    # is rejected too and the token is drawn from the rest (token 2: p(0) = 0).
    p = torch.tensor([[0.0, 0.25, 0.75], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])
    outcomes = Counter()
    for seed in range(400):
        path, tokens, _ = tree_speculative_sample_row([-1, -1], [1, 1], None, p, seed=seed)
        assert (path, tokens[0]) in (([0], 1), ([], 2))
        outcomes[tokens[0]] += 1
    assert chisquare_pvalue(outcomes, {1: 0.25, 2: 0.75}, 400) > P_THRESHOLD
    p_zero = torch.tensor([[0.5, 0.0, 0.5], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])
    for seed in range(50):
        path, tokens, accepted = tree_speculative_sample_row([-1, -1], [1, 1], None, p_zero, seed=seed)
        assert path == [] and accepted == 0 and tokens[0] in (0, 2)


# --- greedy tree verification and typical acceptance ---

def one_hot_logits(argmaxes, vocab=6):
    logits = torch.zeros(len(argmaxes), vocab)
    for row, t in enumerate(argmaxes):
        logits[row, t] = 5.0
    return logits


def test_tree_greedy_verify_by_hand():
    # root -> {0: tok 3, 1: tok 3 (repeat), 2: tok 1}; 0 -> {3: tok 4}; 1 -> {4: tok 2}; 4 -> {5: tok 5}
    parents = [-1, -1, -1, 0, 1, 4]
    drafts = [3, 3, 1, 4, 2, 5]
    # argmax after the root 3, after node 0: 0 (node 3's 4 fails), after node 1: 2, after node 4: 5, after 5: 1
    logits = one_hot_logits([3, 0, 2, 0, 0, 5, 1])
    path, tokens, accepted = tree_greedy_verify_row(parents, drafts, logits)
    assert (path, tokens, accepted) == ([1, 4, 5], [3, 2, 5, 1], 3)  # the longer of the two token-3 branches
    logits = one_hot_logits([0, 0, 0, 0, 0, 0, 0])
    assert tree_greedy_verify_row(parents, drafts, logits) == ([], [0], 0)


def test_typical_accept_by_hand():
    # Root row: uniform over 4 of 6 tokens, H = log 4, threshold min(0.09, 0.3 / 4) = 0.075: token 2
    # (p = 0.25) passes, token 5 (p = 0) does not. Row after node 0: almost one-hot on 4 (H small, threshold
    # 0.09); token 4 passes, token 1 (p ~ 1e-9) not.
    uniform = torch.tensor([0.0, 0.0, 0.0, 0.0, -math.inf, -math.inf])
    peaked = torch.full((6,), -20.0)
    peaked[4] = 0.0
    logits = torch.stack([uniform, peaked, peaked, peaked])
    parents, drafts = [-1, 0, -1], [2, 4, 5]
    path, tokens, accepted = typical_accept_row(parents, drafts, logits)
    assert (path, accepted) == ([0, 1], 2)
    assert tokens == [2, 4, 4]  # then the argmax after node 1
    assert typical_accept_row(parents, [2, 1, 5], logits)[0] == [0]
    assert typical_accept_row(parents, [2, 4, 5], logits, temperature=0)[0] == []  # argmax of the root is 0
