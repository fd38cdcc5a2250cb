"""fastar.tree_greedy_verify on every backend, against fastar.reference.tree_greedy_verify_row; chains against
fastar.greedy_verify; hand-computed trees; every bad input.
"""
from __future__ import annotations

import pytest
import torch

from fastar import _simt
from fastar.masks import Tree
from fastar.reference import tree_greedy_verify_row
from helpers import tree_op_status

STATUS_BAD_ID, STATUS_BAD_VALUE, STATUS_BAD_TREE = 2, 4, 16


def random_parents(gen, n: int) -> list:
    return [int(torch.randint(-1, t, (1,), generator=gen)) for t in range(n)]


def drafts_that_often_match(gen, parents, logits):
    """Each node's token: the argmax after its parent with probability 0.7 (so paths grow), else random."""
    V = logits.shape[-1]
    out = []
    for parent in parents:
        if torch.rand(1, generator=gen) < 0.7:
            out.append(int(torch.argmax(logits[parent + 1])))
        else:
            out.append(int(torch.randint(0, V, (1,), generator=gen)))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["drafted", "rooted", "batched"])
def test_matches_reference(backend, dtype, form):
    gen = torch.Generator().manual_seed(["drafted", "rooted", "batched"].index(form))
    B, N, V = 8, 12, 41
    parents_rows = [random_parents(gen, N) for _ in range(B if form == "batched" else 1)]
    logits = torch.randn(B, N + 1, V, generator=gen).to(dtype)
    logits[5, :, 3] = logits[5].float().amax(-1).to(dtype)  # ties in the argmax: the smallest id wins
    drafts = [drafts_that_often_match(gen, parents_rows[b if form == "batched" else 0], logits[b].float())
              for b in range(B)]
    drafts[2][N - 2:] = [-1, -1]  # a ragged row
    if form == "rooted":
        tree = Tree([-1] + [t + 1 for t in parents_rows[0]])
    else:
        tree = Tree(torch.tensor(parents_rows if form == "batched" else parents_rows[0]))
    path, tokens, accepted = backend.tree_greedy_verify(torch.tensor(drafts), tree, logits)
    for b in range(B):
        parents = parents_rows[b if form == "batched" else 0]
        want_path, want_tokens, k = tree_greedy_verify_row(parents, drafts[b], logits[b])
        if form == "rooted":
            want_path = [0] + [t + 1 for t in want_path]
        assert int(accepted[b]) == k
        assert path[b].tolist() == want_path + [-1] * (path.shape[1] - len(want_path))
        assert tokens[b].tolist() == want_tokens + [-1] * (tokens.shape[1] - len(want_tokens))


def one_hot_logits(argmaxes, vocab=6):
    logits = torch.zeros(len(argmaxes), vocab)
    for row, t in enumerate(argmaxes):
        logits[row, t] = 5.0
    return logits


def test_by_hand(backend):
    # root -> {0: tok 3, 1: tok 3, 2: tok 1}; 0 -> {3: tok 4}; 1 -> {4: tok 2}; 4 -> {5: tok 5}. The argmax is 3 at
    # the root, 0 after node 0, 2 after node 1, 5 after node 4, 1 after node 5: the second token-3 branch goes on.
    drafts = torch.tensor([[3, 3, 1, 4, 2, 5]])
    logits = one_hot_logits([3, 0, 2, 0, 0, 5, 1])[None]
    path, tokens, accepted = backend.tree_greedy_verify(drafts, Tree([-1, -1, -1, 0, 1, 4]), logits)
    assert path.tolist() == [[1, 4, 5, -1]] and tokens.tolist() == [[3, 2, 5, 1]] and accepted.tolist() == [3]
    # The same tree with the verified root as node 0: the path in tree numbering.
    path, tokens, accepted = backend.tree_greedy_verify(drafts, Tree([-1, 0, 0, 0, 1, 2, 5]), logits)
    assert path.tolist() == [[0, 2, 5, 6]] and tokens.tolist() == [[3, 2, 5, 1]] and accepted.tolist() == [3]
    # Nothing matches: the root's argmax alone.
    nothing = one_hot_logits([0] * 7)[None]
    path, tokens, accepted = backend.tree_greedy_verify(drafts, Tree([-1, -1, -1, 0, 1, 4]), nothing)
    assert path.tolist() == [[-1] * 4] and tokens.tolist() == [[0, -1, -1, -1]] and accepted.tolist() == [0]


def test_a_chain_is_greedy_verify(backend):
    gen = torch.Generator().manual_seed(4)
    B, N, V = 10, 5, 200
    logits = torch.randn(B, N + 1, V, generator=gen)
    drafts = torch.where(torch.rand(B, N, generator=gen) < 0.8, logits[:, :N].argmax(-1),
                         torch.randint(0, V, (B, N), generator=gen))
    path, tokens, accepted = backend.tree_greedy_verify(drafts, Tree(list(range(-1, N - 1))), logits)
    chain_tokens, chain_accepted = backend.greedy_verify(drafts, logits)
    assert torch.equal(tokens, chain_tokens) and torch.equal(accepted, chain_accepted)


