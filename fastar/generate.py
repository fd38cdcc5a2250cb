"""A ready speculative-decoding loop over two Hugging Face causal LMs: ``fastar.generate.speculative``.

The draft model proposes ``num_draft_tokens`` tokens one at a time, the target scores them in one forward pass,
and fastar's acceptance ops (:func:`fastar.speculative_sample`, :func:`fastar.greedy_verify`) decide what is kept;
both models' KV caches are then cut back to the accepted tokens. Sampling is exact: the emitted tokens follow
the target's (warped) distribution whatever the draft model. See docs/generate.md.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import torch

from .acceptance import compact_kv, greedy_verify, speculative_sample, tree_greedy_verify, tree_speculative_sample
from .masks import Tree

__all__ = ["SpeculativeStats", "speculative", "warp_logits"]

_OP = "fastar.generate.speculative"


@dataclasses.dataclass
class SpeculativeStats:
    """What a :func:`speculative` call did: ``target_forwards`` verification passes (the prefill not counted),
    ``drafted`` draft tokens proposed, ``accepted`` of them emitted, ``new_tokens`` emitted."""

    target_forwards: int = 0
    drafted: int = 0
    accepted: int = 0
    new_tokens: int = 0

    @property
    def acceptance_length(self) -> float:
        """Tokens emitted per verification pass (accepted drafts plus the target's own token)."""
        return self.new_tokens / max(self.target_forwards, 1)


def warp_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Float32 logits after temperature, top-k and top-p, with transformers' rules (``TemperatureLogitsWarper``,
    ``TopKLogitsWarper``, ``TopPLogitsWarper`` applied in that order): top-k keeps the logits ``>=`` the k-th
    largest; top-p sorts ascending and drops the tokens whose cumulative probability is ``<= 1 - top_p``, the
    largest always kept. Dropped tokens get ``-inf``. ``logits``: ``[..., V]``."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1)
        drop = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _check_args(target, draft, input_ids, max_new_tokens, num_draft_tokens, do_sample, temperature, top_k, top_p,
                tree):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int32,
                                                                                                   torch.int64):
        raise ValueError(f"{_OP}: input_ids must be an integer tensor [1, L]")
    if input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(
            f"{_OP}: input_ids must be one non-empty prompt [1, L] (got {tuple(input_ids.shape)}); the models' "
            "caches keep one length per batch, as in transformers' assisted generation"
        )
    for name, value, low in (("max_new_tokens", max_new_tokens, 0), ("num_draft_tokens", num_draft_tokens, 1),
                             ("top_k", top_k, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{_OP}: {name} must be an int >= {low}, got {value!r}")
    if not isinstance(do_sample, bool):
        raise TypeError(f"{_OP}: do_sample must be a bool, got {type(do_sample).__name__}")
    if not (isinstance(temperature, (int, float)) and temperature > 0 and temperature != float("inf")):
        raise ValueError(f"{_OP}: temperature must be a finite number > 0, got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"{_OP}: top_p must be in (0, 1], got {top_p!r}")
    vocab = [model.get_output_embeddings().weight.shape[0] for model in (target, draft)]
    if tree is not None and (isinstance(tree, (str, bytes)) or not isinstance(tree, Sequence) or not tree or any(
            isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= vocab[1] for w in tree)):
        raise ValueError(f"{_OP}: tree must be a non-empty sequence of level widths in [1, vocabulary size], got "
                         f"{tree!r}")
    if vocab[0] != vocab[1]:
        raise ValueError(
            f"{_OP}: the target's vocabulary ({vocab[0]} logits) and the draft's ({vocab[1]}) differ; speculative "
            "decoding needs one tokenizer for both models"
        )
    devices = {p.device for p in (next(target.parameters()), next(draft.parameters()))}
    if len(devices) != 1 or input_ids.device not in devices:
        raise ValueError(f"{_OP}: target, draft and input_ids must be on one device, got "
                         f"{sorted(map(str, devices | {input_ids.device}))}")
    return vocab[0]


def _forward(model, tokens: torch.Tensor, cache) -> torch.Tensor:
    """Logits ``[1, len, V]`` of ``tokens`` appended to ``cache``."""
    return model(input_ids=tokens, past_key_values=cache, use_cache=True).logits


def _draft_chain(draft, cache, feed: torch.Tensor, k: int, warp, generator):
    """``k`` tokens drafted one at a time: sampled from the warped draft distribution (``warp`` given) or the
    argmax. Returns (draft ids ``[1, k]``, the distributions ``[1, k, V]`` they were sampled from, or None)."""
    drafts, probs = [], []
    for _ in range(k):
        logits = _forward(draft, feed, cache)[:, -1]
        if warp is not None:
            q = warp(logits).softmax(-1)
            feed = torch.multinomial(q, 1, generator=generator)
            probs.append(q)
        else:
            feed = logits.argmax(-1, keepdim=True)
        drafts.append(feed)
    return torch.cat(drafts, dim=1), torch.stack(probs, dim=1) if probs else None


def _draft_tree(draft, cache, feed: torch.Tensor, widths: Sequence[int], warp, generator):
    """A draft tree of ``len(widths)`` levels below the root (node 0): level ``d`` holds ``widths[d]`` children of
    the first node of level ``d - 1`` (of the root for level 0), which alone is extended: the most likely tokens,
    or with ``warp`` tokens sampled i.i.d. (with replacement) from the warped draft distribution. Returns (draft
    ids ``[1, n]``, the :class:`~fastar.masks.Tree` of the root and the ``n`` drafted nodes, the distribution
    each node was sampled from ``[1, n, V]`` or None)."""
    drafts, probs, parents, parent = [], [], [-1], 0
    for width in widths:
        logits = _forward(draft, feed, cache)[:, -1]
        if warp is not None:
            q = warp(logits).softmax(-1)
            top = torch.multinomial(q, width, replacement=True, generator=generator)
            probs.append(q[:, None].expand(-1, width, -1))
        else:
            top = torch.topk(logits, width, dim=-1).indices
        drafts.append(top)
        parents += [parent] * width
        parent = len(parents) - width
        feed = top[:, :1]
    return torch.cat(drafts, dim=1), Tree(parents), torch.cat(probs, dim=1) if probs else None


def _forward_tree(model, root: torch.Tensor, draft_ids: torch.Tensor, tree: Tree, cache) -> torch.Tensor:
    """Logits ``[1, 1 + n, V]`` of the root token and the tree's drafted nodes appended to ``cache``: each node
    sees the cache, its ancestors and itself, at position ``cache length + depth``."""
    past = cache.get_seq_length()
    nodes = tree.num_nodes
    visible = tree.materialize(nodes, past + nodes, device=root.device)[:, None]
    dtype = model.get_output_embeddings().weight.dtype
    mask = torch.zeros(visible.shape, dtype=dtype, device=root.device).masked_fill_(~visible, float("-inf"))
    return model(input_ids=torch.cat([root, draft_ids], dim=1), attention_mask=mask,
                 position_ids=past + tree.position_ids.view(1, -1), past_key_values=cache, use_cache=True).logits


def _compact(cache, root: int, tree: Tree, path: torch.Tensor, num_accepted: torch.Tensor) -> None:
    """Keep the K/V of the accepted path of ``tree`` (its root, node 0, at position ``root``) at consecutive
    positions after the root, with :func:`fastar.compact_kv` on every layer's ``[B, H, S, D]`` tensors (heads as
    the stacked dimension), and drop everything after them."""
    seqlens = torch.full((1,), root, dtype=torch.int32, device=path.device)
    for layer in cache.layers:
        keys, values = layer.keys, layer.values
        compact_kv(keys.transpose(0, 1), values.transpose(0, 1), path, num_accepted, seqlens,
                   num_nodes=tree.num_nodes, root_in_path=True, stacked=True)
    _keep(cache, root + 1 + int(num_accepted[0]))


def _keep(cache, length: int) -> None:
    """Drop a transformers cache's entries past the first ``length`` (``crop`` takes how many to remove)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


@torch.no_grad()
def speculative(
    target,
    draft,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int = 128,
    num_draft_tokens: int = 4,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: Optional[Union[int, Sequence[int]]] = None,
    tree: Optional[Sequence[int]] = None,
    seed: Optional[int] = None,
    return_stats: bool = False,
):
    """Generate with speculative decoding: ``draft`` proposes, ``target`` verifies.

    Each step the draft model samples (or, with ``do_sample=False``, takes the argmax of) ``num_draft_tokens``
    tokens, the target scores them in one forward pass, and :func:`fastar.speculative_sample` (exact rejection
    sampling) or :func:`fastar.greedy_verify` keeps the longest acceptable prefix plus one token of the target's.
    Both caches are then cropped to the kept tokens. ``do_sample=False`` gives exactly the tokens of
    ``target.generate(input_ids, do_sample=False)``; with sampling the tokens follow the target's distribution
    after :func:`warp_logits` (the same warping is applied to the draft's logits).

    Args:
        target, draft: Hugging Face causal LMs (``model(input_ids=..., past_key_values=..., use_cache=True)``
            returning ``.logits``) with one vocabulary, on one device; e.g. loaded with
            ``attn_implementation="fastar"``.
        input_ids: int64 ``[1, L]``, the prompt (batch 1, as transformers' assisted generation).
        max_new_tokens: tokens to generate at most.
        num_draft_tokens: draft tokens per verification step (``>= 1``).
        do_sample, temperature, top_k, top_p: transformers' sampling settings (``top_k=0``: none).
        tree: draft trees instead of chains: ``tree[d]`` tokens at level ``d`` (e.g. ``(4, 3, 2, 2, 1)``), children
            of the level above's first node, which alone is extended: the draft's most likely tokens (greedy), or
            tokens sampled i.i.d. from its warped distribution (sampling). The draft runs ``len(tree)`` times, as
            for a chain that long, and the target verifies ``sum(tree)`` nodes at once
            (:func:`fastar.tree_greedy_verify` or :func:`fastar.tree_speculative_sample`, exact: SpecInfer's
            multi-draft rule). ``num_draft_tokens`` is then unused. Needs caches whose layers
            hold ``keys`` / ``values`` tensors (transformers' ``DynamicCache``, which this loop creates).
        eos_token_id: a token id or ids that end generation (the eos token is kept in the output).
        seed: seeds the draft's sampling (a ``torch.Generator``) and the acceptance op's Philox stream; ``None``
            draws one from torch's default generator.
        return_stats: also return a :class:`SpeculativeStats`.

    Returns:
        int64 ``[1, L + new]``: the prompt and the generated tokens; with ``return_stats`` ``(ids, stats)``.
    """
    from transformers.cache_utils import DynamicCache

    vocab = _check_args(target, draft, input_ids, max_new_tokens, num_draft_tokens, do_sample, temperature, top_k,
                        top_p, tree)
    tree = None if tree is None else tuple(tree)
    eos = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    stats = SpeculativeStats()
    ids = input_ids.to(torch.int64)
    target_cache, draft_cache = DynamicCache(config=target.config), DynamicCache(config=draft.config)
    # Invariant between steps: each cache holds every token of ``ids`` but the last (the draft's may lag by one).
    if ids.shape[1] > 1:
        _forward(target, ids[:, :-1], target_cache)
    done = max_new_tokens == 0
    while not done:
        length = ids.shape[1]
        room = max(max_new_tokens - stats.new_tokens - 1, 1)  # drafts worth verifying
        feed = ids[:, draft_cache.get_seq_length():]
        warp = (lambda logits: warp_logits(logits, temperature, top_k, top_p)) if do_sample else None
        if tree is None:
            draft_ids, draft_probs = _draft_chain(draft, draft_cache, feed, min(num_draft_tokens, room), warp,
                                                  generator)
            logits = _forward(target, torch.cat([ids[:, -1:], draft_ids], dim=1), target_cache)
        else:
            draft_ids, shape, draft_probs = _draft_tree(draft, draft_cache, feed, tree[:room], warp, generator)
            logits = _forward_tree(target, ids[:, -1:], draft_ids, shape, target_cache)
        if logits.shape[-1] != vocab:
            raise ValueError(f"{_OP}: the target returned {logits.shape[-1]} logits per token, expected {vocab}")
        p = warp(logits).softmax(-1) if do_sample else None
        offset = stats.target_forwards
        if tree is None:
            if do_sample:
                tokens, num_accepted = speculative_sample(draft_ids, draft_probs, p, seed=seed, offset=offset)
            else:
                tokens, num_accepted = greedy_verify(draft_ids, logits)
            path = None
        elif do_sample:
            path, tokens, num_accepted = tree_speculative_sample(draft_ids, shape, draft_probs, p, seed=seed,
                                                                 offset=offset)
        else:
            path, tokens, num_accepted = tree_greedy_verify(draft_ids, shape, logits)
        accepted = int(num_accepted[0])
        new = tokens[0, : accepted + 1].tolist()[: max_new_tokens - stats.new_tokens]
        for i, token in enumerate(new):
            if token in eos:
                new, done = new[: i + 1], True
                break
        stats.target_forwards += 1
        stats.drafted += draft_ids.shape[1]
        stats.accepted += min(accepted, len(new))
        stats.new_tokens += len(new)
        ids = torch.cat([ids, torch.tensor([new], dtype=torch.int64, device=ids.device)], dim=1)
        done = done or stats.new_tokens >= max_new_tokens
        # Keep the K/V of the tokens before the new last one: the verified token and the accepted drafts.
        if path is None:
            _keep(target_cache, length + accepted)
            _keep(draft_cache, length + accepted)
        else:
            nodes = path[0, 1 : accepted + 1].tolist()
            _compact(target_cache, length - 1, shape, path, num_accepted)
            # The draft's cache holds the first node of each level: kept while the path follows them.
            on_chain = next((d for d, node in enumerate(nodes) if node != 1 + sum(tree[:d])), len(nodes))
            _keep(draft_cache, length + on_chain)
    return (ids, stats) if return_stats else ids
