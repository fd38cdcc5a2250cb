"""The CPU kernels' ISAs: one build holds a generic, an AVX2 and an AVX-512 copy of every CPU kernel (on x86-64
with GCC) and picks one at run time. Every ISA the CPU runs is checked here against the plain-PyTorch
references; an ISA this CPU lacks is skipped, like the cuda backend. The whole CPU suite also runs under
``FASTAR_CPU_ISA=generic`` and ``=avx2`` in ``make test``.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

import fastar
from fastar import masks
from fastar.reference import (
    KV_FORMATS,
    attention_reference,
    greedy_verify_reference,
    scale_attention_reference,
    speculative_sample_reference,
    tree_greedy_verify_row,
    tree_speculative_sample_row,
    typical_accept_row,
)

INFO = fastar.build_info()
ISAS = ("generic", "avx2", "avx512")


@pytest.fixture(params=ISAS)
def isa(request):
    name = request.param
    if name not in INFO["cpu_isas_built"]:
        pytest.skip(f"this build has no {name} CPU kernels (built: {INFO['cpu_isas_built']})")
    if name not in INFO["cpu_isas_supported"]:
        pytest.skip(f"this CPU does not run the {name} kernels")
    previous = fastar.build_info()["cpu_isa"]
    fastar._C._set_cpu_isa(name)
    try:
        yield name
    finally:
        fastar._C._set_cpu_isa(previous)


def test_build_info_names_the_isas():
    assert "generic" in INFO["cpu_isas_built"]
    assert set(INFO["cpu_isas_supported"]) <= set(INFO["cpu_isas_built"])
    assert INFO["cpu_isa"] in INFO["cpu_isas_supported"]
    if platform.machine() in ("x86_64", "AMD64"):
        assert INFO["cpu_isas_built"] == ["generic", "avx2", "avx512"]


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_env_var_picks_the_isa():
    proc = _run("import fastar; print(fastar.build_info()['cpu_isa'])", FASTAR_CPU_ISA="generic")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "generic"


def test_unknown_isa_is_a_clear_error():
    code = "import torch, fastar; x = torch.randn(1, 1, 4, 8); fastar.attention(x, x, x)"
    proc = _run(code, FASTAR_CPU_ISA="sse9")
    assert proc.returncode != 0
    assert "FASTAR_CPU_ISA = 'sse9' is not an ISA of this build" in proc.stderr
    with pytest.raises(RuntimeError, match="not an ISA of this build"):
        fastar._C._set_cpu_isa("sse9")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [24, 64, 72, 128])
def test_attention_every_path(isa, dtype, D):
    """Decode (streaming path), 16 and 40 query rows (GEMM path: whole and partial vectors of columns),
    GQA, masks with hidden, partial and full tiles, and head dims off every vector width."""
    torch.manual_seed(D)
    for Lq, Lk, Hq, Hkv, mask in [
        (1, 300, 4, 2, None),
        (16, 200, 4, 4, masks.Causal()),
        (40, 333, 8, 2, masks.Window(70, sinks=3)),
        (40, 333, 2, 2, masks.BlockCausal(block_size=20)),
    ]:
        q = torch.randn(2, Hq, Lq, D, dtype=dtype)
        k = torch.randn(2, Hkv, Lk, D, dtype=dtype)
        v = torch.randn(2, Hkv, Lk, D, dtype=dtype)
        out, lse = fastar.attention(q, k, v, mask=mask, return_lse=True)
        dense = None if mask is None else mask.materialize(Lq, Lk)
        ref, ref_lse = attention_reference(q.double(), k.double(), v.double(), mask=dense)
        tol = 2e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
        torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("D", [40, 72, 256])
@pytest.mark.parametrize("Lq", [7, 8], ids=["decode", "gemm"])
def test_quantized_cache_reads_every_code_as_torch_converts_it(isa, fmt, D, Lq):
    """One-key caches whose K and V codes run through all 256 codes of the format, across heads and every lane of
    the vector loads and of the scalar tails (D off the vector widths), read by the decode path (7 query rows)
    and by the GEMM path (8). At scale 1 the output is V's row, bit for bit torch's float8 / int8 -> float32
    conversion, NaNs and infinities included (-0 comes back as +0: the output accumulates from 0). The LSE of
    the query e_d (softmax scale 1) is K's code d; K's non-finite codes are replaced by 0, since one would make
    every logit of its row NaN."""
    H = -(-256 // D)  # kv heads, each one row of D codes
    B = -(-D // Lq)  # sequences: query i of sequence b is e_d with d = (b * Lq + i) % D
    codes = (torch.arange(H * D) % 256).to(torch.uint8)
    values = codes.view(KV_FORMATS[fmt]).float()
    k_codes = torch.where(values.isfinite(), codes, torch.zeros_like(codes))
    v = codes.view(KV_FORMATS[fmt]).reshape(1, 1, H, D).expand(B, 1, H, D).contiguous()
    k = k_codes.view(KV_FORMATS[fmt]).reshape(1, 1, H, D).expand(B, 1, H, D).contiguous()
    d = (torch.arange(B)[:, None] * Lq + torch.arange(Lq)) % D
    q = torch.nn.functional.one_hot(d, D).float()[:, :, None, :].expand(B, Lq, H, D).contiguous()
    ones = torch.ones(B, 1, H)
    out, lse = fastar.attention_with_kvcache(q, k, v, cache_seqlens=1, k_scale=ones, v_scale=ones, scale=1.0,
                                             return_lse=True)
    want = torch.where(values == 0, 0.0, values).reshape(1, 1, H, D).expand(B, Lq, H, D)
    assert torch.equal(out.view(torch.int32), want.contiguous().view(torch.int32))
    want_lse = k_codes.view(KV_FORMATS[fmt]).float().reshape(H, D)[:, d].permute(1, 0, 2)  # [B, H, Lq]
    assert torch.equal(lse, want_lse)


@pytest.mark.parametrize("window", [None, 2])
def test_scale_attention(isa, window):
    torch.manual_seed(1)
    layout = fastar.ScaleLayout((1, 2, 3, 4, 5, 6, 8), local_window=window)
    L = layout.num_tokens
    q, k, v = (torch.randn(2, 4, L, 64) for _ in range(3))
    out = fastar.scale_attention(q, k, v, layout, qk_norm=True)
    ref = scale_attention_reference(q.double(), k.double(), v.double(), layout, qk_norm=True)
    ref = ref[0] if isinstance(ref, tuple) else ref
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_acceptance_tokens(isa):
    """Exact ops: every ISA gives the reference's tokens for one seed."""
    torch.manual_seed(2)
    B, n, V = 6, 4, 1000  # V off every vector width
    drafts = torch.randint(0, V, (B, n))
    p = torch.softmax(torch.randn(B, n + 1, V) * 3, -1)
    q = torch.softmax(torch.randn(B, n, V) * 3, -1)
    for draft_probs in (q, None):
        got = fastar.speculative_sample(drafts, draft_probs, p, seed=11)
        want = speculative_sample_reference(drafts, draft_probs, p, seed=11)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    logits = torch.randn(B, n + 1, V)
    logits[0, 1, 7] = logits[0, 1].max() + 1  # a clear maximum late in a row
    got = fastar.greedy_verify(drafts, logits)
    want = greedy_verify_reference(drafts, logits)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_tree_sampling_tokens(isa):
    """Tree sampling's weight rows (fixed point, the draft row scaled by their total) on every ISA: a wide root and
    a peaked target, so rows reject several children; V off every vector width."""
    torch.manual_seed(4)
    B, V = 6, 1003
    parents = [-1, -1, -1, -1, 0, 0, 4]
    p = torch.softmax(torch.randn(B, len(parents) + 1, V) * 4, -1)
    q = torch.softmax(torch.randn(B, len(parents), V) * 2, -1)
    drafts = torch.multinomial(q.reshape(-1, V), 1).reshape(B, len(parents))
    for draft_probs in (q, None):
        path, tokens, accepted = fastar.tree_speculative_sample(drafts, masks.Tree(parents), draft_probs, p, seed=3)
        for b in range(B):
            want_path, want_tokens, k = tree_speculative_sample_row(
                parents, drafts[b].tolist(), None if draft_probs is None else draft_probs[b], p[b], row=b, seed=3)
            assert int(accepted[b]) == k and path[b, :k].tolist() == want_path
            assert tokens[b, : k + 1].tolist() == want_tokens


