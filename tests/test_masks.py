"""Tests of the structured masks (fastar.masks) and the attention reference (docs/masks.md, docs/attention.md).

Three descriptions of every mask are checked against each other:

* the definition, written here as per-element Python loops over the issue's rules (``naive``);
* ``Mask.materialize`` (vectorised, the users' and tests' dense form);
* ``Mask.lower`` evaluated by ``fastar.reference.mask_from_args``, a literal port of ``mask_visible`` in
  ``csrc/core/attention.h`` (what the kernels will compute).

Plus the published vectors (Medusa buffers, VAR scales) and ``attention_reference`` against PyTorch SDPA.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastar.masks import (
    And,
    BlockCausal,
    Causal,
    Dense,
    MaskArgs,
    Tree,
    Window,
    pack_bits,
    unpack_bits,
)
from fastar.reference.attention import attention_reference, mask_from_args

MEDUSA_CHOICES = [[0], [1], [0, 0], [0, 1], [0, 0, 0]]
MEDUSA_MASK = ["100000", "110000", "101000", "110100", "110010", "110101"]


# ---------------------------------------------------------------------------------------------------------
# The definitions, one element at a time.


class Spec:
    """A mask's definition: ``visible(b, i, j, Lq, lk)`` for query i of sequence b with lk keys (j < lk)."""

    def visible(self, b: int, i: int, j: int, Lq: int, lk: int) -> bool:
        raise NotImplementedError


class CausalSpec(Spec):
    def visible(self, b, i, j, Lq, lk):
        return j <= i + (lk - Lq)


class WindowSpec(Spec):
    def __init__(self, left: int, sinks: int):
        self.left, self.sinks = left, sinks

    def visible(self, b, i, j, Lq, lk):
        pos = i + (lk - Lq)
        return j <= pos and (j >= pos - self.left or j < self.sinks)


class BlockSpec(Spec):
    def __init__(self, ids: List[List[int]], relation: str):
        self.ids, self.relation = ids, relation  # ids: per sequence (or one list shared), per key position

    def visible(self, b, i, j, Lq, lk):
        ids = self.ids[b if len(self.ids) > 1 else 0]
        qb, kb = ids[i + (lk - Lq)], ids[j]
        return {"causal": kb <= qb, "same": kb == qb, "prev": qb - 1 <= kb <= qb}[self.relation]


class TreeSpec(Spec):
    def __init__(self, parents: List[List[int]]):
        self.parents = parents

    def visible(self, b, i, j, Lq, lk):
        parents = self.parents[b if len(self.parents) > 1 else 0]
        start = lk - len(parents)
        if j < start:
            return True  # the prefix
        node, target = i, j - start
        while node >= 0:  # walk from the query node up to its root
            if node == target:
                return True
            node = parents[node]
        return False


class DenseSpec(Spec):
    def __init__(self, mask: torch.Tensor):
        self.mask = mask.reshape(-1, *mask.shape[-2:])

    def visible(self, b, i, j, Lq, lk):
        return bool(self.mask[b if self.mask.shape[0] > 1 else 0, i, j])


class AndSpec(Spec):
    def __init__(self, *specs: Spec):
        self.specs = specs

    def visible(self, b, i, j, Lq, lk):
        return all(s.visible(b, i, j, Lq, lk) for s in self.specs)


def naive(spec: Spec, batch: int, Lq: int, Lk: int, kv_lens: Optional[Sequence[int]] = None) -> torch.Tensor:
    out = torch.zeros(batch, Lq, Lk, dtype=torch.bool)
    for b in range(batch):
        lk = Lk if kv_lens is None else int(kv_lens[b])
        for i in range(Lq):
            for j in range(lk):
                out[b, i, j] = spec.visible(b, i, j, Lq, lk)
    return out


