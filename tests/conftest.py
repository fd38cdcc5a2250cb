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
import os

import pytest
import torch

import fastar
from fastar import _simt, acceptance, masked_attention, sampling

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
    def __init__(self, name: str):
        self.name = name
        self.device = torch.device("cuda" if name == "cuda" else "cpu")
        self.ops = torch.ops.fastar_simt if name == "simt" else torch.ops.fastar
        # The CPU kernels raise on invalid values; the CUDA kernels (and so the SIMT build) mark rows.
        self.marks_invalid_rows = name != "cpu"

    def __repr__(self):
        return f"Backend({self.name})"

    def to(self, t):
        return None if t is None else t.to(self.device) if isinstance(t, torch.Tensor) else t

    def speculative_sample(self, draft_token_ids, draft_probs, target_probs, *, num_draft_tokens=None, seed=None,
                           offset=0):
        tokens, num_accepted = acceptance._speculative_sample(
            self.ops.speculative_sample,
            self.to(draft_token_ids),
            self.to(draft_probs),
            self.to(target_probs),
            self.to(num_draft_tokens),
            self.to(seed),
            self.to(offset),
        )
        return tokens.cpu(), num_accepted.cpu()

    def greedy_verify(self, draft_token_ids, target_logits, *, num_draft_tokens=None):
        tokens, num_accepted = acceptance._greedy_verify(
            self.ops.greedy_verify, self.to(draft_token_ids), self.to(target_logits), self.to(num_draft_tokens)
        )
        return tokens.cpu(), num_accepted.cpu()

    def attention(self, q, k, v, *, mask=None, scale=None, return_lse=False):
        result = masked_attention._attention(
            self.ops.attention, self.to(q), self.to(k), self.to(v), mask, scale, return_lse, None
        )
        return tuple(t.cpu() for t in result) if return_lse else result.cpu()

    def attention_with_kvcache(self, q, k_cache, v_cache, *, cache_seqlens, k_new=None, v_new=None, block_table=None,
                               mask=None, scale=None, return_lse=False):
        """Runs on copies of the caches moved to the device; returns (result, k_cache, v_cache) on the CPU."""
        k_dev, v_dev = self.to(k_cache).clone(), self.to(v_cache).clone()
        result = masked_attention._attention_with_kvcache(
            self.ops.attention, self.to(q), k_dev, v_dev, self.to(cache_seqlens), self.to(k_new), self.to(v_new),
            self.to(block_table), mask, scale, return_lse,
        )
        result = tuple(t.cpu() for t in result) if return_lse else result.cpu()
        return result, k_dev.cpu(), v_dev.cpu()

    def scaled_dot_product_attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     scale=None, enable_gqa=False):
        return masked_attention._sdpa(
            self.ops.attention, self.to(query), self.to(key), self.to(value), self.to(attn_mask), dropout_p, is_causal,
            scale, enable_gqa,
        ).cpu()

    def scale_kvcache(self, batch, heads, head_dim, layout, dtype):
        """A fastar.ScaleKVCache on the backend's device whose attend runs the backend's kernel; give it
        tensors through ``to`` and bring its results back with ``.cpu()``. Its buffers start as NaN, so a
        read of a slot never written shows in the results."""
        cache = fastar.ScaleKVCache(batch, heads, head_dim, layout, dtype, self.device)
        cache._ops = self.ops
        cache._k.fill_(float("nan"))
        cache._v.fill_(float("nan"))
        return cache

    def scale_attention(self, q, k, v, layout, *, scale=None, qk_norm=False, q_scale=None, return_lse=False):
        result = fastar.scale._scale_attention(
            self.ops.scale_attention, self.to(q), self.to(k), self.to(v), layout, scale, qk_norm, self.to(q_scale),
            return_lse,
        )
        return tuple(t.cpu() for t in result) if return_lse else result.cpu()

    def sample_cfg(self, logits, *, cfg, schedule="var", scale_index=None, num_scales=None, top_k=0, top_p=1.0,
                   temperature=1.0, seed=None, offset=0):
        return sampling._sample_cfg(
            self.ops.sample_cfg, self.to(logits), cfg, schedule, scale_index, num_scales, top_k, top_p, temperature,
            self.to(seed), self.to(offset),
        ).cpu()

    def checked(self, fn, *args, **kwargs):
        """Call an acceptance op and raise for invalid rows on every backend (CPU raises by itself)."""
        tokens, num_accepted = fn(*args, **kwargs)
        acceptance.check_rows(num_accepted, "fastar")
        return tokens, num_accepted


@pytest.fixture(params=["cpu", "simt", "cuda"])
def backend(request):
    name = request.param
    reason = {"cpu": None, "simt": _simt_unavailable_reason(), "cuda": _cuda_unavailable_reason()}[name]
    if reason is not None:
        if name == "simt" and REQUIRE_CUDA_BUILD:
            pytest.fail(f"FASTAR_REQUIRE_CUDA_BUILD=1 but {reason}")
        pytest.skip(reason)
    return Backend(name)
