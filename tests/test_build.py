"""The build itself: what it contains, the torch-version guard, opcheck for every op, torch.compile."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastar
from fastar import _loader, _simt

REQUIRE_CUDA_BUILD = os.environ.get("FASTAR_REQUIRE_CUDA_BUILD") == "1"


def test_build_info():
    info = fastar.build_info()
    assert info["torch_version"] == torch.__version__
    assert info["cpu_isa"] in info["cpu_isas_supported"]
    if info["cuda"]:
        assert info["cuda_version"] == torch.version.cuda
        assert info["cuda_archs"]
    if REQUIRE_CUDA_BUILD:  # CI sets this where nvcc exists: a silent CPU-only build must not pass
        assert info["cuda"], "nvcc is on this machine but fastar was built without its CUDA kernels"
        assert info["simt"], "nvcc is on this machine but the SIMT emulation build is missing"


def test_torch_version_guard_message():
    with pytest.raises(ImportError, match="Rebuild fastar"):
        _loader.check_torch_version("2.0.0", torch.__version__)
    _loader.check_torch_version(torch.__version__, torch.__version__)


def test_import_with_another_torch_says_how_to_rebuild():
    code = "import torch; torch.__version__ = '0.0.1'; import fastar"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "built against torch" in proc.stderr and "pip install --no-build-isolation" in proc.stderr
    assert "undefined symbol" not in proc.stderr


def _acceptance_samples(device):
    g = torch.Generator().manual_seed(0)
    B, n, V = 3, 4, 37
    p = torch.softmax(torch.randn(B, n + 1, V, generator=g), -1)
    q = torch.softmax(torch.randn(B, n, V, generator=g), -1)
    ids = torch.randint(0, V, (B, n), generator=g)
    nd = torch.tensor([4, 0, 2], dtype=torch.int32)
    seed, offset = torch.tensor(5), torch.tensor(1)
    to = lambda *ts: [t.to(device) if t is not None else None for t in ts]  # noqa: E731
    qa, ka, va = (torch.randn(shape, generator=g) for shape in ((2, 4, 3, 16), (2, 2, 9, 16), (2, 2, 9, 16)))
    lens = torch.tensor([9, 4], dtype=torch.int32)
    ids_q = torch.tensor([[0, 1, 1]], dtype=torch.int32)
    ids_k = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 1, 1]], dtype=torch.int32)
    # (args, kwargs): out is written in place, also a transposed view and one with a non-unit last stride.
    out = lambda q: torch.empty(q.shape, dtype=q.dtype, device=device)  # noqa: E731
    transposed = lambda q: out(q.transpose(1, 2)).transpose(1, 2)  # noqa: E731
    strided = lambda q: torch.empty(*q.shape, 2, dtype=q.dtype, device=device)[..., 0]  # noqa: E731
    # Quantized k and v: int8 codes with one scale per key row, fp8 with one per kv head.
    codes8 = torch.randint(-127, 128, (2, 2, 9, 16), generator=g).to(torch.int8)
    row_scales = torch.rand(2, 2, 9, generator=g) + 0.01
    attention = [
        ([*to(qa, ka, va), out(qa), 0.25], {}),
        ([*to(qa, codes8, codes8), out(qa), 0.25],
         dict(kv_lens=to(lens)[0], causal=True, k_scale=to(row_scales)[0], v_scale=to(row_scales * 2)[0])),
        ([*to(qa, ka.to(torch.float8_e5m2), va.to(torch.float8_e5m2)), out(qa), 0.25],
         dict(k_scale=to(torch.rand(1, 2, 1, generator=g))[0], v_scale=to(torch.ones(()))[0])),
        ([*to(qa.bfloat16(), ka.bfloat16(), va.bfloat16()), transposed(qa.bfloat16()), 0.25],
         dict(kv_lens=to(lens)[0], causal=True)),
        ([*to(qa, ka, va), strided(qa), 0.25],
         dict(block_relation="causal", q_block_ids=to(ids_q)[0], k_block_ids=to(ids_k)[0])),
    ]
    # scale_attention over scales (1, 2, 3) (14 tokens): causal with a window, "same" for the last 5 queries
    # with qk_norm in bfloat16, and no mask (a cached step).
    layout = fastar.ScaleLayout((1, 2, 3), local_window=0)
    info, hw = layout.token_info(), layout.scale_hw()
    qs, ks, vs = (torch.randn(shape, generator=g) for shape in ((2, 4, 14, 16), (2, 2, 14, 16), (2, 2, 14, 16)))
    bf = lambda *ts: [t.bfloat16() for t in ts]  # noqa: E731
    q_same = qs[:, :, 9:].bfloat16()
    scale_attention = [
        ([*to(qs, ks, vs), out(qs), 0.25],
         dict(zip(("token_info", "scale_hw", "tile_map"), to(info, hw, layout.tile_map())), relation="causal",
              local_window=0)),
        ([*to(q_same, *bf(ks, vs)), strided(q_same), 1.0],
         dict(token_info=to(info)[0], tile_map=to(layout.tile_map(q_offset=9))[0], relation="same", qk_norm=True,
              q_scale=to(torch.rand(4, generator=g) + 1)[0])),
        ([*to(qs[:, :, 5:], ks, vs), out(qs[:, :, 5:]), 0.25], {}),
    ]
    # sample_cfg: VAR's [2B, L, V] with both filters, LlamaGen's [2B, V] in bfloat16 with a constant schedule.
    logits = torch.randn(4, 3, 40, generator=g) * 2
    sample_cfg = [
        [*to(logits), 1.5, "var", 4, 10, 8, 0.9, 1.0, *to(seed, offset)],
        [*to(logits[:, 0].bfloat16()), 4.0, "constant", None, None, 0, 0.8, 0.7, *to(seed, offset)],
    ]
    # quantize_kv_append: int8 into a contiguous cache (slot -1 skipped), fp8 at fixed per-head scales into a paged
    # one.
    kv = torch.randn(3, 2, 16, generator=g)
    slots = torch.tensor([4, -1, 0])
    codes = lambda shape, dtype: torch.zeros(shape, dtype=torch.uint8, device=device).view(dtype)  # noqa: E731
    quantize_kv_append = [
        [*to(kv, kv, slots), codes((5, 2, 16), torch.int8), codes((5, 2, 16), torch.int8),
         *to(torch.zeros(5, 2), torch.zeros(5, 2))],
        [*to(kv.bfloat16(), kv.bfloat16(), slots), codes((2, 3, 2, 16), torch.float8_e4m3fn),
         codes((2, 3, 2, 16), torch.float8_e4m3fn), *to(torch.ones(2), torch.ones(2))],
    ]
    # quantize_kivi_append: int4 with one key group and a skipped value token, int2 from bfloat16 with G = 8.
    kivi = torch.randn(8, 2, 16, generator=g)
    half = lambda *shape: torch.zeros(shape, dtype=torch.float16, device=device)  # noqa: E731
    byte = lambda *shape: torch.zeros(shape, dtype=torch.uint8, device=device)  # noqa: E731
    quantize_kivi_append = [
        [*to(kivi[:4], kivi[:3], torch.tensor([1]), torch.tensor([0, -1, 7])), byte(8, 2, 8), byte(8, 2, 8),
         half(2, 2, 16), half(2, 2, 16), half(8, 2, 4), half(8, 2, 4), 4],
        [*to(kivi.bfloat16(), kivi[:1].bfloat16(), torch.tensor([0]), torch.tensor([3])), byte(8, 2, 4),
         byte(8, 2, 4), half(1, 2, 16), half(1, 2, 16), half(8, 2, 2), half(8, 2, 2), 8],
    ]
    # diffusion_unmask: x [B, L] written in place; top-k counts over a float32 block, the factor rule sampling from
    # bfloat16 logits with the margin confidence after Dream's filters, Dimple's rule on noisy log-probabilities.
    dl = torch.randn(2, 10, 30, generator=g) * 2
    dx = torch.randint(0, 29, (2, 10), generator=g)
    dx[:, 3:9:2] = 29
    diffusion_unmask = [
        [*to(dl), to(dx)[0], to(torch.tensor([2, 5]))[0], 29, 2, 9, "probability", "topk", 0.0, 0.0, 0.0, 0.0, 1.0, 0,
         "logits", *to(seed, offset)],
        [*to(dl.bfloat16()), to(dx)[0], None, 29, 0, 10, "margin", "factor", 0.0, 1.0, 0.8, 0.0, 0.9, 5, "sampling",
         *to(seed, offset)],
        [*to(dl), to(dx)[0], to(torch.tensor([1, 2]))[0], 29, 0, 10, "log_probability", "dimple", -1.5, 0.0, 0.0, 2.0,
         1.0, 0, "logits", *to(seed, offset)],
    ]
    # compact_kv: a bfloat16 contiguous cache with a rooted path, int8 codes in a paged one with a drafted path.
    paths = torch.tensor([[0, 2, 3], [0, 1, -1]], dtype=torch.int32)
    compact_kv = [
        [*to(torch.randn(2, 9, 2, 16, generator=g).bfloat16(), torch.randn(2, 9, 2, 16, generator=g).bfloat16(),
             paths, torch.tensor([2, 1], dtype=torch.int32), torch.tensor([3, 0], dtype=torch.int32)), None, 5, True],
        [*to(codes((5, 4, 2, 16), torch.int8), codes((5, 4, 2, 16), torch.int8), torch.tensor([[1, 2, 4], [0, 1, -1]],
             dtype=torch.int32), torch.tensor([3, 2], dtype=torch.int32), torch.tensor([6, 1], dtype=torch.int32),
             torch.tensor([[4, 0, 1], [2, 3, 0]], dtype=torch.int32)), 5, False],
        [*to(torch.randn(3, 2, 9, 2, 8, generator=g), torch.randn(3, 2, 9, 2, 8, generator=g), paths,
             torch.tensor([2, 1], dtype=torch.int32), torch.tensor([3, 0], dtype=torch.int32)), None, 5, True, True],
    ]
    return {
        "compact_kv": compact_kv,
        "diffusion_unmask": diffusion_unmask,
        "quantize_kv_append": quantize_kv_append,
        "quantize_kivi_append": quantize_kivi_append,
        "speculative_sample": [to(ids, q, p, None, seed, offset), to(ids, None, p.half(), nd, seed, offset)],
        # LANTERN on the chain: a neighbour table listing each token's successors (int64, then int32 with itself).
        "lantern_accept": [
            [*to(ids, q, p, (torch.arange(V)[:, None] + torch.arange(1, 4)) % V), 0.2, *to(None, seed, offset)],
            [*to(ids.int(), None, p.bfloat16(), (torch.arange(V)[:, None] + torch.arange(0, 2)).int() % V), 1.0,
             *to(nd, seed, offset)],
        ],
        # GSD: a float32 embedding table, the authors' window (6 above, 7 below), then a narrow one without q.
        "gsd_accept": [
            [*to(ids, q, p, torch.randn(V, 8, generator=g)), 6, 7, 0.15, 0.5, *to(None, seed, offset)],
            [*to(ids.int(), None, p.bfloat16(), torch.randn(V, 3, generator=g)), 1, 2, 0.05, float("inf"),
             *to(nd, seed, offset)],
        ],
        "sjd_accept": [to(ids, q, p, None, seed, offset), to(ids.int(), None, p.half(), nd, seed, offset)],
        # SpecTr: k = 2 drafts of length 2 (float32, int64 ids), k = 3 of length 1 from bfloat16 rows (int32 ids).
        "spectr_accept": [
            to(ids[:, :4].reshape(B, 2, 2), q[:, :4].reshape(B, 2, 2, V), p[:, :3].repeat(1, 2, 1).reshape(B, 2, 3, V),
               seed, offset),
            to(ids[:, :3].reshape(B, 3, 1).int(), q[:, :3].reshape(B, 3, 1, V).bfloat16(),
               p[:, :2].repeat(1, 3, 1).reshape(B, 3, 2, V).bfloat16(), seed, offset),
        ],
        "sample_cfg": sample_cfg,
        "greedy_verify": [to(ids, p), to(ids.int(), p.bfloat16(), nd)],
        # A tree of the drafts: shared parents with draft probabilities, batched parents one-hot with a root node.
        "tree_speculative_sample": [
            [*to(ids, torch.tensor([[-1, 0, 0, 2]]), q, p), 3, False, *to(seed, offset)],
            [*to(ids.int(), torch.tensor([[-1, -1, 1, 2]] * B), None, p.half()), 3, True, *to(seed, offset)],
        ],
        "tree_greedy_verify": [
            [*to(ids, torch.tensor([[-1, 0, 0, 2]]), p), 3, False],
            [*to(ids.int(), torch.tensor([[-1, -1, 1, 2]] * B), p.bfloat16()), 3, True],
        ],
        "typical_accept": [
            [*to(ids, torch.tensor([[-1, 0, 1, 2]]), p.log()), 4, False, 0.09, 0.3, 1.0],
            [*to(ids.int(), torch.tensor([[-1, -1, 1, 2]] * B), p.half()), 3, True, 0.2, 0.5, 0.0],
        ],
        "attention": attention,
        "scale_attention": scale_attention,
    }


def _op_names(namespace):
    """The public ops of a namespace; test-only ops (a leading underscore) have no fake and their own tests."""
    names = (name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith(f"{namespace}::"))
    return sorted(name for name in names if not name.startswith("_"))


FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
DEFAULT_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
OPCHECK_WITHOUT_SCHEMA = DEFAULT_OPCHECK[1:]


def _backends():
    yield "fastar", "cpu"
    try:
        _simt.load()
        yield "fastar_simt", "cpu"
    except ImportError:
        pass
    if torch.cuda.is_available() and fastar.build_info()["cuda"]:
        yield "fastar", "cuda"


@pytest.mark.parametrize("namespace,device", list(_backends()))
def test_opcheck_every_op(namespace, device):
    samples = _acceptance_samples(device)
    names = _op_names(namespace)
    assert names and set(names) <= set(samples), f"ops without opcheck samples: {set(names) - set(samples)}"
    for name in names:
        op = getattr(getattr(torch.ops, namespace), name).default
        if not torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU" if device == "cpu" else "CUDA"):
            continue  # e.g. an op whose CUDA kernel (and so SIMT build) is not written yet
        for sample in samples[name]:
            args, kwargs = sample if isinstance(sample, tuple) else (sample, {})
            if "k_scale" in kwargs and (namespace != "fastar" or device != "cpu"):
                continue  # quantized k and v: the CPU kernels only, so far
            # torch's schema check compares tensors with arithmetic that float8 lacks: the other checks only.
            fp8 = any(isinstance(a, torch.Tensor) and a.dtype in FLOAT8 for a in args)
            torch.library.opcheck(op, args, kwargs, test_utils=OPCHECK_WITHOUT_SCHEMA if fp8 else DEFAULT_OPCHECK)


def test_public_api_compiles_without_graph_breaks():
    B, n, V = 2, 3, 11
    p = torch.softmax(torch.randn(B, n + 1, V), -1)
    q = torch.softmax(torch.randn(B, n, V), -1)
    ids = torch.randint(0, V, (B, n))

    tree = fastar.masks.Tree([-1, 0, 0])
    neighbors = (torch.arange(V)[:, None] + torch.arange(1, 5)) % V
    embeddings = torch.randn(V, 4)

    def step(ids, q, p, seed, offset, k_cache, v_cache):
        tokens, accepted = fastar.speculative_sample(ids, q, p, seed=seed, offset=offset)
        greedy, _ = fastar.greedy_verify(ids, p)
        path, tree_tokens, _ = fastar.tree_speculative_sample(ids, tree, q, p, seed=seed, offset=offset)
        greedy_path, greedy_tokens, greedy_accepted = fastar.tree_greedy_verify(ids, tree, p)
        _, typical_tokens, _ = fastar.typical_accept(ids, p.log())
        _, typical_tree_tokens, _ = fastar.typical_accept(ids, p.log(), tree=tree, temperature=0.7)
        lengths = fastar.compact_kv(k_cache, v_cache, greedy_path, greedy_accepted, torch.tensor([1, 4]), num_nodes=n,
                                    root_in_path=False)
        lantern_tokens, _ = fastar.lantern_accept(ids, q, p, neighbors, delta=0.3, seed=seed, offset=offset)
        gsd_tokens, _ = fastar.gsd_accept(ids, q, p, embeddings, seed=seed, offset=offset)
        sjd = fastar.sjd_accept(ids, q, p, seed=seed, offset=offset)
        spectr = fastar.spectr_accept(ids[:, None].expand(B, 2, n), q[:, None].expand(B, 2, n, V),
                                      p[:, None].expand(B, 2, n + 1, V), seed=seed, offset=offset)
        return (tokens, accepted, greedy, path, tree_tokens, greedy_path, greedy_tokens, typical_tokens,
                typical_tree_tokens, lengths, lantern_tokens, gsd_tokens, *sjd, *spectr)

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    seed, offset = torch.tensor(7), torch.tensor(0)
    caches = torch.randn(2, B, 8, 2, 4)
    eager_caches = caches.clone()
    for got, want in zip(compiled(ids, q, p, seed, offset, *caches), step(ids, q, p, seed, offset, *eager_caches)):
        assert torch.equal(got, want)
    assert torch.equal(caches, eager_caches)  # compact_kv's in-place moves happen under compile too

    def int_seed(ids, q, p):
        return fastar.speculative_sample(ids, q, p, seed=123, offset=4)

    for got, want in zip(torch.compile(int_seed, fullgraph=True)(ids, q, p), int_seed(ids, q, p)):
        assert torch.equal(got, want)

    def unseeded(ids, q, p):
        return fastar.speculative_sample(ids, q, p)

    tokens, accepted = torch.compile(unseeded, fullgraph=True)(ids, q, p)
    for row, k in zip(tokens.tolist(), accepted.tolist()):
        assert all(0 <= t < V for t in row[: k + 1])
        assert all(t == -1 for t in row[k + 1 :])


def test_sample_cfg_compiles_without_graph_breaks():
    """fastar.sample_cfg under torch.compile(fullgraph=True) with tensor, int and drawn seeds: seeded calls give
    eager mode's tokens (a drawn seed comes from inductor's own random numbers, so only its range is checked)."""
    logits = torch.randn(6, 4, 50)

    def step(logits, seed, offset):
        var = fastar.sample_cfg(logits, cfg=1.5, scale_index=3, num_scales=10, top_k=10, top_p=0.9, seed=seed,
                                offset=offset)
        llamagen = fastar.sample_cfg(logits[:, 0], cfg=4.0, schedule="constant", top_p=0.95, seed=7)
        return var, llamagen, fastar.sample_cfg(logits, cfg=2.0, scale_index=9, num_scales=10, temperature=0.5)

    seed, offset = torch.tensor(3), torch.tensor(5)
    *seeded, unseeded = torch.compile(step, fullgraph=True)(logits, seed, offset)
    for got, want in zip(seeded, step(logits, seed, offset)):
        assert got.dtype == torch.int64 and torch.equal(got, want)
    assert unseeded.shape == (3, 4) and ((unseeded >= 0) & (unseeded < 50)).all()


def test_diffusion_unmask_compiles_without_graph_breaks():
    """fastar.diffusion_unmask and the LLaDA schedule under torch.compile(fullgraph=True): the same commits into x
    and the same outputs as eager mode."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 12, 40, generator=g) * 2
    x = torch.randint(0, 39, (2, 12), generator=g)
    x[:, 4:] = 39

    def step(logits, x, seed):
        counts = fastar.num_transfer_tokens(x[:, 4:8] == 39, 2)
        first = fastar.diffusion_unmask(logits, x, mask_id=39, block_start=4, block_end=8, num_transfer=counts[:, 0])
        second = fastar.diffusion_unmask(logits, x, mask_id=39, block_start=8, block_end=12, threshold=0.1,
                                         confidence="neg_entropy", temperature=0.9, top_p=0.9, top_k=20,
                                         confidence_source="sampling", seed=seed)
        return (*first, *second)

    eager_x, compiled_x = x.clone(), x.clone()
    want = step(logits, eager_x, torch.tensor(3))
    got = torch.compile(step, fullgraph=True)(logits, compiled_x, torch.tensor(3))
    assert torch.equal(compiled_x, eager_x)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dynamic", [False, True])
