"""Shared benchmark machinery: an op's entry and its cases, interleaved cold-cache timing, the machine's copy
bandwidth, the table / JSON / PNG reports; and the acceptance ops' (speculative_sample, greedy_verify) cases,
realistic inputs, output checks and table."""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Protocol

import torch

RESULTS_DIR = Path(__file__).parent / "results"

# softmax(6 * randn) over 32k-128k tokens has a top-1 probability ~0.45 and an entropy ~2 nats, like an
# LLM's next-token distribution at temperature 1.
TEMPERATURE = 6.0
# Noise on the target's log-probabilities that makes the draft's: ~0.79 acceptance per position (and ~0.79
# argmax agreement), in the range EAGLE/Medusa-style drafters reach.
DRAFT_NOISE = 0.75
# A scalar read from a large row costs a whole cache line, and the adjacent-line prefetcher fetches a second.
SCALAR_READ_BYTES = 128
# Each timed call starts with caches emptied by reading this much (more than the CPU's L3 / the GPU's L2):
# in a decoding step the probabilities come from a model, not from a previous identical call. Reading, not
# writing, so the timed call does not pay for writing back dirty lines.
FLUSH_BYTES = {"cpu": 64 << 20, "cuda": 256 << 20}
DTYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16"}


class Case(Protocol):
    """What the harness needs of an op's case, whatever else the op's own case class holds."""

    @property
    def id(self) -> str:  # unique within the op: `--only op[id]` and the pytest ids
        ...

    @property
    def shape(self) -> str:  # the table's shape column
        ...

    @property
    def dtype(self) -> torch.dtype:
        ...


@dataclasses.dataclass(frozen=True)
class AcceptanceCase:
    """A case of the acceptance ops: B sequences of n drafts over a vocabulary of V."""

    B: int
    n: int
    V: int
    dtype: torch.dtype = torch.float32
    draft_probs: bool = True  # False: the drafter gives no probabilities (n-gram, EAGLE-2/3)

    @property
    def id(self) -> str:
        return f"B{self.B}-n{self.n}-V{self.V}-{DTYPE_NAMES[self.dtype]}" + ("" if self.draft_probs else "-noq")

    @property
    def shape(self) -> str:
        return f"B={self.B} n={self.n} V={self.V}" + ("" if self.draft_probs else " no q")


Column = tuple[str, int, Callable[[dict], str]]  # (header, width, row -> text)


@dataclasses.dataclass(frozen=True)
class Table:
    """A table of the CLI output: the legend printed above its header, and its columns (the first three
    left-aligned). Consecutive rows of ops with the same table share one header."""

    legend: str
    columns: list[Column]


@dataclasses.dataclass(frozen=True)
class OpBench:
    """One op's entry in the CLI table. Every implementation is called as fn(inputs, seed) -> outputs (a
    tensor or a tuple of tensors); the seed feeds fastar's Philox where the op samples, the baselines draw
    from torch's global generator as users' code does."""

    name: str
    cases: list[Case]
    make_inputs: Callable[[Case, str], dict]
    fastar: Callable[[dict, int], object]
    baseline: Callable[[dict, int], object]  # the plain-PyTorch way: the "torch" time and the speed-up
    check: Callable[[Case, dict, object], None]  # raises unless every element of one call's outputs was written
    agree: Callable[[dict, list, list], None]  # (inputs, fastar's outputs, a baseline's): raises unless they match
    # From fastar's outputs of every round: "bytes" the op must move, optionally "flops", then the op's own fields.
    metrics: Callable[[Case, dict, list], dict]
    table: Table
    # Further baselines of a case beside `baseline` (name -> fn), prepared outside the timed region (compiled,
    # say), and row fields about that preparation; the bool says it is a --quick run.
    more_baselines: Optional[Callable[[Case, dict, str, bool], tuple[dict, dict]]] = None
    goal: Optional[float] = None  # the speed-up the project aims at (a row's own "goal" field overrides it)
    # For an op that works in place: restores the inputs before each timed call (outside the timed region).
    reset: Optional[Callable[[dict], None]] = None


