"""`python -m bench.decode_context`: time per decode step against context length, for each quantized KV cache
format (fastar.QuantizedKVCache.attend), fastar over a bfloat16 cache, and SDPA over a float32 cache.

One decode step: B = 8 sequences, 32 query heads over 8 kv heads, head dim 128, one query each, every cached
token visible. Each timed call starts with the CPU caches flushed (bench.common). Writes
bench/results/decode_context.json and the README's plot docs/images/decode_context.png.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

import fastar
from bench import common

ROOT = Path(__file__).resolve().parents[1]
B, HQ, HKV, D = 8, 32, 8, 128
CONTEXTS = [1024, 2048, 4096, 8192, 16384]
FORMATS = ["int8", "fp8_e4m3", "int4", "int2"]


def median_ms(fn, flush, rounds: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        flush()
        times.append(common.timed(fn, "cpu")[0])
    return 1e3 * statistics.median(times)


def step_times(S: int, rounds: int, flush) -> dict:
    """ms per decode step over S cached tokens, per implementation."""
    gen = torch.Generator().manual_seed(S)
    k = torch.randn(B, HKV, S, D, generator=gen).bfloat16()
    v = torch.randn(B, HKV, S, D, generator=gen).bfloat16()
    q = torch.randn(B, HQ, 1, D, generator=gen).bfloat16()
    times = {}
    for fmt in FORMATS:
        cache = fastar.QuantizedKVCache(B, HKV, D, capacity=S, format=fmt, dtype=torch.bfloat16)
        cache.append(k, v)
        assert torch.isfinite(cache.attend(q).float()).all()
        times[fmt] = median_ms(functools.partial(cache.attend, q), flush, rounds)
    lens = torch.full((B,), S)
    times["bf16"] = median_ms(functools.partial(fastar.attention_with_kvcache, q.transpose(1, 2),
                                                k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(),
                                                cache_seqlens=lens), flush, rounds)
    times["sdpa_f32"] = median_ms(functools.partial(F.scaled_dot_product_attention, q.float(), k.float(), v.float(),
                                                    enable_gqa=True), flush, rounds)
    return times


LABELS = {"sdpa_f32": "SDPA, float32 cache", "bf16": "fastar, bfloat16 cache", "int8": "fastar, int8",
          "fp8_e4m3": "fastar, fp8 e4m3", "int4": "fastar, KIVI int4", "int2": "fastar, KIVI int2"}


def plot(path: Path, meta: dict, rows: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, label in LABELS.items():
        ax.plot([r["context"] for r in rows], [r["ms"][name] for r in rows], marker="o", label=label,
                linestyle="--" if name in ("sdpa_f32", "bf16") else "-")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("cached tokens per sequence")
    ax.set_ylabel("ms per decode step")
    ax.set_title(f"Decode step, B={B} Hq={HQ} Hkv={HKV} D={D}: {meta['device_name']}, {meta['threads']} threads",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_context", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="two contexts, three rounds: a smoke test")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    contexts, rounds = (CONTEXTS[:2], 3) if args.quick else (CONTEXTS, 10)
    flush = common.CacheFlusher("cpu")
    meta = {"device": "cpu", "device_name": common.device_name("cpu"), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cpu_isa": fastar.build_info()["cpu_isa"]}
    rows = []
    for S in contexts:
        rows.append({"context": S, "ms": step_times(S, rounds, flush)})
        print(f"{S:6d} tokens: " + "  ".join(f"{name} {ms:8.2f} ms" for name, ms in rows[-1]["ms"].items()),
              flush=True)
    suffix = "-quick" if args.quick else ""
    out = ROOT / "bench" / "results" / f"decode_context{suffix}.json"
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    image = ROOT / "docs" / "images" / f"decode_context{suffix}.png"
    plot(image, meta, rows)
    print(f"wrote {out.relative_to(ROOT)} and {image.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
