"""Per-scale KV cache for cached next-scale (VAR) inference, with ScaleKV compression.

VAR generates an image scale by scale: at step ``s`` the model feeds only the ``h_s * w_s`` tokens of scale
``s``, appends their keys and values to each layer's cache, and attends with those queries to everything
cached, with no mask (docs/scale_attention.md). This equals the rows of scale ``s`` in the full block-causal
(``relation="causal"``) pass. :class:`ScaleKVCache` is one layer's cache: preallocated K and V of
``[batch, heads, capacity, head_dim]``, written in place by :meth:`~ScaleKVCache.append`, read through views
by :meth:`~ScaleKVCache.attend` (the ``scale_attention`` kernels with no mask: no concatenation, no copy).

:meth:`~ScaleKVCache.compress` is ScaleKV's selection (Li et al., "Memory-Efficient Visual Autoregressive
Modeling with Scale-Aware KV Cache Compression"): keep the keys that a grid of observation queries of the
current scale scores highest, and those queries' own keys. Budgets are per cache, that is per layer:
ScaleKV gives "drafter" layers (broad attention) a large budget and "refiner" layers (local attention) a
small one. A sampling loop with per-layer budgets::

    caches = [fastar.ScaleKVCache(2 * B, heads, 64, layout, torch.bfloat16, "cuda") for _ in range(depth)]
    budgets = [2048 if layer in drafters else 256 for layer in range(depth)]
    for s in range(layout.num_scales):
        for layer, cache in enumerate(caches):
            q, k, v = ...  # this scale's [2B, heads, h_s * w_s, 64]
            cache.append(k, v)
            out = cache.attend(q, qk_norm=True, q_scale=q_scale[layer], scale=1.0)
            if s >= 2:  # compress once the cache holds more than the budget (a no-op until then)
                cache.compress(q, budgets[layer], qk_norm=True, q_scale=q_scale[layer])
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F

from . import _common
from ._common import FLOAT_DTYPES, as_int, no_grad, q_scale_arg, softmax_scale

__all__ = ["ScaleKVCache"]

# Keys per batch row converted to float64 at once while scoring: bounds compress's scratch memory.
_SCORE_CHUNK_ELEMENTS = 1 << 22


def observation_positions(h: int, w: int, window: int = 16) -> List[int]:
    """Token indices (row-major, ``y * w + x``) inside an ``h x w`` scale of ScaleKV's observation queries.

    ``window`` queries sit on a ``g x g`` grid (``g = sqrt(window)``, so ``window`` must be a perfect square:
    16 gives ScaleKV's 4x4 grid), at the centre of each of the ``g x g`` equal cells of the scale, rounded
    down: rows ``((2i + 1) * h) // (2g)`` and columns ``((2j + 1) * w) // (2g)`` for ``i, j < g``. A scale
    smaller than the grid repeats rows or columns; the positions are the distinct ones, ``min(g, h) *
    min(g, w)`` of them, in increasing order.
    """
    g = math.isqrt(window)
    if window < 1 or g * g != window:
        raise ValueError(f"window must be a positive perfect square (the g x g observation grid), got {window}")
    rows = sorted({(2 * i + 1) * h // (2 * g) for i in range(g)})
    cols = sorted({(2 * j + 1) * w // (2 * g) for j in range(g)})
    return [y * w + x for y in rows for x in cols]


class ScaleKVCache:
    """One layer's K/V cache for cached next-scale inference over a :class:`fastar.ScaleLayout`.

    Args:
        batch, heads, head_dim: the cache holds K and V of ``[batch, heads, capacity, head_dim]`` (``heads``
            = the layer's kv heads; the queries may have a multiple of them, GQA).
        layout: the ``fastar.ScaleLayout`` being generated, ``relation="causal"`` with no local window and
            no full scales: cached inference with no mask reproduces exactly that layout's full pass.
        dtype: float32, float16 or bfloat16, of the K/V appended and the queries.
        device: where the cache lives.

    The cache starts at ``capacity = layout.num_tokens``. Appends go to the end of what is cached, one scale
    at a time in the layout's order. :meth:`compress` gathers the kept keys to the front of a new, smaller
    buffer with room for the scales still to come, and frees the old one; ``length``, ``capacity`` and
    :meth:`memory_bytes` tell where the cache stands.
    """

    def __init__(self, batch: int, heads: int, head_dim: int, layout, dtype: torch.dtype = torch.float32,
                 device=None):
        for name, value in (("batch", batch), ("heads", heads), ("head_dim", head_dim)):
            as_int(value, f"fastar.ScaleKVCache: {name}", 1)
        if (layout.relation, layout.local_window, layout.full_scales) != ("causal", None, 0):
            raise ValueError(
                "fastar.ScaleKVCache: cached inference attends to everything cached with no mask, which "
                "reproduces a ScaleLayout with relation='causal', no local_window and full_scales=0; got "
                f"relation={layout.relation!r}, local_window={layout.local_window}, full_scales={layout.full_scales}"
            )
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"fastar.ScaleKVCache: dtype must be float32, float16 or bfloat16, got {dtype}")
        self.layout = layout
        self._sizes = [h * w for h, w in layout.hw]
        shape = (batch, heads, layout.num_tokens, head_dim)
        self._k = torch.empty(shape, dtype=dtype, device=device)
        self._v = torch.empty(shape, dtype=dtype, device=device)
        self._length = 0
        self._scales = 0
        # compress moved keys since the last append: the current scale's tokens are no longer the last h*w.
        self._compressed = False

    @property
    def length(self) -> int:
        """Tokens cached: the positions ``[0, length)`` of :attr:`keys` and :attr:`values`."""
        return self._length

    @property
    def capacity(self) -> int:
        """Tokens the current buffers hold room for."""
        return self._k.shape[2]

    @property
    def scales_appended(self) -> int:
        """How many of the layout's scales have been appended (the current scale is the last of them)."""
        return self._scales

    @property
    def keys(self) -> torch.Tensor:
        """The cached keys, a view ``[batch, heads, length, head_dim]`` (in cache order)."""
        return self._k[:, :, : self._length]

    @property
    def values(self) -> torch.Tensor:
        """The cached values, a view ``[batch, heads, length, head_dim]`` (in cache order)."""
        return self._v[:, :, : self._length]

    def memory_bytes(self) -> int:
        """Bytes of the K and V buffers held (their capacity, not only the cached length)."""
        return 2 * self._k.numel() * self._k.element_size()

    def _check(self, name: str, t: torch.Tensor, scale: int, heads_multiple: bool) -> None:
        """Raise unless ``t`` is ``[batch, heads (or a multiple), h*w, head_dim]`` for the layout's scale
        ``scale``, in the cache's dtype and on its device."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fastar.ScaleKVCache: {name} must be a tensor, got {type(t).__name__}")
        B, H, _, D = self._k.shape
        n = self._sizes[scale]
        heads_ok = t.dim() == 4 and (t.shape[1] % H == 0 if heads_multiple else t.shape[1] == H)
        if not heads_ok or (t.shape[0], t.shape[2], t.shape[3]) != (B, n, D):
            heads = f"a multiple of {H}" if heads_multiple else str(H)
            raise ValueError(
                f"fastar.ScaleKVCache: {name} must be [batch, heads, h*w, head_dim] = [{B}, {heads}, {n}, {D}] "
                f"for scale {scale} (h, w = {self.layout.hw[scale]}), got {tuple(t.shape)}"
            )
        if t.dtype != self._k.dtype or t.device != self._k.device:
            raise ValueError(
                f"fastar.ScaleKVCache: {name} must be {self._k.dtype} on {self._k.device} like the cache, got "
                f"{t.dtype} on {t.device}"
            )

    def _check_current(self, what: str) -> None:
        if self._scales == 0:
            raise RuntimeError(f"fastar.ScaleKVCache: {what} needs a scale appended first")

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append the next scale's keys and values, ``[batch, heads, h*w, head_dim]`` each (``(h, w)`` =
        ``layout.hw[scales_appended]``), after what is cached. Copies into the preallocated buffers."""
        if self._scales == len(self._sizes):
            raise RuntimeError(f"fastar.ScaleKVCache: all {len(self._sizes)} scales of the layout are appended")
        self._check("k", k, self._scales, heads_multiple=False)
        self._check("v", v, self._scales, heads_multiple=False)
        no_grad("fastar.ScaleKVCache.append", k=k, v=v)
        end = self._length + k.shape[2]
        self._k[:, :, self._length : end].copy_(k)
        self._v[:, :, self._length : end].copy_(v)
        self._length = end
        self._scales += 1
        self._compressed = False

    def attend(self, q: torch.Tensor, *, qk_norm: bool = False, q_scale: Optional[torch.Tensor] = None,
               scale: Optional[float] = None) -> torch.Tensor:
        """Attention of the current scale's queries over every cached key, with no mask.

        Args:
            q: ``[batch, Hq, h*w, head_dim]``, the queries of the last appended scale (``Hq`` a multiple of
                the cache's heads; query head ``h`` uses kv head ``h // (Hq // heads)``), the cache's dtype.
            qk_norm: VAR's ``attn_l2_norm``: q and k are L2-normalised in the kernel (``x / max(|x|, 1e-12)``)
                and q is multiplied by ``q_scale[h]``.
            q_scale: float ``[Hq]`` on q's device (VAR's ``exp(min(s_h, log 100))``); None = 1. Only with
                ``qk_norm``.
            scale: softmax scale; default 1 with ``qk_norm``, else ``1/sqrt(head_dim)`` (VAR without
                ``attn_l2_norm`` passes ``0.25/sqrt(head_dim)``), as :func:`fastar.scale_attention`.

        Returns:
            ``[batch, Hq, h*w, head_dim]`` in q's dtype.
        """
        self._check_current("attend")
        self._check("q", q, self._scales - 1, heads_multiple=True)
        no_grad("fastar.ScaleKVCache.attend", q=q, q_scale=q_scale)
        q_scale = q_scale_arg("fastar.ScaleKVCache.attend", q, q_scale, qk_norm)
        # Every cached key is visible: no relation, window or full scales, so no mask tables.
        out = q.new_empty(q.shape)
        _common.ops().scale_attention(q, self.keys, self.values, out, softmax_scale(scale, q.shape[-1], qk_norm),
                                      qk_norm=bool(qk_norm), q_scale=q_scale)
        return out

    def compress(self, q: torch.Tensor, budget: int, *, window: int = 16, pool: int = 5, qk_norm: bool = False,
                 q_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ScaleKV: keep ``budget`` keys chosen by the current scale's observation queries, plus theirs.

        1. The observation queries are the rows of ``q`` at :func:`observation_positions` of the current
           scale (``window`` = how many: a ``sqrt(window)`` square grid, 16 = ScaleKV's 4x4).
        2. Each cached key ``j`` of batch row ``b`` and kv head ``g`` scores ``sum_i q_i . k_j``, the raw
           logits (no softmax scale) of the observation queries ``i`` of every query head of group ``g``,
           in float64. With ``qk_norm`` these are the logits the attention uses: ``q_scale[h] * q_i / |q_i|``
           against ``k_j / |k_j|``.
        3. The observation keys' own scores are set to ``-inf`` (they are kept anyway; their high self-scores
           must not promote their neighbours), then the scores are max-pooled along the cache order with
           kernel ``pool`` (odd; stride 1, same padding), as ScaleKV does.
        4. Kept: the ``budget`` other keys of highest pooled score (ties: the earlier key), and the
           observation keys, in their cache order. Every (batch row, kv head) keeps the same number of keys,
           but not the same keys. A cache of at most ``budget`` + observation keys is left as it is.

        Once the cache is compressed, compress again only after the next append.

        Args:
            q: the current scale's queries, as given to :meth:`attend`, ``[batch, Hq, h*w, head_dim]``.
            budget: non-observation keys to keep (``>= 0``).
            qk_norm, q_scale: as given to :meth:`attend`.

        Returns:
            int64 ``[batch, heads, kept]``: the kept keys' positions in the cache before compressing.
            Afterwards the cache holds ``kept`` tokens in a buffer with room for the layout's remaining
            scales; appending and attending go on as before.
        """
        self._check_current("compress")
        if self._compressed:
            raise RuntimeError(
                f"fastar.ScaleKVCache.compress: the cache was compressed after scale {self._scales - 1} already; "
                "its tokens are no longer the last ones cached (append the next scale first)"
            )
        self._check("q", q, self._scales - 1, heads_multiple=True)
        budget = as_int(budget, "fastar.ScaleKVCache.compress: budget", 0)
        if as_int(pool, "fastar.ScaleKVCache.compress: pool", 1) % 2 == 0:
            raise ValueError(f"fastar.ScaleKVCache.compress: pool must be odd (same padding), got {pool}")
        h, w = self.layout.hw[self._scales - 1]
        start = self._length - h * w  # the current scale's tokens are the last ones cached
        local = torch.tensor(observation_positions(h, w, window), device=q.device)
        B, H, L, D = self.keys.shape
        if L <= budget + local.numel():
            return torch.arange(L, device=q.device).repeat(B, H, 1)
        q_scale = q_scale_arg("fastar.ScaleKVCache.compress", q, q_scale, qk_norm)
        scores = self._scores(q[:, :, local], qk_norm, q_scale)
        observed = local + start
        scores[:, :, observed] = -math.inf
        pooled = F.max_pool1d(scores.view(B * H, 1, L), pool, stride=1, padding=pool // 2).view(B, H, L)
        pooled[:, :, observed] = -math.inf
        # Stable: equal pooled scores (a max-pool plateau) keep the earlier keys, as the reference does.
        order = torch.sort(pooled, dim=-1, descending=True, stable=True).indices[:, :, :budget]
        kept = torch.cat([order, observed.expand(B, H, -1)], dim=-1).sort(dim=-1).values
        self._gather(kept)
        return kept

    def _scores(self, q_obs: torch.Tensor, qk_norm: bool, q_scale: Optional[torch.Tensor]) -> torch.Tensor:
        """float64 ``[batch, heads, length]``: sum over the observation queries (and the query heads of each kv
        head's group) of their logits with each cached key. The sum over queries is folded into one query
        vector first (the logits are linear in q), so this reads the keys once."""
        B, H, L, D = self.keys.shape
        q64 = q_obs.double()
        if qk_norm:
            q64 = F.normalize(q64, dim=-1)
            if q_scale is not None:
                q64 = q64 * q_scale.double().view(1, -1, 1, 1)
        q_sum = q64.sum(2).view(B, H, -1, D).sum(2)  # [B, H, D]
        scores = torch.empty(B, H, L, dtype=torch.float64, device=q_obs.device)
        chunk = max(1, _SCORE_CHUNK_ELEMENTS // (H * D))
        for b in range(B):
            for j in range(0, L, chunk):
                k64 = self.keys[b, :, j : j + chunk].double()  # [H, chunk, D]
                if qk_norm:
                    k64 = F.normalize(k64, dim=-1)
                scores[b, :, j : j + chunk] = (k64 @ q_sum[b].unsqueeze(-1)).squeeze(-1)
        return scores

    def _gather(self, kept: torch.Tensor) -> None:
        """Move the kept positions (int64 ``[batch, heads, kept]``) into new buffers sized for the kept keys
        and the scales not appended yet; the old buffers are freed."""
        B, H, n, D = *kept.shape, self._k.shape[3]
        capacity = n + sum(self._sizes[self._scales :])
        index = kept.unsqueeze(-1).expand(B, H, n, D)
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = torch.empty(B, H, capacity, D, dtype=old.dtype, device=old.device)
            torch.gather(old[:, :, : self._length], 2, index, out=new[:, :, :n])
            setattr(self, name, new)
        self._length = n
        self._compressed = True

