"""A small random-initialised block-diffusion transformer (SDAR-style) that speaks
fastar.diffusion.generate_blocks's model protocol (docs/diffusion.md): ``model(ids, attention_mask=m,
position_ids=p, past_key_values=None, use_cache=False)`` returns an output with ``.logits`` (float32) and, with
``use_cache``, ``.past_key_values``.

* ``attention_mask``: bool ``[B, 1, n, past + n]``, True where a query may see a key (the cached keys first, then
  the ids'); None: every key visible. Attention is torch's SDPA with that mask.
* ``position_ids``: int ``[B, n]`` (learned position embeddings); None: ``past .. past + n - 1``.
* The cache: a legacy tuple of per-layer ``(k, v)`` ``[B, H, L, D]``, left as it is (the model returns a new one,
  the ids' keys and values appended); or, with ``dynamic_cache`` set, a transformers ``DynamicCache`` appended to in
  place, as transformers' models do.

``dtype=torch.float64`` runs the model in float64 (its logits are still returned as float32). The mask token's
logit is pushed down, as a trained model's is, unless ``predict_mask``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    past_key_values: Optional[object] = None


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, h, past, index, mask):
        batch, n, dim = h.shape
        q, k, v = (t.view(batch, n, self.heads, -1).transpose(1, 2) for t in self.qkv(self.norm1(h)).chunk(3, -1))
        if past is not None and hasattr(past, "update"):  # a transformers cache
            k, v = past.update(k, v, index)
        elif past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        attn = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h + self.out(attn.transpose(1, 2).reshape(batch, n, dim))
        return h + self.mlp(self.norm2(h)), (k, v)


class TinyBlockDiffusionLM(nn.Module):
    def __init__(self, vocab: int = 48, dim: int = 32, heads: int = 4, layers: int = 2, max_len: int = 128,
                 mask_id: int = 47, seed: int = 0, head_scale: float = 3.0, predict_mask: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.layers = nn.ModuleList(Layer(dim, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)
        with torch.no_grad():
            self.head.weight.mul_(head_scale)
            if not predict_mask:
                self.head.bias[mask_id] = -30.0
        self.to(dtype)
        self.dynamic_cache = False
        self.calls = []  # (input shape, cached length) of every call

    @torch.no_grad()
    def forward(self, ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        past = past_key_values
        if past is None:
            length = 0
        else:
            length = past.get_seq_length() if hasattr(past, "get_seq_length") else past[0][0].shape[2]
        self.calls.append((tuple(ids.shape), length))
        if position_ids is None:
            position_ids = length + torch.arange(ids.shape[1], device=ids.device)
        if use_cache and past is None and self.dynamic_cache:
            import transformers

            past = transformers.DynamicCache()
        h = self.embed(ids) + self.pos(position_ids)
        presents = []
        for i, layer in enumerate(self.layers):
            h, kv = layer(h, past if past is None or hasattr(past, "update") else past[i], i, attention_mask)
            presents.append(kv)
        logits = self.head(self.norm(h)).float()
        if not use_cache:
            return Output(logits)
        return Output(logits, past if hasattr(past, "update") else tuple(presents))