# A vocabulary of several 16-byte-load tiles and few logit rows: the CUDA kernels split each row over several
# blocks (the emulator counts 4 SMs, so 2 rows of 5 logit rows of V = 9001 take 2 chunks of 5120 fp32 or 6144
# 16-bit tokens; 1 row, 3 chunks of 3072 or 4096).
SPLIT_VOCAB = 9001
SPLIT_PARENTS = [-1, -1, 0, 2]  # root -> {0, 1}, 0 -> 2 -> 3


def split_case(gen, batch, dtype):
    """Logits whose maxima lie in every chunk of some row, with drafts that copy the argmax after their parent."""
    logits = torch.randn(batch, len(SPLIT_PARENTS) + 1, SPLIT_VOCAB, generator=gen).to(dtype)
    for i, t in enumerate([5, 8999, 4095, 6143, 7000]):
        logits[:, i, t] = 50.0
    logits[-1, 1, [3000, 7000]] = 60.0  # a tie in two chunks: the lowest index wins
    logits[-1, 3] = float("-inf")  # argmax 0
    argmax = torch.argmax(logits.double(), -1)
    drafts = argmax[:, [p + 1 for p in SPLIT_PARENTS]].clone()
    return logits, drafts


def assert_reference(backend, drafts, tree_parents, logits):
    path, tokens, accepted = backend.tree_greedy_verify(drafts, Tree(torch.tensor(tree_parents)), logits)
    for b in range(drafts.shape[0]):
        want_path, want_tokens, k = tree_greedy_verify_row(tree_parents, drafts[b].tolist(), logits[b])
        assert int(accepted[b]) == k
        assert path[b].tolist() == want_path + [-1] * (path.shape[1] - len(want_path))
        assert tokens[b].tolist() == want_tokens + [-1] * (tokens.shape[1] - len(want_tokens))
    return path, tokens, accepted


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "unaligned"])
@pytest.mark.parametrize("batch", [1, 2])
def test_rows_split_over_blocks(backend, dtype, layout, batch):
    """Maxima in every chunk, a tie across a chunk boundary, a -inf row; rows whose start is not 16-byte aligned
    (a padded vocabulary) take the element-wise loads."""
    logits, drafts = split_case(torch.Generator().manual_seed(batch), batch, dtype)
    if batch == 2:
        drafts[0, 0] = (drafts[0, 0] + 1) % SPLIT_VOCAB  # row 0: node 0 fails, so node 1 alone matches
    if layout == "unaligned":
        padded = torch.zeros(*logits.shape[:2], SPLIT_VOCAB + 1, dtype=dtype)
        padded[..., 1:] = logits
        logits = padded[..., 1:]
    path, tokens, accepted = assert_reference(backend, drafts, SPLIT_PARENTS, logits)
    # The last row: the whole chain 0 -> 2 -> 3, through the tie (3000) and the -inf row (0).
    assert accepted[-1] == 3 and tokens[-1].tolist() == [5, 3000, 0, 7000]
    if batch == 2:
        assert accepted[0] == 1 and tokens[0].tolist() == [5, 4095, -1, -1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_in_any_chunk_of_a_split_row(backend, dtype):
    logits, drafts = split_case(torch.Generator().manual_seed(3), 1, dtype)
    tree = Tree(torch.tensor(SPLIT_PARENTS))
    for row, t in ((0, 0), (0, 8000), (1, 4500), (4, SPLIT_VOCAB - 1)):  # rows the walk reads, any chunk
        bad = logits.clone()
        bad[0, row, t] = float("nan")
        status = tree_op_status(backend, lambda bad=bad: backend.tree_greedy_verify(drafts, tree, bad))
        assert status == STATUS_BAD_VALUE, (row, t)
    wrong = drafts.clone()
    wrong[0, 2] = (wrong[0, 2] + 1) % SPLIT_VOCAB  # node 2 fails: the rows after nodes 2 and 3 are never read
    bad = logits.clone()
    bad[0, 3, 8000] = bad[0, 4, 100] = float("nan")
    _, tokens, accepted = backend.tree_greedy_verify(wrong, tree, bad)
    assert accepted.tolist() == [1] and tokens.tolist() == [[5, 3000, -1, -1]]
    ragged = drafts.clone()
    ragged[0, 3] = -1  # an absent node: the row after it is never read
    bad = logits.clone()
    bad[0, 4, 8000] = float("nan")
    _, tokens, accepted = backend.tree_greedy_verify(ragged, tree, bad)
    assert accepted.tolist() == [2] and tokens.tolist() == [[5, 3000, 0, -1]]


# A wide, shallow tree over a large vocabulary: the CUDA kernels read the logits level by level (only the rows
# the walk reads) when the rows that skips outweigh max_depth more launches: on the emulator's 4 SMs, rows of
# V = 20000 here when B * 10 skipped rows are over 2 levels * 4 SMs * 76 KB (not one bfloat16 row: one launch).
LEVEL_PARENTS = [-1, -1, -1, -1, 0, 0, 0, 1, 1, 2, 3, 3]
LEVEL_VOCAB = 20000


def level_case(batch, dtype):
    """Nodes 1 and 3 repeat the root's argmax, 7 and 10 the argmax after them: two paths of two, 1 -> 7 first."""
    gen = torch.Generator().manual_seed(batch)
    logits = torch.randn(batch, len(LEVEL_PARENTS) + 1, LEVEL_VOCAB, generator=gen).to(dtype)
    argmax = torch.argmax(logits.double(), -1)
    drafts = torch.randint(0, LEVEL_VOCAB, (batch, len(LEVEL_PARENTS)), generator=gen)
    drafts[:, 0] = (argmax[:, 0] + 1) % LEVEL_VOCAB
    drafts[:, 1] = drafts[:, 3] = argmax[:, 0]
    drafts[:, 7], drafts[:, 10] = argmax[:, 2], argmax[:, 4]
    return logits, drafts, argmax


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [1, 2])
def test_rows_read_level_by_level(backend, dtype, batch):
    logits, drafts, argmax = level_case(batch, dtype)
    drafts[-1, 8] = -1  # an absent node
    logits[:, 1, 5] = float("nan")  # after node 0, which does not match: never read
    simt = _simt.load() if backend.name == "simt" else None
    if simt:
        simt.reset_launch_counts()
    path, tokens, accepted = assert_reference(backend, drafts, LEVEL_PARENTS, logits)
    assert accepted.tolist() == [2] * batch and path[:, :2].tolist() == [[1, 7]] * batch
    assert tokens[:, 2].tolist() == argmax[:, 8].tolist()
    if simt:  # levels 0, 1 and 2 of the tree, or every row at once
        by_level = batch * 10 * LEVEL_VOCAB * logits.element_size() > 2 * 4 * 76 * 1024
        assert simt.launch_counts()["tree_greedy_verify_partial"] == (3 if by_level else 1)
    bad = logits.clone()
    bad[-1, 8, 19000] = float("nan")  # after node 7, on the accepted path
    tree = Tree(torch.tensor(LEVEL_PARENTS))
    if backend.marks_invalid_rows:
        _, _, accepted = backend.tree_greedy_verify(drafts, tree, bad)
        assert accepted.tolist() == [2] * (batch - 1) + [-STATUS_BAD_VALUE]
    else:
        with pytest.raises(ValueError, match="NaN"):
            backend.tree_greedy_verify(drafts, tree, bad)