def realistic_logits(case: AcceptanceCase, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 log-probabilities of a target [B, n+1, V] and of a draft [B, n, V] close to it."""
    gen = torch.Generator(device).manual_seed(0)
    target = torch.randn(case.B, case.n + 1, case.V, generator=gen, device=device).mul_(TEMPERATURE).log_softmax(-1)
    noise = torch.randn(case.B, case.n, case.V, generator=gen, device=device).mul_(DRAFT_NOISE)
    return target, noise.add_(target[:, : case.n]).log_softmax(-1)


def check_output(out: tuple, draft_token_ids: torch.Tensor, V: int) -> None:
    """Raise unless every output element was written: the accepted drafts, one token in [0, V), then -1."""
    tokens, num_accepted = (t.cpu() for t in out)
    B, n = draft_token_ids.shape
    assert tokens.dtype == num_accepted.dtype == torch.int32, (tokens.dtype, num_accepted.dtype)
    assert tokens.shape == (B, n + 1) and num_accepted.shape == (B,), (tokens.shape, num_accepted.shape)
    assert ((num_accepted >= 0) & (num_accepted <= n)).all(), num_accepted
    pos = torch.arange(n + 1)
    accepted = pos < num_accepted[:, None]
    emitted = pos == num_accepted[:, None]
    drafts = torch.nn.functional.pad(draft_token_ids.cpu().int(), (0, 1))
    assert (tokens[accepted] == drafts[accepted]).all(), "an accepted slot does not hold its draft"
    assert ((tokens[emitted] >= 0) & (tokens[emitted] < V)).all(), "the emitted target token is outside [0, V)"
    assert (tokens[pos > num_accepted[:, None]] == -1).all(), "padding is not -1"


def check_acceptance(case: AcceptanceCase, x: dict, out: tuple) -> None:
    """OpBench.check of the acceptance ops."""
    check_output(out, x["draft_token_ids"], case.V)


def acceptance_metrics(nbytes: Callable[[dict, torch.Tensor], int]) -> Callable[[AcceptanceCase, dict, list], dict]:
    """OpBench.metrics of an acceptance op whose bytes to move depend on a run's num_accepted: the median over
    the rounds, and the mean accepted drafts per sequence."""

    def metrics(case: AcceptanceCase, x: dict, outputs: list) -> dict:
        return {
            "bytes": statistics.median(nbytes(x, na) for _, na in outputs),
            "mean_accepted": torch.stack([na for _, na in outputs]).double().mean().item(),
            "n": case.n,
        }

    return metrics


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class CacheFlusher:
    def __init__(self, device: str):
        self.buffer = torch.ones(FLUSH_BYTES[device] // 4, device=device)
        self.device = device

    def __call__(self) -> None:
        self.buffer.sum()
        sync(self.device)


def timed(fn: Callable, device: str) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def copy_bandwidth(device: str, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes/s of a 256 MB tensor copy, counting the read and the write (median of a few)."""
    src = torch.ones(nbytes // 4, device=device)  # written, so its pages are real (not the shared zero page)
    dst = torch.empty_like(src)
    times = [timed(lambda: dst.copy_(src), device)[0] for _ in range(repeats + 1)][1:]  # the first faults pages in
    return 2 * nbytes / statistics.median(times)


def read_bandwidth(device: str, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes/s of summing a 256 MB tensor: what reading memory alone reaches (median of a few). A decode
    reads its K/V cache and writes next to nothing, so this is its ceiling."""
    src = torch.ones(nbytes // 4, device=device)
    times = [timed(lambda: src.sum(), device)[0] for _ in range(repeats + 1)][1:]
    return nbytes / statistics.median(times)


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(CPU-seconds used by all processes, by this one, wall clock); None without Linux's /proc/stat."""
    try:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    except OSError:
        return None
    own = os.times()
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.perf_counter()


def others_share(before, after) -> float | None:
    """Share of the cores used by other processes between two snapshots: they skew every timing."""
    if before is None or after is None:
        return None
    busy, own, wall = (a - b for a, b in zip(after, before))
    return max(0.0, (busy - own) / (wall * os.cpu_count()))


def to_cpu(out):
    return out.cpu() if isinstance(out, torch.Tensor) else tuple(o.cpu() for o in out)


def measure(op: OpBench, case: Case, x: dict, device: str, copy_Bps: float, read_Bps: float, rounds: int,
            budget_s: float, more: Optional[dict] = None, warmup: int = 2) -> dict:
    """Interleaved rounds of fastar, the baseline and `more` baselines (name -> fn) on cold caches, until
    `rounds` or the time budget (at least 3 rounds); every output is checked, and every baseline's agree with
    fastar's. Returns the CLI row: a time and a speed-up per baseline, then GB/s (and GFLOP/s) per implementation."""
    impls = {"fastar": op.fastar, "torch": op.baseline, **(more or {})}
    flush = CacheFlusher(device)
    runs = {name: ([], []) for name in impls}  # name -> (times, outputs)
    start, snapshot = time.perf_counter(), cpu_snapshot()
    for r in itertools.count():
        measured = r >= warmup
        if measured and (r - warmup >= rounds or (r - warmup >= 3 and time.perf_counter() - start > budget_s)):
            break
        for name, fn in impls.items():
            if op.reset is not None:
                op.reset(x)
            flush()
            t, out = timed(functools.partial(fn, x, r), device)
            op.check(case, x, out)
            if measured:
                runs[name][0].append(t)
                runs[name][1].append(to_cpu(out))
    others = others_share(snapshot, cpu_snapshot())
    for name in impls:
        if name != "fastar":
            op.agree(x, runs["fastar"][1], runs[name][1])
    seconds = {name: statistics.median(times) for name, (times, _) in runs.items()}
    metrics = op.metrics(case, x, runs["fastar"][1])
    nbytes, flops = metrics.pop("bytes"), metrics.pop("flops", None)
    row = {"op": op.name, "case": case.id, "shape": case.shape, "dtype": DTYPE_NAMES[case.dtype]}
    row.update({f"{name}_s": s for name, s in seconds.items()})
    row["speedup"] = seconds["torch"] / seconds["fastar"]
    row.update({f"speedup_vs_{name}": seconds[name] / seconds["fastar"] for name in more or {}})
    row["bytes"] = nbytes
    row.update({f"{name}_GBps": nbytes / s / 1e9 for name, s in seconds.items()})
    row.update({f"{name}_pct_copy": 100 * nbytes / s / copy_Bps for name, s in seconds.items()})
    row.update({f"{name}_pct_read": 100 * nbytes / s / read_Bps for name, s in seconds.items()})
    if flops is not None:
        row["flops"] = flops
        row.update({f"{name}_GFLOPs": flops / s / 1e9 for name, s in seconds.items()})
    row.update(metrics)
    row["rounds"] = len(runs["fastar"][0])
    row["others_cpu_share"] = others
    return row


def benchmark_op(benchmark, op: OpBench, fn: Callable, case: Case, x: dict, rounds: int = 10) -> None:
    """pytest-benchmark timing of fn(x, seed) on cold caches, a new seed per round; checks the last output."""
    flush = CacheFlusher("cpu")
    seeds = itertools.count()

    def setup():
        if op.reset is not None:
            op.reset(x)
        flush()
        return (x, next(seeds)), {}

    op.check(case, x, benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=1))


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        return next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def op_columns(op_width: int, shape_width: int, *, torch_gbps: bool = True, extra: list[Column] = ()) -> list[Column]:
    """The columns of an op-versus-PyTorch table: op, shape, dtype, both times, the ratio, fastar's bandwidth
    (GB/s and % of the copy bandwidth), optionally PyTorch's, then `extra`, then the others' CPU share."""
    return [
        ("op", op_width, lambda r: r["op"]),
        ("shape", shape_width, lambda r: r["shape"]),
        ("dtype", 5, lambda r: r["dtype"]),
        ("fastar", 9, lambda r: format_time(r["fastar_s"])),
        ("torch", 9, lambda r: format_time(r["torch_s"])),
        ("speed-up", 8, lambda r: f"{r['speedup']:.1f}x"),
        ("GB/s", 6, lambda r: f"{r['fastar_GBps']:.1f}"),
        ("% copy", 6, lambda r: f"{r['fastar_pct_copy']:.0f}%"),
        *([("torch GB/s", 10, lambda r: f"{r['torch_GBps']:.2f}")] if torch_gbps else []),
        *extra,
        ("others", 6, lambda r: format_share(r["others_cpu_share"])),
    ]


ACCEPTANCE_TABLE = Table(
    "fastar/torch: median time per call, cold caches; GB/s: bytes the op must move (from each run's"
    " num_accepted) / time; accepted: mean accepted drafts per sequence; others: share of the cores that"
    " other processes used meanwhile (above a few %, the timings are unreliable)",
    op_columns(18, 24, extra=[("accepted", 8, lambda r: f"{r['mean_accepted']:.2f}/{r['n']}")]),
)


def format_time(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3f} ms" if ms < 1 else f"{ms:.2f} ms" if ms < 10 else f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms"


def format_share(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.0f}%"


def print_header(meta: dict) -> None:
    print(f"device: {meta['device_name']} ({meta['device']}, {meta['threads']} threads), torch {meta['torch']}, "
          f"fastar CPU kernels: {meta['fastar_build']['cpu_isa']}")
    print(f"copy bandwidth: {meta['copy_GBps']:.1f} GB/s (256 MB tensor copy, read + write), read bandwidth: "
          f"{meta['read_GBps']:.1f} GB/s (256 MB tensor sum); others: {format_share(meta['copy_others_cpu_share'])}",
          flush=True)


def print_table_header(table: Table, first: bool = True) -> None:
    """The legend and the column headers of a table; a blank line before all but the first table."""
    if not first:
        print()
    print(table.legend)
    print("  ".join(f"{h:>{w}}" if i > 2 else f"{h:<{w}}" for i, (h, w, _) in enumerate(table.columns)))
    print("  ".join("-" * w for _, w, _ in table.columns), flush=True)


def print_row(table: Table, row: dict) -> None:
    cells = [(f(row), w) for _, w, f in table.columns]
    print("  ".join(f"{c:>{w}}" if i > 2 else f"{c:<{w}}" for i, (c, w) in enumerate(cells)), flush=True)


def write_json(path: Path, meta: dict, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


def write_plot(path: Path, meta: dict, rows: list[dict], goals: list[Optional[float]]) -> None:
    """Speed-up over the baseline (with each row's goal, None for none) and, for the memory-bound rows, the
    share of copy bandwidth reached (compute-bound rows, with a "bound" of "compute", show their GFLOP/s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    labels = [f"{r['op']}\n{r['shape']} {r['dtype']}" for r in rows]
    y = range(len(rows))
    speedups = [r["speedup"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.75 * len(rows) + 1.6), sharey=True)
    ax1.barh(y, speedups, color="tab:blue")
    set_goals = [(i, goal) for i, goal in enumerate(goals) if goal is not None]
    for k, (i, goal) in enumerate(set_goals):
        ax1.plot([goal, goal], [i - 0.45, i + 0.45], color="tab:red", linestyle="--", label=None if k else "goal")
    ax1.set_xscale("log")
    lo, hi = min(1.0, min(speedups) / 1.5), 3 * max(speedups + [goal for _, goal in set_goals])  # room for the labels
    ax1.set_xlim(lo, hi)
    ticks = [t for t in (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if lo <= t <= hi]
    ax1.xaxis.set_major_locator(FixedLocator(ticks))
    ax1.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax1.xaxis.set_minor_formatter(NullFormatter())
    ax1.set_xlabel("speed-up of fastar over plain PyTorch (log scale)")
    for i, r in enumerate(rows):
        ax1.annotate(f" {r['speedup']:.1f}x", (r["speedup"], i), va="center", fontsize=9)
    if set_goals:
        ax1.legend(loc="lower right", fontsize=8)
    ax1.set_yticks(list(y), labels, fontsize=8)
    ax1.invert_yaxis()
    height = 0.4
    memory = [i for i, r in enumerate(rows) if r.get("bound", "memory") == "memory"]
    for name, shift, color in (("fastar", -height / 2, "tab:blue"), ("torch", height / 2, "tab:gray")):
        ax2.barh([i + shift for i in memory], [rows[i][f"{name}_pct_copy"] for i in memory], height, label=name,
                 color=color)
    for i, r in enumerate(rows):
        if i not in memory:
            ax2.annotate(f"compute-bound: fastar {r['fastar_GFLOPs']:.1f} GFLOP/s, torch {r['torch_GFLOPs']:.1f}",
                         (2, i), va="center", fontsize=8)
    ax2.axvline(100, color="black", linewidth=0.8)
    ax2.set_xlabel(f"% of copy bandwidth ({meta['copy_GBps']:.1f} GB/s) on the bytes the op must move")
    ax2.legend(loc="best", fontsize=8)
    fig.suptitle(f"fastar on {meta['device_name']} ({meta['device']}, {meta['threads']} threads)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
