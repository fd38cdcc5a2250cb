"""`python -m bench`: time every op against its plain-PyTorch baseline, print the table as rows complete, and
write results*.json and speedup*.png under bench/results/."""
from __future__ import annotations

import argparse
import importlib
import os
import re
import time
from pathlib import Path

import torch

import fastar
from bench import common

# The bench modules in the table's order; one not named here runs after them, in name order.
ORDER = [
    "bench_speculative_sample", "bench_greedy_verify", "bench_attention", "bench_scale_attention", "bench_sample_cfg",
]


def bench_ops() -> list:
    """The OpBench entries of every bench/bench_*.py (its BENCH, or its list BENCHES) in ORDER, the ops of one
    table kept together (its rows share one header)."""
    names = sorted((path.stem for path in Path(__file__).parent.glob("bench_*.py")),
                   key=lambda name: (ORDER.index(name) if name in ORDER else len(ORDER), name))
    ops = []
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        ops += module.BENCHES if hasattr(module, "BENCHES") else [module.BENCH]
    return sorted(ops, key=lambda op: next(i for i, other in enumerate(ops) if other.table is op.table))


# (max rounds, seconds per case after which rounds stop once 3 are done)
ROUNDS = {"full": (40, 12.0), "quick": (4, 1.5)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few rounds per case: a smoke test")
    parser.add_argument("--only", metavar="NAME",
                        help="only the rows whose 'op[case id]' contains NAME (several: comma-separated)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--isa", choices=fastar.build_info()["cpu_isas_built"],
                        help="the CPU kernels' ISA (default: the best this CPU runs, or FASTAR_CPU_ISA)")
    args = parser.parse_args(argv)
    if args.isa:
        if args.isa not in fastar.build_info()["cpu_isas_supported"]:
            parser.error(f"--isa {args.isa}: this CPU does not run it")
        fastar._C._set_cpu_isa(args.isa)
    if args.device == "cuda" and not (torch.cuda.is_available() and fastar.build_info()["cuda"]):
        parser.error("--device cuda needs a CUDA GPU and a CUDA build of fastar")
    wanted = args.only.split(",") if args.only else []
    selected = [(op, case) for op in bench_ops() for case in op.cases
                if not wanted or any(w in f"{op.name}[{case.id}]" for w in wanted)]
    if not selected:
        parser.error(f"--only {args.only}: no case matches")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the baselines draw from torch's global generator
    meta = {
        "device": args.device,
        "device_name": common.device_name(args.device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fastar_build": fastar.build_info(),
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    snapshot = common.cpu_snapshot()
    meta["copy_GBps"] = common.copy_bandwidth(args.device) / 1e9
    meta["read_GBps"] = common.read_bandwidth(args.device) / 1e9
    meta["copy_others_cpu_share"] = common.others_share(snapshot, common.cpu_snapshot())
    common.print_header(meta)
    rounds, budget_s = ROUNDS["quick" if args.quick else "full"]
    rows, goals, table = [], [], None
    for op, case in selected:
        if op.table is not table:
            common.print_table_header(op.table, first=table is None)
            table = op.table
        x = op.make_inputs(case, args.device)
        more, prepared = op.more_baselines(case, x, args.device, args.quick) if op.more_baselines else ({}, {})
        row = common.measure(op, case, x, args.device, meta["copy_GBps"] * 1e9, meta["read_GBps"] * 1e9, rounds,
                             budget_s, more)
        rows.append({**row, **prepared})
        goals.append(row.get("goal", op.goal))
        common.print_row(table, rows[-1])
        del x, more  # before the next case's inputs are built: the large shapes take ~300 MB

    # A smoke test, a partial or a GPU run gets its own files, so it never overwrites the full CPU results.
    suffix = "".join(
        [f"-{args.device}" if args.device != "cpu" else "", f"-{args.isa}" if args.isa else "",
         "-quick" if args.quick else ""]
        + ([f"-{re.sub(r'[^A-Za-z0-9]+', '_', args.only)}"] if args.only else [])
    )
    json_path = common.RESULTS_DIR / f"results{suffix}.json"
    png_path = common.RESULTS_DIR / f"speedup{suffix}.png"
    common.write_json(json_path, meta, rows)
    common.write_plot(png_path, meta, rows, goals)
    print(f"wrote {json_path} and {png_path}", flush=True)


if __name__ == "__main__":
    main()
