"""Tests of fastar's masked attention ops (docs/attention.md, docs/masks.md) on every backend (cpu / simt / cuda).

Every result is checked against an independent reference: ``attention_reference`` (softmax attention in
float64) over the mask's definition (``Mask.materialize``, itself checked element by element in
``test_masks.py``), or PyTorch's own ``scaled_dot_product_attention`` for the drop-in.

Tolerances (docs/attention.md):

* float32: ``max|out - ref64| <= 1e-5 * max(1, max|ref64|)``.
* float16 / bfloat16: FlashAttention's error-ratio criterion ``max|out - ref64| <= 2 * max|lowprec - ref64| +
  1e-5``, where ``lowprec`` is PyTorch's SDPA run in the low precision (on the CPU it accumulates in float32
  and rounds once, so this is stricter than FlashAttention's own tests, whose ``torch_lowprec`` computes
  every product in the input dtype; every backend meets it today).
* LSE (natural log, float32): ``rtol 1e-5, atol 1e-4``; a row that sees no key has output exactly 0 and LSE
  exactly ``-inf``.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import List, Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fastar
from fastar import _simt, masked_attention
from fastar.masks import And, BlockCausal, Causal, Dense, Tree, Window
from fastar.reference.attention import attention_reference
from helpers import HYPOTHESIS

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MEDUSA_CHOICES = [[0], [1], [0, 0], [0, 1], [0, 0, 0]]
MEDUSA_MASK = ["100000", "110000", "101000", "110100", "110010", "110101"]
SIMT_SKIP_REASON = "SIMT attention kernel not built yet"

# Sizes per backend: the SIMT emulator runs the CUDA kernels on CPU fibers (~0.1 ms per __syncthreads), so
# its shapes stay small (Lk <= 200, B * Hq <= 8).
SIZES = {
    "cpu": dict(max_batch=3, max_kv_heads=2, max_lk=300, max_lq=80, dims=(64, 80, 96, 128, 256), max_bh=32,
                max_cache=150),
    "cuda": dict(max_batch=3, max_kv_heads=2, max_lk=300, max_lq=80, dims=(64, 80, 96, 128, 256), max_bh=32,
                 max_cache=150),
    "simt": dict(max_batch=2, max_kv_heads=2, max_lk=200, max_lq=40, dims=(64, 80, 128, 256), max_bh=8,
                 max_cache=96),
}
# Key lengths worth hitting: around the 64-key tiles of the CPU kernel and the CUDA kernels' tiles.
INTERESTING_LK = (1, 2, 7, 31, 63, 64, 65, 127, 128, 129, 150, 191, 200, 257, 300)
INTERESTING_LQ = (1, 3, 16, 17, 33, 64, 65)



@pytest.fixture(autouse=True)
def _skip_simt_without_attention_kernel(request):
    """Until the SIMT build has an attention kernel, torch.ops.fastar_simt.attention exists without one."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("backend") != "simt":
        return
    try:
        _simt.load()
    except ImportError:
        return  # the backend fixture skips with its own reason
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fastar_simt::attention", "CPU"):
        pytest.skip(SIMT_SKIP_REASON)


@pytest.fixture
def no_fallback(monkeypatch):
    """Fail the test if fastar's SDPA drop-in hands the call to PyTorch instead of running its kernels."""

    def fail(reason, *args, **kwargs):
        pytest.fail(f"fastar.scaled_dot_product_attention fell back to PyTorch: {reason}")

    monkeypatch.setattr(masked_attention, "_fallback", fail)


# ---------------------------------------------------------------------------------------------------------
# Helpers


def make(shape, dtype, gen, layout="contiguous"):
    """A random [B, H, L, D] tensor with the given memory layout (values drawn in float32, then cast)."""
    B, H, L, D = shape
    if layout == "contiguous":
        return torch.randn(B, H, L, D, generator=gen).to(dtype)
    if layout == "transposed":  # [B, L, H, D] storage, as a [B, H, L, D] view
        return torch.randn(B, L, H, D, generator=gen).to(dtype).transpose(1, 2)
    if layout == "sliced":  # every other head, rows 3.., the first D of D + 8 columns (16-byte aligned rows)
        return torch.randn(B, 2 * H, L + 5, D + 8, generator=gen).to(dtype)[:, 1::2, 3 : 3 + L, :D]
    if layout == "expanded":  # one batch row shared by all (batch stride 0)
        return torch.randn(1, H, L, D, generator=gen).to(dtype).expand(B, H, L, D)
    raise ValueError(layout)


def lowprec_sdpa(q, k, v, dense=None, bias=None, scale=None):
    """PyTorch's SDPA in q's dtype (NaN of fully masked rows, if any, as 0)."""
    mask = bias if bias is not None else dense
    if bias is not None and dense is not None:
        mask = bias.masked_fill(~dense, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.nan_to_num(0.0)


def assert_output_close(out, ref, q, k, v, dense=None, bias=None, scale=None, what=""):
    """out (backend's, any dtype) against ref (float64) with the tolerances of the module docstring."""
    out = out.to(torch.float64)
    err = (out - ref).abs().max().item() if ref.numel() else 0.0
    if q.dtype == torch.float32:
        tol = 1e-5 * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
        assert err <= tol, f"{what}: float32 error {err:.3g} > {tol:.3g}"
        return
    base = (lowprec_sdpa(q, k, v, dense, bias, scale).to(torch.float64) - ref).abs().max().item()
    assert err <= 2 * base + 1e-5, f"{what}: {q.dtype} error {err:.3g} > 2 * {base:.3g} + 1e-5 (error ratio)"


def check_attention(out, lse, q, k, v, dense=None, bias=None, scale=None, what=""):
    """Output and LSE of an attention call against the float64 reference over the dense mask
    (bool broadcastable to [B, Hq, Lq, Lk])."""
    ref, ref_lse = attention_reference(
        q.double(), k.double(), v.double(), mask=dense, bias=None if bias is None else bias.double(), scale=scale
    )
    assert out.shape == q.shape and out.dtype == q.dtype, (out.shape, out.dtype)
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32, (lse.shape, lse.dtype)
    assert not out.isnan().any(), f"{what}: NaN in the output"
    dead = ref_lse == -math.inf
    assert torch.all(out[dead] == 0), f"{what}: a row that sees no key must give output 0"
    assert torch.all(lse[dead] == -math.inf), f"{what}: a row that sees no key must give LSE -inf"
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-4, msg=lambda m: f"{what}: LSE\n{m}")
    assert_output_close(out, ref, q, k, v, dense, bias, scale, what)


def assert_same(a, b, what=""):
    """Two fastar results of the same math along different paths (structured vs bit-packed masks...)."""
    tol = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[a.dtype]
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{what}\n{m}")


def dense4(mask, Lq, Lk, batch, kv_lens=None):
    """Mask.materialize as a [B or 1, 1, Lq, Lk] bool mask for attention_reference."""
    return mask.materialize(Lq, Lk, batch=batch, kv_lens=kv_lens).unsqueeze(1)


def random_parents(T: int, gen: torch.Generator) -> List[int]:
    """parents[t] in [-1, t): half the nodes continue the previous node (chains), the rest anywhere."""
    parents = []
    for t in range(T):
        if t > 0 and torch.rand(1, generator=gen).item() < 0.5:
            parents.append(t - 1)
        else:
            parents.append(int(torch.randint(-1, t, (1,), generator=gen)) if t > 0 else -1)
    return parents


def random_lengths(total: int, gen: torch.Generator, max_len: int = 12) -> List[int]:
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(torch.randint(1, max_len + 1, (1,), generator=gen)))
    return lengths


def sizes(backend):
    return SIZES[backend.name]


# ---------------------------------------------------------------------------------------------------------
# 1. Random shapes, layouts, dtypes and masks (hypothesis)

BASE_KINDS = ("causal", "window", "block", "tree", "dense")
NEEDS_LQ_LE_LK = ("block", "tree")


