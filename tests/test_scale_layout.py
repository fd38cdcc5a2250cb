"""Tests of fastar.ScaleLayout (docs/scale_attention.md): token counts, token tables, the visibility rule against a
pair-by-pair loop, and the block maps of the kernels against the dense mask."""
from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
import torch

from fastar import ScaleLayout

VAR_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
VAR_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
FLOWAR = (1, 2, 4, 8, 16)
# Small, with non-square scales, odd ratios between neighbours and a scale smaller than its predecessor.
SMALL = (1, (2, 3), 3, (4, 2), (1, 5), 5)
RELATIONS = ("causal", "same", "prev")


def plain_tokens(scales):
    """(scale, y, x, h, w) of every token, in sequence order, with plain loops."""
    tokens = []
    for s, scale in enumerate(scales):
        h, w = (scale, scale) if isinstance(scale, int) else scale
        for y in range(h):
            for x in range(w):
                tokens.append((s, y, x, h, w))
    return tokens


def plain_visible(a, b, relation, window, full_scales) -> bool:
    """The docstring's rule for query token a and key token b, with exact fractions for the mapping."""
    sa, ya, xa, ha, wa = a
    sb, yb, xb, hb, wb = b
    if relation == "causal":
        ok = sb <= sa
    elif relation == "same":
        ok = sb == sa
    else:
        ok = sa - 1 <= sb <= sa
    if ok and window is not None and sb != sa and sb >= full_scales:
        # The key's cell centre (yb + 1/2) / hb of the image height, in cells of the query's grid.
        my = int(Fraction(2 * yb + 1, 2 * hb) * ha)
        mx = int(Fraction(2 * xb + 1, 2 * wb) * wa)
        ok = abs(my - ya) <= window and abs(mx - xa) <= window
    return ok


def plain_mask(scales, relation="causal", window=None, full_scales=0) -> torch.Tensor:
    tokens = plain_tokens(scales)
    return torch.tensor([[plain_visible(a, b, relation, window, full_scales) for b in tokens] for a in tokens])


