"""The build itself: what it contains, the torch-version guard, opcheck for every op, torch.compile."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastar
from fastar import _loader, _simt

REQUIRE_CUDA_BUILD = os.environ.get("FASTAR_REQUIRE_CUDA_BUILD") == "1"


def test_build_info():
    info = fastar.build_info()
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cpu_isa"], list)
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
    qa, ka, va = torch.randn(2, 4, 3, 16, generator=g), torch.randn(2, 2, 9, 16, generator=g), torch.randn(2, 2, 9, 16, generator=g)
    lens = torch.tensor([9, 4], dtype=torch.int32)
    ids_q, ids_k = torch.tensor([[0, 1, 1]], dtype=torch.int32), torch.tensor([[0, 0, 0, 0, 0, 0, 0, 1, 1]], dtype=torch.int32)
    none, causal, block = [0, 1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 1, 0]
    attention = [
        [*to(qa, ka, va, None, None, None, None, None, None), none, 0.25],
        [*to(qa.bfloat16(), ka.bfloat16(), va.bfloat16(), lens, None, None, None, None, None), causal, 0.25],
        [*to(qa, ka, va, None, None, ids_q, ids_k, None, None), block, 0.25],
    ]
    return {
        "speculative_sample": [to(ids, q, p, None, seed, offset), to(ids, None, p.half(), nd, seed, offset)],
        "greedy_verify": [to(ids, p, None), to(ids.int(), p.bfloat16(), nd)],
        "attention": attention,
    }


def _op_names(namespace):
    return sorted(
        name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith(f"{namespace}::")
    )


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
        for args in samples[name]:
            torch.library.opcheck(op, args)


def test_public_api_compiles_without_graph_breaks():
    B, n, V = 2, 3, 11
    p = torch.softmax(torch.randn(B, n + 1, V), -1)
    q = torch.softmax(torch.randn(B, n, V), -1)
    ids = torch.randint(0, V, (B, n))

    def step(ids, q, p, seed, offset):
        tokens, accepted = fastar.speculative_sample(ids, q, p, seed=seed, offset=offset)
        greedy, _ = fastar.greedy_verify(ids, p)
        return tokens, accepted, greedy

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    seed, offset = torch.tensor(7), torch.tensor(0)
    for got, want in zip(compiled(ids, q, p, seed, offset), step(ids, q, p, seed, offset)):
        assert torch.equal(got, want)

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
