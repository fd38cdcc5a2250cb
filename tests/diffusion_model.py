"""A small random-initialised bidirectional transformer that speaks fastar.diffusion.generate's model protocol
(docs/diffusion.md): ``model(ids, past_key_values=None, use_cache=False, replace_position=None)`` returns an
output with ``.logits`` and, with ``use_cache``, ``.past_key_values``; and Dream's (without a cache):
``model(ids, attention_mask=m, position_ids=p)``, ``m`` bool ``[B, 1, n, n]`` (True: may attend; a query row with
no True attends to nothing, zeros as SDPA's math kernel gives), ``p`` int64 ``[B, n]``.

* No cache: the ids sit at positions ``0 .. n-1``.
* Prefix cache: the ids follow the cached positions (``past length .. past length + n - 1``) and attend to them
  and to each other. A legacy tuple cache is left as it is (the new one is returned); with ``dynamic_cache`` set
  the model makes a transformers ``DynamicCache`` and appends to it in place, as transformers' models do (prefix
  mode only).
* Dual cache (``replace_position`` bool ``[B, L]``): the ids sit at the marked positions; their keys and values
  replace the cached ones there, in place, and they attend to all ``L`` cached positions.

Attention is non-causal; positions are learned embeddings. The mask token's logit is pushed down, as a trained
model's is, unless ``predict_mask``.
"""
from __future__ import annotations

import dataclasses
import types
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

    def forward(self, h, past, index, positions, replace, mask=None):
        batch, n, dim = h.shape
        q, k, v = (t.view(batch, n, self.heads, -1).transpose(1, 2) for t in self.qkv(self.norm1(h)).chunk(3, -1))
        if past is not None and hasattr(past, "update"):  # a transformers cache
            k, v = past.update(k, v, index)
        elif past is not None and replace:
            past_k, past_v = past
            past_k[:, :, positions], past_v[:, :, positions] = k, v
            k, v = past_k, past_v
        elif past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if mask is not None:
            scores = scores.masked_fill(~mask, -torch.inf)
        attn = torch.softmax(scores, -1).nan_to_num(0.0) @ v  # a row that may attend to nothing: zeros
        h = h + self.out(attn.transpose(1, 2).reshape(batch, n, dim))
        return h + self.mlp(self.norm2(h)), (k, v)


class TinyDiffusionLM(nn.Module):
    def __init__(self, vocab: int = 48, dim: int = 32, heads: int = 4, layers: int = 2, max_len: int = 96,
                 mask_id: int = 47, seed: int = 0, head_scale: float = 3.0, predict_mask: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.config = types.SimpleNamespace(vocab_size=vocab)
        self.embed, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.layers = nn.ModuleList(Layer(dim, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)
        with torch.no_grad():
            self.head.weight.mul_(head_scale)
            if not predict_mask:
                self.head.bias[mask_id] = -30.0
        self.calls = []  # (input shape, past given, replace_position given) of every call

    @torch.no_grad()
    def forward(self, ids, past_key_values=None, use_cache=False, replace_position=None, attention_mask=None,
                position_ids=None):
        self.calls.append((tuple(ids.shape), past_key_values is not None, replace_position is not None))
        past = past_key_values
        if position_ids is not None:
            positions = position_ids
        elif replace_position is not None:
            positions = replace_position[0].nonzero().flatten()
        elif past is None:
            positions = torch.arange(ids.shape[1], device=ids.device)
        else:
            length = past.get_seq_length() if hasattr(past, "get_seq_length") else past[0][0].shape[2]
            positions = length + torch.arange(ids.shape[1], device=ids.device)
        if use_cache and past is None and getattr(self, "dynamic_cache", False):
            import transformers

            past = transformers.DynamicCache()
        h = self.embed(ids) + self.pos(positions)
        presents = []
        for i, layer in enumerate(self.layers):
            layer_past = past if past is None or hasattr(past, "update") else past[i]
            h, kv = layer(h, layer_past, i, positions, replace_position is not None, attention_mask)
            presents.append(kv)
        logits = self.head(self.norm(h))
        if not use_cache:
            return Output(logits)
        return Output(logits, past if hasattr(past, "update") else tuple(presents))
