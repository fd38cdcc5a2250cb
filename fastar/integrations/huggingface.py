"""Hugging Face transformers: ``attn_implementation="fastar"``.

``register()`` (done on import of this module) adds fastar to transformers' ``AttentionInterface``, with
SDPA-style boolean masks from ``AttentionMaskInterface``::

    import fastar.integrations.huggingface  # noqa: F401
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fastar")

The function follows transformers' own SDPA integration (same masks, same causal rule, same output layout)
and calls :func:`fastar.scaled_dot_product_attention`, which computes GQA without repeating K/V and falls
back to PyTorch (with a warning) for training features fastar does not serve.

:class:`FastarQuantizedCache` is a ``transformers`` cache whose layers are :class:`fastar.QuantizedKVCache`:
pass it as ``past_key_values`` to a model loaded with ``attn_implementation="fastar"`` and the attention reads
the int8 / fp8 codes directly (no dequantized copy of the cache)::

    cache = FastarQuantizedCache(model.config, format="int8", max_cache_len=4096)
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=256)
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..masked_attention import scaled_dot_product_attention
from ..masks import Causal, Dense
from ..quantized_kvcache import QuantizedKVCache

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
    quantized = getattr(key, _QUANTIZED, None)
    if quantized is not None:
        # key holds only this step's tokens: the layer's QuantizedKVCache holds them all, appended in update().
        if attention_mask is not None:
            mask = Dense(attention_mask[:, 0])  # [B, Lq, max_cache_len], True = attend, absolute key positions
        else:
            mask = Causal() if q_len > 1 else None
        out = quantized.attend(query, mask=mask, scale=scaling)
        return out.transpose(1, 2), None
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


# The attribute of a key tensor returned by FastarQuantizedLayer.update that names the layer's cache.
_QUANTIZED = "_fastar_quantized_cache"


class FastarQuantizedLayer(CacheLayerMixin):
    """One decoder layer's :class:`fastar.QuantizedKVCache` as a ``transformers`` cache layer.

    ``update`` appends the step's K/V (quantized in place) and returns them tagged with the cache, which
    ``attn_implementation="fastar"`` attends to; the attention mask spans ``max_cache_len`` positions, as a
    static cache's does."""

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, max_cache_len: int, format: str, **options):
        super().__init__()
        self.max_cache_len, self.format, self.options = max_cache_len, format, options
        self.cache: Optional[QuantizedKVCache] = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.cache = QuantizedKVCache(B, H, D, capacity=self.max_cache_len, format=self.format, dtype=self.dtype,
                                      device=self.device, **self.options)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cache.append(key_states, value_states)
        setattr(key_states, _QUANTIZED, self.cache)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int):
        return self.max_cache_len, 0

    def get_seq_length(self) -> int:
        return max(self.cache._lengths) if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def crop(self, tokens_to_remove: int) -> None:
        """Removes ``-tokens_to_remove`` tokens (a negative count, as ``DynamicLayer.crop`` takes) from the end."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove and self.is_initialized:
            self.cache.truncate([max(0, n + tokens_to_remove) for n in self.cache._lengths])

    def reset(self) -> None:
        if self.is_initialized:
            self.cache.truncate(0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("FastarQuantizedCache does not reorder its sequences (beam search)")


class FastarQuantizedCache(Cache):
    """A ``transformers`` cache stored quantized by fastar, read by ``attn_implementation="fastar"``.

    Args:
        config: the model's config; the model must use ``attn_implementation="fastar"`` (another attention
            would see only each step's tokens) and full attention in every layer.
        format: ``"int8"``, ``"fp8_e4m3"`` or ``"fp8_e5m2"`` (docs/quantized_kvcache.md).
        max_cache_len: tokens per sequence (prompt and generated); default the config's
            ``max_position_embeddings``.
        options: further :class:`fastar.QuantizedKVCache` arguments (fp8 ``k_scale`` / ``v_scale``).
    """

    def __init__(self, config, format: str = "int8", max_cache_len: Optional[int] = None, **options):
        if getattr(config, "_attn_implementation", None) != NAME:
            raise ValueError(
                f"FastarQuantizedCache is read only by attn_implementation={NAME!r}; the model's config says "
                f"{getattr(config, '_attn_implementation', None)!r} (load it with attn_implementation={NAME!r})"
            )
        text = config.get_text_config(decoder=True)
        kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            raise NotImplementedError(f"FastarQuantizedCache holds full-attention layers only, got {sorted(kinds)}")
        max_cache_len = max_cache_len or text.max_position_embeddings
        super().__init__(layers=[FastarQuantizedLayer(max_cache_len, format, **options)
                                 for _ in range(text.num_hidden_layers)])


def register(name: str = NAME) -> None:
    """Make ``attn_implementation=name`` use fastar's kernels."""
    AttentionInterface.register(name, fastar_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)


register()