def plain_tile_classes(dense: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """uint8 [nqb, nkb]: 0 if a block of dense has no True, 2 if all True, else 1 (loops over blocks)."""
    nq, nk = dense.shape
    out = torch.zeros(-(-nq // block_q), -(-nk // block_k), dtype=torch.uint8)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            block = dense[i * block_q : (i + 1) * block_q, j * block_k : (j + 1) * block_k]
            out[i, j] = 2 if bool(block.all()) else 1 if bool(block.any()) else 0
    return out


# ---------------------------------------------------------------------------------------------------------
# Sizes and tables


@pytest.mark.parametrize(
    "scales,tokens,ends",
    [
        (VAR_256, 680, [1, 5, 14, 30, 55, 91, 155, 255, 424, 680]),
        (VAR_512, 2240, [1, 5, 14, 30, 66, 147, 316, 640, 1216, 2240]),
        (FLOWAR, 341, [1, 5, 21, 85, 341]),
    ],
)
def test_token_counts(scales, tokens, ends):
    layout = ScaleLayout(scales)
    assert layout.num_tokens == tokens and layout.num_scales == len(scales)
    assert layout.ends == ends and layout.starts == [0] + ends[:-1]
    assert layout.hw == [(s, s) for s in scales]
    assert layout.relation == "causal" and layout.local_window is None and layout.full_scales == 0
    ids = layout.scale_ids()
    assert ids.dtype == torch.int32 and ids.shape == (tokens,)
    assert torch.equal(ids, torch.repeat_interleave(torch.arange(len(scales)), torch.tensor(scales) ** 2).int())


def test_semantics_vector():
    """docs/scale_attention.md: scales (1, 2, 3) -> ids [0, 1, 1, 1, 1, 2 x 9]; rows 1-4 see columns 0-4, rows 5-13
    all 14."""
    layout = ScaleLayout((1, 2, 3))
    assert layout.scale_ids().tolist() == [0, 1, 1, 1, 1] + [2] * 9
    mask = layout.materialize()
    assert mask.dtype == torch.bool and mask.shape == (14, 14)
    assert mask[0].tolist() == [True] + [False] * 13
    for row in range(1, 5):
        assert mask[row].tolist() == [True] * 5 + [False] * 9
    assert bool(mask[5:].all())


def test_hw_pairs_token_info():
    layout = ScaleLayout([(1, 1), (2, 3), [3, 1]])
    assert layout.hw == [(1, 1), (2, 3), (3, 1)] and layout.num_tokens == 10
    info = layout.token_info()
    assert info.dtype == torch.int32 and info.is_contiguous() and info.shape == (3, 10)
    assert info.tolist() == [
        [0, 1, 1, 1, 1, 1, 1, 2, 2, 2],  # scale
        [0, 0, 0, 0, 1, 1, 1, 0, 1, 2],  # row y
        [0, 0, 1, 2, 0, 1, 2, 0, 0, 0],  # column x
    ]
    hw = layout.scale_hw()
    assert hw.dtype == torch.int32 and hw.is_contiguous() and hw.tolist() == [[1, 1], [2, 3], [3, 1]]
    assert torch.equal(layout.scale_ids(), info[0])
    assert torch.equal(info, torch.tensor([t[:3] for t in plain_tokens([(1, 1), (2, 3), (3, 1)])]).T.int())


def test_flowar_doubling_token_info():
    layout = ScaleLayout(FLOWAR)
    want = torch.tensor([t[:3] for t in plain_tokens(FLOWAR)], dtype=torch.int32).T
    assert torch.equal(layout.token_info(), want)


# ---------------------------------------------------------------------------------------------------------
# The visibility rule


@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("window", [None, 0, 1, 2])
def test_rule_matches_pair_loop(relation, window):
    for full_scales in [0] if window is None else [0, 1, 3]:
        layout = ScaleLayout(SMALL, relation=relation, local_window=window, full_scales=full_scales)
        want = plain_mask(SMALL, relation, window, full_scales)
        got = layout.materialize()
        assert got.dtype == torch.bool and got.shape == want.shape
        assert torch.equal(got, want), f"{layout}: first difference at {torch.nonzero(got != want)[0].tolist()}"
        assert bool(got.diagonal().all()), "every token sees itself"


@pytest.mark.parametrize("relation", RELATIONS)
def test_relations_on_var(relation):
    """Without a window, the mask is the relation between the scale ids (fastar.masks.BlockCausal's)."""
    layout = ScaleLayout(VAR_256, relation=relation)
    ids = layout.scale_ids().long()
    qs, ks = ids.view(-1, 1), ids.view(1, -1)
    want = {"causal": ks <= qs, "same": ks == qs, "prev": (ks <= qs) & (ks >= qs - 1)}[relation]
    assert torch.equal(layout.materialize(), want)


def test_window_on_var_shrinks_the_mask():
    """VAR 256px under a window: the window hides most of the earlier fine scales, keeps every same-scale key
    and the first full_scales scales, and a wider window shows a superset."""
    base = ScaleLayout(VAR_256).materialize()
    masks = {r: ScaleLayout(VAR_256, local_window=r).materialize() for r in (0, 1, 2)}
    assert not bool((masks[0] & ~masks[1]).any()) and not bool((masks[1] & ~masks[2]).any())
    assert not bool((masks[2] & ~base).any())
    ids = ScaleLayout(VAR_256).scale_ids().long()
    same = ids.view(-1, 1) == ids.view(1, -1)
    assert bool(masks[0][same].all())
    assert int((masks[1] & ~same).sum()) < int((base & ~same).sum()) // 10
    full = ScaleLayout(VAR_256, local_window=1, full_scales=4).materialize()
    assert torch.equal(full[:, :30], base[:, :30]) and torch.equal(full[:, 30:], masks[1][:, 30:])
    # Query (8, 8) of the 16x16 scale under r=1 sees the 13x13 cells whose centres map to rows and columns 7..9
    # of its grid: y, x in {6, 7} ((2*6 + 1) * 16 // 26 = 8, (2*7 + 1) * 16 // 26 = 9; 5 -> 6 and 8 -> 10 are out).
    q = 424 + 8 * 16 + 8
    seen = torch.nonzero(masks[1][q, 255:424]).flatten()
    assert seen.tolist() == [6 * 13 + 6, 6 * 13 + 7, 7 * 13 + 6, 7 * 13 + 7]


def test_sees_every_key_is_sound():
    """The op drops the mask when every query sees every key; that must hold exactly then, and (without a
    window) be recognised whenever it holds."""
    for relation, window, full in itertools.product(RELATIONS, (None, 1), (0, 2, 5)):
        if window is None and full:
            continue
        for scales in (SMALL, SMALL[:1], SMALL[:2], FLOWAR):
            full_scales = min(full, len(scales))
            layout = ScaleLayout(scales, relation=relation, local_window=window, full_scales=full_scales)
            mask = layout.materialize()
            for q_offset in sorted({0, 1, *layout.starts, layout.starts[-1] + 1, layout.num_tokens - 1}):
                everything = bool(mask[q_offset:].all())
                claimed = layout._sees_every_key(q_offset)
                assert not claimed or everything, (layout, q_offset)
                if window is None:
                    assert claimed == everything, (layout, q_offset)


# ---------------------------------------------------------------------------------------------------------
# Block maps


BLOCK_CASES = [
    (VAR_256, dict(relation="causal"), 64, 64, 0, None),
    (VAR_256, dict(relation="causal", local_window=1), 64, 64, 0, None),
    (VAR_256, dict(relation="prev", local_window=2, full_scales=3), 64, 64, 424, None),
    (VAR_256, dict(relation="same"), 32, 48, 100, 77),
    (VAR_512, dict(relation="causal", local_window=1, full_scales=2), 64, 64, 1216, None),
    (FLOWAR, dict(relation="prev"), 16, 64, 0, None),
    (SMALL, dict(relation="causal", local_window=0), 7, 5, 3, 40),
    (SMALL, dict(relation="same", local_window=1, full_scales=1), 1, 1, 0, None),
    (SMALL, dict(relation="causal"), 64, 64, 49, 0),
]


@pytest.mark.parametrize("scales,kwargs,block_q,block_k,q_offset,num_queries", BLOCK_CASES)
def test_tile_map_and_bsr_match_the_mask(scales, kwargs, block_q, block_k, q_offset, num_queries):
    layout = ScaleLayout(scales, **kwargs)
    L = layout.num_tokens
    stop = L if num_queries is None else q_offset + num_queries
    want = plain_tile_classes(layout.materialize()[q_offset:stop], block_q, block_k)
    tiles = layout.tile_map(block_q, block_k, q_offset, num_queries)
    assert tiles.dtype == torch.uint8 and tiles.is_contiguous()
    assert tiles.shape == (-(-(stop - q_offset) // block_q), -(-L // block_k))
    assert torch.equal(tiles, want)

    crow, cols, full = layout.bsr(block_q, block_k, q_offset, num_queries)
    assert crow.dtype == torch.int32 and cols.dtype == torch.int32 and full.dtype == torch.bool
    assert crow.shape == (tiles.shape[0] + 1,) and crow[0] == 0 and int(crow[-1]) == cols.numel() == full.numel()
    rebuilt = torch.zeros_like(tiles)
    for i in range(tiles.shape[0]):
        row_cols = cols[crow[i] : crow[i + 1]].long()
        assert bool((row_cols[1:] > row_cols[:-1]).all()), "key blocks ascending"
        rebuilt[i, row_cols] = torch.where(full[crow[i] : crow[i + 1]], 2, 1).to(torch.uint8)
    assert torch.equal(rebuilt, tiles)


def test_block_maps_hold_every_class():
    """The VAR cases of the block map test are not trivial: each has hidden, partial and full blocks."""
    for kwargs in (dict(), dict(local_window=1)):
        tiles = ScaleLayout(VAR_256, **kwargs).tile_map()
        assert set(tiles.unique().tolist()) == {0, 1, 2}, kwargs


def test_tables_are_cached():
    layout = ScaleLayout(VAR_256, local_window=1)
    assert layout.tile_map() is layout.tile_map(64, 64, 0, 680)
    assert layout.tile_map(q_offset=424) is not layout.tile_map()
    assert layout.bsr(q_offset=424) is layout.bsr(64, 64, 424, 256)
    assert layout.token_info() is layout.token_info("cpu") and layout.scale_hw() is layout.scale_hw()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_tables_on_cuda():
    layout = ScaleLayout(VAR_256, local_window=1)
    for got, want in ((layout.token_info("cuda"), layout.token_info()), (layout.scale_hw("cuda"), layout.scale_hw()),
                      (layout.tile_map(q_offset=424, device="cuda"), layout.tile_map(q_offset=424)),
                      (layout.materialize("cuda"), layout.materialize())):
        assert got.device.type == "cuda" and torch.equal(got.cpu(), want)


# ---------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        (([],), {}, ValueError, "empty"),
        (("123",), {}, TypeError, "list"),
        ((5,), {}, TypeError, "list"),
        (([1, 0],), {}, ValueError, "scale 1"),
        (([1, -2],), {}, ValueError, "scale 1"),
        (([1, 2.0],), {}, TypeError, "scale 1"),
        (([1, True],), {}, TypeError, "bool"),
        (([(1, 2, 3)],), {}, ValueError, r"\(h, w\)"),
        (([(2, 0)],), {}, ValueError, "width"),
        (([1, 2],), dict(relation="full"), ValueError, "relation"),
        (([1, 2],), dict(local_window=-1), ValueError, "local_window"),
        (([1, 2],), dict(local_window=1.5), TypeError, "local_window"),
        (([1, 2],), dict(local_window=1, full_scales=3), ValueError, "full_scales"),
        (([1, 2],), dict(local_window=1, full_scales=-1), ValueError, "full_scales"),
        (([1, 2],), dict(full_scales=1), ValueError, "local_window"),
    ],
)
def test_bad_layouts(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        ScaleLayout(*args, **kwargs)


def test_bad_block_arguments():
    layout = ScaleLayout((1, 2, 3))
    with pytest.raises(ValueError, match="block_q"):
        layout.tile_map(0, 64)
    with pytest.raises(TypeError, match="block_k"):
        layout.bsr(64, 6.4)
    with pytest.raises(ValueError, match="q_offset"):
        layout.tile_map(q_offset=15)
    with pytest.raises(ValueError, match="num_queries"):
        layout.bsr(q_offset=5, num_queries=10)
    with pytest.raises(ValueError, match="num_queries"):
        layout.tile_map(num_queries=-1)