def draw_mask(data, kind: str, B: int, Lq: int, Lk: int, gen: torch.Generator):
    if kind == "causal":
        return Causal()
    if kind == "window":
        return Window(data.draw(st.integers(0, Lk + 2), "left"), data.draw(st.integers(0, 6), "sinks"))
    if kind == "block":
        relation = data.draw(st.sampled_from(["causal", "same", "prev"]), "relation")
        form = data.draw(st.sampled_from(["size", "ids_sorted", "ids_random", "lengths"]), "form")
        rows = data.draw(st.sampled_from([1, B]), "mask rows")
        if form == "size":
            return BlockCausal(block_size=data.draw(st.integers(1, 20), "block_size"), relation=relation)
        if form == "ids_sorted":
            ids = (torch.rand(rows, Lk, generator=gen) < 0.15).cumsum(-1)
            return BlockCausal(ids if rows > 1 else ids[0], relation=relation)
        if form == "ids_random":
            return BlockCausal(torch.randint(0, 4, (rows, Lk), generator=gen), relation=relation)
        lengths = [random_lengths(Lk, gen) for _ in range(rows)]
        width = max(map(len, lengths))
        lengths = torch.tensor([ls + [1] * (width - len(ls)) for ls in lengths])
        return BlockCausal(block_lengths=lengths if rows > 1 else lengths[0], relation=relation)
    if kind == "tree":
        rows = data.draw(st.sampled_from([1, B]), "mask rows")
        parents = [random_parents(Lq, gen) for _ in range(rows)]
        return Tree(parents if rows > 1 else parents[0])
    if kind == "dense":
        rows = data.draw(st.sampled_from([1, B]), "mask rows")
        density = data.draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]), "density")
        mask = torch.rand(rows, Lq, Lk, generator=gen) < density
        return Dense(mask if rows > 1 else mask[0])
    raise ValueError(kind)


def draw_heads(data, backend, B):
    s = sizes(backend)
    group = data.draw(st.sampled_from([1, 2, 4]), "group")
    Hkv = data.draw(st.integers(1, s["max_kv_heads"]), "Hkv")
    while B * Hkv * group > s["max_bh"] and Hkv > 1:
        Hkv -= 1
    return Hkv * group, Hkv


@pytest.mark.parametrize("kind", ["none", *BASE_KINDS, "and"])
@settings(max_examples=10, **HYPOTHESIS)
@given(data=st.data())
def test_random_shapes(backend, kind, data):
    s = sizes(backend)
    kinds = [] if kind == "none" else [kind]
    if kind == "and":
        kinds = data.draw(st.lists(st.sampled_from(BASE_KINDS), min_size=2, max_size=3), "composed kinds")
    dtype = data.draw(st.sampled_from(DTYPES), "dtype")
    D = data.draw(st.sampled_from(s["dims"]), "D")
    B = data.draw(st.integers(1, s["max_batch"]), "B")
    if B * 4 > s["max_bh"]:
        B = max(1, s["max_bh"] // 4)
    Hq, Hkv = draw_heads(data, backend, B)
    Lk = data.draw(st.one_of(st.sampled_from([x for x in INTERESTING_LK if x <= s["max_lk"]]),
                             st.integers(1, s["max_lk"])), "Lk")
    max_lq = min(Lk, s["max_lq"]) if any(k in NEEDS_LQ_LE_LK for k in kinds) else s["max_lq"]
    Lq = data.draw(st.one_of(st.integers(1, max_lq), st.sampled_from([x for x in INTERESTING_LQ if x <= max_lq])),
                   "Lq")
    q_layout = data.draw(st.sampled_from(["contiguous", "transposed", "sliced"]), "q layout")
    kv_layouts = ["contiguous", "transposed", "sliced"] + (["expanded"] if B > 1 else [])
    kv_layout = data.draw(st.sampled_from(kv_layouts), "kv layout")
    scale = data.draw(st.sampled_from([None, 0.3]), "scale")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), "seed"))

    masks = [draw_mask(data, k, B, Lq, Lk, gen) for k in kinds]
    mask = None if not masks else masks[0] if len(masks) == 1 else And(*masks)
    q = make((B, Hq, Lq, D), dtype, gen, q_layout)
    k = make((B, Hkv, Lk, D), dtype, gen, kv_layout)
    v = make((B, Hkv, Lk, D), dtype, gen, kv_layout)
    out, lse = backend.attention(q, k, v, mask=mask, scale=scale, return_lse=True)
    dense = None if mask is None else dense4(mask, Lq, Lk, B)
    check_attention(out, lse, q, k, v, dense, scale=scale, what=repr(mask))


# ---------------------------------------------------------------------------------------------------------
# 2. Equivalences between masks, and the published mask semantics end to end


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Lq,Lk", [(1, 77), (13, 150), (70, 70), (40, 21)])
def test_mask_equivalences(backend, dtype, Lq, Lk):
    """Dense(tril) == Causal(); all-visible Dense == no mask; BlockCausal(block_size=1) == Causal()."""
    if backend.name == "simt":
        Lq = min(Lq, 40)
    gen = torch.Generator().manual_seed(Lq * 1000 + Lk)
    B, Hq, Hkv, D = 2, 4, 2, 64
    q = make((B, Hq, Lq, D), dtype, gen)
    k, v = make((B, Hkv, Lk, D), dtype, gen), make((B, Hkv, Lk, D), dtype, gen)
    causal, causal_lse = backend.attention(q, k, v, mask=Causal(), return_lse=True)
    tril = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)  # bottom-right aligned
    dense_causal, dense_lse = backend.attention(q, k, v, mask=Dense(tril), return_lse=True)
    assert_same(dense_causal, causal, "Dense(tril) vs Causal()")
    torch.testing.assert_close(dense_lse, causal_lse, rtol=1e-5, atol=1e-5)
    check_attention(causal, causal_lse, q, k, v, tril, what="Causal")

    unmasked, unmasked_lse = backend.attention(q, k, v, return_lse=True)
    all_visible = backend.attention(q, k, v, mask=Dense(torch.ones(B, Lq, Lk, dtype=torch.bool)))
    assert_same(all_visible, unmasked, "all-visible Dense vs no mask")
    check_attention(unmasked, unmasked_lse, q, k, v, what="no mask")

    if Lq <= Lk:
        block1 = backend.attention(q, k, v, mask=BlockCausal(block_size=1))
        assert_same(block1, causal, "BlockCausal(block_size=1) vs Causal()")
        window_all = backend.attention(q, k, v, mask=Window(left=Lk))
        assert_same(window_all, causal, "Window(left=Lk) vs Causal()")


def tree_inputs(B, H, Hkv, P, T, D, dtype, gen):
    q = make((B, H, T, D), dtype, gen)
    k, v = make((B, Hkv, P + T, D), dtype, gen), make((B, Hkv, P + T, D), dtype, gen)
    return q, k, v


