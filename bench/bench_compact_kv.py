"""fastar.compact_kv against the PyTorch way: gather the accepted nodes' K/V rows, then write them after the prefix.

After verifying mc_sim_7b_63's 64 tree tokens (the root first) appended after each sequence's prefix, each sequence
keeps its accepted path (a root-to-leaf path of the tree cut at a random length: 1 to 5 tokens). The baseline is
EAGLE's / Medusa's ``tree_decoding`` update of the past key values (``index_select`` of the accepted positions,
``copy_`` after the prefix) batched over the sequences without host syncs: the source and destination rows of every
sequence's path (through the block table for a paged cache; positions not kept copy onto themselves), then
``index_select`` and ``index_copy_`` per cache. The stacked cases hold every layer in one buffer, as EAGLE's
``past_key_values_data`` does: the baseline indexes all layers at once, fastar moves them in one call. Every call
starts from the caches as verification left them (``reset``, outside the timed region); the check compares every
kept row with the node it must hold, so a row the op failed to move (it still holds another node's random values)
fails.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import pytest
import torch

import fastar
from bench import common
from bench.bench_tree_speculative_sample import TREE

GOAL = 5.0
T = TREE.num_nodes  # the tree tokens, the root included
PATHS = TREE.retrieve_paths()  # [n_paths, depth + 1], -1 padded


@dataclasses.dataclass(frozen=True)
class CompactCase:
    """B sequences of up to S tokens, Hkv heads of D; paged caches when page_size is given; layers > 1: one buffer of
    every layer's cache (EAGLE's past_key_values_data), compacted in one call."""

    B: int
    S: int
    Hkv: int = 8
    D: int = 128
    page_size: Optional[int] = None
    dtype: torch.dtype = torch.bfloat16
    layers: int = 1

    @property
    def id(self) -> str:
        layout = f"paged{self.page_size}" if self.page_size else "contig"
        stack = f"-L{self.layers}" if self.layers > 1 else ""
        return f"B{self.B}-S{self.S}-H{self.Hkv}-D{self.D}-{layout}{stack}-{common.DTYPE_NAMES[self.dtype]}"

    @property
    def shape(self) -> str:
        stack = f" {self.layers} layers" if self.layers > 1 else ""
        return f"B={self.B} tree {T} {'paged' if self.page_size else 'contig'}{stack}"


CASES = [CompactCase(1, 4096), CompactCase(32, 1024), CompactCase(32, 1024, page_size=16),
         CompactCase(1, 2048, layers=32), CompactCase(8, 512, page_size=16, layers=32)]


def make_inputs(case: CompactCase, device: str = "cpu") -> dict:
    gen = torch.Generator().manual_seed(0)
    B, S = case.B, case.S
    rows = torch.randint(0, PATHS.shape[0], (B,), generator=gen)
    path = PATHS[rows].to(torch.int32)
    lengths = (path >= 0).sum(1)
    accepted = torch.minimum(torch.randint(0, 6, (B,), generator=gen), lengths - 1).to(torch.int32)
    starts = torch.randint(0, S - T + 1, (B,), generator=gen).to(torch.int32)
    shape = (B, S) if case.page_size is None else (B * S // case.page_size, case.page_size)
    stack = (case.layers,) if case.layers > 1 else ()
    k, v = (torch.randn(*stack, *shape, case.Hkv, case.D, generator=gen).to(case.dtype) for _ in range(2))
    block_table = None
    if case.page_size is not None:
        block_table = torch.randperm(shape[0], generator=gen).view(B, S // case.page_size).to(torch.int32)
    positions = starts.long()[:, None] + torch.arange(T)  # [B, T]: where verification appended the nodes
    x = {"k": k, "v": v, "path": path, "accepted": accepted, "starts": starts, "block_table": block_table}
    x = {name: t.to(device) if t is not None else None for name, t in x.items()}
    x["rows_per_layer"], x["S_or_page"] = shape[0] * shape[1], shape[1]
    x["slots"] = slots_of(x, positions.to(device))
    x["nodes"] = [layer_rows(x, cache)[:, x["slots"]].clone() for cache in (x["k"], x["v"])]  # [layers, B, T, ..]
    x["stacked"] = case.layers > 1
    return x


def layer_rows(x: dict, cache: torch.Tensor) -> torch.Tensor:
    """The cache as ``[layers, B * S or pages * page_size, Hkv, D]`` (one layer unless stacked)."""
    return cache.view(-1, x["rows_per_layer"], *cache.shape[-2:])


def slots_of(x: dict, positions: torch.Tensor) -> torch.Tensor:
    """Rows of a layer's flattened cache ``[B * S or pages * page_size, Hkv, D]`` of each sequence's positions
    ``[B, n]``."""
    S_or_page = x["S_or_page"]
    if x["block_table"] is None:
        return torch.arange(positions.shape[0], device=positions.device)[:, None] * S_or_page + positions
    pages = x["block_table"].long().gather(1, positions // S_or_page)
    return pages * S_or_page + positions % S_or_page


def reset(x: dict) -> None:
    """The caches as verification left them: node i at position starts + i."""
    for cache, nodes in zip((x["k"], x["v"]), x["nodes"]):
        layer_rows(x, cache)[:, x["slots"]] = nodes


def run_fastar(x: dict, seed: int):
    return fastar.compact_kv(x["k"], x["v"], x["path"], x["accepted"], x["starts"], num_nodes=T, root_in_path=True,
                             block_table=x["block_table"], stacked=x["stacked"])


def run_torch(x: dict, seed: int):
    path, accepted, starts = x["path"], x["accepted"], x["starts"]
    steps = torch.arange(path.shape[1], device=path.device)
    keep = accepted + 1
    node = torch.where(steps < keep[:, None], path, steps)  # a row not kept is copied onto itself
    src = slots_of(x, starts[:, None].long() + node)
    dst = slots_of(x, starts[:, None].long() + steps)
    for cache in (x["k"], x["v"]):
        rows = layer_rows(x, cache)
        rows.index_copy_(1, dst.view(-1), rows.index_select(1, src.view(-1)))
    return (starts + keep).to(torch.int32)


def check(case: CompactCase, x: dict, out) -> None:
    """The new lengths, and every kept position holds its node's row."""
    lengths = out.cpu()
    keep = (x["accepted"] + 1).cpu()
    assert lengths.dtype == torch.int32 and torch.equal(lengths, x["starts"].cpu() + keep), lengths
    steps = torch.arange(x["path"].shape[1], device=x["path"].device)
    kept = (steps < (x["accepted"] + 1)[:, None])
    dst = slots_of(x, x["starts"][:, None].long() + steps)
    node = x["path"].long().clamp(min=0)
    for cache, nodes in zip((x["k"], x["v"]), x["nodes"]):
        got = layer_rows(x, cache)[:, dst]  # [layers, B, W, Hkv, D]
        index = node[None, :, :, None, None].expand(nodes.shape[0], -1, -1, *nodes.shape[3:])
        want = nodes.gather(2, index)
        assert bool((got == want).all(-1).all(-1)[:, kept].all()), "a kept position does not hold its node"


