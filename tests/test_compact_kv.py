"""fastar.compact_kv on every backend: after compaction the cache equals one built from the accepted path alone (bit
for bit: it is a copy), contiguous and paged (pages crossing), every cache dtype, ragged acceptance from none to the
full depth, trees with and without the root node; the acceptance ops' outputs end to end; QuantizedKVCache.compact;
every bad input.
"""
from __future__ import annotations

import pytest
import torch

import fastar
from fastar.masks import Tree
from fastar.reference import compact_kv_reference

STATUS_BAD_PATH = 32
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.float8_e4m3fn]


def random_rows(gen, shape, dtype):
    """Random bytes viewed as ``dtype`` (NaN payloads included: a move must keep every bit)."""
    item = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * item), generator=gen, dtype=torch.uint8)
    return raw.view(dtype)


def chain_to(parents, node):
    """The drafted nodes from a child of the root down to ``node``."""
    chain = []
    while node >= 0:
        chain.append(node)
        node = parents[node]
    return chain[::-1]


def make_paths(gen, parents, B, rooted, lengths):
    """path [B, depth + 1] and num_accepted [B] as the acceptance ops return them: row b accepts ``lengths[b]``
    drafts ("full": a deepest path), a prefix of the path to a random node."""
    chains = [chain_to(parents, t) for t in range(len(parents))]
    depth = max(len(c) for c in chains)
    path = torch.full((B, depth + 1), -1, dtype=torch.int32)
    accepted = []
    for b, want in enumerate(lengths):
        if want == "full":
            chain = max(chains, key=len)
        else:
            long_enough = [c for c in chains if len(c) >= want]
            chain = long_enough[int(torch.randint(0, len(long_enough), (1,), generator=gen))][:want]
        nodes = [0] + [t + 1 for t in chain] if rooted else chain
        path[b, : len(nodes)] = torch.tensor(nodes, dtype=torch.int32)
        accepted.append(len(chain))
    return path, torch.tensor(accepted, dtype=torch.int32)


