"""NaN and Inf through the attention ops, on every backend: NaN in, NaN out for exactly the rows that see it.

The rule (docs/attention.md, conventions): a NaN logit of a visible key (a NaN in the q row, in key
``j``'s k row, in ``scale`` or in a float mask element, or a +-inf that makes the logit NaN or +inf) makes the
row's output and LSE NaN; a NaN in v row ``j`` makes NaN the outputs of the rows that see key ``j`` and of no
row whose mask hides it, even when both share a key tile; a row that sees no key gives output 0 and LSE
``-inf`` whatever its inputs hold. The oracle is ``attention_reference`` (float64), itself checked here
against the rule's rows where the rule names them without arithmetic.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastar import ScaleLayout
from fastar.masks import BlockCausal, Causal, Dense, Tree, Window
from fastar.reference import attention_reference, scale_attention_reference
from test_attention import dense4, make, random_parents

NAN, INF = math.nan, math.inf
KEY_TILE = 32  # the CUDA kernels' key tile (and a divisor of the CPU kernel's 64): a hidden key shares it
MASKS = ("none", "causal", "tree", "block", "window", "dense")
POISONS = ("q", "k", "k_hidden", "v", "v_hidden", "k_inf", "k_inf_sign", "scale")
# (B, Hq, Hkv, Lq, Lk): decode with kv splits on the SIMT build (Lk >= 256), multi-row tiles of a GQA group
# (two query tiles), and one item split over the keys (multi-row, B * Hkv = 1).
SHAPES = {"decode": (2, 4, 2, 1, 300), "rows": (2, 4, 2, 17, 70), "rows_split": (1, 2, 1, 9, 300)}


def build_mask(kind, B, Lq, Lk, gen):
    if kind == "none":
        return None
    if kind == "causal":
        return Causal()
    if kind == "tree":
        return Tree([random_parents(Lq, gen) for _ in range(B)])
    if kind == "block":
        return BlockCausal(block_size=5)
    if kind == "window":
        return Window(left=10, sinks=2)
    dense = torch.rand(B, Lq, Lk, generator=gen) < 0.5
    dense[0, min(3, Lq - 1)] = False  # a row that sees nothing, whatever its inputs
    return Dense(dense)


def visibility(mask, B, Hq, Lq, Lk):
    """bool [B, Hq, Lq, Lk]: whether each query row sees each key."""
    if mask is None:
        return torch.ones(B, Hq, Lq, Lk, dtype=torch.bool)
    return dense4(mask, Lq, Lk, B).expand(B, Hq, Lq, Lk)


def pick_key(vis, b, heads, hidden):
    """A key of sequence b for the rows of `heads`: hidden=False, one some row sees; hidden=True, one hidden
    from some row that sees another key of its tile. Keys both seen and hidden are preferred; None if none."""
    rows = vis[b, heads].reshape(-1, vis.shape[-1])  # [rows, Lk]
    tiles = torch.zeros_like(rows)
    for t0 in range(0, rows.shape[1], KEY_TILE):
        tiles[:, t0 : t0 + KEY_TILE] = rows[:, t0 : t0 + KEY_TILE].any(1, keepdim=True)
    seen, hidden_in_tile = rows.any(0), (tiles & ~rows).any(0)
    for candidates in (seen & hidden_in_tile, hidden_in_tile if hidden else seen):
        keys = torch.nonzero(candidates).flatten()
        if len(keys):
            return int(keys[len(keys) // 2])
    return None


def poison(kind, q, k, v, vis, G):
    """Plants the case's NaN or Inf in q, k or v (in place). Returns (scale, nan) with nan the bool
    [B, Hq, Lq, D] the rule makes NaN, or None to skip the case (no key fits)."""
    B, Hq, Lq, Lk = vis.shape
    live = vis.any(-1)
    nan = torch.zeros(B, Hq, Lq, q.shape[-1], dtype=torch.bool)
    if kind == "scale":
        nan[live] = True
        return NAN, nan
    if kind == "q":
        for b, h, i in ((0, 1, min(3, Lq - 1)), (B - 1, Hq - 1, Lq - 1)):
            q[b, h, i, 5] = NAN
            nan[b, h, i] = live[b, h, i]
        return None, nan
    for b in range(B):
        hkv = b % k.shape[1]
        heads = slice(hkv * G, (hkv + 1) * G)
        j = pick_key(vis, b, heads, hidden=kind.endswith("hidden"))
        if j is None:
            return None
        if kind == "k_inf":  # a row of +inf: q . k is inf - inf, a NaN logit
            k[b, hkv, j] = INF
            nan[b, heads] = vis[b, heads, :, j].unsqueeze(-1)
        elif kind == "k_inf_sign":  # one +inf: logit +inf (NaN row) where q[7] > 0, -inf (weight 0) where < 0
            k[b, hkv, j, 7] = INF
            sign = 1 - 2 * (torch.arange(Lq) % 2)
            q[b, heads, :, 7] = q[b, heads, :, 7].abs().clamp_min(0.1) * sign
            nan[b, heads] = (vis[b, heads, :, j] & (sign > 0)).unsqueeze(-1)
        elif kind.startswith("k"):
            k[b, hkv, j, 7] = NAN
            nan[b, heads] = vis[b, heads, :, j].unsqueeze(-1)
        else:
            v[b, hkv, j, 7] = NAN
            nan[b, heads, :, 7] = vis[b, heads, :, j]  # only column 7 of the rows that see key j
    return None, nan


def assert_nan_rule(out, lse, ref, ref_lse, nan=None, what=""):
    """out / lse against the float64 reference: NaN exactly where it has NaN, equal -inf, close elsewhere.
    nan (bool like out, optional): where the rule puts NaN, checked on the reference first; a row's LSE is
    NaN iff its whole output is."""
    if nan is not None:
        assert torch.equal(ref.isnan(), nan), f"{what}: the reference breaks the rule"
        assert torch.equal(ref_lse.isnan(), nan.all(-1)), f"{what}: the reference's LSE breaks the rule"
    nan_out, nan_ref = out.isnan(), ref.isnan()
    assert torch.equal(nan_out, nan_ref), (
        f"{what}: output NaN at {torch.nonzero(nan_out & ~nan_ref)[:4].tolist()} (not the reference's) or finite at "
        f"{torch.nonzero(nan_ref & ~nan_out)[:4].tolist()} (NaN in the reference)"
    )
    assert torch.equal(lse.isnan(), ref_lse.isnan()), (
        f"{what}: LSE NaN at {torch.nonzero(lse.isnan()).tolist()[:6]}, "
        f"the reference's at {torch.nonzero(ref_lse.isnan()).tolist()[:6]}"
    )
    dead = ref_lse == -INF
    assert torch.all(lse[dead] == -INF) and torch.all(out[dead] == 0), f"{what}: rows that see no key: 0, -inf"
    ok = ~nan_ref
    if ok.any():
        tol = 1e-5 * max(1.0, ref[ok].abs().max().item())
        err = (out[ok].double() - ref[ok]).abs().max().item()
        assert err <= tol, f"{what}: finite values off by {err:.3g} > {tol:.3g}"
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("poison_kind", POISONS)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_nan_rule(backend, mask_kind, poison_kind, shape):
    B, Hq, Hkv, Lq, Lk = SHAPES[shape]
    if mask_kind == "tree":
        Lk = Lq + (40 if shape == "rows" else Lk)  # the prefix, then the Lq nodes
    gen = torch.Generator().manual_seed(MASKS.index(mask_kind) * 100 + POISONS.index(poison_kind))
    mask = build_mask(mask_kind, B, Lq, Lk, gen)
    q, k, v = make((B, Hq, Lq, 64), torch.float32, gen), make((B, Hkv, Lk, 64), torch.float32, gen), \
        make((B, Hkv, Lk, 64), torch.float32, gen)
    vis = visibility(mask, B, Hq, Lq, Lk)
    planted = poison(poison_kind, q, k, v, vis, Hq // Hkv)
    if planted is None:
        pytest.skip(f"{mask_kind} hides no key next to a visible one")
    scale, nan = planted
    out, lse = backend.attention(q, k, v, mask=mask, scale=scale, return_lse=True)
    ref, ref_lse = attention_reference(q.double(), k.double(), v.double(), mask=vis, scale=scale)
    assert_nan_rule(out, lse, ref, ref_lse, nan, f"{mask_kind}, {poison_kind}, {shape}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", ["decode", "rows"])
def test_nan_rule_half(backend, dtype, shape):
    """16-bit inputs (Causal): a NaN in a q row makes that row NaN, one in the last V row only the last rows'
    column."""
    B, Hq, Hkv, Lq, Lk = SHAPES[shape]
    gen = torch.Generator().manual_seed(5)
    q, k, v = make((B, Hq, Lq, 64), dtype, gen), make((B, Hkv, Lk, 64), dtype, gen), make((B, Hkv, Lk, 64), dtype, gen)
    vis = visibility(Causal(), B, Hq, Lq, Lk)
    q[0, 1, 0, 3] = NAN
    v[1, 1, Lk - 1, 9] = NAN  # the last key: seen by the last row only
    out, lse = backend.attention(q, k, v, mask=Causal(), return_lse=True)
    assert out.isnan().all(-1).sum() == 1 and out[0, 1, 0].isnan().all()
    assert torch.equal(out[..., 9].isnan()[1, 2:], vis[1, 2:, :, Lk - 1])
    assert lse.isnan().sum() == 1 and lse[0, 1, 0].isnan()
    assert not out[1, :2].isnan().any() and not out[1, 2:, :-1].isnan().any()


@pytest.mark.parametrize("Lq", [1, 5])
@pytest.mark.parametrize("causal", [False, True])
def test_nan_query_any_key_count(backend, Lq, causal):
    """A NaN in q makes its row NaN for every key count (no dependence on Lk % 8, or on the tiles)."""
    gen = torch.Generator().manual_seed(Lq)
    for Lk in [*range(max(1, Lq), 18), 31, 33, 63, 64, 65, 129]:
        q, k, v = make((1, 2, Lq, 32), torch.float32, gen), make((1, 2, Lk, 32), torch.float32, gen), \
            make((1, 2, Lk, 32), torch.float32, gen)
        q[0, 1, Lq - 1, 5] = NAN
        out, lse = backend.attention(q, k, v, mask=Causal() if causal else None, return_lse=True)
        assert out[0, 1, Lq - 1].isnan().all() and lse[0, 1, Lq - 1].isnan(), f"Lk={Lk}: the NaN row is not NaN"
        assert not out[0, 0].isnan().any() and not out[0, 1, : Lq - 1].isnan().any(), f"Lk={Lk}: NaN leaked"


SCALE_POISONS = ("q", "k", "v", "scale")


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("poison_kind", SCALE_POISONS)
def test_scale_attention_nan_rule(backend, poison_kind, qk_norm):
    """fastar.scale_attention (block-causal over the scales: a key of a later scale is hidden from the rows
    of the earlier scales, which share its key tile)."""
    layout = ScaleLayout((1, 2, 3, 4))
    L = layout.num_tokens
    B, Hq, Hkv, D = 1, 2, 1, 64
    gen = torch.Generator().manual_seed(SCALE_POISONS.index(poison_kind) + 10 * qk_norm)
    q, k, v = make((B, Hq, L, D), torch.float32, gen), make((B, Hkv, L, D), torch.float32, gen), \
        make((B, Hkv, L, D), torch.float32, gen)
    vis = layout.materialize().view(1, 1, L, L).expand(B, Hq, L, L)
    j = 10  # a token of the 3x3 scale: seen by the rows of the 3x3 and 4x4 scales only
    nan = torch.zeros(B, Hq, L, D, dtype=torch.bool)
    scale = None
    if poison_kind == "q":
        q[0, 1, 7, 0] = NAN
        nan[0, 1, 7] = True
    elif poison_kind == "k":
        k[0, 0, j, 3] = NAN
        nan[0] = vis[0, :, :, j].unsqueeze(-1)
    elif poison_kind == "v":
        v[0, 0, j, 3] = NAN
        nan[0, :, :, 3] = vis[0, :, :, j]
    else:
        scale = NAN
        nan[:] = True
    out, lse = backend.scale_attention(q, k, v, layout, scale=scale, qk_norm=qk_norm, return_lse=True)
    ref, ref_lse = scale_attention_reference(q.double(), k.double(), v.double(), layout, scale=scale, qk_norm=qk_norm)
    assert_nan_rule(out, lse, ref, ref_lse, nan, f"scale_attention qk_norm={qk_norm}, {poison_kind}")


@pytest.mark.parametrize("Lq,Lk", [(1, 40), (9, 70)])
@pytest.mark.parametrize("mask_shape", ["2d", "bh"])
def test_sdpa_float_mask_nan(backend, mask_shape, Lq, Lk):
    """The SDPA drop-in with a float attn_mask holding NaN (and -inf): NaN rows exactly where PyTorch's
    SDPA has them, and equal to it elsewhere."""
    gen = torch.Generator().manual_seed(Lq * 100 + Lk)
    B, H, D = 2, 4, 64
    q, k, v = make((B, H, Lq, D), torch.float32, gen), make((B, H, Lk, D), torch.float32, gen), \
        make((B, H, Lk, D), torch.float32, gen)
    shape = (Lq, Lk) if mask_shape == "2d" else (B, H, Lq, Lk)
    bias = torch.randn(shape, generator=gen).masked_fill(torch.rand(shape, generator=gen) < 0.25, -INF)
    bias[..., Lq - 1, Lk // 2] = NAN
    if mask_shape == "bh":
        bias[1, 2, 0, 0] = NAN
    out = backend.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    ref, _ = attention_reference(q.double(), k.double(), v.double(), bias=bias.double())
    rows = torch.zeros(B, H, Lq, dtype=torch.bool)
    rows[..., Lq - 1] = True
    if mask_shape == "bh":
        rows[1, 2, 0] = True
    assert torch.equal(ref.isnan().all(-1), rows) and torch.equal(want.isnan().all(-1), rows)
    assert torch.equal(out.isnan(), want.isnan()), f"NaN rows {torch.nonzero(out.isnan().all(-1)).tolist()}"
    torch.testing.assert_close(out[~rows], want[~rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[~rows].double(), ref[~rows], rtol=1e-5, atol=1e-5)


def test_sdpa_nan_scale(backend):
    """scale=NaN through the drop-in: every row NaN, as in PyTorch's math backend."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = make((1, 2, 5, 64), torch.float32, gen), make((1, 2, 9, 64), torch.float32, gen), \
        make((1, 2, 9, 64), torch.float32, gen)
    out = backend.scaled_dot_product_attention(q, k, v, is_causal=True, scale=NAN)
    with sdpa_kernel(SDPBackend.MATH):
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=NAN)
    assert want.isnan().all() and out.isnan().all()