def assert_tree_rows_equal_paths(backend, tree_out, q, k, v, parents_per_batch, P):
    """Row t of tree attention == last row of causal attention over prefix + the root-to-t path."""
    for b, parents in enumerate(parents_per_batch):
        for t in range(len(parents)):
            path = [t]
            while parents[path[-1]] >= 0:
                path.append(parents[path[-1]])
            path = torch.tensor(path[::-1])
            kp = torch.cat([k[b : b + 1, :, :P], k[b : b + 1, :, P + path]], dim=2)
            vp = torch.cat([v[b : b + 1, :, :P], v[b : b + 1, :, P + path]], dim=2)
            chain = backend.attention(q[b : b + 1, :, path], kp, vp, mask=Causal())
            assert_same(tree_out[b : b + 1, :, t], chain[:, :, -1], f"tree node {t} of sequence {b} (path {path})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_equals_causal_attention_over_path(backend, dtype):
    gen = torch.Generator().manual_seed(7)
    B, H, Hkv, P, T, D = 2, 4, 2, 37, 11, 64
    parents = [random_parents(T, gen) for _ in range(B)]
    q, k, v = tree_inputs(B, H, Hkv, P, T, D, dtype, gen)
    tree = Tree(parents)
    out, lse = backend.attention(q, k, v, mask=tree, return_lse=True)
    check_attention(out, lse, q, k, v, dense4(tree, T, P + T, B), what="tree")
    assert_tree_rows_equal_paths(backend, out, q, k, v, parents, P)


def test_medusa_buffers_end_to_end(backend):
    """Tree.from_choices gives Medusa's buffers (docs/masks.md); tree verification against a ragged KV
    cache, with the tree tokens appended as k_new, equals the reference and, node by node, causal attention
    over the prefix and the node's path (retrieve_paths)."""
    tree = Tree.from_choices(MEDUSA_CHOICES)
    T = tree.num_nodes
    assert T == 6
    tree_part = tree.materialize(T, T)[0]
    assert ["".join(str(int(x)) for x in row) for row in tree_part] == MEDUSA_MASK
    assert tree.position_ids.tolist() == [0, 1, 1, 2, 2, 3]
    assert tree.retrieve_paths().tolist() == [[0, 1, 3, 5], [0, 1, 4, -1], [0, 2, -1, -1]]

    gen = torch.Generator().manual_seed(3)
    B, Hq, Hkv, D, S = 2, 4, 1, 64, 40
    seqlens = torch.tensor([5, 17], dtype=torch.int32)
    k_cache = torch.randn(B, S, Hkv, D, generator=gen)
    v_cache = torch.randn(B, S, Hkv, D, generator=gen)
    q = torch.randn(B, T, Hq, D, generator=gen)
    k_new, v_new = torch.randn(B, T, Hkv, D, generator=gen), torch.randn(B, T, Hkv, D, generator=gen)
    (out, lse), k_after, v_after = backend.attention_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=seqlens, k_new=k_new, v_new=v_new, mask=tree, return_lse=True
    )
    kv_lens = seqlens + T
    check_attention(
        out.transpose(1, 2), lse, q.transpose(1, 2), k_after.transpose(1, 2), v_after.transpose(1, 2),
        dense4(tree, T, S, B, kv_lens), what="Medusa tree",
    )
    for b in range(B):
        P = int(seqlens[b])
        kb, vb = k_after[b : b + 1, : P + T].transpose(1, 2), v_after[b : b + 1, : P + T].transpose(1, 2)
        qb = q[b : b + 1].transpose(1, 2)
        for path in tree.retrieve_paths().tolist():
            path = torch.tensor([n for n in path if n >= 0])
            kp = torch.cat([kb[:, :, :P], kb[:, :, P + path]], dim=2)
            vp = torch.cat([vb[:, :, :P], vb[:, :, P + path]], dim=2)
            chain = backend.attention(qb[:, :, path], kp, vp, mask=Causal())
            assert_same(out[b : b + 1, path].transpose(1, 2), chain, f"Medusa path {path.tolist()} of sequence {b}")


@pytest.mark.parametrize(
    "left,sinks,Lq,Lk",
    [(0, 0, 9, 40), (3, 0, 20, 20), (5, 2, 1, 130), (2, 10, 30, 90), (16, 4, 70, 200), (300, 4, 13, 150),
     (7, 3, 50, 30)],
)
def test_window_with_sinks(backend, left, sinks, Lq, Lk):
    if backend.name == "simt":
        Lq = min(Lq, 40)
    gen = torch.Generator().manual_seed(left * 31 + sinks)
    B, Hq, Hkv, D = 2, 2, 1, 64
    q, k, v = make((B, Hq, Lq, D), torch.float32, gen), make((B, Hkv, Lk, D), torch.float32, gen, "transposed"), \
        make((B, Hkv, Lk, D), torch.float32, gen, "transposed")
    mask = Window(left, sinks)
    out, lse = backend.attention(q, k, v, mask=mask, return_lse=True)
    # The definition written out here: j <= i' and (j >= i' - left or j < sinks), i' = i + Lk - Lq.
    i = torch.arange(Lq).view(-1, 1) + (Lk - Lq)
    j = torch.arange(Lk).view(1, -1)
    want = (j <= i) & ((j >= i - left) | (j < sinks))
    assert torch.equal(dense4(mask, Lq, Lk, B)[0, 0], want)
    check_attention(out, lse, q, k, v, want, what=repr(mask))


# Shared block ids with runs longer than half a CPU query tile (GQA group 8: 32 positions a tile), which
# start tiles of their own, and short runs, which join them; and ids out of order.
MIXED_RUNS = [40, 3, 2, 30, 20, 5]


@pytest.mark.parametrize("relation", ["causal", "same", "prev"])
@pytest.mark.parametrize("form", ["block_size", "block_ids", "block_lengths_per_sequence", "mixed_runs",
                                  "unsorted_ids"])
def test_block_relations(backend, relation, form):
    gen = torch.Generator().manual_seed(11)
    B, Hq, Hkv, D, Lk = 2, 4, 4, 80, 100
    if form in ("mixed_runs", "unsorted_ids"):
        Hq, Hkv = 8, 1
    Lq = 40 if backend.name == "simt" else 45
    if form == "block_size":
        mask = BlockCausal(block_size=8, relation=relation)
    elif form == "block_ids":
        mask = BlockCausal((torch.rand(Lk, generator=gen) < 0.2).cumsum(0), relation=relation)
    elif form == "mixed_runs":
        mask = BlockCausal(block_lengths=MIXED_RUNS, relation=relation)
    elif form == "unsorted_ids":
        mask = BlockCausal(torch.randint(0, 4, (Lk,), generator=gen), relation=relation)
    else:
        mask = BlockCausal(block_lengths=[[10, 30, 0, 60, 0, 0], [1, 4, 9, 16, 25, 45]], relation=relation)
    q = make((B, Hq, Lq, D), torch.float32, gen)
    k, v = make((B, Hkv, Lk, D), torch.float32, gen), make((B, Hkv, Lk, D), torch.float32, gen)
    out, lse = backend.attention(q, k, v, mask=mask, return_lse=True)
    # The relations written out here, over the block id of every position.
    if form == "block_size":
        ids = (torch.arange(Lk) // 8).expand(B, Lk)
    elif form in ("block_ids", "unsorted_ids"):
        ids = mask.block_ids.expand(B, Lk)
    elif form == "mixed_runs":
        ids = torch.repeat_interleave(torch.arange(len(MIXED_RUNS)), torch.tensor(MIXED_RUNS)).expand(B, Lk)
    else:
        ids = torch.stack([torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls))
                           for ls in ([10, 30, 0, 60, 0, 0], [1, 4, 9, 16, 25, 45])])
    qb, kb = ids[:, Lk - Lq :].unsqueeze(2), ids.unsqueeze(1)
    want = {"causal": kb <= qb, "same": kb == qb, "prev": (kb <= qb) & (kb >= qb - 1)}[relation]
    assert torch.equal(dense4(mask, Lq, Lk, B).expand(B, 1, Lq, Lk)[:, 0], want)
    check_attention(out, lse, q, k, v, want.unsqueeze(1), what=repr(mask))


@pytest.mark.parametrize("D", [24, 36, 72])
def test_head_dims_off_the_vector_width(backend, D):
    """Head dims that are not a multiple of 16 (or 8): the kernels' vector loops leave a tail. Eight or more
    query rows (the CPU's GEMM path) and one (its streaming path), a causal mask and a block relation
    whose partial tiles drop keys, float32 and bfloat16."""
    gen = torch.Generator().manual_seed(13)
    Lk = 150
    for dtype in (torch.float32, torch.bfloat16):
        for Lq, mask, dense in (
            (33, Causal(), torch.ones(33, Lk, dtype=torch.bool).tril(Lk - 33)),
            (1, Causal(), None),
            (40, BlockCausal(block_size=10, relation="same"), None),
        ):
            q = make((2, 4, Lq, D), dtype, gen)
            k, v = make((2, 2, Lk, D), dtype, gen), make((2, 2, Lk, D), dtype, gen)
            out, lse = backend.attention(q, k, v, mask=mask, return_lse=True)
            if dense is None:
                dense = dense4(mask, Lq, Lk, 2)
            check_attention(out, lse, q, k, v, dense, what=f"D={D} {dtype} Lq={Lq} {mask!r}")


