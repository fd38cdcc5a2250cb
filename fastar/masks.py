"""Structured attention masks: small objects that describe which keys each query sees, never an Lq x Lk tensor.

Conventions (docs/masks.md):

* Boolean masks say True = attend. Queries are the **last** ``Lq`` of the ``Lk`` key positions
  (bottom-right alignment, as FlashAttention and FlashInfer): query ``i`` sits at key position
  ``i' = i + (Lk - Lq)``.
* Ragged caches: with ``kv_lens`` (int ``[B]``) sequence ``b`` has ``Lk_b = kv_lens[b]`` keys; its queries
  sit at ``i + (Lk_b - Lq)`` and key positions ``>= Lk_b`` do not exist (never visible).

Masks:

=========================================  =================================================================
``Causal()``                               key ``j`` visible iff ``j <= i'``
``Window(left, sinks=0)``                  ``j <= i'`` and (``j >= i' - left`` or ``j < sinks``)
``BlockCausal(block_ids | block_size |     a block id per token; ``relation`` "causal" ``kb <= qb``,
block_lengths, relation="causal")``        "same" ``kb == qb``, "prev" ``qb - 1 <= kb <= qb``
``Tree(parents)``                          tree verification: the prefix is visible, inside the tree a
                                           node sees itself and its ancestors
``Dense(mask)`` / ``Dense.from_packed``    any bool mask ``[Lq, Lk]`` or ``[B, Lq, Lk]``
``a & b`` (:class:`And`)                   intersection
=========================================  =================================================================

Every mask has ``materialize(Lq, Lk, batch=None, kv_lens=None)`` -> bool ``[B or 1, Lq, Lk]`` (the
definition, for tests and users) and ``lower(batch, Lq, Lk, device, kv_lens=None)`` -> :class:`MaskArgs`,
the AND of optional terms the kernels evaluate (``struct AttentionMask`` in ``csrc/core/attention.h``).
The structured terms let the kernels skip whole key tiles a mask hides; only ``Tree``, ``Dense`` and the
compositions that have no structured form become bit-packed masks.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from ._common import RELATIONS, Device, as_int, check, check_relation

BLOCK_NONE, BLOCK_CAUSAL, BLOCK_SAME, BLOCK_PREV = 0, 1, 2, 3
BLOCK_NAMES = ("none", *RELATIONS)  # the attention op's block_relation, indexed by BLOCK_*
_INT32 = torch.iinfo(torch.int32)
_INT64_MAX = torch.iinfo(torch.int64).max


class MaskArgs(NamedTuple):
    """The mask arguments of the attention ops: ``struct AttentionMask`` of ``csrc/core/attention.h``.

    A key is visible iff every present term allows it (``mask_visible`` there), per sequence ``b`` with
    ``diag = Lk_b - Lq`` (``bottom_right``) or ``0``, and ``d = i + diag``:

    * ``causal``: ``j <= d``.
    * ``window``: ``d - window_left <= j <= d`` or ``j < window_sinks``.
    * ``block_relation`` (0 none, 1 causal, 2 same, 3 prev) between ``q_block_ids`` (int32 ``[B or 1, Lq]``)
      and ``k_block_ids`` (int32 ``[B or 1, Lk]``).
    * ``bits`` (uint8 ``[B or 1, Lq, ceil(bits_cols / 8)]``): a bit-packed mask over the last ``bits_cols``
      keys of each sequence (key ``j`` is column ``c = j - (Lk_b - bits_cols)``: bit ``c % 8`` of byte
      ``c // 8``, little-endian as FlashInfer); earlier keys pass this term.
    * ``bias``: an additive float mask, for the SDPA drop-in only (the mask objects leave it None).
    """

    causal: bool
    bottom_right: bool
    window: bool
    window_left: int
    window_sinks: int
    block_relation: int
    q_block_ids: Optional[torch.Tensor]
    k_block_ids: Optional[torch.Tensor]
    bits: Optional[torch.Tensor]
    bits_cols: int
    bias: Optional[torch.Tensor]

    @classmethod
    def none(cls) -> "MaskArgs":
        """No mask: every key is visible."""
        return cls(False, True, False, 0, 0, BLOCK_NONE, None, None, None, 0, None)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool ``[..., n]`` -> uint8 ``[..., ceil(n / 8)]``: column ``c`` is bit ``c % 8`` of byte ``c // 8``."""
    n = mask.shape[-1]
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, -n % 8))
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8, device=mask.device)
    return (padded.unflatten(-1, (-1, 8)) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 ``[..., ceil(n / 8)]`` -> bool ``[..., n]``, the inverse of :func:`pack_bits`."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., :n].bool()


def _int_tensor(values, name: str, dims: Tuple[int, ...]) -> torch.Tensor:
    """An integer tensor (from a tensor or nested lists) with a dimension count in ``dims``."""
    t = values if isinstance(values, torch.Tensor) else torch.as_tensor(values)
    if t.numel() == 0 and not isinstance(values, torch.Tensor):
        t = t.to(torch.int64)  # an empty list comes out as float32
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {t.dtype}")
    if t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(t.shape)}")
    return t


