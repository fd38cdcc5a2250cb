"""The CPU attention kernel's plan on its own (torch.ops.fastar._attention_plan, csrc/cpu/attention_plan.h),
checked against the dense masks (``mask.materialize``, ``layout.materialize``): the query tiles partition the
queries, every visible (query, key) pair is computed by exactly one step of its query's tile and marked
visible there, no hidden pair is marked visible, and no key of a key tile the whole query tile cannot see is
computed. The plan is index logic of the CPU kernel alone, so these tests have no other backend."""
from __future__ import annotations

import pytest
import torch

import fastar
from fastar import masks
from fastar.masks import BLOCK_NAMES

KEY_TILE = 64  # the kernel's key tile (kKeyTile)
MAX_ROWS = 256  # query rows (heads x positions) of a work item (kMaxRows)
VAR = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def _shapes(B, Hq, Hkv, Lq, Lk):
    """q and k of the given shapes (only their shapes are read; head dim 1)."""
    return torch.empty(B, Hq, Lq, 1), torch.empty(B, Hkv, Lk, 1)


def plan_of_mask(mask, B, Hq, Hkv, Lq, Lk, kv_lens=None):
    """The plan of fastar.attention's kernel for ``mask``, with the mask arguments the op passes it."""
    a = mask.lower(B, Lq, Lk, "cpu", kv_lens)
    return torch.ops.fastar._attention_plan(
        *_shapes(B, Hq, Hkv, Lq, Lk), kv_lens=kv_lens, causal=a.causal, bottom_right=a.bottom_right,
        window_left=a.window_left if a.window else -1, window_sinks=a.window_sinks,
        block_relation=BLOCK_NAMES[a.block_relation], q_block_ids=a.q_block_ids, k_block_ids=a.k_block_ids,
        mask_bits=a.bits, mask_bits_cols=a.bits_cols,
    )


def plan_of_layout(layout, B, Hq, Hkv, Lq, tile_map=True):
    """The plan of fastar.scale_attention's kernel for the last ``Lq`` tokens of ``layout``, with the arguments
    scale_attention passes (tile_map=False: as under torch.compile for other query counts)."""
    L = layout.num_tokens
    tiles = layout.tile_map(64, 64, L - Lq, Lq) if tile_map else None
    return torch.ops.fastar._attention_plan(
        *_shapes(B, Hq, Hkv, Lq, L), token_info=layout.token_info(), scale_hw=layout.scale_hw(), tile_map=tiles,
        relation=layout.relation, local_window=-1 if layout.local_window is None else layout.local_window,
        full_scales=layout.full_scales, tile_q=64, tile_k=64,
    )


