"""Tests of fastar.scale_attention (next-scale / VAR attention, docs/scale_attention.md) on every backend.

Every result is checked against ``scale_attention_reference`` (float64 attention over
``ScaleLayout.materialize``, itself checked pair by pair in ``test_scale_layout.py``) with the tolerances of
``test_attention.py``: float32 ``1e-5 * max(1, max|ref|)``; float16/bfloat16 FlashAttention's error ratio
against PyTorch's SDPA in the low precision (on q and k normalised in the low precision for qk_norm); LSE
``rtol 1e-5, atol 1e-4``.
"""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import fastar
from fastar import ScaleLayout, _common
from fastar.reference import scale_attention_reference
from test_attention import assert_output_close, assert_same, make

VAR_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
VAR_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
FLOWAR = (1, 2, 4, 8, 16)


def heads(backend):
    """(B, Hq, Hkv): GQA everywhere; the SIMT emulator (~1 s per 680-token head) gets one sequence."""
    return (1, 2, 1) if backend.name == "simt" else (2, 4, 2)


def inputs(B, Hq, Hkv, L, D, dtype, seed, Lq=None, layout="contiguous"):
    gen = torch.Generator().manual_seed(seed)
    q = make((B, Hq, L if Lq is None else Lq, D), dtype, gen, layout)
    return q, make((B, Hkv, L, D), dtype, gen, layout), make((B, Hkv, L, D), dtype, gen, layout)


def normalised(q, k, q_scale):
    """q and k as VAR normalises them, in their own dtype (the low-precision baseline of qk_norm)."""
    qn = F.normalize(q, dim=-1)
    if q_scale is not None:
        qn = qn * q_scale.to(q.dtype).view(1, -1, 1, 1)
    return qn, F.normalize(k, dim=-1)


def check(out, lse, q, k, v, layout, *, scale=None, qk_norm=False, q_scale=None, what=""):
    """out, lse of a scale_attention call against the float64 reference."""
    ref, ref_lse = scale_attention_reference(
        q.double(), k.double(), v.double(), layout, scale=scale, qk_norm=qk_norm, q_scale=q_scale
    )
    assert out.shape == q.shape and out.dtype == q.dtype, (out.shape, out.dtype)
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32, (lse.shape, lse.dtype)
    assert not out.isnan().any(), f"{what}: NaN in the output"
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-4, msg=lambda m: f"{what}: LSE\n{m}")
    L, Lq = layout.num_tokens, q.shape[2]
    dense = layout.materialize()[L - Lq :].view(1, 1, Lq, L)
    if qk_norm:
        q, k = normalised(q, k, q_scale)
        scale = 1.0 if scale is None else scale
    assert_output_close(out, ref, q, k, v, dense, None, scale, what)


# ---------------------------------------------------------------------------------------------------------
# Relations and windows against the reference

# Each relation with each window and each dtype once (a Latin square); windows over global coarse scales
# (full_scales) are in the 512px, FlexVAR and last-query tests.
VAR_CASES = [
    ("causal", None, 0, torch.float32),
    ("causal", 1, 0, torch.float16),
    ("causal", 2, 0, torch.bfloat16),
    ("same", None, 0, torch.float16),
    ("same", 1, 0, torch.bfloat16),
    ("same", 2, 0, torch.float32),
    ("prev", None, 0, torch.bfloat16),
    ("prev", 1, 0, torch.float32),
    ("prev", 2, 0, torch.float16),
]


@pytest.mark.parametrize("relation,window,full_scales,dtype", VAR_CASES)
def test_var_256(backend, relation, window, full_scales, dtype):
    layout = ScaleLayout(VAR_256, relation=relation, local_window=window, full_scales=full_scales)
    B, Hq, Hkv = heads(backend)
    # VAR's q, k, v are views of one [B, L, 3, H, D] projection: [B, L, H, D] storage.
    q, k, v = inputs(B, Hq, Hkv, 680, 64, dtype, seed=len(relation) * 7 + (window or 0), layout="transposed")
    out, lse = backend.scale_attention(q, k, v, layout, return_lse=True)
    check(out, lse, q, k, v, layout, what=repr(layout))