def test_var_block_causal_and_cached_inference(backend):
    """VAR (docs/scale_attention.md): scales (1, 2, 3, 4) -> block lengths (1, 4, 9, 16), 30 tokens. The training
    pass is block-causal; at inference each scale's tokens are appended to the KV cache and attend to the
    whole cache with no mask, which must equal the rows of the full block-causal pass."""
    scales = (1, 2, 3, 4)
    lengths = [s * s for s in scales]
    L = sum(lengths)
    gen = torch.Generator().manual_seed(5)
    B, H, D = 2, 4, 64
    q, k, v = (torch.randn(B, H, L, D, generator=gen) for _ in range(3))
    mask = BlockCausal(block_lengths=lengths)
    full, full_lse = backend.attention(q, k, v, mask=mask, return_lse=True)
    ids = torch.repeat_interleave(torch.arange(len(scales)), torch.tensor(lengths))
    want = ids.view(1, -1) <= ids.view(-1, 1)
    check_attention(full, full_lse, q, k, v, want, what="VAR block-causal")
    assert torch.equal(BlockCausal(ids).materialize(L, L)[0], want)

    k_cache, v_cache = torch.zeros(B, L, H, D), torch.zeros(B, L, H, D)
    start = 0
    for n in lengths:
        rows = slice(start, start + n)
        (step, step_lse), k_cache, v_cache = backend.attention_with_kvcache(
            q[:, :, rows].transpose(1, 2), k_cache, v_cache, cache_seqlens=start,
            k_new=k[:, :, rows].transpose(1, 2), v_new=v[:, :, rows].transpose(1, 2), return_lse=True,
        )
        assert_same(step.transpose(1, 2), full[:, :, rows], f"VAR scale of {n} tokens")
        torch.testing.assert_close(step_lse, full_lse[:, :, rows], rtol=1e-5, atol=1e-5)
        start += n


# ---------------------------------------------------------------------------------------------------------
# 3. KV cache


def paged_layout(B: int, pages_per_seq: int, gen: torch.Generator, extra_pages: int = 3):
    """A block table int32 [B, pages_per_seq] over shuffled pages, plus a few pages no sequence owns."""
    total = B * pages_per_seq + extra_pages
    return torch.randperm(total, generator=gen)[: B * pages_per_seq].view(B, pages_per_seq).to(torch.int32), total


def to_paged(logical: torch.Tensor, block_table: torch.Tensor, total: int, gen: torch.Generator) -> torch.Tensor:
    """[B, S, H, D] -> pages [total, page_size, H, D] (pages outside the table hold random values)."""
    B, S, H, D = logical.shape
    page_size = S // block_table.shape[1]
    pages = torch.randn(total, page_size, H, D, generator=gen).to(logical.dtype)
    pages[block_table.long()] = logical.view(B, -1, page_size, H, D)
    return pages