def check_plan(plan, visible, B, Hq, Hkv, kv_lens=None):
    """Checks the plan against ``visible`` (bool [B or 1, Lq, Lk]); returns the steps as a tensor."""
    positions, starts, steps, keys, marks = plan
    Lq, Lk = visible.shape[-2:]
    G = Hq // Hkv
    lens = [Lk] * B if kv_lens is None else kv_lens.tolist()
    # The tiles partition the queries: every position once, tiles in order, none empty, none over the rows.
    assert sorted(positions.tolist()) == list(range(Lq))
    starts = starts.tolist()
    assert starts[0] == 0 and starts[-1] == Lq
    sizes = [b - a for a, b in zip(starts, starts[1:])]
    assert all(0 < n <= max(1, MAX_ROWS // G) for n in sizes), sizes
    n_tiles = len(sizes)

    computed = torch.zeros(B, Hkv, Lq, Lk, dtype=torch.int64)
    marked = torch.zeros(B, Hkv, Lq, Lk, dtype=torch.int64)
    seen = torch.zeros(B, Hkv, n_tiles, Lk, dtype=torch.bool)  # keys computed by each tile
    counts = steps[:, 6]
    key_at = torch.cumsum(counts, 0) - counts
    vis_at = torch.cumsum(counts * steps[:, 5], 0) - counts * steps[:, 5]
    assert keys.numel() == int(counts.sum()) and marks.numel() == int((counts * steps[:, 5]).sum())
    for (b, h, t, _split, p0, np_, n), ka, va in zip(steps.tolist(), key_at.tolist(), vis_at.tolist()):
        assert 0 <= b < B and 0 <= h < Hkv and 0 <= t < n_tiles and n > 0
        assert 0 <= p0 and p0 + np_ <= sizes[t] and np_ > 0
        if G > 1:  # the GEMM rows of a step are every head times every position of the item
            assert (p0, np_) == (0, sizes[t])
        ks = keys[ka : ka + n]
        assert bool(((ks >= 0) & (ks < lens[b])).all()), f"keys outside the sequence's {lens[b]}: {ks.tolist()}"
        qs = positions[starts[t] + p0 : starts[t] + p0 + np_]
        qi, ki = qs.view(-1, 1).expand(np_, n), ks.view(1, -1).expand(np_, n)
        where = (torch.full_like(qi, b), torch.full_like(qi, h), qi, ki)
        computed.index_put_(where, torch.ones_like(qi), accumulate=True)
        marked.index_put_(where, marks[va : va + n * np_].view(n, np_).t().to(torch.int64), accumulate=True)
        seen[b, h, t, ks] = True

    vis = visible.expand(B, Lq, Lk).unsqueeze(1).expand(B, Hkv, Lq, Lk)
    assert int(computed.max()) <= 1, "a (query, key) pair is computed twice"
    missed = vis & ((computed != 1) | (marked != 1))
    assert not bool(missed.any()), f"visible pairs not computed once and marked: {missed.nonzero()[:5].tolist()}"
    leaked = ~vis & (marked != 0)
    assert not bool(leaked.any()), f"hidden pairs marked visible: {leaked.nonzero()[:5].tolist()}"
    # No key of a key tile that no query of the query tile sees.
    for t in range(n_tiles):
        rows = visible.expand(B, Lq, Lk)[:, positions[starts[t] : starts[t + 1]]]  # [B, nq, Lk]
        for j0 in range(0, Lk, KEY_TILE):
            hidden = ~rows[:, :, j0 : j0 + KEY_TILE].any(dim=(1, 2))  # [B]
            wasted = seen[:, :, t, j0 : j0 + KEY_TILE].any(dim=2) & hidden.view(B, 1)
            assert not bool(wasted.any()), f"query tile {t} computes keys of the hidden key tile at {j0}"
    return steps


def _gen(seed):
    return torch.Generator().manual_seed(seed)


MASK_CASES = {
    "causal": (masks.Causal(), 100, 300),
    "causal_square": (masks.Causal(), 200, 200),
    "window_sinks": (masks.Window(70, sinks=5), 150, 400),
    "window_no_sinks": (masks.Window(3), 40, 260),
    "block_causal": (masks.BlockCausal(block_size=16), 96, 300),
    "block_causal_lengths": (masks.BlockCausal(block_lengths=[100, 7, 1, 60, 20, 40, 80]), 180, 300),
    "block_same": (masks.BlockCausal(block_size=40, relation="same"), 150, 300),
    "block_prev": (masks.BlockCausal(block_size=40, relation="prev"), 150, 300),
    "block_unsorted_ids": (masks.BlockCausal(torch.randint(0, 5, (260,), generator=_gen(1))), 130, 260),
    "tree": (masks.Tree([-1, 0, 0, 1, 1, 2, -1, 6, 7, 3, 9, 4, 11, 5, 13, 8, 15, 0, 17, 18]), 20, 150),
    "dense": (masks.Dense(torch.rand(70, 200, generator=_gen(2)) < 0.3), 70, 200),
    "window_and_blocks": (masks.Window(50) & masks.BlockCausal(block_size=32), 120, 250),
}


@pytest.mark.parametrize("name", sorted(MASK_CASES))
@pytest.mark.parametrize("B,Hkv", [(2, 2), (1, 1)])  # plans shared by the batch, and per item
def test_plan_covers_the_mask(name, B, Hkv):
    mask, Lq, Lk = MASK_CASES[name]
    check_plan(plan_of_mask(mask, B, Hkv, Hkv, Lq, Lk), mask.materialize(Lq, Lk, batch=B), B, Hkv, Hkv)


def test_plan_of_a_dense_mask_with_hidden_key_tiles_per_sequence():
    dense = torch.rand(3, 90, 330, generator=_gen(3)) < 0.2
    dense[0, :, 64:200] = False  # whole key tiles hidden from sequence 0
    dense[1, 40:, :] = False  # rows that see nothing
    dense[2] = True
    mask = masks.Dense(dense)
    check_plan(plan_of_mask(mask, 3, 2, 2, 90, 330), mask.materialize(90, 330), 3, 2, 2)


@pytest.mark.parametrize(
    "mask",
    [masks.Causal(), masks.Window(20, sinks=3), masks.BlockCausal(block_size=8)],
    ids=["causal", "window", "block_causal"],
)
def test_plan_with_ragged_kv_lens(mask):
    B, Lq, Lk = 4, 30, 300
    kv_lens = torch.tensor([300, 130, 65, 30], dtype=torch.int32)
    plan = plan_of_mask(mask, B, 2, 2, Lq, Lk, kv_lens=kv_lens)
    check_plan(plan, mask.materialize(Lq, Lk, batch=B, kv_lens=kv_lens), B, 2, 2, kv_lens=kv_lens)


@pytest.mark.parametrize("Hq,Hkv,Lq", [(8, 2, 100), (32, 1, 40), (4, 2, 1)])
@pytest.mark.parametrize("mask", [masks.Causal(), masks.Window(30, sinks=2)], ids=["causal", "window"])
def test_plan_with_gqa(mask, Hq, Hkv, Lq):
    B, Lk = 2, 280
    check_plan(plan_of_mask(mask, B, Hq, Hkv, Lq, Lk), mask.materialize(Lq, Lk, batch=B), B, Hq, Hkv)


def test_decode_plan_splits_the_keys():
    """One sequence, one head, one query: the keys are split over the threads, each pair still once."""
    mask, Lk = masks.Causal(), 700
    steps = check_plan(plan_of_mask(mask, 1, 1, 1, 1, Lk), mask.materialize(1, Lk, batch=1), 1, 1, 1)
    assert int(steps[:, 3].max()) > 0, "the decode plan has a single kv split"


LAYOUTS = {
    "var": fastar.ScaleLayout(VAR),
    "var_same": fastar.ScaleLayout(VAR, relation="same"),
    "var_prev": fastar.ScaleLayout(VAR, relation="prev"),
    "var_window": fastar.ScaleLayout(VAR, local_window=2),
    "var_window0_full": fastar.ScaleLayout(VAR, local_window=0, full_scales=3),
    "var_window_prev": fastar.ScaleLayout(VAR, relation="prev", local_window=1),
    "rect_window": fastar.ScaleLayout([(1, 2), (2, 3), (3, 5), (5, 7), (9, 6)], local_window=1),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("last", [0, 2])  # every query, or those of the last two scales
@pytest.mark.parametrize("B,Hq,Hkv", [(2, 4, 2), (1, 1, 1)])
def test_plan_covers_the_scale_layout(name, last, B, Hq, Hkv):
    layout = LAYOUTS[name]
    L = layout.num_tokens
    Lq = L if last == 0 else L - layout.starts[-last]
    visible = layout.materialize()[L - Lq :].unsqueeze(0)
    check_plan(plan_of_layout(layout, B, Hq, Hkv, Lq), visible, B, Hq, Hkv)


@pytest.mark.parametrize("name", ["var", "var_window", "rect_window"])
def test_plan_of_a_scale_layout_without_tile_map(name):
    layout = LAYOUTS[name]
    L = layout.num_tokens
    check_plan(plan_of_layout(layout, 2, 2, 2, L, tile_map=False), layout.materialize().unsqueeze(0), 2, 2, 2)


@pytest.mark.parametrize("name", ["var", "var_window", "rect_window"])
@pytest.mark.parametrize("last", [0, 2])
def test_query_order(name, last):
    """In order without a window; under a window, each scale's queries in row-major 4x4 patches of its grid
    (row-major inside a patch)."""
    layout = LAYOUTS[name]
    L = layout.num_tokens
    Lq = L if last == 0 else L - layout.starts[-last]
    positions = plan_of_layout(layout, 1, 1, 1, Lq)[0].tolist()
    if layout.local_window is None:
        assert positions == list(range(Lq))
        return
    want = []
    for s, (h, w) in enumerate(layout.hw):
        if layout.starts[s] < L - Lq:
            continue
        cells = sorted(((y // 4, x // 4, y % 4, x % 4), y * w + x) for y in range(h) for x in range(w))
        want += [layout.starts[s] - (L - Lq) + t for _, t in cells]
    assert positions == want


def test_mixed_mask_arguments_are_rejected():
    layout = LAYOUTS["var"]
    q, k = _shapes(1, 1, 1, layout.num_tokens, layout.num_tokens)
    with pytest.raises(ValueError, match="not both"):
        torch.ops.fastar._attention_plan(q, k, causal=True, token_info=layout.token_info(), relation="causal")
