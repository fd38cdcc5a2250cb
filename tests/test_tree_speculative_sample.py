"""fastar.tree_speculative_sample on every backend, against fastar.reference.tree_speculative_sample_row token for
token; chi-square (reject at p-value < 1e-3, fixed seeds) for the first token's law; chains against
fastar.speculative_sample; every bad input.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from fastar import _simt
from fastar.masks import Tree
from fastar.reference import tree_speculative_sample_row
from helpers import chisquare_pvalue, rows, tree_op_status

P_THRESHOLD = 1e-3
STATUS_BAD_ID, STATUS_BAD_VALUE, STATUS_BAD_TREE = 2, 4, 16


def random_probs(gen, shape, dtype=torch.float32) -> torch.Tensor:
    x = torch.rand(shape, generator=gen, dtype=torch.float64) ** 3
    x = x * (torch.rand(shape, generator=gen, dtype=torch.float64) > 0.2)  # some exact zeros
    x[..., 0] += 1e-3
    return (x / x.sum(-1, keepdim=True)).to(dtype)


def random_parents(gen, n: int) -> list:
    return [int(torch.randint(-1, t, (1,), generator=gen)) for t in range(n)]


def draft_from(gen, parents, q_of_node):
    """Each node's token drawn from its own draft row (children of one parent share that row)."""
    return [int(torch.multinomial(q_of_node[t].double(), 1, generator=gen)) for t in range(len(parents))]


def expected_rows(parents_rows, drafts, q, p, seed, offset, rooted, width):
    path = torch.full((len(drafts), width), -1, dtype=torch.int32)
    tokens = torch.full_like(path, -1)
    accepted = torch.zeros(len(drafts), dtype=torch.int32)
    for b in range(len(drafts)):
        parents = parents_rows[b if len(parents_rows) > 1 else 0]
        nodes, toks, k = tree_speculative_sample_row(parents, drafts[b], None if q is None else q[b], p[b], row=b,
                                                     seed=seed, offset=offset)
        if rooted:
            nodes = [0] + [t + 1 for t in nodes]
        path[b, : len(nodes)] = torch.tensor(nodes, dtype=torch.int32)
        tokens[b, : len(toks)] = torch.tensor(toks, dtype=torch.int32)
        accepted[b] = k
    return path, tokens, accepted


def depth_of(parents):
    depth = []
    for parent in parents:
        depth.append(1 if parent < 0 else depth[parent] + 1)
    return max(depth)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("one_hot", [False, True])
@pytest.mark.parametrize("form", ["drafted", "rooted", "batched"])
def test_matches_reference(backend, dtype, one_hot, form):
    gen = torch.Generator().manual_seed(7 + one_hot + 10 * ["drafted", "rooted", "batched"].index(form))
    B, N, V = 6, 9, 37
    parents_rows = [random_parents(gen, N) for _ in range(B if form == "batched" else 1)]
    p = random_probs(gen, (B, N + 1, V), dtype)
    q = None if one_hot else random_probs(gen, (B, N, V), dtype)
    if one_hot:
        drafts = [[int(torch.randint(0, V, (1,), generator=gen)) for _ in range(N)] for _ in range(B)]
    else:
        drafts = [draft_from(gen, parents_rows[b if form == "batched" else 0], q[b].float()) for b in range(B)]
    # Ragged trees: -1 marks absent nodes (row 3's last three; row 4's node 0 and so its subtree).
    drafts[3][N - 3:] = [-1] * 3
    drafts[4][0] = -1
    # Rows where the target equals the draft (no residual mass), and where a drafted token has p = 0.
    if q is not None:
        p[1, 0] = q[1, 0]
    p[2, :, drafts[2][1]] = 0
    if form == "rooted":
        tree = Tree([-1] + [t + 1 for t in parents_rows[0]])
    else:
        tree = Tree(torch.tensor(parents_rows if form == "batched" else parents_rows[0]))
    width = max(depth_of(r) for r in parents_rows) + 1
    ids = torch.tensor(drafts)
    path, tokens, accepted = backend.tree_speculative_sample(ids, tree, q, p, seed=1234, offset=5)
    ref = expected_rows(parents_rows, drafts, q, p, 1234, 5, form == "rooted", width)
    assert path.shape == tokens.shape == (B, width)
    assert torch.equal(accepted, ref[2]) and torch.equal(tokens, ref[1]) and torch.equal(path, ref[0])