def from_paged(pages: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    B, per_seq = block_table.shape
    return pages[block_table.long()].reshape(B, per_seq * pages.shape[1], *pages.shape[2:])


def expected_append(cache: torch.Tensor, new: Optional[torch.Tensor], seqlens: torch.Tensor) -> torch.Tensor:
    """The cache after writing new [B, Lnew, H, D] at positions seqlens[b] + t, written out slot by slot."""
    cache = cache.clone()
    if new is not None:
        for b in range(cache.shape[0]):
            for t in range(new.shape[1]):
                cache[b, int(seqlens[b]) + t] = new[b, t]
    return cache


def kvcache_mask(kind, B, Lq, S, gen):
    if kind == "none":
        return None
    if kind == "causal":
        return Causal()
    if kind == "window":
        return Window(5, 2)
    if kind == "tree":
        return Tree([random_parents(Lq, gen) for _ in range(B)])
    if kind == "block":
        return BlockCausal(block_size=3)
    if kind == "block_lengths":
        return BlockCausal(block_lengths=random_lengths(S, gen, 7), relation="prev")
    if kind == "dense":
        return Dense(torch.rand(B, Lq, S, generator=gen) < 0.6)
    raise ValueError(kind)


def run_kvcache_case(backend, *, B, Hq, Hkv, D, S, Lq, seqlens, with_new, page_size, mask_kind, dtype, seed):
    """attention_with_kvcache on a contiguous or paged cache against the reference and the expected cache."""
    gen = torch.Generator().manual_seed(seed)
    seqlens = torch.tensor(seqlens, dtype=torch.int32)
    k_log = torch.randn(B, S, Hkv, D, generator=gen).to(dtype)
    v_log = torch.randn(B, S, Hkv, D, generator=gen).to(dtype)
    q = torch.randn(B, Lq, Hq, D, generator=gen).to(dtype)
    k_new = torch.randn(B, Lq, Hkv, D, generator=gen).to(dtype) if with_new else None
    v_new = torch.randn(B, Lq, Hkv, D, generator=gen).to(dtype) if with_new else None
    mask = kvcache_mask(mask_kind, B, Lq, S, gen)
    k_want, v_want = expected_append(k_log, k_new, seqlens), expected_append(v_log, v_new, seqlens)
    kv_lens = seqlens + (Lq if with_new else 0)

    if page_size is None:
        (out, lse), k_after, v_after = backend.attention_with_kvcache(
            q, k_log, v_log, cache_seqlens=seqlens, k_new=k_new, v_new=v_new, mask=mask, return_lse=True
        )
        assert torch.equal(k_after, k_want) and torch.equal(v_after, v_want), "cache contents after the append"
    else:
        block_table, total = paged_layout(B, S // page_size, gen)
        k_pages, v_pages = to_paged(k_log, block_table, total, gen), to_paged(v_log, block_table, total, gen)
        owned = torch.zeros(k_pages.shape[0], dtype=torch.bool)
        owned[block_table.long().flatten()] = True
        (out, lse), k_after, v_after = backend.attention_with_kvcache(
            q, k_pages, v_pages, cache_seqlens=seqlens, k_new=k_new, v_new=v_new, block_table=block_table, mask=mask,
            return_lse=True,
        )
        assert torch.equal(from_paged(k_after, block_table), k_want), "paged K cache after the append"
        assert torch.equal(from_paged(v_after, block_table), v_want), "paged V cache after the append"
        assert torch.equal(k_after[~owned], k_pages[~owned]) and torch.equal(v_after[~owned], v_pages[~owned]), \
            "pages outside the block table must stay untouched"
    assert out.shape == q.shape and out.dtype == dtype
    dense = None if mask is None else dense4(mask, Lq, S, B, kv_lens)
    lens_mask = (torch.arange(S).view(1, 1, 1, S) < kv_lens.view(B, 1, 1, 1)).expand(B, 1, Lq, S)
    dense = lens_mask if dense is None else dense & lens_mask
    check_attention(
        out.transpose(1, 2), lse, q.transpose(1, 2), k_want.transpose(1, 2), v_want.transpose(1, 2), dense,
        what=f"kvcache mask={mask!r} page_size={page_size}",
    )
    return out, lse


@pytest.mark.parametrize("mask_kind", ["none", "causal", "tree", "block"])
@pytest.mark.parametrize("with_new", [False, True])
def test_kvcache_contiguous_equals_paged(backend, mask_kind, with_new):
    """The same ragged caches, contiguous [B, S_max, Hkv, D] and paged (page sizes 1, 3, 16, pages shuffled),
    give the same result, the reference's, and the same cache contents after the append."""
    B, Hq, Hkv, D, S, Lq = 3, 4, 2, 64, 48, 5
    seqlens = [0, 17, 43]
    if not with_new and mask_kind in ("tree", "block"):
        seqlens = [s + Lq for s in seqlens]  # the queries are the last Lq keys of each sequence
    kw = dict(B=B, Hq=Hq, Hkv=Hkv, D=D, S=S, Lq=Lq, seqlens=seqlens, with_new=with_new, mask_kind=mask_kind,
              dtype=torch.float32, seed=23)
    contiguous, contiguous_lse = run_kvcache_case(backend, page_size=None, **kw)
    for page_size in (1, 3, 16):
        paged, paged_lse = run_kvcache_case(backend, page_size=page_size, **kw)
        assert_same(paged, contiguous, f"paged (page size {page_size}) vs contiguous")
        torch.testing.assert_close(paged_lse, contiguous_lse, rtol=1e-5, atol=1e-5)


@settings(max_examples=20, **HYPOTHESIS)
@given(data=st.data())
def test_kvcache_random(backend, data):
    s = sizes(backend)
    B = data.draw(st.integers(1, s["max_batch"]), "B")
    Hq, Hkv = draw_heads(data, backend, B)
    D = data.draw(st.sampled_from(s["dims"]), "D")
    dtype = data.draw(st.sampled_from(DTYPES), "dtype")
    page_size = data.draw(st.sampled_from([None, 1, 3, 16]), "page size")
    pages = data.draw(st.integers(1, max(1, s["max_cache"] // (page_size or 1))), "pages") if page_size else 1
    S = pages * page_size if page_size else data.draw(st.integers(1, s["max_cache"]), "S")
    mask_kind = data.draw(st.sampled_from(["none", "causal", "window", "tree", "block", "block_lengths", "dense"]))
    with_new = data.draw(st.booleans(), "with k_new")
    Lq = data.draw(st.integers(1, min(S, s["max_lq"], 16)), "Lq")
    structural = mask_kind in ("tree", "block", "block_lengths")
    # With k_new the Lq new tokens must fit; without, tree / block masks need Lq keys per sequence.
    low = Lq if structural and not with_new else 0
    high = S - Lq if with_new else S
    seqlens = data.draw(st.lists(st.integers(low, high), min_size=B, max_size=B), "cache_seqlens")
    run_kvcache_case(backend, B=B, Hq=Hq, Hkv=Hkv, D=D, S=S, Lq=Lq, seqlens=seqlens, with_new=with_new,
                     page_size=page_size, mask_kind=mask_kind, dtype=dtype,
                     seed=data.draw(st.integers(0, 2**31 - 1), "seed"))


@pytest.mark.parametrize("mask_kind", ["causal", "tree", "block", "block_lengths", "window", "dense"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kvcache_masks_with_ragged_lengths(backend, mask_kind, dtype):
    """The mask is applied to the new tokens, the last Lq of each sequence's own length."""
    run_kvcache_case(backend, B=3, Hq=4, Hkv=1, D=128, S=70, Lq=7, seqlens=[0, 9, 63], with_new=True,
                     page_size=None, mask_kind=mask_kind, dtype=dtype, seed=31)


def test_public_kvcache_appends_in_place():
    """fastar.attention_with_kvcache (the public function, CPU) writes k_new / v_new into the caches given."""
    gen = torch.Generator().manual_seed(8)
    B, Lq, H, D, S = 2, 2, 2, 64, 12
    q = torch.randn(B, Lq, H, D, generator=gen)
    k_cache, v_cache = torch.randn(B, S, H, D, generator=gen), torch.randn(B, S, H, D, generator=gen)
    k_new, v_new = torch.randn(B, Lq, H, D, generator=gen), torch.randn(B, Lq, H, D, generator=gen)
    seqlens = torch.tensor([3, 10], dtype=torch.int32)
    k_want, v_want = expected_append(k_cache, k_new, seqlens), expected_append(v_cache, v_new, seqlens)
    k_ptr = k_cache.data_ptr()
    out, lse = fastar.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, k_new=k_new, v_new=v_new,
                                             mask=Causal(), return_lse=True)
    assert k_cache.data_ptr() == k_ptr and torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)
    check_attention(out.transpose(1, 2), lse, q.transpose(1, 2), k_want.transpose(1, 2),
                    v_want.transpose(1, 2), dense4(Causal(), Lq, S, B, seqlens + Lq))


def test_kvcache_empty(backend):
    gen = torch.Generator().manual_seed(2)
    B, Lq, H, D, S = 2, 3, 2, 64, 16
    q = torch.randn(B, Lq, H, D, generator=gen)
    k_cache, v_cache = torch.randn(B, S, H, D, generator=gen), torch.randn(B, S, H, D, generator=gen)
    # Nothing cached, nothing appended: every row sees no key.
    for mask in (None, Causal()):
        (out, lse), k_after, _ = backend.attention_with_kvcache(
            q, k_cache, v_cache, cache_seqlens=torch.zeros(B, dtype=torch.int32), mask=mask, return_lse=True
        )
        assert torch.equal(out, torch.zeros_like(out)) and torch.all(lse == -math.inf)
        assert torch.equal(k_after, k_cache)
    # Nothing cached, Lq tokens appended: plain attention over the new tokens.
    k_new, v_new = torch.randn(B, Lq, H, D, generator=gen), torch.randn(B, Lq, H, D, generator=gen)
    (out, lse), _, _ = backend.attention_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=0, k_new=k_new, v_new=v_new, mask=Causal(), return_lse=True
    )
    alone, alone_lse = backend.attention(
        q.transpose(1, 2), k_new.transpose(1, 2), v_new.transpose(1, 2), mask=Causal(), return_lse=True
    )
    assert_same(out.transpose(1, 2), alone, "empty cache + k_new vs attention over the new tokens")
    torch.testing.assert_close(lse, alone_lse, rtol=1e-5, atol=1e-5)
    check_attention(alone, alone_lse, q.transpose(1, 2), k_new.transpose(1, 2), v_new.transpose(1, 2),
                    torch.ones(Lq, Lq, dtype=torch.bool).tril())


def test_kvcache_int_seqlens_and_no_mask(backend):
    """cache_seqlens as an int; no mask = every cached key visible (decode)."""
    gen = torch.Generator().manual_seed(4)
    B, H, D, S = 2, 4, 96, 33
    q = torch.randn(B, 1, H, D, generator=gen)
    k_cache, v_cache = torch.randn(B, S, H, D, generator=gen), torch.randn(B, S, H, D, generator=gen)
    (out, lse), _, _ = backend.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=20, return_lse=True)
    check_attention(out.transpose(1, 2), lse, q.transpose(1, 2), k_cache[:, :20].transpose(1, 2),
                    v_cache[:, :20].transpose(1, 2))


def test_edge_shapes(backend):
    """Empty batch / queries / keys, a strided head dim, k_new of another length than q."""
    gen = torch.Generator().manual_seed(12)
    out, lse = backend.attention(torch.randn(1, 2, 3, 64), torch.randn(1, 2, 0, 64), torch.randn(1, 2, 0, 64),
                                 return_lse=True)
    assert torch.equal(out, torch.zeros(1, 2, 3, 64)) and torch.all(lse == -math.inf)
    out, lse = backend.attention(torch.randn(1, 2, 0, 64), torch.randn(1, 2, 4, 64), torch.randn(1, 2, 4, 64),
                                 mask=Causal(), return_lse=True)
    assert out.shape == (1, 2, 0, 64) and lse.shape == (1, 2, 0)
    out = backend.attention(torch.randn(0, 2, 3, 64), torch.randn(0, 2, 4, 64), torch.randn(0, 2, 4, 64))
    assert out.shape == (0, 2, 3, 64)
    # A head dim with stride 2: the op takes a unit-stride copy.
    q = torch.randn(2, 2, 5, 128, generator=gen)[..., ::2]
    k, v = torch.randn(2, 1, 9, 128, generator=gen)[..., ::2], torch.randn(2, 1, 9, 64, generator=gen)
    out, lse = backend.attention(q, k, v, mask=Causal(), return_lse=True)
    check_attention(out, lse, q, k, v, torch.ones(5, 9, dtype=torch.bool).tril(4))
    # One query appending three new tokens (k_new need not be as long as q).
    q = torch.randn(2, 1, 4, 64, generator=gen)
    k_cache, v_cache = torch.randn(2, 20, 2, 64, generator=gen), torch.randn(2, 20, 2, 64, generator=gen)
    k_new, v_new = torch.randn(2, 3, 2, 64, generator=gen), torch.randn(2, 3, 2, 64, generator=gen)
    seqlens = torch.tensor([4, 9], dtype=torch.int32)
    (out, lse), k_after, v_after = backend.attention_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=seqlens, k_new=k_new, v_new=v_new, mask=Causal(), return_lse=True
    )
    assert torch.equal(k_after, expected_append(k_cache, k_new, seqlens))
    dense = dense4(Causal(), 1, 20, 2, seqlens + 3)
    check_attention(out.transpose(1, 2), lse, q.transpose(1, 2), k_after.transpose(1, 2),
                    v_after.transpose(1, 2), dense)


def test_kvcache_errors(backend):
    B, Lq, H, D, S = 2, 3, 2, 64, 8
    q = torch.randn(B, Lq, H, D)
    k_cache, v_cache = torch.randn(B, S, H, D), torch.randn(B, S, H, D)
    k_new, v_new = torch.randn(B, Lq, H, D), torch.randn(B, Lq, H, D)
    with pytest.raises(ValueError, match="overflows"):
        backend.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=S - Lq + 1, k_new=k_new, v_new=v_new)
    gen = torch.Generator().manual_seed(0)
    block_table, total = paged_layout(B, S // 4, gen)
    pages = to_paged(k_cache, block_table, total, gen)

    def paged_append(seqlens):
        k_pages, v_pages = pages.clone(), pages.clone()
        out = backend.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=torch.tensor(seqlens), k_new=k_new,
                                             v_new=v_new, block_table=block_table)
        return out[0], out[1], out[2]

    with pytest.raises(ValueError):  # kv_lens > capacity, as an int
        backend.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=S + 1)
    if backend.name == "cuda":
        # Device lengths are not read on the host: they are clamped into [0, capacity - Lnew] (the docstring).
        for got, want in zip(paged_append([0, S - 1]), paged_append([0, S - Lq])):
            assert torch.equal(got, want), "a device length past the capacity is clamped"
        bad = backend.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([-1, 2]))
        assert torch.equal(bad[0], backend.attention_with_kvcache(q, k_cache, v_cache,
                                                                  cache_seqlens=torch.tensor([0, 2]))[0])
    else:
        with pytest.raises(ValueError, match="overflows"):
            paged_append([0, S - 1])
        with pytest.raises(ValueError):  # negative length
            backend.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="k_new"):
        backend.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=0, k_new=k_new)
    with pytest.raises(ValueError, match="k_new"):
        backend.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=0, k_new=k_new[..., :32],
                                       v_new=v_new[..., :32])
    with pytest.raises(ValueError, match="k_new"):
        backend.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=0, k_new=k_new[:1], v_new=v_new[:1])
    with pytest.raises(ValueError, match="cache_seqlens"):
        backend.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.zeros(B + 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="4-D"):
        backend.attention_with_kvcache(q[0], k_cache, v_cache, cache_seqlens=0)
    with pytest.raises(ValueError, match="4-D"):
        backend.attention_with_kvcache(q, k_cache[0], v_cache, cache_seqlens=0)
    with pytest.raises(ValueError):  # the cache's head dim differs from q's
        backend.attention_with_kvcache(q, k_cache[..., :32], v_cache[..., :32], cache_seqlens=1)
    with pytest.raises(ValueError, match="Tree"):  # a tree of 4 nodes for 3 queries
        backend.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=4, mask=Tree([-1, 0, 1, 2]))