def test_bad_values(backend):
    drafts = torch.tensor([[3, 3, 2]])  # nodes 0 and 1 match the root's 3; node 2 (under 0) is not the 1 there
    tree = Tree([-1, -1, 0])
    logits = one_hot_logits([3, 1, 0, 0])[None]
    bad_ids = drafts.clone()
    bad_ids[0, 2] = 6
    assert tree_op_status(backend, lambda: backend.tree_greedy_verify(bad_ids, tree, logits)) == STATUS_BAD_ID
    nan = logits.clone()
    nan[0, 1, 4] = float("nan")  # the row after node 0, which matches
    assert tree_op_status(backend, lambda: backend.tree_greedy_verify(drafts, tree, nan)) == STATUS_BAD_VALUE
    unread = logits.clone()
    unread[0, 3, 0] = float("nan")  # the row after node 2, which does not match: never read
    path, tokens, accepted = backend.tree_greedy_verify(drafts, tree, unread)
    assert accepted.tolist() == [1] and path.tolist() == [[0, -1, -1]] and tokens.tolist() == [[3, 1, -1]]


@pytest.mark.parametrize("parents, max_depth", [([-1, 1, 0], 2), ([-1, 0, 1], 2)])
def test_malformed_trees_through_the_op(backend, parents, max_depth):
    logits = torch.randn(1, 4, 8).to(backend.device)
    ids = torch.tensor([[1, 2, 3]], device=backend.device)
    parents_t = torch.tensor([parents], device=backend.device)

    def call():
        return tuple(t.cpu() for t in backend.ops.tree_greedy_verify(ids, parents_t, logits, max_depth, False))

    assert tree_op_status(backend, call) == STATUS_BAD_TREE


def test_bad_arguments(backend):
    logits = torch.randn(2, 4, 8)
    ids = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="the tree has 5 nodes for 3 drafts"):
        backend.tree_greedy_verify(ids, Tree([-1, 0, 1, 2, 3]), logits)
    with pytest.raises(TypeError, match="must be a fastar.masks.Tree"):
        backend.tree_greedy_verify(ids, [-1, 0, 1], logits)
    with pytest.raises(ValueError, match=r"target_logits must have shape \[B, n\+1, V\]"):
        backend.tree_greedy_verify(ids, Tree([-1, 0, 1]), logits[:, :3])
    with pytest.raises(TypeError, match="must be float32, float16 or bfloat16"):
        backend.tree_greedy_verify(ids, Tree([-1, 0, 1]), logits.double())