def test_scale_attention_compiles_without_graph_breaks(dynamic):
    """fastar.scale_attention under torch.compile(fullgraph=True): the layout's tables are built at trace time
    (graph constants), for the whole sequence and its last scale; another query count (and any count under
    dynamic shapes that is not one of those) runs without a tile map. Each result equals eager mode's."""
    torch._dynamo.reset()

    def fn(q, k, v, q_scale, layout):
        full, lse = fastar.scale_attention(q, k, v, layout, qk_norm=True, q_scale=q_scale, return_lse=True)
        last = fastar.scale_attention(q[:, :, layout.starts[-1]:], k, v, layout)
        other = fastar.scale_attention(q[:, :, 3:], k, v, layout, scale=0.3)
        return full * 2, lse, last + 1, other

    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
    g = torch.Generator().manual_seed(0)
    layouts = [
        fastar.ScaleLayout((1, 2, 3, 4), local_window=1),
        fastar.ScaleLayout((1, 2, 3, 4), relation="prev"),
        fastar.ScaleLayout([(1, 2), (2, 2), (2, 3), (3, 3)], relation="same"),
    ]
    for layout in layouts:
        L = layout.num_tokens
        q, k, v = (torch.randn(2, H, L, 64, generator=g) for H in (4, 2, 2))
        q_scale = torch.rand(4, generator=g) + 1
        for got, want in zip(compiled(q, k, v, q_scale, layout), fn(q, k, v, q_scale, layout)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_build_uses_the_installed_torch():
    """`pip install .` (build isolation) must not build against another torch from the build requirements; the
    build stops before CMake with the fix when torch cannot be imported."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parents[1]
    build_system = tomllib.loads((root / "pyproject.toml").read_text())["build-system"]
    assert not any(req.split("=")[0].split(">")[0].split("<")[0].strip() == "torch" for req in build_system["requires"])
    code = (
        "import runpy, sys; sys.modules['torch'] = None; "  # `import torch` raises ImportError
        "sys.argv = ['setup.py', 'build_ext']; "
        "runpy.run_path('setup.py', run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "torch cannot be imported" in proc.stderr and "pip install --no-build-isolation ." in proc.stderr