# ---------------------------------------------------------------------------------------------------------
# 4. The SDPA drop-in


def sdpa_mask(kind, B, H, Lq, Lk, dtype, gen):
    """(attn_mask, is_causal) for a case of the argument grid."""
    if kind == "none":
        return None, False
    if kind == "is_causal":
        return None, True
    if kind.startswith("bool"):
        shape = {"bool_2d": (Lq, Lk), "bool_b1": (B, 1, Lq, Lk), "bool_bh": (B, H, Lq, Lk), "bool_keys": (B, 1, 1, Lk),
                 "bool_3d": (H, Lq, Lk), "bool_dead_rows": (B, 1, Lq, Lk)}[kind]
        mask = torch.rand(shape, generator=gen) < 0.7
        if kind == "bool_dead_rows":
            mask[:, :, ::3] = False
        return mask, False
    shape = {"float_2d": (Lq, Lk), "float_b1": (B, 1, Lq, Lk), "float_bh": (B, H, Lq, Lk), "float_1h": (1, H, Lq, Lk),
             "float_dead_rows": (B, H, Lq, Lk)}[kind]
    bias = torch.randn(shape, generator=gen) * 2
    bias = bias.masked_fill(torch.rand(shape, generator=gen) < 0.25, float("-inf"))
    if kind == "float_dead_rows":
        bias[:, :, ::4] = float("-inf")
    return bias.to(dtype), False


SDPA_KINDS = ["none", "is_causal", "bool_2d", "bool_b1", "bool_bh", "bool_keys", "bool_3d", "bool_dead_rows",
              "float_2d", "float_b1", "float_bh", "float_1h", "float_dead_rows"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Lq,Lk", [(9, 70), (70, 9), (1, 33)])
@pytest.mark.parametrize("kind", SDPA_KINDS)
def test_sdpa_matches_torch(backend, no_fallback, kind, Lq, Lk, dtype):
    if backend.name == "simt":
        Lq = min(Lq, 40)
    gen = torch.Generator().manual_seed(SDPA_KINDS.index(kind) * 10000 + Lq * 100 + Lk)
    B, H = 2, 4
    # Half the grid uses GQA (enable_gqa, 2 kv heads) and an explicit scale.
    gqa = (SDPA_KINDS.index(kind) + Lq) % 2 == 1
    Hkv, scale = (2, 0.2) if gqa else (H, None)
    D = 64 if dtype == torch.float32 else 80
    q = make((B, H, Lq, D), dtype, gen, "transposed")
    k, v = make((B, Hkv, Lk, D), dtype, gen), make((B, Hkv, Lk, D), dtype, gen)
    attn_mask, is_causal = sdpa_mask(kind, B, H, Lq, Lk, dtype, gen)
    out = backend.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                               enable_gqa=gqa)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=gqa)
    assert out.shape == want.shape and out.dtype == want.dtype
    # The float64 reference with SDPA's conventions: top-left is_causal, bool True = attend, float added.
    dense = bias = None
    if is_causal:
        dense = torch.ones(Lq, Lk, dtype=torch.bool).tril()
    elif attn_mask is not None and attn_mask.dtype == torch.bool:
        dense = attn_mask
    elif attn_mask is not None:
        bias = attn_mask
    ref, ref_lse = attention_reference(q.double(), k.double(), v.double(), mask=dense,
                                       bias=None if bias is None else bias.double(), scale=scale)
    dead = (ref_lse == -math.inf).unsqueeze(-1).expand_as(out)
    if "dead" in kind:
        assert dead.any()
    assert torch.all(out[dead] == 0) and torch.all(want[dead] == 0), "fully masked rows give 0 in both"
    assert not out.isnan().any()
    if dtype == torch.float32:
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()))
    assert_output_close(out, ref, q, k, v, dense, bias, scale, what=f"SDPA {kind}")


def test_sdpa_is_causal_is_top_left(backend, no_fallback):
    """SDPA's is_causal is top-left aligned, unlike the mask objects' bottom-right Causal()."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = make((1, 2, 4, 64), torch.float32, gen), make((1, 2, 10, 64), torch.float32, gen), \
        make((1, 2, 10, 64), torch.float32, gen)
    top_left = backend.scaled_dot_product_attention(q, k, v, is_causal=True)
    explicit = backend.attention(q, k, v, mask=Dense(torch.ones(4, 10, dtype=torch.bool).tril()))
    bottom_right = backend.attention(q, k, v, mask=Causal())
    assert_same(top_left, explicit, "is_causal vs Dense(top-left tril)")
    assert (top_left - bottom_right).abs().max() > 0.1


@pytest.fixture
def fresh_warnings(monkeypatch):
    """An empty warn-once set, so that this test's first fallback warns."""
    monkeypatch.setattr(masked_attention, "_warned", set())


def fallback_warnings(record):
    return [w for w in record if issubclass(w.category, UserWarning) and "falls back" in str(w.message)]


