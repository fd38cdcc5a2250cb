"""Next-scale attention (VAR, FlowAR, FlexVAR, M-VAR, HMAR): a multi-scale token sequence and its mask.

A :class:`ScaleLayout` describes the sequence (scale ``s`` is an ``h_s x w_s`` grid of tokens, row-major,
scales one after the other) and which key each query sees; :func:`scale_attention` runs attention over
the whole sequence (training, teacher-forced scoring, CoDe's prefill) or over its last queries, with
hidden key tiles skipped and VAR's ``attn_l2_norm`` (qk_norm) fused in.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import _common
from ._common import (
    FLOAT_DTYPES,
    Device,
    as_int,
    attention_lse,
    check_relation,
    fake,
    four_d,
    head_dim,
    no_grad,
    one_device,
    q_scale_arg,
    softmax_scale,
)

__all__ = ["ScaleLayout", "scale_attention"]

# Classes of tile_map's blocks (TileClass of csrc/core/attention.h); 1 is a partly visible block.
TILE_HIDDEN, TILE_FULL = 0, 2
# The tile the op's tile map is built for (the kernels read it at any tile size of their own).
_OP_TILE = 64


def _positive_int(value, what: str) -> int:
    return as_int(value, what, 1)


def _scale_hw(scale, s: int) -> Tuple[int, int]:
    """(h, w) of scale ``s`` given as a side length or an (h, w) pair."""
    if isinstance(scale, (tuple, list)):
        if len(scale) != 2:
            raise ValueError(f"scale {s} must be a side length or an (h, w) pair, got {scale!r}")
        return _positive_int(scale[0], f"scale {s} height"), _positive_int(scale[1], f"scale {s} width")
    side = _positive_int(scale, f"scale {s}")
    return side, side


class ScaleLayout:
    """The tokens of a multi-scale sequence and the rule of which keys each query sees.

    Args:
        scales: the scales, coarse to fine: square side lengths (VAR 256px ``(1, 2, 3, 4, 5, 6, 8, 10, 13,
            16)``, 680 tokens) or ``(h, w)`` pairs (FlexVAR's arbitrary lists). Scale ``s`` holds ``h_s * w_s``
            tokens, row-major; the scales follow one another.
        relation: which scales a query's scale attends to: ``"causal"`` (itself and the earlier ones: VAR,
            FlowAR), ``"same"`` (itself only: M-VAR, Switti) or ``"prev"`` (itself and the one before: HMAR,
            Markov VAR).
        local_window: ``r`` (int >= 0) restricts keys of other scales to a neighbourhood of the query
            (SparVAR, Markov-VAR); None = no window. A window wider than the largest scale side restricts
            nothing and is stored as that side.
        full_scales: with a window, keys of the first ``full_scales`` scales stay fully visible (a global
            context of the coarse scales).

    Visibility of key token ``b`` (scale ``s_b``, row ``y_b``, column ``x_b``) to query token ``a``:

    * relation: ``"causal"`` ``s_b <= s_a``; ``"same"`` ``s_b == s_a``; ``"prev"`` ``s_a - 1 <= s_b <= s_a``;
    * and, with ``local_window=r``, when ``s_b != s_a`` and ``s_b >= full_scales``: the key's cell centre mapped
      onto the query's grid (integer floor) ``my = ((2 y_b + 1) h_a) // (2 h_b)``,
      ``mx = ((2 x_b + 1) w_a) // (2 w_b)`` must satisfy ``|my - y_a| <= r`` and ``|mx - x_a| <= r``. Keys of
      the query's own scale and of the first ``full_scales`` scales are not restricted.

    Every token sees itself, so no query row is empty. Tables for the kernels (:meth:`token_info`,
    :meth:`scale_hw`, :meth:`tile_map`) and :meth:`bsr` are computed once per argument set and device and
    kept on the object: build a layout once and reuse it across layers and steps.
    """

    def __init__(
        self,
        scales: Sequence[Union[int, Tuple[int, int]]],
        *,
        relation: str = "causal",
        local_window: Optional[int] = None,
        full_scales: int = 0,
    ):
        if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence):
            raise TypeError(f"scales must be a list of side lengths or (h, w) pairs, got {type(scales).__name__}")
        if len(scales) == 0:
            raise ValueError("scales must not be empty")
        check_relation(relation)
        self.hw: List[Tuple[int, int]] = [_scale_hw(scale, s) for s, scale in enumerate(scales)]
        self.relation = relation
        self.local_window: Optional[int] = None
        if local_window is not None:
            # A key's mapped cell and the query lie on one grid, less than its largest side apart: a larger
            # window restricts nothing, and is kept as that side (so the kernels' 32-bit offsets cannot overflow).
            side = max(max(h, w) for h, w in self.hw)
            self.local_window = min(as_int(local_window, "local_window", 0), side)
        self.full_scales = as_int(full_scales, "full_scales", 0, len(self.hw))
        if self.full_scales and self.local_window is None:
            raise ValueError("full_scales only applies with a local_window")
        sizes = [h * w for h, w in self.hw]
        self.ends: List[int] = [sum(sizes[: s + 1]) for s in range(len(sizes))]
        self.starts: List[int] = [end - size for end, size in zip(self.ends, sizes)]
        self._tables: Dict[tuple, torch.Tensor] = {}
        self._bsr: Dict[tuple, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def num_scales(self) -> int:
        return len(self.hw)

    @property
    def num_tokens(self) -> int:
        return self.ends[-1]

    def __repr__(self) -> str:
        window = ""
        if self.local_window is not None:
            window = f", local_window={self.local_window}, full_scales={self.full_scales}"
        return f"ScaleLayout({self.hw}, relation={self.relation!r}{window})"

    def _cached(self, key: tuple, make) -> torch.Tensor:
        if key not in self._tables:
            self._tables[key] = make()
        return self._tables[key]

    def scale_hw(self, device: Device = None) -> torch.Tensor:
        """int32 ``[num_scales, 2]`` (contiguous): ``(h, w)`` of each scale."""
        device = torch.device(device or "cpu")
        return self._cached(("hw", device), lambda: torch.tensor(self.hw, dtype=torch.int32, device=device))

    def token_info(self, device: Device = None) -> torch.Tensor:
        """int32 ``[3, num_tokens]`` (contiguous): rows (scale id, row ``y``, column ``x``) of each token."""
        device = torch.device(device or "cpu")

        def make():
            if device.type != "cpu":
                return self.token_info().to(device)
            per_scale = []
            for s, (h, w) in enumerate(self.hw):
                t = torch.arange(h * w, dtype=torch.int32)
                per_scale.append(torch.stack([torch.full_like(t, s), t // w, t % w]))
            return torch.cat(per_scale, dim=1).contiguous()

        return self._cached(("info", device), make)

    def scale_ids(self, device: Device = None) -> torch.Tensor:
        """int32 ``[num_tokens]``: the scale of each token."""
        return self.token_info(device)[0]

    def _mapped_keys(self) -> torch.Tensor:
        """int32 ``[2, num_scales, num_tokens]``: the (row, column) of each token's cell centre on the grid of
        each scale (the window rule's ``my``, ``mx``), so that the mask needs no per-pair division."""

        def make():
            scale, y, x = self.token_info().to(torch.int64)
            hw = self.scale_hw().to(torch.int64)
            own = hw[scale]  # [L, 2]: (h, w) of each token's own scale
            my = ((2 * y + 1) * hw[:, :1]) // (2 * own[:, 0])
            mx = ((2 * x + 1) * hw[:, 1:]) // (2 * own[:, 1])
            return torch.stack([my, mx]).to(torch.int32)

        return self._cached(("mapped",), make)

    def _visible_rows(self, start: int, stop: int) -> torch.Tensor:
        """bool ``[stop - start, num_tokens]`` on the CPU: whether query tokens ``start..stop`` see each key."""
        info = self.token_info()
        s_b = info[0].view(1, -1)  # keys along columns
        s_a, y_a, x_a = info[:, start:stop, None]  # queries along rows
        if self.relation == "causal":
            visible = s_b <= s_a
        elif self.relation == "same":
            visible = s_b == s_a
        else:
            visible = (s_b <= s_a) & (s_b >= s_a - 1)
        if self.local_window is not None:
            r = self.local_window
            my, mx = self._mapped_keys()[:, info[0, start:stop].long()]  # [n, L] each: keys on the query's grid
            near = ((my - y_a).abs() <= r) & ((mx - x_a).abs() <= r)
            visible = visible & ((s_b == s_a) | (s_b < self.full_scales) | near)
        return visible

    def materialize(self, device: Device = None) -> torch.Tensor:
        """bool ``[num_tokens, num_tokens]`` (True = attend): row = query token, column = key token."""
        return self._visible_rows(0, self.num_tokens).to(device or "cpu")

    def _queries(self, q_offset: int, num_queries: Optional[int]) -> Tuple[int, int]:
        """Validated ``(q_offset, num_queries)``: the queries are tokens ``q_offset .. q_offset + num_queries``."""
        q_offset = as_int(q_offset, "q_offset", 0, self.num_tokens)
        rest = self.num_tokens - q_offset
        if num_queries is None:
            return q_offset, rest
        return q_offset, as_int(num_queries, f"num_queries (q_offset={q_offset})", 0, rest)

    def tile_map(
        self,
        block_q: int = 64,
        block_k: int = 64,
        q_offset: int = 0,
        num_queries: Optional[int] = None,
        device: Device = None,
    ) -> torch.Tensor:
        """uint8 ``[ceil(num_queries / block_q), ceil(num_tokens / block_k)]``: the class of each block of the
        mask's rows ``q_offset .. q_offset + num_queries`` (the queries) by all its columns (the keys):
        0 = no pair visible, 1 = some, 2 = every pair visible. Blocks at the edges hold fewer rows/columns;
        only pairs that exist count."""
        block_q, block_k = _positive_int(block_q, "block_q"), _positive_int(block_k, "block_k")
        q_offset, num_queries = self._queries(q_offset, num_queries)
        device = torch.device(device or "cpu")
        key = ("tiles", block_q, block_k, q_offset, num_queries, device)
        if device.type != "cpu":
            return self._cached(key, lambda: self.tile_map(block_q, block_k, q_offset, num_queries).to(device))
        return self._cached(key, lambda: self._classify(block_q, block_k, q_offset, num_queries))

    def _classify(self, block_q: int, block_k: int, q_offset: int, num_queries: int) -> torch.Tensor:
        L, stop = self.num_tokens, q_offset + num_queries
        nkb = -(-L // block_k)
        # Query blocks in chunks of about 2^20 mask elements: the mask of a large layout (Infinity's 1024px,
        # ~10k tokens) never exists as a whole, and a few large tensor ops beat many small ones.
        chunk = block_q * max(1, 2**20 // (block_q * L))
        rows = [torch.zeros(0, nkb, dtype=torch.uint8)]
        for start in range(q_offset, stop, chunk):
            visible = self._visible_rows(start, min(start + chunk, stop))
            nqb = -(-visible.shape[0] // block_q)
            pad = (0, nkb * block_k - L, 0, nqb * block_q - visible.shape[0])
            # Pairs past the edges do not exist: they count as visible for "every" and hidden for "some".
            some = F.pad(visible, pad, value=False).view(nqb, block_q, nkb, block_k).any(3).any(1)
            every = F.pad(visible, pad, value=True).view(nqb, block_q, nkb, block_k).all(3).all(1)
            rows.append(some.to(torch.uint8) + every.to(torch.uint8))
        return torch.cat(rows).contiguous()

    def bsr(
        self, block_q: int = 64, block_k: int = 64, q_offset: int = 0, num_queries: Optional[int] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block-sparse (BSR) form of :meth:`tile_map`, on the CPU: ``(crow_indices`` int32
        ``[nqb + 1]``, ``col_indices`` int32 ``[nnz]``, ``is_full`` bool ``[nnz])``. Query block ``i``
        visits the key blocks ``col_indices[crow_indices[i]:crow_indices[i + 1]]`` (ascending), each with at
        least one visible pair; ``is_full`` says every pair of the block is visible (no per-element mask)."""
        tiles = self.tile_map(block_q, block_k, q_offset, num_queries)
        key = (block_q, block_k) + self._queries(q_offset, num_queries)
        if key not in self._bsr:
            visited = tiles != TILE_HIDDEN
            crow = torch.zeros(tiles.shape[0] + 1, dtype=torch.int32)
            crow[1:] = visited.sum(1).cumsum(0)
            cols = visited.nonzero()[:, 1].to(torch.int32)
            self._bsr[key] = (crow, cols, tiles[visited] == TILE_FULL)
        return self._bsr[key]

    def _sees_every_key(self, q_offset: int) -> bool:
        """Whether every query from token ``q_offset`` to the end sees every token (a cached step of the last
        scale under "causal": the op then runs with no mask)."""
        last = self.num_scales - 1
        if q_offset < self.starts[last]:
            return False  # no relation shows a query the keys of a later scale
        # The queries are all of the last scale; the keys span every scale.
        relation_ok = self.relation == "causal" or last == 0 or (self.relation == "prev" and last == 1)
        window_ok = self.local_window is None or self.full_scales >= last
        return relation_ok and window_ok


def _check_inputs(q, k, v, layout, q_scale) -> None:
    """Shape, dtype and device errors of :func:`scale_attention` but those of ``q_scale``, raised before the op."""
    op = "fastar.scale_attention"
    if not isinstance(layout, ScaleLayout):
        raise TypeError(f"{op}: layout must be a fastar.ScaleLayout, got {type(layout).__name__}")
    four_d(op, "[B, H, L, D]", q=q, k=k, v=v)
    if q.dtype not in FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{op}: q, k, v must share one dtype of float32, float16, bfloat16; got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"{op}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    no_grad(op, q=q, k=k, v=v, q_scale=q_scale)
    B, Hq, Lq, D = q.shape
    head_dim(op, D)
    L = layout.num_tokens
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or Hq % k.shape[1] != 0:
        raise ValueError(f"{op}: k and v must both have shape [B={B}, Hkv, L, D={D}] with Hq={Hq} a multiple of "
                         f"Hkv, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[2] != L:
        raise ValueError(f"{op}: k and v hold {k.shape[2]} tokens but the layout has {L}")
    if Lq > L:
        raise ValueError(f"{op}: q holds {Lq} tokens, more than the layout's {L} (q holds the last Lq tokens)")


def _op_tables(layout: ScaleLayout, Lq: int, device: torch.device):
    """(token_info, scale_hw, tile_map or None) of the op for the last ``Lq`` tokens."""
    if not torch.compiler.is_compiling():
        return layout.token_info(device), layout.scale_hw(device), layout.tile_map(
            _OP_TILE, _OP_TILE, layout.num_tokens - Lq, Lq, device=device
        )
    info, hw, counts, maps = _compile_tables(layout, device)
    # Lq may be a symbol (dynamic shapes): comparing specialises the graph on the count it equals.
    return info, hw, next((m for n, m in zip(counts, maps) if Lq == n), None)


@torch.compiler.assume_constant_result
def _compile_tables(layout: ScaleLayout, device: torch.device):
    """The tables under torch.compile, which calls this at trace time and keeps the result as constants of the
    graph instead of tracing their construction. The query count may be a symbol there, which cannot key a
    table, so the tile maps are built for the counts of the usual calls (the whole sequence, its last scale);
    another count runs without a tile map (the kernels then classify tiles from the scale ids: exactly for the
    relation, while under a window every visited tile is partial)."""
    counts = (layout.num_tokens, layout.num_tokens - layout.starts[-1])
    maps = tuple(layout.tile_map(_OP_TILE, _OP_TILE, layout.num_tokens - n, n, device=device) for n in counts)
    return layout.token_info(device), layout.scale_hw(device), counts, maps


def scale_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: ScaleLayout,
    *,
    scale: Optional[float] = None,
    qk_norm: bool = False,
    q_scale: Optional[torch.Tensor] = None,
    return_lse: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Attention over a multi-scale token sequence under ``layout``'s visibility rule (:class:`ScaleLayout`).

    Args:
        q: ``[B, Hq, Lq, D]``, the queries of the last ``Lq <= L`` tokens (query ``i`` is token
            ``L - Lq + i``): the whole sequence (training, teacher-forced scoring, a multi-scale prefill) or
            its last scale(s).
        k, v: ``[B, Hkv, L, D]`` with ``L = layout.num_tokens`` and ``Hq % Hkv == 0`` (query head ``h`` uses
            kv head ``h // (Hq // Hkv)``). One dtype (float32, float16, bfloat16) for q, k, v; any strides
            with a unit stride along ``D``.
        layout: the :class:`ScaleLayout` of the ``L`` tokens.
        scale: softmax scale; default ``1`` with ``qk_norm``, else ``1/sqrt(D)`` (VAR without
            ``attn_l2_norm`` passes ``0.25/sqrt(D)``).
        qk_norm: VAR's ``attn_l2_norm``: q and k are L2-normalised (``x / max(|x|, 1e-12)``) inside the kernel,
            then q is multiplied by ``q_scale``.
        q_scale: float ``[Hq]`` per-head factor of the normalised queries (VAR passes
            ``exp(min(s_h, log 100))``); None = 1. Only with ``qk_norm``.
        return_lse: also return the natural-log LSE, float32 ``[B, Hq, Lq]``.

    Returns:
        ``out`` ``[B, Hq, Lq, D]`` in q's dtype (softmax and accumulation in float32), or ``(out, lse)``.
    """
    _check_inputs(q, k, v, layout, q_scale)
    q_scale = q_scale_arg("fastar.scale_attention", q, q_scale, qk_norm)
    Lq, D = q.shape[2], q.shape[3]
    q_offset = layout.num_tokens - Lq
    scale = softmax_scale(scale, D, qk_norm)
    out = q.new_empty(q.shape)
    if layout._sees_every_key(q_offset):
        # A cached step (the last scale over the whole cache): attention with no mask and no tables.
        lse = _common.ops().scale_attention(q, k, v, out, float(scale), qk_norm=bool(qk_norm), q_scale=q_scale)
    else:
        info, hw, tiles = _op_tables(layout, Lq, q.device)
        lse = _common.ops().scale_attention(
            q, k, v, out, float(scale), token_info=info, scale_hw=hw, tile_map=tiles, relation=layout.relation,
            local_window=-1 if layout.local_window is None else layout.local_window,
            full_scales=layout.full_scales, qk_norm=bool(qk_norm), q_scale=q_scale, tile_q=_OP_TILE,
            tile_k=_OP_TILE,
        )
    return (out, lse) if return_lse else out


@fake("scale_attention")
def _scale_attention_fake(q, k, v, out, scale, **layout):
    one_device("scale_attention", q, k, v, out, *layout.values())
    return attention_lse(q, out)