@pytest.mark.parametrize("one_hot", [False, True])
def test_a_chain_is_speculative_sample(backend, one_hot):
    gen = torch.Generator().manual_seed(3)
    B, N, V = 16, 5, 300
    p = random_probs(gen, (B, N + 1, V))
    q = None if one_hot else random_probs(gen, (B, N, V))
    ids = torch.randint(0, V, (B, N), generator=gen)
    if q is not None:
        ids = torch.stack([torch.multinomial(q[:, i].double(), 1, generator=gen)[:, 0] for i in range(N)], 1)
    path, tokens, accepted = backend.tree_speculative_sample(ids, Tree(list(range(-1, N - 1))), q, p, seed=9)
    chain_tokens, chain_accepted = backend.speculative_sample(ids, q, p, seed=9)
    assert torch.equal(tokens, chain_tokens) and torch.equal(accepted, chain_accepted)
    steps = torch.arange(N + 1).expand(B, N + 1)
    assert torch.equal(path, torch.where(steps < accepted[:, None], steps, -1).int())


# The root with three children (the first two drafting from one row, so they may repeat a token), a shared
# prefix under the first, a leaf under the second.
TREE = [-1, -1, -1, 0, 0, 3, 1]


@pytest.mark.parametrize("one_hot", [False, True])
def test_first_token_follows_target(backend, one_hot):
    gen = torch.Generator().manual_seed(41 + one_hot)
    B, V = rows(backend, 20_000, 1_500), 6
    p_rows = random_probs(gen, (len(TREE) + 1, V))
    q_of_parent = random_probs(gen, (len(TREE) + 1, V))
    q_rows = torch.stack([q_of_parent[parent + 1] for parent in TREE])  # siblings share their parent's row
    p = p_rows.expand(B, -1, -1)
    if one_hot:
        ids = torch.tensor([2, 2, 0, 1, 1, 3, 4]).expand(B, -1)
        q = None
    else:
        q = q_rows.expand(B, -1, -1)
        ids = torch.stack([torch.multinomial(q_rows[t].double(), B, True, generator=gen) for t in range(len(TREE))], 1)
    path, tokens, accepted = backend.tree_speculative_sample(ids, Tree(TREE), q, p, seed=2025)
    assert (accepted >= 0).all()
    p0 = p_rows[0].double() / p_rows[0].double().sum()
    expected = {t: float(p0[t]) for t in range(V)}
    assert chisquare_pvalue(Counter(tokens[:, 0].tolist()), expected, B) > P_THRESHOLD


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("one_hot", [False, True])
def test_rows_split_over_blocks(backend, dtype, one_hot):
    """V = 5000: the CUDA kernels split each row's passes over blocks (four, then the row's block runs the rest).
    Row 0 rejects all six children of the root, each holding a tenth of the target's mass: seven passes, over
    residuals whose excluded mass changes every total. Row 1's target almost surely takes the first child at
    every level down to a leaf: one pass. Row 3 takes nodes 0 and 6, then rejects node 9 (half the mass): it
    draws from the residual of one rejection. The seed is the first for which the reference says rows 0 and 3
    do so. Row 2 is random."""
    gen = torch.Generator().manual_seed(5 + one_hot)
    parents = [-1, -1, -1, -1, -1, -1, 0, 0, 0, 6]
    B, N, V = 4, len(parents), 5000
    p = random_probs(gen, (B, N + 1, V), torch.float64)
    q = random_probs(gen, (B, N, V), torch.float64)
    drafts = torch.multinomial(q.reshape(-1, V), 1, generator=gen).reshape(B, N)
    drafts[0, :6] = torch.randperm(V, generator=gen)[:6]
    one = torch.nn.functional.one_hot(drafts, V).double()
    p[0, 0] = 0.4 * p[0, 0] + 0.1 * one[0, :6].sum(0)
    q[0, :6] = 0.1 * q[0, :6] + 0.9 * one[0, :6]
    for b, t in ((1, 0), (1, 6), (1, 9), (3, 0), (3, 6)):  # row 1's path: the root, nodes 0, 6, 9; row 3's
        p[b, parents[t] + 1] = 0.01 * p[b, parents[t] + 1] + 0.99 * one[b, t]
    p[3, 7] = 0.5 * p[3, 7] + 0.5 * one[3, 9]
    q[3, 9] = 0.1 * q[3, 9] + 0.9 * one[3, 9]
    p, q = p.to(dtype), None if one_hot else q.to(dtype)

    def accepted_by_reference(b, seed):
        return tree_speculative_sample_row(parents, drafts[b].tolist(), None if q is None else q[b], p[b], row=b,
                                           seed=seed, offset=3)[2]

    seed = next(s for s in range(200) if accepted_by_reference(0, s) == 0 and accepted_by_reference(3, s) == 2)
    simt = _simt.load() if backend.name == "simt" else None
    if simt:
        simt.reset_launch_counts()
    path, tokens, accepted = backend.tree_speculative_sample(drafts, Tree(parents), q, p, seed=seed, offset=3)
    want = expected_rows([parents], drafts.tolist(), q, p, seed, 3, False, 4)
    assert torch.equal(accepted, want[2]) and torch.equal(tokens, want[1]) and torch.equal(path, want[0])
    assert accepted[1] == 3
    if simt:
        assert simt.launch_counts() == {"tree_sample_step": 5, "tree_sample_pass": 4}
    nan = p[:1].clone()
    nan[0, 0, V - 7] = float("nan")  # read in row 0's first pass (its first child fails), in the last chunk
    assert V - 7 not in drafts[0].tolist()
    q0 = None if q is None else q[:1]
    status = tree_op_status(backend, lambda: backend.tree_speculative_sample(drafts[:1], Tree(parents), q0, nan,
                                                                             seed=seed))
    assert status == STATUS_BAD_VALUE