def _check_batch(mask_batch: int, batch: int, what: str) -> None:
    if mask_batch not in (1, batch):
        raise ValueError(f"{what} is given for {mask_batch} sequences but the batch has {batch}")


class _Geometry:
    """Where the queries and keys of each sequence are, for :meth:`Mask.materialize`.

    ``lk``: int64 ``[G, 1, 1]`` keys per sequence (``G`` = B with ``kv_lens``, else 1); ``qpos``: int64
    ``[G, Lq, 1]`` the key position of each query; ``j``: int64 ``[1, 1, Lk]`` key positions.
    """

    def __init__(self, batch: int, Lq: int, Lk: int, kv_lens: Optional[torch.Tensor], device: torch.device):
        self.batch, self.Lq, self.Lk, self.kv_lens = batch, Lq, Lk, kv_lens
        if kv_lens is None:
            self.lk = torch.full((1, 1, 1), Lk, dtype=torch.int64, device=device)
        else:
            self.lk = kv_lens.to(device=device, dtype=torch.int64).view(-1, 1, 1)
        self.qpos = self.lk - Lq + torch.arange(Lq, device=device).view(1, -1, 1)
        self.j = torch.arange(Lk, device=device).view(1, 1, -1)


class Mask:
    """Base class of the structured masks. Combine masks with ``&``."""

    def _mask_batch(self) -> int:
        """Sequences the mask's own tensors describe: 1 when the mask is shared by the batch."""
        return 1

    def _device(self) -> Optional[torch.device]:
        """Device of the mask's own tensors (None for purely structural masks)."""
        return None

    def _visible(self, geo: _Geometry) -> torch.Tensor:
        """bool, broadcastable to ``[B, Lq, Lk]``: the mask's rule (keys past ``Lk_b`` are cut later)."""
        raise NotImplementedError

    def lower(
        self, batch: int, Lq: int, Lk: int, device: Device, kv_lens: Optional[torch.Tensor] = None
    ) -> MaskArgs:
        """The kernels' arguments for ``batch`` sequences of ``Lq`` queries over (up to) ``Lk`` keys.

        ``kv_lens`` (int ``[batch]``, keys per sequence) matters only to masks whose terms cannot follow a
        per-sequence length by themselves (block ids of the queries, dense masks); the op must pass the same
        ``kv_lens`` to the kernel.
        """
        raise NotImplementedError

    def materialize(
        self,
        Lq: int,
        Lk: int,
        batch: Optional[int] = None,
        kv_lens: Optional[torch.Tensor] = None,
        device: Device = None,
    ) -> torch.Tensor:
        """bool ``[B or 1, Lq, Lk]`` (True = attend): the mask as a dense tensor.

        ``batch`` defaults to ``len(kv_lens)``, else to the mask's own batch. The result has one row per
        sequence when the mask or ``kv_lens`` differ between sequences, else a single row shared by all.
        With ``kv_lens`` (int ``[B]``, ``0 <= kv_lens[b] <= Lk``) sequence ``b`` has ``kv_lens[b]`` keys and
        the later key positions are False.
        """
        Lq, Lk = as_int(Lq, "Lq"), as_int(Lk, "Lk")
        mask_batch = self._mask_batch()
        if batch is None:
            batch = kv_lens.shape[0] if kv_lens is not None else mask_batch
        _check_batch(mask_batch, batch, type(self).__name__)
        if device is None:
            device = self._device() or (kv_lens.device if kv_lens is not None else torch.device("cpu"))
        if kv_lens is not None:
            if kv_lens.shape != (batch,):
                raise ValueError(f"kv_lens must have shape [{batch}], got {tuple(kv_lens.shape)}")
            if bool(((kv_lens < 0) | (kv_lens > Lk)).any()):
                raise ValueError(f"kv_lens must lie in [0, Lk={Lk}]")
        geo = _Geometry(batch, Lq, Lk, kv_lens, device)
        visible = self._visible(geo) & (geo.j < geo.lk)
        rows = batch if mask_batch > 1 or kv_lens is not None else 1
        return visible.expand(rows, Lq, Lk)

    def __and__(self, other: "Mask") -> "And":
        if not isinstance(other, Mask):
            return NotImplemented
        return And(self, other)