# The emulator takes ~20 s for a 2240-token pass: it runs only the case with a window over global scales,
# marked slow (deselect with -m "not slow").
@pytest.mark.parametrize("backend", ["cpu", pytest.param("simt", marks=pytest.mark.slow), "cuda"], indirect=True)
@pytest.mark.parametrize(
    "relation,window,full_scales",
    [
        ("causal", None, 0),
        ("causal", 1, 2),
        ("prev", 2, 0),
    ],
)
def test_var_512(backend, relation, window, full_scales):
    """VAR 512px, 2240 tokens: one sequence of two query heads over one kv head."""
    if backend.name == "simt" and (relation, window) != ("causal", 1):
        pytest.skip("the emulator runs one 2240-token case")
    layout = ScaleLayout(VAR_512, relation=relation, local_window=window, full_scales=full_scales)
    q, k, v = inputs(1, 2, 1, 2240, 64, torch.bfloat16, seed=3)
    out, lse = backend.scale_attention(q, k, v, layout, return_lse=True)
    check(out, lse, q, k, v, layout, what=repr(layout))


@pytest.mark.parametrize(
    "relation,window,dtype,D",
    [
        ("causal", None, torch.float16, 128),
        ("causal", 2, torch.float32, 128),
        ("same", 1, torch.bfloat16, 96),
        ("prev", 1, torch.float16, 96),
    ],
)
def test_flowar_and_other_head_dims(backend, relation, window, dtype, D):
    """FlowAR's doubling scales (1, 2, 4, 8, 16): 341 tokens, every scale twice its predecessor."""
    layout = ScaleLayout(FLOWAR, relation=relation, local_window=window)
    B, Hq, Hkv = heads(backend)
    q, k, v = inputs(B, Hq, Hkv, layout.num_tokens, D, dtype, seed=D, layout="sliced")
    out, lse = backend.scale_attention(q, k, v, layout, scale=0.25 / math.sqrt(D), return_lse=True)
    check(out, lse, q, k, v, layout, scale=0.25 / math.sqrt(D), what=f"{layout} D={D}")


def test_flexvar_rectangular_scales(backend):
    """FlexVAR-style (h, w) scales of another aspect ratio, under a window."""
    layout = ScaleLayout([(1, 2), (2, 3), (3, 5), (6, 8), (9, 12)], local_window=1, full_scales=1)
    q, k, v = inputs(1, 2, 2, layout.num_tokens, 64, torch.float32, seed=11)
    out, lse = backend.scale_attention(q, k, v, layout, return_lse=True)
    check(out, lse, q, k, v, layout, what=repr(layout))


# ---------------------------------------------------------------------------------------------------------
# qk_norm


@pytest.mark.parametrize(
    "dtype,with_q_scale",
    [(torch.float32, True), (torch.float32, False), (torch.float16, False), (torch.bfloat16, True)],
)
def test_qk_norm(backend, dtype, with_q_scale):
    """VAR's attn_l2_norm: the fused normalisation against the reference, and against normalising in
    PyTorch (float32) before calling scale_attention with scale 1."""
    layout = ScaleLayout(FLOWAR, local_window=2)
    B, Hq, Hkv = heads(backend)
    q, k, v = inputs(B, Hq, Hkv, layout.num_tokens, 64, dtype, seed=21)
    q_scale = None
    if with_q_scale:
        # VAR's per-head factor exp(min(s_h, log 100)), around its initial value 4.
        q_scale = torch.tensor([0.5, 3.0, 1.0, 2.0][:Hq]).clamp_max(math.log(100)).exp()
    out, lse = backend.scale_attention(q, k, v, layout, qk_norm=True, q_scale=q_scale, return_lse=True)
    check(out, lse, q, k, v, layout, qk_norm=True, q_scale=q_scale, what=f"qk_norm {dtype} q_scale={with_q_scale}")

    if dtype == torch.float32:
        qn, kn = normalised(q, k, q_scale)
        explicit, explicit_lse = backend.scale_attention(qn, kn, v, layout, scale=1.0, return_lse=True)
        # Logits up to 20 (q_scale): the two float32 normalisations differ by a few ulps of that.
        torch.testing.assert_close(out, explicit, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, explicit_lse, rtol=1e-5, atol=1e-5)


def test_qk_norm_scale_argument(backend):
    """An explicit scale multiplies the normalised logits (the default with qk_norm is 1)."""
    layout = ScaleLayout(FLOWAR)
    q, k, v = inputs(1, 2, 2, layout.num_tokens, 64, torch.float32, seed=4)
    out, lse = backend.scale_attention(q, k, v, layout, qk_norm=True, scale=3.0, return_lse=True)
    check(out, lse, q, k, v, layout, qk_norm=True, scale=3.0, what="qk_norm scale=3")


