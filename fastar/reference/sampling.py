"""Reference of fastar.sample_cfg: the distribution it samples from, in float64 plain PyTorch; and the PyTorch
code of VAR's sampler it replaces (``cfg_mix``, ``var_top_k_top_p_``), shared with the tests and benchmarks."""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["cfg_mix", "sample_cfg_reference", "var_top_k_top_p_"]


def cfg_mix(logits: torch.Tensor, cfg: float, schedule: str = "var", scale_index: Optional[int] = None,
            num_scales: Optional[int] = None) -> torch.Tensor:
    """Classifier-free guidance of [2B, ..., V] logits (conditional rows first), in the logits' dtype: VAR's
    ``(1 + t) * cond - t * uncond`` with ``t = cfg * scale_index / (num_scales - 1)`` (schedule "var"), or
    LlamaGen's ``uncond + cfg * (cond - uncond)`` (schedule "constant")."""
    B = logits.shape[0] // 2
    cond, uncond = logits[:B], logits[B:]
    if schedule == "var":
        t = cfg * scale_index / (num_scales - 1)
        return (1 + t) * cond - t * uncond
    return uncond + cfg * (cond - uncond)


def var_top_k_top_p_(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """VAR's ``sample_with_top_k_top_p_`` filter as VAR writes it, in place: -inf below the k-th largest logit
    (``top_k > 0``), then, sorted ascending, on the tokens with ``cumsum(softmax) <= 1 - top_p`` but the last
    (``top_p > 0``; tied logits are split by their sort position). Returns logits."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), largest=True, sorted=False, dim=-1)[0]
        kth = kth.amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, -math.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits.masked_fill_(remove.scatter(sorted_idx.ndim - 1, sorted_idx, remove), -math.inf)
    return logits


def sample_cfg_reference(
    logits: torch.Tensor,
    *,
    cfg: float,
    schedule: str = "var",
    scale_index: Optional[int] = None,
    num_scales: Optional[int] = None,
    top_k: int = 0,
    top_p: float = 1.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """float64 probabilities ``[B, V]`` or ``[B, L, V]`` of the token fastar.sample_cfg draws at each position.

    Guidance (VAR's ramp or LlamaGen's constant) and temperature in float64, then VAR's
    ``sample_with_top_k_top_p_`` rule with fastar's tie rules: top-k keeps every logit ``>=`` the k-th largest;
    top-p drops a token when the mass of the tokens with a strictly larger logit is ``>= top_p`` (VAR's
    ascending ``cumsum <= 1 - top_p``), so equal logits share one decision and the largest is always kept.
    """
    mixed = cfg_mix(logits.double(), cfg, schedule, scale_index, num_scales) / temperature
    V = mixed.shape[-1]
    if 0 < top_k < V:
        kth = mixed.topk(top_k, dim=-1).values[..., -1:]
        mixed = mixed.masked_fill(mixed < kth, float("-inf"))
    if top_p < 1:
        probs = mixed.softmax(-1)
        ascending, order = mixed.sort(-1)
        cumsum = probs.gather(-1, order).cumsum(-1)
        # mass of the tokens whose logit is <= each token's: the cumsum at the last equal logit
        last_equal = torch.searchsorted(ascending.contiguous(), mixed.contiguous(), right=True) - 1
        above = cumsum[..., -1:] - cumsum.gather(-1, last_equal)
        mixed = mixed.masked_fill(above >= top_p, float("-inf"))
    return mixed.softmax(-1)