class Causal(Mask):
    """Causal attention, bottom-right aligned: query ``i`` sees keys ``j <= i + (Lk - Lq)``."""

    def _visible(self, geo: _Geometry) -> torch.Tensor:
        return geo.j <= geo.qpos

    def lower(
        self, batch: int, Lq: int, Lk: int, device: Device, kv_lens: Optional[torch.Tensor] = None
    ) -> MaskArgs:
        return MaskArgs.none()._replace(causal=True)

    def __repr__(self) -> str:
        return "Causal()"


class Window(Mask):
    """Causal sliding window with attention sinks (StreamingLLM): with ``i' = i + (Lk - Lq)``, key ``j`` is
    visible iff ``j <= i'`` and (``i' - left <= j`` or ``j < sinks``).

    ``left`` keys before the query's own position (the window holds ``left + 1`` keys); the ``sinks`` first
    keys stay visible to every later query. Sinks obey causality too. Values past the int64 range cover every
    key already and are stored as its maximum.
    """

    def __init__(self, left: int, sinks: int = 0):
        left, sinks = as_int(left, "left"), as_int(sinks, "sinks")
        if left < 0 or sinks < 0:
            raise ValueError(f"Window needs left >= 0 and sinks >= 0, got left={left}, sinks={sinks}")
        # Past int64 (the kernels' type) a window or sink count covers every key already: same meaning.
        self.left, self.sinks = min(left, _INT64_MAX), min(sinks, _INT64_MAX)

    def _visible(self, geo: _Geometry) -> torch.Tensor:
        return (geo.j <= geo.qpos) & ((geo.qpos - geo.j <= self.left) | (geo.j < self.sinks))

    def lower(
        self, batch: int, Lq: int, Lk: int, device: Device, kv_lens: Optional[torch.Tensor] = None
    ) -> MaskArgs:
        return MaskArgs.none()._replace(causal=True, window=True, window_left=self.left, window_sinks=self.sinks)

    def __repr__(self) -> str:
        return f"Window(left={self.left}, sinks={self.sinks})"


