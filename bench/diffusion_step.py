"""`python -m bench.diffusion_step`: time of one unmasking step of a masked-diffusion LM against the vocabulary
size V and the sequence length L, fastar.diffusion_unmask against LLaDA's per-step PyTorch code
(bench.bench_diffusion_unmask.llada_step), at temperature 0 (argmax) and 1 (Gumbel sampling).

The step is bench_diffusion_unmask's: B = 1, bfloat16 logits [1, L, V], block 2 of length 32 with 20 positions
still masked, 2 committed per step. LLaDA's code works on all L positions (float64 noise and softmax over
[L, V]); fastar reads the block's masked rows only. Each timed call starts with the CPU caches flushed
(bench.common). Writes bench/results/diffusion_step.json and the README's plot docs/images/diffusion_step.png.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
from pathlib import Path

import torch

import fastar
from bench import common
from bench.bench_diffusion_unmask import UnmaskCase, check, make_inputs, run_fastar, run_torch

ROOT = Path(__file__).resolve().parents[1]
VOCABS = [32000, 65536, 126464, 152064]  # LLaMA-2, a 64k tokenizer, LLaDA, Dream / Qwen2.5
LENGTHS = [128, 256, 512, 768]
FIXED_V, FIXED_L = 126464, 256
TEMPERATURES = [0.0, 1.0]


def median_ms(fn, case: UnmaskCase, x: dict, flush, rounds: int) -> float:
    check(case, x, fn(x, 0))  # warm-up, and every output written as it should be
    times = []
    for seed in range(rounds):
        flush()
        times.append(common.timed(functools.partial(fn, x, seed), "cpu")[0])
    return 1e3 * statistics.median(times)


def sweep(rounds: int, vocabs: list, lengths: list, flush) -> list:
    """Rows {sweep, V, L, temperature, fastar_ms, torch_ms} over V at FIXED_L, then over L at FIXED_V."""
    points = [("V", V, FIXED_L) for V in vocabs] + [("L", FIXED_V, L) for L in lengths]
    rows = []
    for name, V, L in points:
        for t in TEMPERATURES:
            case = UnmaskCase(1, t, V=V, gen_length=L)
            x = make_inputs(case)
            row = {"sweep": name, "V": V, "L": L, "temperature": t,
                   "fastar_ms": median_ms(run_fastar, case, x, flush, rounds),
                   "torch_ms": median_ms(run_torch, case, x, flush, rounds)}
            rows.append(row)
            print(f"{name}: V={V:6d} L={L:4d} T={t:g}: fastar {row['fastar_ms']:8.2f} ms, LLaDA's code "
                  f"{row['torch_ms']:9.1f} ms ({row['torch_ms'] / row['fastar_ms']:.0f}x)", flush=True)
    return rows


def plot(path: Path, meta: dict, rows: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for ax, name, fixed in ((axes[0], "V", f"L={FIXED_L}"), (axes[1], "L", f"V={FIXED_V}")):
        for t in TEMPERATURES:
            sel = [r for r in rows if r["sweep"] == name and r["temperature"] == t]
            xs = [r[name] for r in sel]
            ax.plot(xs, [r["torch_ms"] for r in sel], marker="o", linestyle="--", label=f"LLaDA's code, T={t:g}")
            ax.plot(xs, [r["fastar_ms"] for r in sel], marker="o", label=f"fastar.diffusion_unmask, T={t:g}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("vocabulary size V" if name == "V" else "sequence length L (prompt + generation)")
        ax.set_title(f"{fixed}, B=1, block 32 (20 masked)", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms per unmasking step (after the forward)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"One unmasking step: {meta['device_name']}, {meta['threads']} threads", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.diffusion_step", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="two points per sweep, two rounds: a smoke test")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    vocabs, lengths, rounds = (VOCABS[:2], LENGTHS[:2], 2) if args.quick else (VOCABS, LENGTHS, 5)
    meta = {"device": "cpu", "device_name": common.device_name("cpu"), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cpu_isa": fastar.build_info()["cpu_isa"]}
    rows = sweep(rounds, vocabs, lengths, common.CacheFlusher("cpu"))
    suffix = "-quick" if args.quick else ""
    out = ROOT / "bench" / "results" / f"diffusion_step{suffix}.json"
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    image = ROOT / "docs" / "images" / f"diffusion_step{suffix}.png"
    plot(image, meta, rows)
    print(f"wrote {out.relative_to(ROOT)} and {image.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