def test_tree_greedy_tokens(isa):
    """Tree greedy verification's argmaxes on every ISA, V off every vector width, ties to the smallest id."""
    torch.manual_seed(5)
    B, V = 6, 1003
    parents = [-1, -1, 0, 0, 2, 1]
    logits = torch.randn(B, len(parents) + 1, V)
    logits[:, :, 900] = logits.amax(-1)  # a tie late in each row: the earlier index wins
    drafts = logits[:, [p + 1 for p in parents]].argmax(-1)
    drafts[::2, 1] = 5
    path, tokens, accepted = fastar.tree_greedy_verify(drafts, masks.Tree(parents), logits)
    for b in range(B):
        want_path, want_tokens, k = tree_greedy_verify_row(parents, drafts[b].tolist(), logits[b])
        assert int(accepted[b]) == k and path[b, :k].tolist() == want_path
        assert tokens[b, : k + 1].tolist() == want_tokens


def test_typical_accept_tokens(isa):
    """Typical acceptance's softmax statistics on every ISA (V off every vector width, a -inf logit): drafts the
    argmax or the argmin, far from the threshold either way."""
    torch.manual_seed(6)
    B, V = 6, 1003
    parents = [-1, -1, 0, 0, 2, 1]
    logits = torch.randn(B, len(parents) + 1, V) * 3
    logits[:, :, 17] = float("-inf")
    rows = logits[:, [p + 1 for p in parents]]
    drafts = torch.where(torch.rand(B, len(parents)) < 0.8, rows.argmax(-1), rows.argmin(-1))
    path, tokens, accepted = fastar.typical_accept(drafts, logits, tree=masks.Tree(parents))
    for b in range(B):
        want_path, want_tokens, k = typical_accept_row(parents, drafts[b].tolist(), logits[b])
        assert int(accepted[b]) == k and path[b, :k].tolist() == want_path
        assert tokens[b, : k + 1].tolist() == want_tokens


def test_sample_cfg_same_tokens_on_every_isa(isa):
    """sample_cfg's tokens are exact (fixed point): every ISA draws those of the generic kernels."""
    torch.manual_seed(3)
    logits = torch.randn(8, 5, 1003)
    got = fastar.sample_cfg(logits, cfg=1.5, schedule="constant", top_k=50, top_p=0.9, seed=5)
    fastar._C._set_cpu_isa("generic")
    want = fastar.sample_cfg(logits, cfg=1.5, schedule="constant", top_k=50, top_p=0.9, seed=5)
    fastar._C._set_cpu_isa(isa)
    assert torch.equal(got, want)