class Layout:
    """A contiguous cache [B, S, H, D], or a paged one [pages, page_size, H, D] whose sequences hold shuffled pages
    (two spare pages that no sequence holds must stay as they are)."""

    def __init__(self, gen, B, capacity, H, D, dtype, page_size=None):
        self.B, self.page_size = B, page_size
        if page_size is None:
            self.block_table = None
            self.k, self.v = (random_rows(gen, (B, capacity, H, D), dtype) for _ in range(2))
            self.capacity = capacity
        else:
            per_seq = -(-capacity // page_size)
            pages = B * per_seq + 2
            order = torch.randperm(pages, generator=gen)[: B * per_seq]
            self.block_table = order.view(B, per_seq).int()
            self.k, self.v = (random_rows(gen, (pages, page_size, H, D), dtype) for _ in range(2))
            self.capacity = per_seq * page_size

    def slot(self, b, pos):
        """(dim-0 index, dim-1 index) of sequence b's position pos."""
        if self.block_table is None:
            return b, pos
        return int(self.block_table[b, pos // self.page_size]), pos % self.page_size


def expected_cache(layout, cache, nodes, path, keep, starts):
    """``cache`` with each sequence's kept nodes written after its prefix: the cache built from the path alone."""
    out = cache.clone()
    for b in range(layout.B):
        for j in range(keep[b]):
            out[layout.slot(b, starts[b] + j)] = nodes[b, int(path[b, j])]
    return out


def as_bytes(t):
    return t.contiguous().view(torch.uint8)


def assert_compacted(layout, got, want, starts, new_lengths, num_nodes):
    """Equal bytes everywhere except each sequence's positions [new length, start + num_nodes) (dropped nodes,
    unspecified)."""
    got, want = as_bytes(got).clone(), as_bytes(want).clone()
    for b in range(layout.B):
        for pos in range(new_lengths[b], starts[b] + num_nodes):
            got[layout.slot(b, pos)] = 0
            want[layout.slot(b, pos)] = 0
    assert torch.equal(got, want)


def run_case(backend, gen, *, B, n, H, D, dtype, rooted, lengths, page_size=None, capacity=40, parents=None):
    parents = parents if parents is not None else [int(torch.randint(-1, t, (1,), generator=gen)) for t in range(n)]
    path, accepted = make_paths(gen, parents, B, rooted, lengths)
    num_nodes = n + 1 if rooted else n
    layout = Layout(gen, B, capacity, H, D, dtype, page_size)
    starts = [int(torch.randint(0, layout.capacity - num_nodes + 1, (1,), generator=gen)) for _ in range(B)]
    starts[0] = layout.capacity - num_nodes  # the tree ends at the capacity
    nodes_k, nodes_v = (random_rows(gen, (B, num_nodes, H, D), dtype) for _ in range(2))
    for b in range(B):  # verification appended node i at start + i
        for i in range(num_nodes):
            layout.k[layout.slot(b, starts[b] + i)] = nodes_k[b, i]
            layout.v[layout.slot(b, starts[b] + i)] = nodes_v[b, i]
    keep = [int(a) + (1 if rooted else 0) for a in accepted]
    seqlens = torch.tensor(starts, dtype=torch.int32)
    new, k, v = backend.compact_kv(layout.k, layout.v, path, accepted, seqlens, num_nodes=num_nodes,
                                   root_in_path=rooted, block_table=layout.block_table)
    assert new.dtype == torch.int32 and new.tolist() == [s + n for s, n in zip(starts, keep)]
    for got, cache, nodes in ((k, layout.k, nodes_k), (v, layout.v, nodes_v)):
        assert_compacted(layout, got, expected_cache(layout, cache, nodes, path, keep, starts), starts, new.tolist(),
                         num_nodes)
    ref_k, ref_v, ref_lengths = compact_kv_reference(layout.k, layout.v, path, accepted, seqlens, root_in_path=rooted,
                                                     block_table=layout.block_table)
    assert ref_lengths == new.tolist() and torch.equal(as_bytes(ref_k), as_bytes(k))
    assert torch.equal(as_bytes(ref_v), as_bytes(v))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rooted", [False, True], ids=["drafted", "rooted"])
@pytest.mark.parametrize("page_size", [None, 3], ids=["contiguous", "paged"])
def test_equals_cache_of_the_path_alone(backend, dtype, rooted, page_size):
    gen = torch.Generator().manual_seed(DTYPES.index(dtype) * 4 + rooted * 2 + (page_size is not None))
    run_case(backend, gen, B=6, n=11, H=2, D=16, dtype=dtype, rooted=rooted, lengths=[0, "full", 1, 2, 3, "full"],
             page_size=page_size)


@pytest.mark.parametrize("H,D,dtype", [(3, 5, torch.float16), (1, 1, torch.int8), (4, 6, torch.float32),
                                       (8, 128, torch.bfloat16)])
def test_row_sizes_and_alignments(backend, H, D, dtype):
    """Rows of 30, 1, 96 and 2048 bytes: the CUDA kernel's 2-, 1-, 16- and 16-byte chunks."""
    gen = torch.Generator().manual_seed(H * 1000 + D)
    for page_size in (None, 4):
        run_case(backend, gen, B=3, n=9, H=H, D=D, dtype=dtype, rooted=True, lengths=["full", 0, 2],
                 page_size=page_size, capacity=24)


@pytest.mark.parametrize("page_size", [None, 4], ids=["contiguous", "paged"])
def test_stacked_layers(backend, page_size):
    """Caches holding every layer ([layers, ...], EAGLE's single buffer): every layer moves the same rows."""
    gen = torch.Generator().manual_seed(11)
    B, n, H, D, L = 3, 9, 2, 8, 3
    parents = [int(torch.randint(-1, t, (1,), generator=gen)) for t in range(n)]
    path, accepted = make_paths(gen, parents, B, True, ["full", 0, 2])
    layout = Layout(gen, B, 20, H, D, torch.bfloat16, page_size)
    k, v = (random_rows(gen, (L, *layout.k.shape), torch.bfloat16) for _ in range(2))
    starts = [20 - n - 1, 4, 0]
    nodes = random_rows(gen, (2, L, B, n + 1, H, D), torch.bfloat16)
    for b in range(B):
        for i in range(n + 1):
            k[(slice(None), *layout.slot(b, starts[b] + i))] = nodes[0, :, b, i]
            v[(slice(None), *layout.slot(b, starts[b] + i))] = nodes[1, :, b, i]
    keep = [int(a) + 1 for a in accepted]
    new, k_got, v_got = backend.compact_kv(k, v, path, accepted, torch.tensor(starts), num_nodes=n + 1,
                                           root_in_path=True, block_table=layout.block_table, stacked=True)
    assert new.tolist() == [s + m for s, m in zip(starts, keep)]
    for got, cache, which in ((k_got, k, 0), (v_got, v, 1)):
        for layer in range(L):
            want = expected_cache(layout, cache[layer], nodes[which, layer], path, keep, starts)
            assert_compacted(layout, got[layer], want, starts, new.tolist(), n + 1)


def test_head_major_cache(backend):
    """A transformers-style cache [B, H, S, D] (positions inside each head) is its heads stacked: k.permute(1, 0, 2, 3)
    with stacked=True moves it in place."""
    gen = torch.Generator().manual_seed(12)
    B, H, S, D, n = 2, 3, 16, 8, 6
    parents = [-1, 0, 1, 0, 3, 4]
    path, accepted = make_paths(gen, parents, B, False, ["full", 2])
    k, v = (random_rows(gen, (B, H, S, D), torch.float16) for _ in range(2))
    starts = [3, 10]
    new, k_got, v_got = backend.compact_kv(k.permute(1, 0, 2, 3), v.permute(1, 0, 2, 3), path, accepted,
                                           torch.tensor(starts), num_nodes=n, root_in_path=False, stacked=True)
    for got, cache in ((k_got.permute(1, 0, 2, 3), k), (v_got.permute(1, 0, 2, 3), v)):
        for b in range(B):
            s, keep = starts[b], int(accepted[b])
            kept = path[b, :keep].long()
            assert torch.equal(as_bytes(got[b, :, :s]), as_bytes(cache[b, :, :s]))
            assert torch.equal(as_bytes(got[b, :, s : s + keep]), as_bytes(cache[b, :, s + kept]))
            assert torch.equal(as_bytes(got[b, :, s + n :]), as_bytes(cache[b, :, s + n :]))


def test_chain_and_in_place_prefix(backend):
    """A chain (path[j] == j: nothing moves) and a path whose kept nodes overlap the positions written before them
    (node 2 is read at step 1, then position 2 is written at step 2)."""
    gen = torch.Generator().manual_seed(5)
    run_case(backend, gen, B=2, n=6, H=2, D=8, dtype=torch.bfloat16, rooted=False, lengths=["full", 3],
             parents=[-1, 0, 1, 2, 3, 4])
    run_case(backend, gen, B=2, n=6, H=2, D=8, dtype=torch.bfloat16, rooted=True, lengths=["full", "full"],
             parents=[-1, -1, 1, 2, -1, 3])


def test_after_tree_greedy_verify(backend):
    """End to end: a Medusa tree verified by fastar.tree_greedy_verify, then compacted with its path; int64
    cache_seqlens. The result equals the cache built from the accepted nodes alone."""
    gen = torch.Generator().manual_seed(9)
    tree = Tree.from_choices([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1]])
    B, V, T, H, D = 4, 17, tree.num_nodes, 2, 8
    logits = torch.randn(B, T, V, generator=gen)
    argmax = logits.argmax(-1)
    parents = tree.parents.tolist()
    drafts = torch.stack([torch.where(torch.rand(T, generator=gen) < 0.8, argmax[b, [max(p, 0) for p in parents]],
                                      (argmax[b, [max(p, 0) for p in parents]] + 1) % V)[1:] for b in range(B)])
    path, _, accepted = backend.tree_greedy_verify(drafts, tree, logits)
    assert accepted.max() >= 2
    cache_k, cache_v = (random_rows(gen, (B, 20, H, D), torch.float16) for _ in range(2))
    starts = torch.tensor([0, 5, 12, 9])
    new, k, v = backend.compact_kv(cache_k, cache_v, path, accepted, starts, num_nodes=T, root_in_path=True)
    assert new.tolist() == (starts + accepted + 1).tolist()
    for b in range(B):
        s, kept = int(starts[b]), path[b, : int(accepted[b]) + 1].long()
        assert torch.equal(as_bytes(k[b, : s]), as_bytes(cache_k[b, : s]))
        assert torch.equal(as_bytes(k[b, s : int(new[b])]), as_bytes(cache_k[b, s + kept]))
        assert torch.equal(as_bytes(v[b, s : int(new[b])]), as_bytes(cache_v[b, s + kept]))


def test_empty_batch_and_zero_width_rows(backend):
    k = torch.zeros(0, 8, 2, 4)
    new, _, _ = backend.compact_kv(k, k, torch.zeros(0, 3, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
                                   torch.zeros(0, dtype=torch.int32), num_nodes=3, root_in_path=False)
    assert new.shape == (0,)
    rows = torch.zeros(2, 8, 0)
    path = torch.tensor([[0, 2, -1], [1, 2, 4]], dtype=torch.int32)
    new, _, _ = backend.compact_kv(rows, rows, path, torch.tensor([2, 3], dtype=torch.int32),
                                   torch.tensor([1, 3], dtype=torch.int32), num_nodes=5, root_in_path=False)
    assert new.tolist() == [3, 6]


# (name, mutate(path, accepted, seqlens, block_table) for row 1, CPU exception, message)
BAD_VALUES = [
    ("node past the tree", lambda p, a, s, t: p.__setitem__((1, 1), 9), IndexError, r"path\[1, 1\] = 9 is not a node"),
    ("-1 inside the accepted part", lambda p, a, s, t: p.__setitem__((1, 1), -1), IndexError,
     r"path\[1, 1\] = -1 is not a node"),
    ("not increasing", lambda p, a, s, t: p.__setitem__((1, 2), 1), ValueError, "must increase"),
    ("num_accepted past the depth", lambda p, a, s, t: a.__setitem__(1, 5), ValueError, "more than the path holds"),
    ("negative num_accepted", lambda p, a, s, t: a.__setitem__(1, -16), ValueError, "is negative"),
    ("tree past the capacity", lambda p, a, s, t: s.__setitem__(1, 8), ValueError, "must fit the cache's capacity"),
    ("negative cache_seqlens", lambda p, a, s, t: s.__setitem__(1, -1), ValueError, "must fit the cache's capacity"),
    ("root not first", lambda p, a, s, t: p.__setitem__((1, 0), 1), ValueError, "starts at the root"),
    ("page outside the pool", lambda p, a, s, t: t.__setitem__((1, 1), 7), IndexError, "page outside"),
]


@pytest.mark.parametrize("name,mutate,exc,match", BAD_VALUES, ids=[c[0] for c in BAD_VALUES])
def test_bad_values(backend, name, mutate, exc, match):
    """The CPU raises naming the row and moves nothing; the CUDA kernel (SIMT) leaves the row alone and returns
    -32 (a row an acceptance kernel marked: its own -status) as its length, the other rows compacted."""
    gen = torch.Generator().manual_seed(0)
    rooted = name == "root not first"
    path = torch.tensor([[0, 2, 3, -1], [0, 2, 4, 5]], dtype=torch.int32)
    accepted = torch.tensor([2, 3 if not rooted else 2], dtype=torch.int32)
    seqlens = torch.tensor([1, 2], dtype=torch.int32)
    block_table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    mutate(path, accepted, seqlens, block_table)
    paged = name == "page outside the pool"
    cache_k, cache_v = (random_rows(gen, (7 if paged else 2, 4 if paged else 12, 2, 4), torch.float32)
                        for _ in range(2))
    kwargs = dict(num_nodes=6, root_in_path=rooted, block_table=block_table if paged else None)
    if backend.name == "cpu":
        with pytest.raises(exc, match=match):
            backend.compact_kv(cache_k, cache_v, path, accepted, seqlens, **kwargs)
        return
    new, k, v = backend.compact_kv(cache_k, cache_v, path, accepted, seqlens, **kwargs)
    status = 16 if name == "negative num_accepted" else STATUS_BAD_PATH
    assert new.tolist() == [1 + 2 + rooted, -status]
    # Row 0 compacted, row 1 (and its pages) untouched: the reference over row 0 alone.
    want_k, want_v, _ = compact_kv_reference(cache_k, cache_v, path[:1], accepted[:1], seqlens[:1], root_in_path=rooted,
                                             block_table=block_table[:1] if paged else None)
    assert torch.equal(as_bytes(k), as_bytes(want_k)) and torch.equal(as_bytes(v), as_bytes(want_v))
    with pytest.raises(ValueError, match="compact_kv cannot apply" if status == 32 else "malformed tree"):
        fastar.check_rows(new, "fastar.compact_kv")


def test_debug_checks_raise_for_marked_rows(backend, debug_checks):
    k = torch.zeros(2, 8, 2, 4)
    path = torch.tensor([[0, 2], [1, 0]], dtype=torch.int32)
    with pytest.raises(ValueError, match="must increase" if backend.name == "cpu" else "compact_kv cannot apply"):
        backend.compact_kv(k, k, path, torch.tensor([2, 2], dtype=torch.int32), torch.tensor([0, 0]), num_nodes=3,
                           root_in_path=False)


def call(k=None, v=None, path=None, accepted=None, seqlens=None, **kwargs):
    k = torch.zeros(2, 8, 2, 4) if k is None else k
    args = (k, k.clone() if v is None else v, torch.tensor([[0, 1], [1, -1]], dtype=torch.int32) if path is None
            else path, torch.tensor([2, 1], dtype=torch.int32) if accepted is None else accepted,
            torch.tensor([0, 3], dtype=torch.int32) if seqlens is None else seqlens)
    return args, {"num_nodes": 3, "root_in_path": False, **kwargs}


BAD_ARGS = [
    ("float path", call(path=torch.zeros(2, 2)), TypeError, "path must hold integers"),
    ("1-D path", call(path=torch.zeros(2, dtype=torch.int32)), ValueError, "path must be 2-D"),
    ("empty path", call(path=torch.zeros(2, 0, dtype=torch.int32)), ValueError, "at least one column"),
    ("num_accepted shape", call(accepted=torch.zeros(3, dtype=torch.int32)), ValueError,
     r"num_accepted must have shape \[2\]"),
    ("cache_seqlens shape", call(seqlens=torch.zeros(1, dtype=torch.int32)), ValueError,
     r"cache_seqlens must have shape \[2\]"),
    ("float seqlens", call(seqlens=torch.zeros(2)), TypeError, "cache_seqlens must hold integers"),
    ("int64 seqlens past int32", call(seqlens=torch.tensor([0, 2**31])), ValueError, "outside"),
    ("float64 cache", call(k=torch.zeros(2, 8, 2, 4, dtype=torch.float64)), TypeError, "k_cache must be float32"),
    ("v dtype", call(v=torch.zeros(2, 8, 2, 4, dtype=torch.float16)), TypeError, "v_cache must have k_cache's dtype"),
    ("v shape", call(v=torch.zeros(2, 8, 2, 5)), ValueError, "v_cache must have k_cache's shape"),
    ("1-D cache", call(k=torch.zeros(8)), ValueError, r"must be \[B, S_max"),
    ("rows not dense", call(k=torch.zeros(2, 8, 4, 2).transpose(2, 3)), ValueError, "must be dense"),
    ("overlapping positions", call(k=torch.zeros(2, 1, 2, 4).expand(2, 8, 2, 4)), ValueError, "overlapping"),
    ("v is k", ((torch.zeros(2, 8, 2, 4),) * 2 + call()[0][2:], call()[1]), ValueError, "must be different tensors"),
    ("batch mismatch", call(k=torch.zeros(3, 8, 2, 4)), ValueError, "one sequence per row of path"),
    ("num_nodes 0", call(num_nodes=0), ValueError, "num_nodes"),
    ("num_nodes past the capacity", call(num_nodes=9), ValueError, "do not fit the cache's capacity"),
    ("root_in_path not a bool", call(root_in_path=1), TypeError, "root_in_path must be a bool"),
    ("stacked 2-D", call(k=torch.zeros(8, 4), stacked=True), ValueError, r"must be \[layers, B, S_max"),
    ("stacked batch mismatch", call(k=torch.zeros(2, 3, 8, 4), stacked=True), ValueError,
     "one sequence per row of path"),
    ("block_table shape", call(block_table=torch.zeros(3, 2, dtype=torch.int32)), ValueError,
     r"block_table must have shape \[2, max_pages\]"),
    ("cache not a tensor", call(k=[[0.0]], v=torch.zeros(2, 8, 2, 4)), TypeError, "k_cache must be a tensor"),
    ("meta path", call(path=torch.zeros(2, 2, dtype=torch.int32, device="meta")), ValueError, "path is on meta"),
    ("cache requires grad", call(k=torch.zeros(2, 8, 2, 4, requires_grad=True)), ValueError, "requires grad"),
]


@pytest.mark.parametrize("name,args,exc,match", BAD_ARGS, ids=[c[0] for c in BAD_ARGS])
def test_bad_arguments(backend, name, args, exc, match):
    """Shapes, dtypes, devices: every backend raises before the kernel runs."""
    (k, v, *rest), kwargs = args
    k_dev = backend.to(k) if isinstance(k, torch.Tensor) else k
    with pytest.raises(exc, match=match):
        with backend.using_ops():
            fastar.compact_kv(k_dev, k_dev if v is k else backend.to(v),
                              *(r if r.device.type == "meta" else backend.to(r) for r in rest),
                              **{key: backend.to(val) for key, val in kwargs.items()})


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3", "fp8_fixed", "int4"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_quantized_cache_compact(backend, fmt, paged):
    """QuantizedKVCache.compact: the cache then dequantizes to the cache built from the accepted nodes alone (int8
    / fp8: each token is quantized on its own, so they are equal bit for bit); KIVI moves its full-precision rows,
    which the tree must still be in."""
    gen = torch.Generator().manual_seed(3)
    B, H, D, T = 3, 2, 32, 8
    size = dict(num_pages=12, page_size=8) if paged else dict(capacity=48)
    extra = {"fp8_fixed": dict(k_scale=0.05, v_scale=[0.02, 0.04])}.get(fmt, {})
    kwargs = dict(format="fp8_e4m3" if fmt == "fp8_fixed" else fmt, group_size=8, residual=16, dtype=torch.bfloat16,
                  **size, **extra)
    prefix = [13, 7, 0]
    k_pre, v_pre = (torch.randn(B, H, 13, D, generator=gen).bfloat16() for _ in range(2))
    k_tree, v_tree = (torch.randn(B, H, T, D, generator=gen).bfloat16() for _ in range(2))
    parents = [-1, 0, 0, 1, -1, 3, 5]  # the drafted nodes of a tree with its root: node t + 1's parent + 1
    path, accepted = make_paths(gen, parents, B, True, ["full", 0, 2])

    cache = backend.quantized_kvcache(B, H, D, **kwargs)
    cache.append(backend.to(k_pre), backend.to(v_pre), lengths=prefix)
    cache.append(backend.to(k_tree), backend.to(v_tree))
    before = [t.cpu() for t in cache.dequantize(torch.float64)]
    cache.compact(backend.to(path), backend.to(accepted), num_nodes=T, root_in_path=True)
    keep = (accepted + 1).tolist()
    assert cache.lengths.cpu().tolist() == [p + n for p, n in zip(prefix, keep)]
    got = [t.cpu() for t in cache.dequantize(torch.float64)]

    alone = backend.quantized_kvcache(B, H, D, **kwargs)
    alone.append(backend.to(k_pre), backend.to(v_pre), lengths=prefix)
    kept = [path[b, : keep[b]].long() for b in range(B)]
    rows = [torch.nn.functional.pad(t[b][:, kept[b]], (0, 0, 0, T - keep[b])) for t in (k_tree, v_tree)
            for b in range(B)]
    alone.append(backend.to(torch.stack(rows[:B])), backend.to(torch.stack(rows[B:])), lengths=keep)
    want = [t.cpu() for t in alone.dequantize(torch.float64)]
    if fmt == "int4":  # KIVI: the kept rows are the full-precision tree rows; the prefix is as it was
        for b in range(B):
            for g, w, tree in zip(got, before, (k_tree, v_tree)):
                assert torch.equal(g[b, :, : prefix[b]], w[b, :, : prefix[b]])
                assert torch.equal(g[b, :, prefix[b] : prefix[b] + keep[b]], tree[b][:, kept[b]].double())
    else:
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    if paged:  # pages past the new lengths went back to the pool
        assert sum(len(p) for p in cache._pages) == sum(-(-n // 8) for n in cache.lengths.tolist())


def test_quantized_cache_compact_refuses(backend):
    gen = torch.Generator().manual_seed(4)
    cache = backend.quantized_kvcache(1, 2, 32, capacity=64, format="int2", group_size=8, residual=8,
                                      dtype=torch.float32)
    cache.append(backend.to(torch.randn(1, 2, 20, 32, generator=gen)), backend.to(torch.randn(1, 2, 20, 32)))
    path = backend.to(torch.tensor([[0, 1, 2]], dtype=torch.int32))
    with pytest.raises(ValueError, match="full-precision window"):
        cache.compact(path, backend.to(torch.tensor([2], dtype=torch.int32)), num_nodes=12, root_in_path=True)
    with pytest.raises(ValueError, match="fewer than the tree's"):
        cache.compact(path, backend.to(torch.tensor([2], dtype=torch.int32)), num_nodes=21, root_in_path=True)
    int8 = backend.quantized_kvcache(1, 2, 32, capacity=16, format="int8", dtype=torch.float32)
    int8.append(backend.to(torch.randn(1, 2, 6, 32, generator=gen)), backend.to(torch.randn(1, 2, 6, 32)))
    bad = backend.to(torch.tensor([[0, 3, 2]], dtype=torch.int32))
    with pytest.raises(ValueError, match="must increase" if backend.name == "cpu" else "compact_kv cannot apply"):
        int8.compact(bad, backend.to(torch.tensor([2], dtype=torch.int32)), num_nodes=4, root_in_path=True)
    assert int8.lengths.cpu().tolist() == [6]
