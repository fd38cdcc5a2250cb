"""Hugging Face transformers: ``attn_implementation="fastar"``.

``register()`` (done on import of this module) adds fastar to transformers' ``AttentionInterface``, with
SDPA-style boolean masks from ``AttentionMaskInterface``::

    import fastar.integrations.huggingface  # noqa: F401
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fastar")

The function follows transformers' own SDPA integration (same masks, same causal rule, same output layout)
and calls :func:`fastar.scaled_dot_product_attention`, which computes GQA without repeating K/V and falls
back to PyTorch (with a warning) for training features fastar does not serve.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..masked_attention import scaled_dot_product_attention

NAME = "fastar"


def fastar_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
):
    """transformers attention function: query ``[B, Hq, L, D]``, key/value ``[B, Hkv, S, D]``; returns
    ``([B, L, Hq, D], None)``."""
    if kwargs.get("softcap") is not None:
        raise ValueError(
            f"attn_implementation='fastar' does not support attention logit soft-capping (softcap="
            f"{kwargs['softcap']}, e.g. Gemma 2's config.attn_logit_softcapping): fastar's kernels compute plain "
            "softmax attention. Load this model with attn_implementation='eager' (or 'flex_attention')."
        )
    if kwargs.get("position_bias") is not None or kwargs.get("cache") is not None:
        # Features of transformers' SDPA path that fastar does not implement itself.
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    q_len = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # transformers' rule: is_causal only for a maskless prefill; SDPA's causal is top-left aligned, so keys past
    # the queries (an empty static cache) are cut.
    is_causal = q_len > 1 and attention_mask is None and is_causal
    if is_causal and key.shape[2] > q_len:
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=is_causal,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> None:
    """Make ``attn_implementation=name`` use fastar's kernels."""
    AttentionInterface.register(name, fastar_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)


register()