def _qkv(shape_q, shape_kv, dtype=torch.float32, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(shape_q, generator=gen).to(dtype)
    k = torch.randn(shape_kv, generator=gen).to(dtype)
    v = torch.randn(shape_kv, generator=gen).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


@pytest.mark.parametrize(
    "case", ["dropout", "float64", "3d", "mask_and_is_causal_error"],
)
def test_sdpa_fallbacks_warn_once_and_match_torch(fresh_warnings, case):
    q, k, v = _qkv((2, 3, 5, 16), (2, 3, 7, 16))
    kwargs = {}
    if case == "dropout":
        kwargs = dict(dropout_p=0.5)
    elif case == "float64":
        q, k, v = q.double(), k.double(), v.double()
    elif case == "3d":
        q, k, v = q[0], k[0], v[0]
    else:  # PyTorch rejects attn_mask with is_causal: so must the drop-in (through the fallback)
        kwargs = dict(attn_mask=torch.ones(5, 7, dtype=torch.bool), is_causal=True)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            with pytest.raises(RuntimeError):
                fastar.scaled_dot_product_attention(q, k, v, **kwargs)
        assert len(fallback_warnings(record)) == 1
        with pytest.raises(RuntimeError):
            F.scaled_dot_product_attention(q, k, v, **kwargs)
        return
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="falls back to PyTorch's"):
        out = fastar.scaled_dot_product_attention(q, k, v, **kwargs)
    torch.manual_seed(1)
    want = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert out.dtype == want.dtype and torch.equal(out, want)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fastar.scaled_dot_product_attention(q, k, v, **kwargs)
    assert fallback_warnings(record) == [], "the fallback warning is emitted once"