# ---------------------------------------------------------------------------------------------------------
# The last queries, cached per-scale inference


@pytest.mark.parametrize(
    "relation,window,full_scales,Lq",
    [
        ("causal", None, 0, 256),  # the last scale (runs with no mask)
        ("causal", 1, 0, 256),
        ("prev", 2, 0, 425),  # the last two scales and one query of the one before
        ("causal", 1, 4, 300),
        ("same", None, 0, 1),
    ],
)
def test_last_queries(backend, relation, window, full_scales, Lq):
    """q holds the last Lq tokens: the rows of the full pass, against the reference."""
    layout = ScaleLayout(VAR_256, relation=relation, local_window=window, full_scales=full_scales)
    B, Hq, Hkv = heads(backend)
    q, k, v = inputs(B, Hq, Hkv, 680, 64, torch.float32, seed=Lq)
    out, lse = backend.scale_attention(q[:, :, 680 - Lq :], k, v, layout, return_lse=True)
    check(out, lse, q[:, :, 680 - Lq :], k, v, layout, what=f"{layout} Lq={Lq}")


def test_cached_inference_equals_full_pass(backend):
    """VAR's claim (docs/scale_attention.md): at step s the queries of scale s attend to the cache of scales 0..s with
    no mask; that equals the rows of scale s of the full block-causal pass. The cached steps run with no mask
    terms (the op's defaults: no relation, window or tables)."""
    full_layout = ScaleLayout(VAR_256)
    B, Hq, Hkv = heads(backend)
    q, k, v = inputs(B, Hq, Hkv, 680, 64, torch.float32, seed=8)
    full, full_lse = backend.scale_attention(q, k, v, full_layout, return_lse=True)
    check(full, full_lse, q, k, v, full_layout, what="full pass")

    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return backend.ops.scale_attention(*args, **kwargs)

    for s, (start, end) in enumerate(zip(full_layout.starts, full_layout.ends)):
        step_layout = ScaleLayout(VAR_256[: s + 1])
        with _common.using_ops(SimpleNamespace(scale_attention=spy)):
            step, step_lse = fastar.scale_attention(
                backend.to(q[:, :, start:end]), backend.to(k[:, :, :end]), backend.to(v[:, :, :end]), step_layout,
                return_lse=True,
            )
        assert_same(step.cpu(), full[:, :, start:end], f"scale {s}")
        torch.testing.assert_close(step_lse.cpu(), full_lse[:, :, start:end], rtol=1e-5, atol=1e-5)
    assert calls and all(set(kwargs) <= {"qk_norm", "q_scale"} for kwargs in calls), calls


# ---------------------------------------------------------------------------------------------------------
# A VAR transformer block: SDPA + dense mask (fastar.patch_sdpa) against scale_attention


