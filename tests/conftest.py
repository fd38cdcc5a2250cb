"""The three backends every op is tested on.

* ``cpu``:  torch.ops.fastar on CPU tensors (the native CPU kernels).
* ``simt``: torch.ops.fastar_simt on CPU tensors: the CUDA kernels and their glue, compiled by g++ over the
            SIMT emulator (fastar._C_simt, built by ``make test`` whenever the CUDA headers exist).
* ``cuda``: torch.ops.fastar on CUDA tensors (needs a GPU and a CUDA build of fastar).

A test takes the ``backend`` fixture and calls the op through it; inputs are made on the CPU, moved to
the backend's device, and results come back on the CPU.
"""
from __future__ import annotations

import contextlib
import functools
import os

import pytest
import torch

import fastar
from fastar import _common, _simt, acceptance

REQUIRE_CUDA_BUILD = os.environ.get("FASTAR_REQUIRE_CUDA_BUILD") == "1"


def _simt_unavailable_reason():
    try:
        _simt.load()
        return None
    except ImportError as exc:
        return f"SIMT build not present (build with FASTAR_BUILD_SIMT=1; needs the CUDA headers): {exc}"


@contextlib.contextmanager
def _debug_checks_set(enabled: bool):
    previous = acceptance.debug_checks_enabled()
    acceptance.set_debug_checks(enabled)
    try:
        yield
    finally:
        acceptance.set_debug_checks(previous)


@pytest.fixture
def debug_checks():
    """Turn on fastar's debug-mode validation for one test."""
    with _debug_checks_set(True):
        yield


@pytest.fixture(autouse=True)
def _debug_checks_off():
    """Tests assume the default (no debug validation, whatever FASTAR_DEBUG_CHECKS says) unless they ask."""
    with _debug_checks_set(False):
        yield


def _cuda_unavailable_reason():
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    if not fastar.build_info()["cuda"]:
        return "fastar was built without CUDA kernels"
    return None


class Backend:
    """Calls fastar's public functions on one backend: ``backend.<name>(...)`` is ``fastar.<name>(...)`` with its
    tensor arguments moved to the backend's device, run on the backend's ops, and its tensor results brought back
    to the CPU. Methods of their own only where a backend behaves otherwise."""

    def __init__(self, name: str):
        self.name = name
        self.device = torch.device("cuda" if name == "cuda" else "cpu")
        self.ops = torch.ops.fastar_simt if name == "simt" else torch.ops.fastar
        # The CPU kernels raise on invalid values; the CUDA kernels (and so the SIMT build) mark rows.
        self.marks_invalid_rows = name != "cpu"

    def __repr__(self):
        return f"Backend({self.name})"

    def to(self, t):
        """``t`` on the backend's device: a tensor, or the tensors inside a tuple or list; anything else as it is."""
        if isinstance(t, torch.Tensor):
            return t.to(self.device)
        if type(t) in (tuple, list):
            return type(t)(self.to(x) for x in t)
        return t

    def using_ops(self):
        """Within the block fastar's public functions run the backend's ops (on tensors the caller placed)."""
        return _common.using_ops(self.ops)

    def __getattr__(self, name):
        if name.startswith("_") or name not in fastar.__all__:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r} (not a public fastar function)")
        return functools.partial(self._call, name)

    def _call(self, name, *args, **kwargs):
        with self.using_ops():
            result = getattr(fastar, name)(*self.to(args), **{key: self.to(value) for key, value in kwargs.items()})
        return _cpu(result)

    def attention_with_kvcache(self, q, k_cache, v_cache, **kwargs):
        """Runs on copies of the caches moved to the device; returns (result, k_cache, v_cache) on the CPU."""
        k_dev, v_dev = self.to(k_cache).clone(), self.to(v_cache).clone()
        return self._call("attention_with_kvcache", q, k_dev, v_dev, **kwargs), k_dev.cpu(), v_dev.cpu()

    def compact_kv(self, k_cache, v_cache, *args, **kwargs):
        """Runs on copies of the caches moved to the device; returns (new lengths, k_cache, v_cache) on the CPU."""
        k_dev, v_dev = self.to(k_cache).clone(), self.to(v_cache).clone()
        return self._call("compact_kv", k_dev, v_dev, *args, **kwargs), k_dev.cpu(), v_dev.cpu()

    def scale_kvcache(self, batch, heads, head_dim, layout, dtype):
        """A fastar.ScaleKVCache on the backend's device whose methods run the backend's ops; give it tensors
        through ``to`` and bring its results back with ``.cpu()``. Its buffers start as NaN, so a read of a slot
        never written shows in the results."""
        cache = fastar.ScaleKVCache(batch, heads, head_dim, layout, dtype, self.device)
        cache._k.fill_(float("nan"))
        cache._v.fill_(float("nan"))
        return _OnBackend(cache, self)

    def quantized_kvcache(self, *args, **kwargs):
        """A fastar.QuantizedKVCache on the backend's device whose methods run the backend's ops (tensors in
        through ``to``, results out with ``.cpu()``). Its per-token scales (and a KIVI window) start as NaN, so a
        read of a slot never written shows in the results."""
        cache = fastar.QuantizedKVCache(*args, device=self.device, **kwargs)
        store = cache._store
        for t in (store.k_scale, store.v_scale, getattr(store, "k_window", None), getattr(store, "v_window", None)):
            if t is not None and t.dim() > 1:
                t.fill_(float("nan"))
        return _OnBackend(cache, self)

    def checked(self, fn, *args, **kwargs):
        """Call an acceptance op and raise for invalid rows on every backend (CPU raises by itself)."""
        tokens, num_accepted = fn(*args, **kwargs)
        acceptance.check_rows(num_accepted, "fastar")
        return tokens, num_accepted


def _cpu(result):
    """A result with its tensors (alone or in a tuple) brought back to the CPU."""
    if isinstance(result, tuple):
        return tuple(_cpu(x) for x in result)
    return result.cpu() if isinstance(result, torch.Tensor) else result


class _OnBackend:
    """An object whose method calls run the backend's ops; its other attributes read through."""

    def __init__(self, obj, backend: Backend):
        self._obj, self._backend = obj, backend

    def __getattr__(self, name):
        value = getattr(self._obj, name)
        if not callable(value):
            return value

        def call(*args, **kwargs):
            with self._backend.using_ops():
                return value(*args, **kwargs)

        return call


@pytest.fixture(params=["cpu", "simt", "cuda"])
def backend(request):
    name = request.param
    reason = {"cpu": None, "simt": _simt_unavailable_reason(), "cuda": _cuda_unavailable_reason()}[name]
    if reason is not None:
        if name == "simt" and REQUIRE_CUDA_BUILD:
            pytest.fail(f"FASTAR_REQUIRE_CUDA_BUILD=1 but {reason}")
        pytest.skip(reason)
    return Backend(name)
