"""Helpers shared by the tests."""
from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Dict

import pytest
import torch
from hypothesis import HealthCheck
from scipy import stats

# hypothesis settings of the per-backend property tests: fixed examples (the suite is deterministic),
# no example database, and fixtures (the backend) shared across examples.
HYPOTHESIS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


def assert_same(got, want, msg=""):
    tokens, num_accepted = got
    ref_tokens, ref_num_accepted = want
    assert tokens.dtype == torch.int32 and num_accepted.dtype == torch.int32
    assert tokens.shape == ref_tokens.shape and num_accepted.shape == ref_num_accepted.shape
    if not torch.equal(num_accepted, ref_num_accepted) or not torch.equal(tokens, ref_tokens):
        bad = (tokens != ref_tokens).any(-1) | (num_accepted != ref_num_accepted)
        row = int(torch.nonzero(bad)[0])
        raise AssertionError(
            f"{msg} first differing row {row}: got {tokens[row].tolist()} / {int(num_accepted[row])}, "
            f"reference {ref_tokens[row].tolist()} / {int(ref_num_accepted[row])} "
            f"({int(bad.sum())} of {bad.numel()} rows differ)"
        )


def rows(backend, cpu: int, simt: int) -> int:
    """Number of i.i.d. rows for a statistical test: the emulated CUDA backend is ~1 ms per row."""
    return simt if backend.name == "simt" else cpu


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models' tensors: one torch thread for the module (on a busy machine the pool costs 100x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generate_on(backend, loop, model, prompt, **kw):
    """A diffusion loop (fastar.diffusion.generate or generate_blocks) on the backend's ops and device, the model
    moved there and back; returns (x, model calls) on the CPU."""
    movable = isinstance(model, torch.nn.Module)
    if movable:
        model.to(backend.device)
    try:
        with backend.using_ops():
            x, nfe = loop(model, backend.to(prompt), return_nfe=True, **kw)
    finally:
        if movable:
            model.to("cpu")
    return x.cpu(), nfe


def chisquare_pvalue(observed: Counter, expected: Dict, total: int) -> float:
    """Pearson chi-square of observed outcome counts against exact probabilities; bins with an expected
    count below 5 are merged (and the merged bin into the smallest other bin if it is still below 5 and at least
    two other bins remain)."""
    probs_sum = sum(expected.values())
    assert abs(probs_sum - 1.0) < 1e-6, f"expected probabilities sum to {probs_sum}"
    impossible = [key for key in observed if expected.get(key, 0.0) <= 0.0]
    assert not impossible, f"outcomes with probability 0 were emitted: {impossible[:5]}"
    keys = sorted(expected, key=lambda key: expected[key], reverse=True)
    obs = [observed.get(key, 0) for key in keys]
    exp = [expected[key] * total for key in keys]
    big = [i for i, e in enumerate(exp) if e >= 5]
    small = [i for i, e in enumerate(exp) if e < 5]
    f_obs = [obs[i] for i in big]
    f_exp = [exp[i] for i in big]
    if small:
        f_obs.append(sum(obs[i] for i in small))
        f_exp.append(sum(exp[i] for i in small))
        if f_exp[-1] < 5 and len(f_exp) > 2:
            small_obs, small_exp = f_obs.pop(), f_exp.pop()  # `f[-2] += f.pop()` stores after the pop
            f_obs[-1] += small_obs
            f_exp[-1] += small_exp
    assert len(f_exp) >= 2, "test is degenerate: fewer than two bins"
    scale = sum(f_obs) / sum(f_exp)  # == 1 up to rounding; scipy insists on equal sums
    return float(stats.chisquare(f_obs, [e * scale for e in f_exp]).pvalue)


def cuobjdump() -> str | None:
    """nvcc's cuobjdump, or the copy the triton wheel ships."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton

        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return str(path) if path.is_file() else None
    except ImportError:
        return None


def tree_op_status(backend, call) -> int:
    """The status a backend reports for a tree acceptance op's one bad row: the CPU raises (the bit read from the
    message), CUDA and the SIMT build mark the row (all -1, num_accepted = -status)."""
    if backend.marks_invalid_rows:
        path, tokens, accepted = call()
        assert (path == -1).all() and (tokens == -1).all()
        return -int(accepted[0])
    with pytest.raises((IndexError, ValueError)) as info:
        call()
    for bit, words in ((2, "draft token id"), (4, "NaN"), (16, "malformed tree")):
        if words in str(info.value):
            return bit
    raise AssertionError(f"unexpected message: {info.value}")