def test_sdpa_requires_grad_falls_back_with_gradients(fresh_warnings, monkeypatch):
    mask = torch.rand(5, 7, generator=torch.Generator().manual_seed(1)) < 0.8
    q, k, v = _qkv((2, 4, 5, 16), (2, 2, 7, 16), requires_grad=True)
    with pytest.warns(UserWarning, match="requires grad"):
        out = fastar.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    want = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=mask, enable_gqa=True)
    want_grads = torch.autograd.grad(want.square().sum(), (q2, k2, v2))
    torch.testing.assert_close(out, want)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)
    # Under no_grad the same tensors take fastar's kernels.
    calls = []
    run = masked_attention._run
    monkeypatch.setattr(masked_attention, "_run", lambda *a, **kw: calls.append(1) or run(*a, **kw))
    with torch.no_grad(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = fastar.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert calls == [1] and fallback_warnings(record) == []
    torch.testing.assert_close(out, want.detach(), rtol=1e-5, atol=1e-5)


def test_patch_sdpa(monkeypatch):
    original = F.scaled_dot_product_attention
    calls = []
    run = masked_attention._run
    monkeypatch.setattr(masked_attention, "_run", lambda *a, **kw: calls.append(1) or run(*a, **kw))
    q, k, v = _qkv((1, 2, 6, 32), (1, 2, 6, 32))
    with fastar.patch_sdpa():
        assert torch.nn.functional.scaled_dot_product_attention is fastar.scaled_dot_product_attention
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert calls == [1]
    assert torch.nn.functional.scaled_dot_product_attention is original
    torch.testing.assert_close(out, original(q, k, v, is_causal=True), rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError):
        with fastar.patch_sdpa():
            assert torch.nn.functional.scaled_dot_product_attention is not original
            raise KeyError("boom")
    assert torch.nn.functional.scaled_dot_product_attention is original


# ---------------------------------------------------------------------------------------------------------
# 5. Bad input


def test_bad_input(backend):
    q, k, v = _qkv((2, 4, 5, 64), (2, 2, 9, 64))
    with pytest.raises(ValueError, match="4-D"):
        backend.attention(q[0], k, v)
    with pytest.raises(ValueError, match="4-D"):
        backend.attention(q, k.unsqueeze(0), v)
    with pytest.raises(TypeError, match="tensor"):
        fastar.attention(q, k.tolist(), v)
    with pytest.raises(TypeError, match="dtype"):
        backend.attention(q, k.half(), v)
    with pytest.raises(TypeError, match="dtype"):
        backend.attention(q.half(), k.half(), v.bfloat16())
    with pytest.raises(TypeError, match="float32"):
        backend.attention(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="multiple"):  # Hq % Hkv != 0
        backend.attention(q[:, :3], k, v)
    with pytest.raises(ValueError, match="head dim"):
        backend.attention(q, k[..., :32], v[..., :32])
    with pytest.raises(ValueError, match="head dim"):
        backend.attention(q, k, v[..., :32])
    with pytest.raises(ValueError):  # k and v lengths differ
        backend.attention(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="batch"):
        backend.attention(q, k[:1], v[:1])
    with pytest.raises(TypeError, match="Dense"):
        backend.attention(q, k, v, mask=torch.ones(5, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="Dense"):
        backend.attention(q, k, v, mask="causal")
    with pytest.raises(ValueError, match="Lq"):  # a tree of 3 nodes for 5 queries
        backend.attention(q, k, v, mask=Tree([-1, 0, 0]))
    with pytest.raises(ValueError):  # a dense mask of the wrong shape
        backend.attention(q, k, v, mask=Dense(torch.ones(5, 8, dtype=torch.bool)))
    with pytest.raises(ValueError):  # block ids for the wrong number of keys
        backend.attention(q, k, v, mask=BlockCausal([0] * 8))
    with pytest.raises(ValueError):  # a mask for 3 sequences, a batch of 2
        backend.attention(q, k, v, mask=Dense(torch.ones(3, 5, 9, dtype=torch.bool)))


def test_bad_block_table(backend):
    if backend.name == "cuda":
        pytest.skip("page indices are validated on the host for CPU tensors only")
    q = torch.randn(1, 2, 2, 64)
    pages = torch.randn(4, 3, 2, 64)
    for bad in ([[0, 4]], [[-1, 1]]):
        with pytest.raises(IndexError, match="page"):
            backend.attention_with_kvcache(q, pages, pages, cache_seqlens=2, block_table=torch.tensor(bad))


# ---------------------------------------------------------------------------------------------------------
# 6. torch.compile


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def fn(q, k, v, mask):
        a, lse = fastar.attention(q, k, v, mask=Causal(), return_lse=True)
        b = fastar.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return a * 2, lse, b + 1

    gen = torch.Generator().manual_seed(0)
    q, k, v = make((2, 4, 7, 64), torch.float32, gen), make((2, 2, 19, 64), torch.float32, gen), \
        make((2, 2, 19, 64), torch.float32, gen)
    mask = torch.rand(2, 1, 7, 19, generator=gen) < 0.8
    compiled = torch.compile(fn, fullgraph=True)
    got = compiled(q, k, v, mask)
    want = fn(q, k, v, mask)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(got[2] - 1, ref, rtol=1e-5, atol=1e-5)


def test_torch_compile_out_in_place():
    """Under torch.compile(fullgraph=True), out= (a graph input, and a view of one) is written in place, as
    in eager mode."""
    torch._dynamo.reset()

    def fn(q, k, v, out, buffer):
        fastar.attention(q, k, v, mask=Causal(), out=out)
        _, lse = fastar.attention(q, k, v, out=buffer.transpose(1, 2), return_lse=True)
        return lse

    gen = torch.Generator().manual_seed(2)
    q, k, v = (make(shape, torch.float32, gen) for shape in ((2, 4, 7, 32), (2, 2, 19, 32), (2, 2, 19, 32)))
    compiled = torch.compile(fn, fullgraph=True)
    out, buffer = torch.full_like(q, float("nan")), torch.full((2, 7, 4, 32), float("nan"))
    lse = compiled(q, k, v, out, buffer)
    torch.testing.assert_close(out, fastar.attention(q, k, v, mask=Causal()), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(buffer.transpose(1, 2), fastar.attention(q, k, v), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, fastar.attention(q, k, v, return_lse=True)[1], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# 7. return_lse and out=


def test_return_lse_and_out(backend):
    gen = torch.Generator().manual_seed(9)
    q, k, v = make((2, 4, 6, 64), torch.float16, gen), make((2, 2, 20, 64), torch.float16, gen), \
        make((2, 2, 20, 64), torch.float16, gen)
    q, k, v = backend.to(q), backend.to(k), backend.to(v)
    with backend.using_ops():
        plain = fastar.attention(q, k, v, mask=Causal())
        assert isinstance(plain, torch.Tensor)
        pair = fastar.attention(q, k, v, mask=Causal(), return_lse=True)
        assert isinstance(pair, tuple) and len(pair) == 2
        out, lse = pair
        assert torch.equal(out, plain)
        assert lse.dtype == torch.float32 and lse.shape == (2, 4, 6)
        # out=: written in place (also a non-contiguous view) and returned as is.
        buffer = torch.full((2, 6, 4, 64), float("nan"), dtype=torch.float16, device=q.device)
        target = buffer.transpose(1, 2)
        result = fastar.attention(q, k, v, mask=Causal(), out=target)
        assert result is target and torch.equal(target, plain)
        result, lse2 = fastar.attention(q, k, v, mask=Causal(), return_lse=True, out=buffer.transpose(1, 2).zero_())
    assert result.data_ptr() == buffer.data_ptr() and torch.equal(result, plain) and torch.equal(lse2, lse)
    check_attention(plain.cpu(), lse.cpu(), q.cpu(), k.cpu(), v.cpu(),
                    torch.ones(6, 20, dtype=torch.bool).tril(14))


def test_out_poisoned_planned_and_grouped(backend):
    """Every row of a NaN-poisoned out= is written when the CPU kernel plans the keys once for the batch (a
    shared mask, B x Hkv > 1) and keeps them per 16-query group (one query head per kv head, 70 queries):
    the causal diagonal and a window's tiles are partial, so both the whole-tile and the grouped steps run."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = (make(shape, torch.float32, gen) for shape in ((2, 3, 70, 64), (2, 3, 90, 64), (2, 3, 90, 64)))
    q, k, v = backend.to(q), backend.to(k), backend.to(v)
    for mask, dense in ((Causal(), torch.ones(70, 90, dtype=torch.bool).tril(20)),
                        (Window(37, sinks=3), Window(37, sinks=3).materialize(70, 90))):
        out = torch.full((2, 3, 70, 64), float("nan"), device=q.device)
        with backend.using_ops():
            result, lse = fastar.attention(q, k, v, mask=mask, return_lse=True, out=out)
        assert result is out and not out.isnan().any()
        check_attention(out.cpu(), lse.cpu(), q.cpu(), k.cpu(), v.cpu(), dense.cpu(), what=type(mask).__name__)


def _run_counting_copies(fn):
    """fn() under the profiler: its result and the number of aten::copy_ calls it made (Python or C++)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, sum(e.name == "aten::copy_" for e in prof.events())


def test_out_is_written_in_place(backend):
    """out= is the kernel's own output: the same storage, no temporary copied into it, every element of a
    NaN-poisoned out written, for a contiguous out and a transposed view (unit stride along D)."""
    gen = torch.Generator().manual_seed(21)
    q, k, v = (make(shape, torch.float16, gen) for shape in ((2, 4, 9, 64), (2, 2, 30, 64), (2, 2, 30, 64)))
    dq, dk, dv = backend.to(q), backend.to(k), backend.to(v)
    mask = Window(11, sinks=2)
    for shape, view in (((2, 4, 9, 64), lambda t: t), ((2, 9, 4, 64), lambda t: t.transpose(1, 2))):
        buffer = torch.full(shape, float("nan"), dtype=torch.float16, device=backend.device)
        out = view(buffer)
        with backend.using_ops():
            (result, lse), copies = _run_counting_copies(
                functools.partial(fastar.attention, dq, dk, dv, mask=mask, return_lse=True, out=out)
            )
        assert result is out and out.data_ptr() == buffer.data_ptr()
        assert copies == 0, f"out {tuple(out.stride())}: {copies} copies"
        check_attention(out.cpu(), lse.cpu(), q, k, v, mask.materialize(9, 30), what=f"out {tuple(out.stride())}")


def test_out_with_a_non_unit_last_stride(backend):
    """An out whose D elements are not adjacent (one column of a wider buffer) gets the kernel's result
    through one temporary; the buffer's other column stays as it was."""
    gen = torch.Generator().manual_seed(22)
    q, k, v = (make(shape, torch.float32, gen) for shape in ((2, 4, 9, 32), (2, 2, 30, 32), (2, 2, 30, 32)))
    buffer = torch.full((2, 4, 9, 32, 2), float("nan"), device=backend.device)
    out = buffer[..., 1]
    dq, dk, dv = backend.to(q), backend.to(k), backend.to(v)
    with backend.using_ops():
        (result, lse), copies = _run_counting_copies(
            functools.partial(fastar.attention, dq, dk, dv, mask=Causal(), return_lse=True, out=out)
        )
    assert result is out and copies == 1
    assert buffer[..., 0].isnan().all()
    check_attention(out.cpu(), lse.cpu(), q, k, v, Causal().materialize(9, 30))


def test_out_sharing_memory_with_an_input(backend):
    """out must not share memory with an input: a ValueError naming it where it surely does (the same view, or
    dense tensors whose bytes meet) or for an out with repeated elements; where ATen cannot tell (strided views
    of one buffer) the kernel writes a temporary, so the inputs are read before out is written."""
    gen = torch.Generator().manual_seed(23)
    shape = (2, 2, 8, 32)
    n = math.prod(shape)
    flat = backend.to(torch.randn(2 * n + 32, generator=gen))
    q, k = flat[:n].view(shape), flat[n : 2 * n].view(shape)
    v = backend.to(torch.randn(shape, generator=gen))
    # The same views, then dense views whose bytes meet those of q (and k), and of k.
    for name, out in (("q", q), ("k", k), ("v", v), ("q", flat[32 : n + 32].view(shape)),
                      ("k", flat[n + 8 : 2 * n + 8].view(shape))):
        with pytest.raises(ValueError, match=f"out shares memory with {name}"):
            backend.attention(q, k, v, out=out)
    with pytest.raises(ValueError, match="out has elements that share memory"):
        backend.attention(q, k, v, out=torch.empty_like(q[:1]).expand(shape))
    with pytest.raises(TypeError, match="dtype"):
        backend.attention(q, k, v, out=torch.empty_like(q, dtype=torch.float16))

    # q and out: interleaved halves of one buffer's rows; out overwrites q's columns only after the kernel.
    wide = backend.to(torch.randn(2, 2, 8, 64, generator=gen))
    q_half, out = wide[..., :32], wide[..., 32:]
    q_before = q_half.cpu().clone()
    with backend.using_ops():
        result, lse = fastar.attention(q_half, k, v, mask=Causal(), return_lse=True, out=out)
    assert result is out and torch.equal(q_half.cpu(), q_before)
    check_attention(out.cpu(), lse.cpu(), q_before, k.cpu(), v.cpu(), Causal().materialize(8, 8))


def test_out_of_wrong_shape_is_rejected():
    """out must be [B, Hq, Lq, D]: a larger tensor must not be filled by broadcasting."""
    q, k, v = _qkv((2, 4, 6, 64), (2, 2, 20, 64))
    for shape in ((3, 2, 4, 6, 64), (2, 4, 6, 1, 64)):
        out = torch.zeros(shape)
        with pytest.raises((ValueError, RuntimeError)):
            fastar.attention(q, k, v, out=out)


@pytest.mark.parametrize("Lq", [1, 5, 50])
def test_mask_terms_at_the_int_limits(backend, Lq):
    """A window wider than int64 arithmetic around it (left = 2^63 - 1: every earlier key; with Lq > Lk the
    first queries' diagonals are negative) and block ids at the bottom of int32 (relation "prev": id - 1
    must not wrap) follow their definitions."""
    gen = torch.Generator().manual_seed(Lq)
    Lk = 40
    q, k, v = make((1, 2, Lq, 32), torch.float32, gen), make((1, 2, Lk, 32), torch.float32, gen), \
        make((1, 2, Lk, 32), torch.float32, gen)
    masks = [Window(2**63 - 1), Window(2**63 - 1, sinks=3)]
    if Lq <= Lk:
        masks += [BlockCausal(torch.full((Lk,), -2**31, dtype=torch.int32), relation="prev"),
                  BlockCausal(torch.tensor([-2**31] * 20 + [-2**31 + 1] * 20, dtype=torch.int32), relation="prev")]
    for mask in masks:
        out, lse = backend.attention(q, k, v, mask=mask, return_lse=True)
        check_attention(out, lse, q, k, v, dense4(mask, Lq, Lk, 1), what=repr(mask)[:40])