def test_sdpa_minus_inf_bias_is_not_a_hidden_key(backend):
    """A float attn_mask's -inf is added to the logit: a NaN in that key's v row reaches the row (weight 0
    times NaN), as in PyTorch's SDPA. A float mask of only 0 and -inf runs as the bool mask it means (VAR's
    attn_bias; docs/attention.md), and a bool mask's False hides the key: the row stays finite."""
    gen = torch.Generator().manual_seed(4)
    B, H, Lq, Lk, D = 1, 2, 6, 40, 64
    q, k, v = make((B, H, Lq, D), torch.float32, gen), make((B, H, Lk, D), torch.float32, gen), \
        make((B, H, Lk, D), torch.float32, gen)
    v[0, 1, 30, 3] = NAN
    keep = torch.ones(Lq, Lk, dtype=torch.bool)
    keep[:3, 30] = False
    bias = torch.full((Lq, Lk), 0.25).masked_fill(~keep, -INF)
    out = backend.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert want[0, 1, :, 3].isnan().all() and torch.equal(out.isnan(), want.isnan())
    out = backend.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(Lq, Lk).masked_fill(~keep, -INF))
    assert torch.equal(out[0, 1, :, 3].isnan(), keep[:, 30]) and out.isnan().sum() == 3
    out = backend.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    assert torch.equal(out[0, 1, :, 3].isnan(), keep[:, 30]) and out.isnan().sum() == 3