def assert_masks_equal(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    got = got.expand_as(want)
    if not torch.equal(got, want):
        b, i, j = torch.nonzero(got != want)[0].tolist()
        raise AssertionError(f"{what}: first difference at b={b}, i={i}, j={j}: got {bool(got[b, i, j])}\n"
                             f"got\n{got[b].int()}\nwant\n{want[b].int()}")


def check_all(mask, spec: Spec, batch: int, Lq: int, Lk: int, kv_lens: Optional[List[int]] = None) -> None:
    """definition == materialize == mask_from_args(lower)."""
    lens = None if kv_lens is None else torch.tensor(kv_lens, dtype=torch.int32)
    want = naive(spec, batch, Lq, Lk, kv_lens)
    dense = mask.materialize(Lq, Lk, batch=batch, kv_lens=lens)
    assert dense.dtype == torch.bool and dense.dim() == 3 and dense.shape[0] in (1, batch)
    assert_masks_equal(dense, want, f"materialize of {mask!r}")
    args = mask.lower(batch, Lq, Lk, "cpu", kv_lens=lens)
    assert args.bias is None
    assert_masks_equal(mask_from_args(args, batch, Lq, Lk, lens), want, f"lowering of {mask!r}")


def rows_of(mask: torch.Tensor) -> List[str]:
    return ["".join(str(int(x)) for x in row) for row in mask]


# ---------------------------------------------------------------------------------------------------------
# Trees: Medusa / EAGLE buffers.


def medusa_buffers(choices):
    """Medusa's generate_medusa_buffers (attention mask, position ids, retrieve indices), re-derived."""
    ordered = sorted(choices, key=lambda x: (len(x), x))
    n = len(ordered) + 1
    mask = torch.eye(n, dtype=torch.bool)
    mask[:, 0] = True
    for k, choice in enumerate(ordered):
        for c in range(len(choice) - 1):
            mask[k + 1, ordered.index(choice[: c + 1]) + 1] = True
    position_ids = [0] + [len(c) for c in ordered]
    paths, seen = [], []
    for choice in reversed(ordered):
        if choice in seen:
            continue
        path = []
        for c in range(len(choice)):
            path.append(ordered.index(choice[: c + 1]) + 1)
            seen.append(choice[: c + 1])
        paths.append([0] + path)
    width = max(map(len, paths))
    paths = [p + [-1] * (width - len(p)) for p in paths]
    return mask, position_ids, paths


# EAGLE-1's default tree (mc_sim_7b_63): 63 nodes and depth 5 (root excluded).
EAGLE_CHOICES = [
    [0], [1], [2], [3], [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [2, 0], [2, 1], [3, 0], [0, 0, 0], [0, 0, 1],
    [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 2, 0], [0, 2, 1], [1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2],
    [0, 0, 0, 0, 0], [0, 0, 0, 0, 1],
]


def test_medusa_vector():
    tree = Tree.from_choices(MEDUSA_CHOICES)
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 3]
    assert tree.choices == ((), (0,), (1,), (0, 0), (0, 1), (0, 0, 0))
    assert rows_of(tree.materialize(6, 6)[0]) == MEDUSA_MASK
    assert tree.position_ids.tolist() == [0, 1, 1, 2, 2, 3]
    assert tree.retrieve_paths().tolist() == [[0, 1, 3, 5], [0, 1, 4, -1], [0, 2, -1, -1]]
    # With a prefix of 3 cached keys, every node sees the prefix.
    assert rows_of(tree.materialize(6, 9)[0]) == ["111" + r for r in MEDUSA_MASK]


def test_eagle_tree_matches_medusa_buffers():
    mask, position_ids, paths = medusa_buffers(EAGLE_CHOICES)
    tree = Tree.from_choices(list(reversed(EAGLE_CHOICES)))  # the order of the list does not matter
    T = len(EAGLE_CHOICES) + 1
    assert tree.num_nodes == T
    assert_masks_equal(tree.materialize(T, T), mask.unsqueeze(0), "EAGLE tree")
    assert tree.position_ids.tolist() == position_ids
    assert tree.retrieve_paths().tolist() == paths
    check_all(tree, TreeSpec([tree.parents.tolist()]), 2, T, T + 5, kv_lens=[T + 5, T + 1])


def test_tree_row_is_prefix_and_path():
    """docs/masks.md: tree attention of a node = causal attention over the prefix plus its root-to-node path."""
    tree = Tree.from_choices(EAGLE_CHOICES)
    T, prefix = tree.num_nodes, 4
    dense = tree.materialize(T, prefix + T)[0]
    for leaf_path in tree.retrieve_paths().tolist():
        path = [n for n in leaf_path if n >= 0]
        for depth, node in enumerate(path):
            want = torch.zeros(prefix + T, dtype=torch.bool)
            want[:prefix] = True
            want[[prefix + n for n in path[: depth + 1]]] = True
            assert torch.equal(dense[node], want)
            assert tree.position_ids[node] == depth


def test_batched_tree_and_multiple_roots():
    parents = [[-1, 0, 0, 1, -1], [-1, -1, 1, 2, 2]]
    tree = Tree(torch.tensor(parents))
    assert tree.position_ids.tolist() == [[0, 1, 1, 2, 0], [0, 0, 1, 2, 2]]
    assert tree.retrieve_paths().tolist() == [
        [[4, -1, -1], [0, 1, 3], [0, 2, -1]],
        [[1, 2, 4], [1, 2, 3], [0, -1, -1]],
    ]
    check_all(tree, TreeSpec(parents), 2, 5, 7)
    check_all(tree, TreeSpec(parents), 2, 5, 7, kv_lens=[5, 6])


# ---------------------------------------------------------------------------------------------------------
# Block-causal, window, causal.


def test_var_scales_vector():
    """docs/scale_attention.md: scales (1, 2, 3) -> ids [0, 1×4, 2×9]; rows 1-4 see columns 0-4, rows 5-13 see all."""
    ids = [0] + [1] * 4 + [2] * 9
    for mask in (BlockCausal(ids), BlockCausal(block_lengths=[1, 4, 9])):
        dense = mask.materialize(14, 14)[0]
        assert rows_of(dense[:1]) == ["1" + "0" * 13]
        assert rows_of(dense[1:5]) == ["1" * 5 + "0" * 9] * 4
        assert rows_of(dense[5:]) == ["1" * 14] * 9
        check_all(mask, BlockSpec([ids], "causal"), 1, 14, 14)
    # KV-cache inference of the last scale: its 9 queries against the whole cache see everything.
    assert bool(BlockCausal(ids).materialize(9, 14).all())


def test_block_relations_same_and_prev():
    ids = [0, 1, 1, 2, 2, 2]
    same = BlockCausal(ids, relation="same").materialize(6, 6)[0]
    assert rows_of(same) == ["100000", "011000", "011000", "000111", "000111", "000111"]
    prev = BlockCausal(ids, relation="prev").materialize(6, 6)[0]
    assert rows_of(prev) == ["100000", "111000", "111000", "011111", "011111", "011111"]
    for relation in ("causal", "same", "prev"):
        check_all(BlockCausal(ids, relation=relation), BlockSpec([ids], relation), 1, 6, 6)
        check_all(BlockCausal(ids, relation=relation), BlockSpec([ids], relation), 1, 3, 6)


def test_block_lengths_per_sequence():
    lengths = [[2, 3, 3], [4, 1, 3]]
    ids = [[0, 0, 1, 1, 1, 2, 2, 2], [0, 0, 0, 0, 1, 2, 2, 2]]
    mask = BlockCausal(block_lengths=lengths)
    assert mask.materialize(8, 8).shape == (2, 8, 8)
    check_all(mask, BlockSpec(ids, "causal"), 2, 8, 8)
    check_all(mask, BlockSpec(ids, "causal"), 2, 3, 8)
    check_all(BlockCausal(torch.tensor(ids), relation="prev"), BlockSpec(ids, "prev"), 2, 2, 8, kv_lens=[8, 5])
    # A ragged cache may hold fewer keys than Lk: the lengths need only cover each sequence's keys.
    short = BlockCausal(block_lengths=[[2, 3, 3], [2, 2, 0]])
    check_all(short, BlockSpec([ids[0], [0, 0, 1, 1, 3, 3, 3, 3]], "causal"), 2, 2, 8, kv_lens=[8, 4])


def test_block_size_and_causal_equivalences():
    for Lq, Lk in [(7, 7), (3, 7), (1, 9)]:
        causal = Causal().materialize(Lq, Lk)
        assert torch.equal(BlockCausal(block_size=1).materialize(Lq, Lk), causal)
        assert torch.equal(Window(left=Lk).materialize(Lq, Lk), causal)
        assert torch.equal(Dense(torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)).materialize(Lq, Lk), causal)
        check_all(BlockCausal(block_size=3), BlockSpec([[t // 3 for t in range(Lk)]], "causal"), 1, Lq, Lk)


def test_causal_and_window_vectors():
    assert rows_of(Causal().materialize(2, 4)[0]) == ["1110", "1111"]
    assert rows_of(Window(1, sinks=1).materialize(4, 6)[0]) == ["111000", "101100", "100110", "100011"]
    assert rows_of(Window(0).materialize(3, 3)[0]) == ["100", "010", "001"]
    # Sinks obey causality: the first query does not see sink keys after it.
    assert rows_of(Window(0, sinks=3).materialize(3, 3)[0]) == ["100", "110", "111"]


def test_kv_lens_ragged():
    """Per-sequence key counts: diagonal at kv_lens[b] - Lq, later key positions invisible."""
    lens = [6, 2, 0, 4]
    for mask, spec in [
        (Causal(), CausalSpec()),
        (Window(1, sinks=1), WindowSpec(1, 1)),
        (Dense(torch.rand(4, 3, 6) < 0.5), None),
    ]:
        spec = spec or DenseSpec(mask.materialize(3, 6))
        check_all(mask, spec, 4, 3, 6, kv_lens=lens)
    got = Causal().materialize(3, 6, kv_lens=torch.tensor(lens))
    assert rows_of(got[1]) == ["000000", "100000", "110000"]
    assert not bool(got[2].any())


# ---------------------------------------------------------------------------------------------------------
# Bit packing and dense masks.


def test_bit_order_is_little_endian():
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 0] = mask[0, 9] = True
    mask[1, 3] = mask[1, 7] = mask[1, 8] = True
    assert pack_bits(mask).tolist() == [[1, 2], [136, 1]]
    bits = torch.tensor([[1, 2], [136, 1]], dtype=torch.uint8)
    assert torch.equal(Dense.from_packed(bits, 2, 10).materialize(2, 10)[0], mask)


@pytest.mark.parametrize("Lk", [1, 7, 8, 9, 16, 21])
def test_pack_round_trip(Lk):
    g = torch.Generator().manual_seed(Lk)
    mask = torch.rand(3, 5, Lk, generator=g) < 0.5
    bits = pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.shape == (3, 5, (Lk + 7) // 8)
    assert torch.equal(unpack_bits(bits, Lk), mask)
    from_packed = Dense.from_packed(bits, 5, Lk)
    assert torch.equal(from_packed.materialize(5, Lk), mask)
    assert torch.equal(Dense(mask).materialize(5, Lk), mask)
    args = Dense(mask).lower(3, 5, Lk, "cpu")
    assert args.bits_cols == Lk and torch.equal(args.bits, bits)
    # Bits past Lk in the last byte are ignored.
    noisy = bits.clone()
    noisy[..., -1] |= (0xFF << (Lk % 8 or 8)) & 0xFF
    assert torch.equal(Dense.from_packed(noisy, 5, Lk).materialize(5, Lk), mask)
    check_all(Dense.from_packed(noisy, 5, Lk), DenseSpec(mask), 3, 5, Lk)


def test_dense_shared_by_batch():
    mask = torch.rand(4, 9) < 0.5
    assert Dense(mask).materialize(4, 9).shape == (1, 4, 9)
    assert Dense(mask).materialize(4, 9, batch=3).shape == (1, 4, 9)
    check_all(Dense(mask), DenseSpec(mask), 3, 4, 9, kv_lens=[9, 5, 8])


# ---------------------------------------------------------------------------------------------------------
# Composition and lowering.


def test_and_lowering_keeps_structure():
    lowered = (Causal() & Window(4, sinks=2) & Window(2, sinks=2)).lower(1, 3, 9, "cpu")
    assert (lowered.causal, lowered.window, lowered.window_left, lowered.window_sinks) == (True, True, 2, 2)
    assert lowered.bits is None and lowered.block_relation == 0

    block = BlockCausal(block_size=2) & Causal()
    lowered = block.lower(2, 4, 8, "cpu")
    assert lowered.causal and lowered.block_relation == 1 and lowered.bits is None
    assert lowered.q_block_ids.dtype == torch.int32 and lowered.q_block_ids.tolist() == [[2, 2, 3, 3]]
    assert lowered.k_block_ids.tolist() == [[0, 0, 1, 1, 2, 2, 3, 3]]

    # Two trees' bits are AND-ed; a dense mask over all keys widens the bits to Lk.
    t1, t2 = Tree([-1, 0, 1]), Tree([-1, 0, 0])
    assert (t1 & t2).lower(1, 3, 5, "cpu").bits_cols == 3
    lowered = (t1 & Dense(torch.ones(3, 5, dtype=torch.bool))).lower(1, 3, 5, "cpu")
    assert lowered.bits_cols == 5 and lowered.bits.shape == (1, 3, 1)


def test_and_fallbacks_to_bits():
    lowered = (Window(3, sinks=1) & Window(1, sinks=2)).lower(1, 4, 9, "cpu")
    assert lowered.window and lowered.window_left == 3 and lowered.bits_cols == 9
    two_blocks = BlockCausal(block_size=2) & BlockCausal([0, 0, 0, 1, 1, 1, 2], relation="prev")
    lowered = two_blocks.lower(1, 7, 7, "cpu")
    assert lowered.block_relation == 1 and lowered.bits_cols == 7
    spec = AndSpec(BlockSpec([[t // 2 for t in range(7)]], "causal"), BlockSpec([[0, 0, 0, 1, 1, 1, 2]], "prev"))
    check_all(two_blocks, spec, 1, 7, 7)
    check_all(two_blocks & Tree([-1, 0, 0, 2]), AndSpec(spec, TreeSpec([[-1, 0, 0, 2]])), 2, 4, 7, kv_lens=[7, 6])


def test_masks_compose_only_with_masks():
    assert isinstance(Causal() & Window(2), And)
    assert len((Causal() & (Window(2) & Causal())).masks) == 3
    with pytest.raises(TypeError):
        Causal() & torch.ones(2, 2, dtype=torch.bool)
    assert MaskArgs.none() == MaskArgs(False, True, False, 0, 0, 0, None, None, None, 0, None)
    assert set(MaskArgs._fields) == {
        "causal", "bottom_right", "window", "window_left", "window_sinks", "block_relation",
        "q_block_ids", "k_block_ids", "bits", "bits_cols", "bias",
    }


@st.composite
def mask_cases(draw):
    """A random mask (a leaf or an AND of up to three), its definition, and a batch geometry."""
    batch = draw(st.integers(1, 3))
    Lk = draw(st.integers(1, 13))
    Lq = draw(st.integers(1, Lk))
    kv_lens = draw(st.none() | st.lists(st.integers(Lq, Lk), min_size=batch, max_size=batch))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)

    def leaf(kind):
        per_seq = draw(st.booleans())
        rows = batch if per_seq else 1
        if kind == "causal":
            return Causal(), CausalSpec()
        if kind == "window":
            left, sinks = draw(st.integers(0, Lk)), draw(st.integers(0, 3))
            return Window(left, sinks), WindowSpec(left, sinks)
        if kind == "block":
            relation = draw(st.sampled_from(["causal", "same", "prev"]))
            how = draw(st.sampled_from(["ids", "size", "lengths"]))
            if how == "size":
                size = draw(st.integers(1, 4))
                spec = BlockSpec([[t // size for t in range(Lk)]], relation)
                return BlockCausal(block_size=size, relation=relation), spec
            if how == "ids":
                ids = torch.randint(-2, 4, (rows, Lk), generator=g)
                if draw(st.booleans()):  # block ids are usually sorted; the rule holds for any ids
                    ids = ids.sort(-1).values
                given = ids if per_seq else ids[0]
                return BlockCausal(given, relation=relation), BlockSpec(ids.tolist(), relation)
            lengths = [draw(st.lists(st.integers(0, 4), min_size=1, max_size=5)) for _ in range(rows)]
            n = max(map(len, lengths))
            lengths = [x + [0] * (n - len(x)) for x in lengths]
            lengths = [x[:-1] + [x[-1] + max(0, Lk - sum(x))] for x in lengths]  # cover every key
            ids = [[k for k, n_k in enumerate(x) for _ in range(n_k)][:Lk] for x in lengths]
            mask = BlockCausal(block_lengths=lengths if per_seq else lengths[0], relation=relation)
            return mask, BlockSpec(ids, relation)
        if kind == "tree":
            parents = [[int(torch.randint(-1, t, (1,), generator=g)) for t in range(Lq)] for _ in range(rows)]
            return Tree(parents if per_seq else parents[0]), TreeSpec(parents)
        dense = torch.rand(rows, Lq, Lk, generator=g) < 0.6
        return Dense(dense if per_seq else dense[0]), DenseSpec(dense)

    kinds = draw(st.lists(st.sampled_from(["causal", "window", "block", "tree", "dense"]), min_size=1, max_size=3))
    leaves = [leaf(k) for k in kinds]
    mask, spec = leaves[0]
    for m, s in leaves[1:]:
        mask, spec = mask & m, AndSpec(spec, s)
    return mask, spec, batch, Lq, Lk, kv_lens


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mask_cases())
def test_lowering_matches_materialize(case):
    mask, spec, batch, Lq, Lk, kv_lens = case
    check_all(mask, spec, batch, Lq, Lk, kv_lens)


# ---------------------------------------------------------------------------------------------------------
# Errors.


def test_errors():
    with pytest.raises(ValueError, match="Lq"):
        Tree([-1, 0, 1]).lower(1, 2, 5, "cpu")
    with pytest.raises(ValueError, match="keys"):
        Tree([-1, 0, 1]).lower(1, 3, 2, "cpu")
    with pytest.raises(ValueError, match="parent"):
        Tree([-1, 1, 0])
    with pytest.raises(ValueError, match="parent"):
        Tree([-1, -2])
    with pytest.raises(ValueError):
        Tree([])
    with pytest.raises(TypeError):
        Tree([-1.0, 0.0])
    with pytest.raises(ValueError, match="batch has"):
        Tree([[-1, 0], [-1, -1]]).lower(3, 2, 4, "cpu")
    with pytest.raises(ValueError, match="parent path"):
        Tree.from_choices([[0], [1, 0]])
    with pytest.raises(ValueError, match="twice"):
        Tree.from_choices([[0], [0]])
    with pytest.raises(ValueError):
        Tree.from_choices([[]])

    with pytest.raises(ValueError, match="Lk"):
        BlockCausal([0, 0, 1]).lower(1, 3, 4, "cpu")
    with pytest.raises(ValueError, match="exactly one"):
        BlockCausal()
    with pytest.raises(ValueError, match="exactly one"):
        BlockCausal([0, 1], block_size=2)
    with pytest.raises(ValueError, match="relation"):
        BlockCausal(block_size=2, relation="future")
    with pytest.raises(ValueError, match="positive"):
        BlockCausal(block_size=0)
    with pytest.raises(ValueError, match="cover"):
        BlockCausal(block_lengths=[2, 2]).lower(1, 2, 5, "cpu")
    with pytest.raises(ValueError, match="last Lq"):
        BlockCausal(block_size=2).materialize(3, 4, kv_lens=torch.tensor([4, 2]))
    with pytest.raises(ValueError, match="batch has"):
        BlockCausal(torch.zeros(2, 4, dtype=torch.int32)).materialize(4, 4, batch=3)

    with pytest.raises(ValueError, match="left"):
        Window(-1)
    with pytest.raises(ValueError, match="sinks"):
        Window(2, sinks=-1)
    with pytest.raises(TypeError):
        Window(2.5)

    with pytest.raises(TypeError, match="bool"):
        Dense(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="Dense mask"):
        Dense(torch.ones(2, 3, dtype=torch.bool)).lower(1, 2, 4, "cpu")
    with pytest.raises(ValueError, match="shape"):
        Dense.from_packed(torch.zeros(2, 2, dtype=torch.uint8), 2, 17)
    with pytest.raises(TypeError):
        Dense.from_packed(torch.zeros(2, 1, dtype=torch.int32), 2, 8)

    with pytest.raises(ValueError, match="kv_lens"):
        Causal().materialize(2, 4, kv_lens=torch.tensor([5]))
    with pytest.raises(ValueError, match="kv_lens"):
        Causal().materialize(2, 4, batch=2, kv_lens=torch.tensor([3]))


# ---------------------------------------------------------------------------------------------------------
# attention_reference.


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (6, 1)])
def test_attention_reference_matches_sdpa(Hq, Hkv):
    g = torch.Generator().manual_seed(Hq * 10 + Hkv)
    B, Lq, Lk, D = 2, 5, 11, 16
    q = torch.randn(B, Hq, Lq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, 1, Lq, Lk, generator=g) < 0.5) | Causal().materialize(Lq, Lk).unsqueeze(1)
    bias = torch.randn(1, Hq, Lq, Lk, generator=g, dtype=torch.float64)
    for scale in (None, 0.3):
        out, lse = attention_reference(q, k, v, mask=mask, scale=scale)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        assert out.dtype == torch.float64 and lse.dtype == torch.float32 and lse.shape == (B, Hq, Lq)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
        s = scale or 1 / math.sqrt(D)
        logits = q @ k.repeat_interleave(Hq // Hkv, 1).transpose(-1, -2) * s
        torch.testing.assert_close(lse, logits.masked_fill(~mask, -math.inf).logsumexp(-1).float())
    out, _ = attention_reference(q, k, v, bias=bias)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_tree_attention_equals_causal_attention_over_the_path():
    """The tree rule of docs/masks.md: each node's tree-attention output = causal attention over prefix + its path."""
    g = torch.Generator().manual_seed(1)
    tree = Tree.from_choices(MEDUSA_CHOICES)
    T, prefix, H, D = tree.num_nodes, 3, 2, 8
    q = torch.randn(1, H, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(1, H, prefix + T, D, generator=g, dtype=torch.float64)
    v = torch.randn(1, H, prefix + T, D, generator=g, dtype=torch.float64)
    out, lse = attention_reference(q, k, v, mask=tree.materialize(T, prefix + T).unsqueeze(1))
    for path in tree.retrieve_paths().tolist():
        nodes = [n for n in path if n >= 0]
        keys = list(range(prefix)) + [prefix + n for n in nodes]
        causal = Causal().materialize(len(nodes), len(keys)).unsqueeze(1)
        want, want_lse = attention_reference(q[:, :, nodes], k[:, :, keys], v[:, :, keys], mask=causal)
        torch.testing.assert_close(out[:, :, nodes], want)
        torch.testing.assert_close(lse[:, :, nodes], want_lse)


def test_attention_reference_fully_masked_rows():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 3, 8, generator=g, dtype=torch.float16)
    k = torch.randn(1, 1, 4, 8, generator=g, dtype=torch.float16)
    v = torch.randn(1, 1, 4, 8, generator=g, dtype=torch.float16)
    # kv_lens 1 with Lq 3: the first two queries see no key.
    mask = Causal().materialize(3, 4, kv_lens=torch.tensor([1])).unsqueeze(1)
    out, lse = attention_reference(q, k, v, mask=mask)
    assert out.dtype == torch.float16
    assert bool((out[:, :, :2] == 0).all()) and bool((lse[:, :, :2] == -math.inf).all())
    assert bool(torch.isfinite(lse[:, :, 2]).all())
    torch.testing.assert_close(out[:, :, 2], v[:, :, 0].expand(1, 2, 8))
    with pytest.raises(ValueError, match="heads"):
        attention_reference(q, k, v, enable_gqa=False)
