"""Fake (meta) implementations: output shapes and dtypes for torch.compile, FakeTensor and opcheck."""
from __future__ import annotations

import torch


def _one_device(op: str, *tensors) -> None:
    """The inputs a kernel reads must share a device: a meta tensor among CPU ones would otherwise dispatch here
    and return uninitialised CPU memory."""
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    torch._check(len(devices) <= 1,
                 lambda: f"fastar.{op}: all inputs must be on one device, got {sorted(map(str, devices))}")


def _acceptance_outputs(draft_token_ids: torch.Tensor, rows: torch.Tensor):
    torch._check(draft_token_ids.dim() == 2, lambda: "draft_token_ids must be 2-D [B, n]")
    torch._check(rows.dim() == 3, lambda: "the probability/logit rows must be 3-D [B, n+1, V]")
    batch, n = draft_token_ids.shape
    tokens = rows.new_empty((batch, n + 1), dtype=torch.int32)
    num_accepted = rows.new_empty((batch,), dtype=torch.int32)
    return tokens, num_accepted


def _attention_lse(q: torch.Tensor, out: torch.Tensor):
    """The LSE of an attention op; the op writes ``out`` in place, so its fake only checks it."""
    torch._check(q.dim() == 4, lambda: "q must be 4-D [B, H, L, D]")
    torch._check(out.shape == q.shape and out.dtype == q.dtype, lambda: "out must have the shape and dtype of q")
    batch, heads, length, _ = q.shape
    return q.new_empty((batch, heads, length), dtype=torch.float32)


def register_fakes(namespace: str) -> None:
    """Register the fakes of every op of ``torch.ops.<namespace>`` (fastar, or fastar_simt in tests)."""

    @torch.library.register_fake(f"{namespace}::speculative_sample")
    def _speculative_sample(draft_token_ids, draft_probs, target_probs, num_draft_tokens, seed, offset):
        _one_device("speculative_sample", draft_token_ids, draft_probs, target_probs, num_draft_tokens)
        return _acceptance_outputs(draft_token_ids, target_probs)

    @torch.library.register_fake(f"{namespace}::greedy_verify")
    def _greedy_verify(draft_token_ids, target_logits, num_draft_tokens=None):
        _one_device("greedy_verify", draft_token_ids, target_logits, num_draft_tokens)
        return _acceptance_outputs(draft_token_ids, target_logits)

    @torch.library.register_fake(f"{namespace}::attention")
    def _attention(q, k, v, out, scale, **mask):
        _one_device("attention", q, k, v, out, *mask.values())
        return _attention_lse(q, out)

    @torch.library.register_fake(f"{namespace}::scale_attention")
    def _scale_attention(q, k, v, out, scale, **layout):
        _one_device("scale_attention", q, k, v, out, *layout.values())
        return _attention_lse(q, out)

    @torch.library.register_fake(f"{namespace}::sample_cfg")
    def _sample_cfg(logits, cfg, schedule, scale_index, num_scales, top_k, top_p, temperature, seed, offset):
        torch._check(logits.dim() in (2, 3), lambda: "logits must be [2B, V] or [2B, L, V]")
        torch._check(logits.shape[0] % 2 == 0, lambda: "the first dimension of logits must be even")
        return logits.new_empty((logits.shape[0] // 2, *logits.shape[1:-1]), dtype=torch.int64)