class VARSelfAttention(torch.nn.Module):
    """VAR's SelfAttention with attn_l2_norm (head_dim 64, per-head learned scale, softmax scale 1)."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.mat_qkv = torch.nn.Linear(embed_dim, 3 * embed_dim, bias=True)
        self.proj = torch.nn.Linear(embed_dim, embed_dim)
        # VAR initialises the factor to 4 (log 4) and learns it per head.
        self.scale_mul_1H11 = torch.nn.Parameter(math.log(4.0) + 0.5 * torch.randn(1, num_heads, 1, 1))
        self.max_scale_mul = math.log(100)

    def qkv(self, x):
        B, L, C = x.shape
        qkv = self.mat_qkv(x).view(B, L, 3, self.num_heads, self.head_dim)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, L, D] views of [B, L, H, D]

    def out(self, o):
        B, H, L, D = o.shape
        return self.proj(o.transpose(1, 2).reshape(B, L, H * D))

    def forward(self, x, attn_mask):
        """VAR's code path: normalise in PyTorch, then F.scaled_dot_product_attention with the mask."""
        q, k, v = self.qkv(x)
        scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
        q, k = F.normalize(q, dim=-1).mul(scale_mul), F.normalize(k, dim=-1)
        return self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0))

    def forward_fastar(self, x, layout):
        q, k, v = self.qkv(x)
        q_scale = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp().view(-1)
        return self.out(fastar.scale_attention(q, k, v, layout, qk_norm=True, q_scale=q_scale))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and fastar.build_info()["cuda"]), reason="no CUDA GPU or CUDA build"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_var_block_sdpa_and_scale_attention_agree(device, dtype):
    torch.manual_seed(0)
    block = VARSelfAttention(embed_dim=256, num_heads=4).to(device=device, dtype=dtype).eval()
    layout = ScaleLayout(VAR_256)
    x = torch.randn(2, layout.num_tokens, 256, device=device, dtype=dtype)
    mask = layout.materialize(device).view(1, 1, 680, 680)  # VAR's attn_bias, as a bool mask
    with torch.no_grad():
        want = copy.deepcopy(block).double()(x.double(), mask)
        with fastar.patch_sdpa():
            through_sdpa = block(x, mask)
        through_scale = block.forward_fastar(x, layout)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype] * want.abs().max().item()
    pairs = (
        (through_sdpa, want, "patch_sdpa + bool mask against float64"),
        (through_scale, want, "scale_attention against float64"),
        (through_scale, through_sdpa, "scale_attention against patch_sdpa + bool mask"),
    )
    for got, ref, what in pairs:
        err = (got.double() - ref.double()).abs().max().item()
        assert err <= tol, f"{what}: {dtype} error {err:.3g} > {tol:.3g}"


# ---------------------------------------------------------------------------------------------------------
# Return values and bad input


def test_return_lse_and_default_scale(backend):
    layout = ScaleLayout((1, 2, 3), relation="prev")
    q, k, v = inputs(1, 2, 2, 14, 32, torch.float32, seed=1)
    plain = backend.scale_attention(q, k, v, layout)
    out, lse = backend.scale_attention(q, k, v, layout, return_lse=True)
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, out)
    check(out, lse, q, k, v, layout, what="default scale 1/sqrt(D)")
    explicit = backend.scale_attention(q, k, v, layout, scale=32**-0.5)
    assert torch.equal(explicit, out)


def test_bad_input():
    layout = ScaleLayout((1, 2, 3))
    q, k, v = inputs(2, 4, 2, 14, 64, torch.float32, seed=0)
    cases = [
        ((q, k, v, (1, 2, 3)), {}, TypeError, "ScaleLayout"),
        ((q, k.tolist(), v, layout), {}, TypeError, "tensor"),
        ((q[0], k, v, layout), {}, ValueError, "4-D"),
        ((q, k, v[0], layout), {}, ValueError, "4-D"),
        ((q.double(), k.double(), v.double(), layout), {}, TypeError, "dtype"),
        ((q, k.half(), v, layout), {}, TypeError, "dtype"),
        ((q, k, v.bfloat16(), layout), {}, TypeError, "dtype"),
        ((q, k, v[:, :, :13], layout), {}, ValueError, "shape"),
        ((q, k[:1], v[:1], layout), {}, ValueError, "shape"),
        ((q[:, :3], k, v, layout), {}, ValueError, "multiple"),
        ((q, k[..., :32], v[..., :32], layout), {}, ValueError, "shape"),
        ((q, k[:, :, :13], v[:, :, :13], layout), {}, ValueError, "layout has 14"),
        ((torch.cat([q, q], 2), k, v, layout), {}, ValueError, "more than the layout"),
        ((q, k, v, layout), dict(q_scale=torch.ones(4)), ValueError, "qk_norm"),
        ((q, k, v, layout), dict(qk_norm=True, q_scale=torch.ones(3)), ValueError, r"\[Hq=4\]"),
        ((q, k, v, layout), dict(qk_norm=True, q_scale=torch.ones(4, dtype=torch.int32)), TypeError, "float"),
        ((q, k, v, layout), dict(qk_norm=True, q_scale=[1.0] * 4), TypeError, "float"),
        ((q, k, v, layout), dict(qk_norm=True, q_scale=torch.ones(1, 4, 1, 1)), ValueError, r"\[Hq=4\]"),
    ]
    for args, kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            fastar.scale_attention(*args, **kwargs)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            fastar.scale_attention(q, k.cuda(), v, layout)
        with pytest.raises(ValueError, match="q_scale"):
            fastar.scale_attention(q, k, v, layout, qk_norm=True, q_scale=torch.ones(4, device="cuda"))
