"""Reference of fastar.sample_cfg: the distribution it samples from, in float64 plain PyTorch."""
from __future__ import annotations

from typing import Optional

import torch


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
    x = logits.double()
    B = x.shape[0] // 2
    cond, uncond = x[:B], x[B:]
    if schedule == "var":
        t = cfg * scale_index / (num_scales - 1)
        mixed = (1 + t) * cond - t * uncond
    else:
        mixed = uncond + cfg * (cond - uncond)
    mixed = mixed / temperature
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