def test_bad_values(backend):
    gen = torch.Generator().manual_seed(0)
    N, V = 4, 10
    p = random_probs(gen, (1, N + 1, V))
    q = random_probs(gen, (1, N, V))
    ids = torch.tensor([[1, 2, 3, 4]])
    tree = Tree([-1, 0, 0, 2])
    bad_ids = ids.clone()
    bad_ids[0, 3] = V
    status = tree_op_status(backend, lambda: backend.tree_speculative_sample(bad_ids, tree, q, p, seed=1))
    assert status == STATUS_BAD_ID
    nan_q = q.clone()
    nan_q[0, 2, 3] = float("nan")
    status = tree_op_status(backend, lambda: backend.tree_speculative_sample(ids, tree, nan_q, p, seed=1))
    assert status == STATUS_BAD_VALUE
    negative = p.clone()
    negative[0, 0, 1] = 0  # node 0 (token 1) is rejected, so the root's row is read whole, -0.5 with it
    negative[0, 0, 7] = -0.5
    assert tree_op_status(backend, lambda: backend.tree_speculative_sample(ids, tree, None, negative, seed=1)) == (
        STATUS_BAD_VALUE)


@pytest.mark.parametrize("parents, max_depth", [([-1, 1, 0], 2), ([-1, 0, 1], 2), ([-1, -3, 0], 2)])
def test_malformed_trees_through_the_op(backend, parents, max_depth):
    # The op itself (the Tree class refuses these before): a parent after its node, a tree deeper than
    # max_depth, an out-of-range link.
    gen = torch.Generator().manual_seed(1)
    p = random_probs(gen, (1, 4, 8)).to(backend.device)
    ids = torch.tensor([[1, 2, 3]], device=backend.device)
    parents_t = torch.tensor([parents], device=backend.device)
    seed = torch.tensor(1)
    offset = torch.tensor(0)

    def call():
        out = backend.ops.tree_speculative_sample(ids, parents_t, None, p, max_depth, False, seed, offset)
        return tuple(t.cpu() for t in out)

    assert tree_op_status(backend, call) == STATUS_BAD_TREE


def test_bad_arguments(backend):
    gen = torch.Generator().manual_seed(2)
    p = random_probs(gen, (2, 4, 8))
    ids = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="the tree has 5 nodes for 3 drafts"):
        backend.tree_speculative_sample(ids, Tree([-1, 0, 1, 2, 3]), None, p)
    with pytest.raises(ValueError, match="node 0 the only root"):
        backend.tree_speculative_sample(ids, Tree([-1, -1, 0, 1]), None, p)  # 4 nodes but two roots
    with pytest.raises(TypeError, match="must be a fastar.masks.Tree"):
        backend.tree_speculative_sample(ids, [-1, 0, 1], None, p)
    with pytest.raises(ValueError, match=r"target_probs must have shape \[B, n\+1, V\]"):
        backend.tree_speculative_sample(ids, Tree([-1, 0, 1]), None, p[:, :3])
    with pytest.raises(TypeError, match="same dtype"):
        backend.tree_speculative_sample(ids, Tree([-1, 0, 1]), random_probs(gen, (2, 3, 8)).half(), p)
    with pytest.raises(ValueError, match=r"parents must have shape \[B or 1, N\]"):
        backend.tree_speculative_sample(ids, Tree(torch.tensor([[-1, 0, 1]] * 3)), None, p)