class BlockCausal(Mask):
    """Attention between blocks of tokens (VAR scales, block diffusion): each token has a block id and
    query ``q`` sees key ``k`` iff their ids satisfy ``relation``:

    * ``"causal"``: ``block(k) <= block(q)`` (bidirectional inside a block, causal across; block size 1 is
      causal attention),
    * ``"same"``: ``block(k) == block(q)`` (M-VAR, Switti),
    * ``"prev"``: ``block(q) - 1 <= block(k) <= block(q)`` (HMAR / Markov VAR).

    The ids are given for the key positions; the queries are the last ``Lq`` of them (of each sequence's
    ``Lk_b`` keys with ``kv_lens``), so a sequence needs at least ``Lq`` keys. Give exactly one of:

    * ``block_ids``: int ``[Lk]`` or ``[B, Lk]``, the block of each key position;
    * ``block_size``: token ``t`` is in block ``t // block_size``;
    * ``block_lengths``: int ``[nblocks]`` or ``[B, nblocks]`` (per sequence, CtrlDiff), the lengths of the
      consecutive blocks from the first key; they must cover every key of the sequence.
    """

    def __init__(
        self,
        block_ids=None,
        *,
        block_size: Optional[int] = None,
        block_lengths=None,
        relation: str = "causal",
    ):
        if sum(x is not None for x in (block_ids, block_size, block_lengths)) != 1:
            raise ValueError("BlockCausal takes exactly one of block_ids, block_size, block_lengths")
        self.relation = check_relation(relation)
        self.block_ids: Optional[torch.Tensor] = None
        self.block_size: Optional[int] = None
        self.block_lengths: Optional[torch.Tensor] = None
        if block_ids is not None:
            ids = _int_tensor(block_ids, "block_ids", (1, 2))
            check(((ids >= _INT32.min) & (ids <= _INT32.max)).all(), ValueError, "block_ids must fit in int32",
                  sync=True)
            self.block_ids = ids.to(torch.int32).reshape(-1, ids.shape[-1])
        elif block_size is not None:
            self.block_size = as_int(block_size, "block_size")
            if self.block_size <= 0:
                raise ValueError(f"block_size must be positive, got {self.block_size}")
        else:
            lengths = _int_tensor(block_lengths, "block_lengths", (1, 2))
            if lengths.shape[-1] == 0:
                raise ValueError("block_lengths must be a non-empty list of non-negative lengths")
            check((lengths >= 0).all(), ValueError, "block_lengths must be a non-empty list of non-negative lengths",
                  sync=True)
            self.block_lengths = lengths.to(torch.int64).reshape(-1, lengths.shape[-1])

    def _mask_batch(self) -> int:
        for t in (self.block_ids, self.block_lengths):
            if t is not None:
                return t.shape[0]
        return 1

    def _device(self) -> Optional[torch.device]:
        for t in (self.block_ids, self.block_lengths):
            if t is not None:
                return t.device
        return None

    def _key_ids(self, Lk: int, kv_lens: Optional[torch.Tensor], device: Device) -> torch.Tensor:
        """int32 ``[B or 1, Lk]``: the block of each key position."""
        positions = torch.arange(Lk, device=device)
        if self.block_ids is not None:
            if self.block_ids.shape[-1] != Lk:
                raise ValueError(f"block_ids has {self.block_ids.shape[-1]} tokens but there are Lk={Lk} keys")
            return self.block_ids.to(device)
        if self.block_size is not None:
            return (positions // self.block_size).to(torch.int32).unsqueeze(0)
        ends = self.block_lengths.cumsum(-1)
        cover = "block_lengths cover fewer tokens than a sequence's keys"
        if kv_lens is None:
            check((ends[:, -1] >= Lk).all(), ValueError, f"{cover} (Lk={Lk})")
        elif ends.device == kv_lens.device:
            check((ends[:, -1] >= kv_lens).all(), ValueError, cover)
        # Positions past the last block (beyond the sequence's keys, never read) get id nblocks.
        ends = ends.to(device)
        ids = torch.searchsorted(ends, positions.expand(ends.shape[0], Lk).contiguous(), right=True)
        return ids.to(torch.int32)

    def _ids(self, batch: int, Lq: int, Lk: int, device: Device, kv_lens: Optional[torch.Tensor]):
        """(query ids int32 ``[B or 1, Lq]``, key ids int32 ``[B or 1, Lk]``): the queries are the last
        ``Lq`` keys of each sequence.

        Lengths ``kv_lens`` on the CPU are checked (each sequence holds at least ``Lq`` keys); on a device
        they are not read (no host sync), and a shorter sequence's queries take the ids of its first keys."""
        _check_batch(self._mask_batch(), batch, "BlockCausal")
        fewer = f"BlockCausal: the queries are the last Lq={Lq} keys, but a sequence has fewer keys"
        if Lk < Lq:
            raise ValueError(fewer)
        if kv_lens is not None:
            check((kv_lens >= Lq).all(), ValueError, fewer)
        k_ids = self._key_ids(Lk, kv_lens, device)
        if kv_lens is None:
            q_ids = k_ids[:, Lk - Lq :]
        else:
            qpos = kv_lens.to(device=device, dtype=torch.int64).view(-1, 1) - Lq + torch.arange(Lq, device=device)
            q_ids = torch.gather(k_ids.expand(batch, Lk), 1, qpos.clamp(0, Lk - 1))
        return q_ids.contiguous(), k_ids.contiguous()

    def _visible(self, geo: _Geometry) -> torch.Tensor:
        q_ids, k_ids = self._ids(geo.batch, geo.Lq, geo.Lk, geo.j.device, geo.kv_lens)
        # int64, so that qb - 1 cannot wrap around for int32 ids.
        qb, kb = q_ids.to(torch.int64).unsqueeze(2), k_ids.to(torch.int64).unsqueeze(1)
        if self.relation == "causal":
            return kb <= qb
        if self.relation == "same":
            return kb == qb
        return (kb <= qb) & (kb.long() >= qb.long() - 1)  # int64: qb - 1 must not wrap at -2**31

    def lower(
        self, batch: int, Lq: int, Lk: int, device: Device, kv_lens: Optional[torch.Tensor] = None
    ) -> MaskArgs:
        q_ids, k_ids = self._ids(batch, Lq, Lk, device, kv_lens)
        return MaskArgs.none()._replace(
            block_relation=BLOCK_NAMES.index(self.relation), q_block_ids=q_ids, k_block_ids=k_ids
        )

    def __repr__(self) -> str:
        given = (
            f"block_size={self.block_size}"
            if self.block_size is not None
            else f"block_ids={self.block_ids.tolist()}"
            if self.block_ids is not None
            else f"block_lengths={self.block_lengths.tolist()}"
        )
        return f"BlockCausal({given}, relation={self.relation!r})"


class Tree(Mask):
    """Tree verification (Medusa, EAGLE, SpecInfer): the queries are the ``T`` draft nodes, which are also
    the last ``T`` keys of each sequence; the keys before them (the prefix, KV cache) are visible to every
    node; inside the tree a node sees itself and its ancestors.

    ``parents``: int ``[T]`` (shared by the batch) or ``[B, T]``; ``parents[t]`` is the node index of ``t``'s
    parent, which must come before it (``-1 <= parents[t] < t``); ``-1`` makes ``t`` a root (a child of the
    last prefix token). Position id of node ``t`` = ``prefix_len + depth(t)`` (:attr:`position_ids`).
    """

    def __init__(self, parents):
        parents = _int_tensor(parents, "parents", (1, 2)).to(torch.int64)
        T = parents.shape[-1]
        if T == 0:
            raise ValueError("Tree needs at least one node")
        node = torch.arange(T, device=parents.device)
        check(((parents >= -1) & (parents < node)).all(), ValueError,
              "Tree: parents[..., t] must lie in [-1, t) for every node t (a parent comes before its child)", sync=True)
        self.parents = parents
        self.choices: Optional[Tuple[Tuple[int, ...], ...]] = None
        flat = parents.reshape(-1, T)
        # ancestors[b, t, s]: node s is t or an ancestor of t; built in node order since parents come first.
        ancestors = torch.zeros(flat.shape[0], T, T, dtype=torch.bool, device=parents.device)
        depth = torch.zeros(flat.shape[0], T, dtype=torch.int64, device=parents.device)
        for t in range(T):
            p = flat[:, t]
            has_parent = (p >= 0).view(-1, 1)
            parent_row = ancestors[torch.arange(flat.shape[0]), p.clamp(min=0)]
            ancestors[:, t] = parent_row & has_parent
            ancestors[:, t, t] = True
            depth[:, t] = torch.where(p >= 0, depth.gather(1, p.clamp(min=0).view(-1, 1)).view(-1) + 1, 0)
        self._ancestors = ancestors
        self._depth = depth
        self._bits = pack_bits(ancestors)
        self._shape_info: Optional[Tuple[int, bool]] = None
        if not torch.compiler.is_compiling():  # a host sync: a tree built in a compiled region reads it on first use
            self._acceptance_shape()

    def _acceptance_shape(self) -> Tuple[int, bool]:
        """For the acceptance ops: the nodes on the deepest root-to-node path, and whether node 0 is the only root
        (the verified token heading an attention tree, as from_choices and from_next_links build it)."""
        if self._shape_info is None:
            flat = self.parents.reshape(-1, self.num_nodes)
            rooted = bool((flat[:, 0] == -1).all() and (flat[:, 1:] >= 0).all())
            self._shape_info = (int(self._depth.max()) + 1, rooted)
        return self._shape_info

    @classmethod
    def from_choices(cls, choices: Sequence[Sequence[int]]) -> "Tree":
        """The tree of Medusa/EAGLE choice lists (``choices`` like ``[[0], [1], [0, 0], ...]``: a path of
        top-k indices from the root, every prefix of a path also listed).

        Nodes follow Medusa's buffers: node 0 is the root (the last accepted token, itself one of the ``T``
        tree tokens, parent ``-1``) and node ``k >= 1`` is the ``k``-th choice sorted by (length, path), whose
        parent is the node of the path without its last step. So ``T = len(choices) + 1`` and the mask,
        :attr:`position_ids` and :meth:`retrieve_paths` equal Medusa's ``medusa_attn_mask`` (plus the
        visible prefix), ``medusa_position_ids`` and ``retrieve_indices``. :attr:`choices` holds the path of
        every node (``()`` for the root).
        """
        paths = [tuple(as_int(c, "a choice index") for c in choice) for choice in choices]
        for path in paths:
            if not path or min(path) < 0:
                raise ValueError(f"a choice must be a non-empty path of non-negative indices, got {list(path)}")
        if len(set(paths)) != len(paths):
            raise ValueError("choices holds a path twice")
        ordered = [()] + sorted(paths, key=lambda p: (len(p), p))
        index = {path: k for k, path in enumerate(ordered)}
        missing = [list(p) for p in ordered[1:] if p[:-1] not in index]
        if missing:
            raise ValueError(f"choices {missing[:3]} lack their parent path")
        tree = cls([-1] + [index[p[:-1]] for p in ordered[1:]])
        tree.choices = tuple(ordered)
        return tree

    @classmethod
    def from_next_links(cls, next_token, next_sibling) -> "Tree":
        """The tree of first-child / next-sibling links (SGLang's ``retrive_next_token`` and
        ``retrive_next_sibling``): int ``[T]`` or ``[B, T]``, ``next_token[i]`` the first child of node ``i`` and
        ``next_sibling[i]`` the next child of ``i``'s parent (``-1``: none). Node 0 is the root (the last verified
        token, the first tree token, as in :meth:`from_choices`), so the tree tokens are SGLang's candidates.

        Every node must be reached exactly once from the root, after its parent (a higher index), and siblings
        must be linked in increasing index order, the order the acceptance rules try them in (as SGLang builds
        them); anything else raises ``ValueError``.
        """
        first = _int_tensor(next_token, "next_token", (1, 2)).to(torch.int64)
        sibling = _int_tensor(next_sibling, "next_sibling", (1, 2)).to(torch.int64)
        if first.shape != sibling.shape:
            raise ValueError(f"next_token {tuple(first.shape)} and next_sibling {tuple(sibling.shape)} differ")
        n_links = first.shape[-1]
        if n_links < 2:
            raise ValueError("from_next_links needs the root and at least one more node (T >= 2)")
        rows = []
        for b, (firsts, siblings) in enumerate(zip(first.reshape(-1, n_links).tolist(),
                                                   sibling.reshape(-1, n_links).tolist())):
            parents = [None] * n_links
            stack = [0]
            while stack:
                node = stack.pop()
                child, previous = firsts[node], 0
                while child != -1:
                    if not 0 < child < n_links:
                        raise ValueError(f"Tree.from_next_links: row {b}: link {child} outside [1, {n_links})")
                    if parents[child] is not None:
                        raise ValueError(f"Tree.from_next_links: row {b}: node {child} is reached twice (a cycle "
                                         "or a shared child)")
                    if child <= node or child <= previous:
                        raise ValueError(f"Tree.from_next_links: row {b}: node {child} comes before its parent "
                                         f"{node} or an earlier sibling {previous}; links must go to higher indices")
                    parents[child] = node
                    stack.append(child)
                    previous, child = child, siblings[child]
            missing = [i for i in range(1, n_links) if parents[i] is None]
            if missing:
                raise ValueError(f"Tree.from_next_links: row {b}: nodes {missing[:5]} are not reached from the root")
            rows.append([-1] + parents[1:])
        parents = torch.tensor(rows, dtype=torch.int64, device=first.device)
        return cls(parents[0] if first.dim() == 1 else parents)

    @property
    def num_nodes(self) -> int:
        return self.parents.shape[-1]

    @property
    def position_ids(self) -> torch.Tensor:
        """int64, shaped like ``parents``: the depth of each node (roots 0). Add the prefix length for the
        absolute positions."""
        return self._depth.view(self.parents.shape)

    def retrieve_paths(self) -> torch.Tensor:
        """int64 ``[n_paths, max_depth + 1]`` (``[B, n_paths, max_depth + 1]`` for batched parents): the node
        path from the root to each leaf, ``-1`` padded; leaves in decreasing node order (Medusa's
        ``retrieve_indices``)."""
        per_tree = []
        for parents in self.parents.reshape(-1, self.num_nodes).tolist():
            has_child = {p for p in parents if p >= 0}
            paths = []
            for leaf in reversed(range(len(parents))):
                if leaf in has_child:
                    continue
                path = [leaf]
                while parents[path[-1]] >= 0:
                    path.append(parents[path[-1]])
                paths.append(path[::-1])
            per_tree.append(paths)
        width = max(len(p) for paths in per_tree for p in paths)
        rows = max(len(paths) for paths in per_tree)
        out = torch.full((len(per_tree), rows, width), -1, dtype=torch.int64)
        for b, paths in enumerate(per_tree):
            for r, path in enumerate(paths):
                out[b, r, : len(path)] = torch.tensor(path)
        return out[0] if self.parents.dim() == 1 else out

    def _mask_batch(self) -> int:
        return self._ancestors.shape[0]

    def _device(self) -> Optional[torch.device]:
        return self.parents.device

    def _check(self, batch: int, Lq: int, Lk: int) -> None:
        _check_batch(self._mask_batch(), batch, "Tree")
        if Lq != self.num_nodes:
            raise ValueError(f"Tree has {self.num_nodes} nodes but Lq={Lq}: the queries are the tree nodes")
        if Lk < self.num_nodes:
            raise ValueError(f"Tree has {self.num_nodes} nodes but only Lk={Lk} keys: the nodes are the last keys")

    def _visible(self, geo: _Geometry) -> torch.Tensor:
        self._check(geo.batch, geo.Lq, geo.Lk)
        T = self.num_nodes
        if bool((geo.lk < T).any()):
            raise ValueError(f"Tree has {T} nodes but a sequence has fewer keys")
        node = geo.j - (geo.lk - T)  # key position -> tree node (negative: the prefix)
        ancestors = self._ancestors.to(geo.j.device)
        index = node.clamp(min=0).expand(max(ancestors.shape[0], node.shape[0]), T, geo.Lk)
        in_tree = torch.gather(ancestors.expand(index.shape[0], T, T), 2, index.clamp(max=T - 1))
        return (node < 0) | in_tree

    def lower(
        self, batch: int, Lq: int, Lk: int, device: Device, kv_lens: Optional[torch.Tensor] = None
    ) -> MaskArgs:
        self._check(batch, Lq, Lk)
        return MaskArgs.none()._replace(bits=self._bits.to(device), bits_cols=self.num_nodes)

    def __repr__(self) -> str:
        return f"Tree(parents={self.parents.tolist()})"


class Dense(Mask):
    """An arbitrary mask: bool ``[Lq, Lk]`` or ``[B, Lq, Lk]``, True = attend; column ``j`` is key position
    ``j`` (with ``kv_lens``, columns ``>= kv_lens[b]`` are ignored). Stored bit-packed (:meth:`from_packed`);
    the kernels read it bit by bit, so prefer a structured mask where one exists.
    """

    def __init__(self, mask: torch.Tensor):
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError("Dense takes a bool tensor (True = attend); an additive float mask is a bias")
        if mask.dim() not in (2, 3):
            raise ValueError(f"Dense takes a mask [Lq, Lk] or [B, Lq, Lk], got shape {tuple(mask.shape)}")
        self.Lq, self.Lk = mask.shape[-2:]
        self.bits = pack_bits(mask.reshape(-1, self.Lq, self.Lk))

    @classmethod
    def from_packed(cls, bits: torch.Tensor, Lq: int, Lk: int) -> "Dense":
        """A mask already bit-packed: uint8 ``[Lq, ceil(Lk / 8)]`` or ``[B, Lq, ceil(Lk / 8)]``, one row of
        bytes per query, key ``c`` = bit ``c % 8`` of byte ``c // 8`` (FlashInfer's little-endian order, each
        row starting on a byte). Bits past ``Lk`` are ignored."""
        Lq, Lk = as_int(Lq, "Lq"), as_int(Lk, "Lk")
        if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8:
            raise TypeError("Dense.from_packed takes a uint8 tensor")
        if bits.dim() not in (2, 3) or tuple(bits.shape[-2:]) != (Lq, (Lk + 7) // 8):
            raise ValueError(
                f"packed bits for Lq={Lq}, Lk={Lk} must have shape [Lq, {(Lk + 7) // 8}] or [B, Lq, {(Lk + 7) // 8}], "
                f"got {tuple(bits.shape)}"
            )
        mask = cls.__new__(cls)
        mask.Lq, mask.Lk = Lq, Lk
        mask.bits = bits.reshape(-1, Lq, bits.shape[-1])
        return mask

    def _mask_batch(self) -> int:
        return self.bits.shape[0]

    def _device(self) -> Optional[torch.device]:
        return self.bits.device

    def _check(self, batch: int, Lq: int, Lk: int) -> None:
        _check_batch(self._mask_batch(), batch, "Dense")
        if (Lq, Lk) != (self.Lq, self.Lk):
            raise ValueError(f"Dense mask is [{self.Lq}, {self.Lk}] but the attention is Lq={Lq} x Lk={Lk}")

    def _visible(self, geo: _Geometry) -> torch.Tensor:
        self._check(geo.batch, geo.Lq, geo.Lk)
        return unpack_bits(self.bits.to(geo.j.device), self.Lk)

    def lower(
        self, batch: int, Lq: int, Lk: int, device: Device, kv_lens: Optional[torch.Tensor] = None
    ) -> MaskArgs:
        self._check(batch, Lq, Lk)
        bits = self.bits.to(device)
        if kv_lens is not None:
            # The kernels align the bit columns to each sequence's end (column c = key c - (Lk - Lk_b)):
            # shift row b right by Lk - Lk_b so that column j stays key j.
            shift = Lk - kv_lens.to(device=device, dtype=torch.int64).view(-1, 1, 1)
            source = (torch.arange(Lk, device=device) - shift).clamp(0, Lk - 1).expand(batch, Lq, Lk)
            dense = unpack_bits(bits, Lk).expand(batch, Lq, Lk)
            bits = pack_bits(torch.gather(dense, 2, source))
        return MaskArgs.none()._replace(bits=bits.contiguous(), bits_cols=Lk)

    def __repr__(self) -> str:
        return f"Dense(batch={self._mask_batch()}, Lq={self.Lq}, Lk={self.Lk})"


class And(Mask):
    """The intersection of masks (``a & b``): a key is visible iff every mask shows it.

    Lowering keeps structure: causal terms are OR-ed, windows with equal sinks keep the smaller ``left``,
    bit-packed terms are AND-ed over the last ``max(bits_cols)`` keys. What has no structured form (a second
    block mask, windows with different sinks) is materialized and AND-ed in as a bit-packed mask.
    """

    def __init__(self, *masks: Mask):
        if not masks:
            raise ValueError("And needs at least one mask")
        flat: List[Mask] = []
        for m in masks:
            if not isinstance(m, Mask):
                raise TypeError(f"And takes fastar.masks objects, got {type(m).__name__}")
            flat.extend(m.masks if isinstance(m, And) else (m,))
        self.masks: Tuple[Mask, ...] = tuple(flat)

    def _mask_batch(self) -> int:
        return max(m._mask_batch() for m in self.masks)

    def _device(self) -> Optional[torch.device]:
        return next((d for d in (m._device() for m in self.masks) if d is not None), None)

    def _visible(self, geo: _Geometry) -> torch.Tensor:
        visible = self.masks[0]._visible(geo)
        for m in self.masks[1:]:
            visible = visible & m._visible(geo)
        return visible

    def lower(
        self, batch: int, Lq: int, Lk: int, device: Device, kv_lens: Optional[torch.Tensor] = None
    ) -> MaskArgs:
        _check_batch(self._mask_batch(), batch, "And")
        structured: List[MaskArgs] = []
        as_bits: List[Mask] = []
        sinks, has_block = None, False
        for m in self.masks:
            if (isinstance(m, Window) and sinks not in (None, m.sinks)) or (isinstance(m, BlockCausal) and has_block):
                as_bits.append(m)
                continue
            args = m.lower(batch, Lq, Lk, device, kv_lens)
            structured.append(args)
            sinks = args.window_sinks if args.window else sinks
            has_block |= args.block_relation != BLOCK_NONE
        if as_bits:
            dense = And(*as_bits).materialize(Lq, Lk, batch, kv_lens, device)
            structured.append(Dense(dense).lower(batch, Lq, Lk, device, kv_lens))

        windows = [a for a in structured if a.window]
        blocks = [a for a in structured if a.block_relation != BLOCK_NONE]
        bits = [a for a in structured if a.bits is not None]
        merged = MaskArgs.none()._replace(causal=any(a.causal for a in structured))
        if windows:
            merged = merged._replace(
                window=True, window_left=min(a.window_left for a in windows), window_sinks=windows[0].window_sinks
            )
        if blocks:
            b = blocks[0]
            merged = merged._replace(
                block_relation=b.block_relation, q_block_ids=b.q_block_ids, k_block_ids=b.k_block_ids
            )
        if len(bits) == 1:
            merged = merged._replace(bits=bits[0].bits, bits_cols=bits[0].bits_cols)
        elif bits:
            merged = merged._replace(bits=_and_bits(bits), bits_cols=max(a.bits_cols for a in bits))
        return merged

    def __repr__(self) -> str:
        return " & ".join(map(repr, self.masks))


def _and_bits(terms: List[MaskArgs]) -> torch.Tensor:
    """AND of bit-packed terms over the last ``W = max(bits_cols)`` keys: a term over fewer keys lets the
    keys before its own columns through, so its columns are left-padded with True."""
    width = max(a.bits_cols for a in terms)
    result = None
    for a in terms:
        dense = unpack_bits(a.bits, a.bits_cols)
        dense = torch.nn.functional.pad(dense, (width - a.bits_cols, 0), value=True)
        result = dense if result is None else result & dense
    return pack_bits(result).contiguous()


__all__ = [
    "And",
    "BlockCausal",
    "Causal",
    "Dense",
    "Mask",
    "MaskArgs",
    "Tree",
    "Window",
    "pack_bits",
    "unpack_bits",
]