def agree(x: dict, fastar_runs: list, torch_runs: list) -> None:
    for got, want in zip(fastar_runs, torch_runs):
        assert torch.equal(got, want)


def metrics(case: CompactCase, x: dict, outputs: list) -> dict:
    """Bytes: the rows that move (kept, not already in place: path[j] != j), read and written, in K and V."""
    steps = torch.arange(x["path"].shape[1])
    path, accepted = x["path"].cpu(), x["accepted"].cpu()
    moved = int(((steps < (accepted + 1)[:, None]) & (path != steps)).sum())
    return {
        "bytes": 2 * 2 * moved * case.layers * case.Hkv * case.D * x["k"].element_size(),
        "mean_accepted": accepted.double().mean().item(),
        "n": x["path"].shape[1] - 1,
    }


BENCH = common.OpBench("compact_kv", CASES, make_inputs, run_fastar, run_torch, check, agree, metrics,
                       common.ACCEPTANCE_TABLE, goal=GOAL, reset=reset)

inputs = functools.cache(make_inputs)
parametrize_cases = pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)


@parametrize_cases
def test_compact_kv_fastar(benchmark, case):
    common.benchmark_op(benchmark, BENCH, run_fastar, case, inputs(case))


@parametrize_cases
def test_compact_kv_torch(benchmark, case):
    common.benchmark_op(benchmark, BENCH, run_torch, case, inputs(case))


@parametrize_cases
def test_compact_kv_baseline_agrees(case):
    x = inputs(case)
    runs = []
    for fn in (run_fastar, run_torch):
        reset(x)
        out = fn(x, 0)
        check(case, x, out)
        runs.append([out])
    agree(x, *runs)
