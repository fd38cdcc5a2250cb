"""The static gate (tests/test_cuda_static.py) for CUDA archs the main build did not compile.

`make`'s builds on a machine without a GPU compile the kernels for sm_90 only (half the build time). This
compiles every csrc/cuda/*.cu once more for each arch given (default 8.0), with the exact nvcc command of the
main build (its compile_commands.json) but that arch's --generate-code, and runs the gate on those objects
(FASTAR_STATIC_GATE_OBJECTS / FASTAR_STATIC_GATE_ARCHS). Exits non-zero when a compile or the gate fails.

    python .ci/arch_gate.py [--archs 8.0;8.6] [--build-dir build/cmake-py311]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def kernel_commands(build_dir: Path) -> list[dict]:
    db = build_dir / "compile_commands.json"
    if not db.is_file():
        sys.exit(f"arch_gate: {db} not found: build fastar with its CUDA kernels first (make build)")
    entries = [e for e in json.loads(db.read_text()) if e["file"].endswith(".cu") and "/_C.dir/" in e["output"]]
    if not entries:
        sys.exit(f"arch_gate: no CUDA kernel file in {db} (was fastar built without nvcc?)")
    return entries


def retarget(command: str, archs: list[str], output: Path) -> list[str]:
    """The main build's nvcc command for one file, compiling for `archs` (SASS only) into `output`."""
    args = [a for a in shlex.split(command) if not a.startswith("--generate-code=")]
    if "-o" not in args:
        raise ValueError(f"no -o in {command}")
    args[args.index("-o") + 1] = str(output)
    codes = [f"--generate-code=arch=compute_{a},code=[sm_{a}]" for a in archs]
    return [args[0], *codes, *args[1:]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="8.0", help="';'-separated, e.g. 8.0;8.6")
    parser.add_argument("--build-dir", type=Path,
                        default=ROOT / "build" / f"cmake-py{sys.version_info.major}{sys.version_info.minor}")
    opts = parser.parse_args()
    archs = [a.replace(".", "") for a in re.split(r"[;,\s]+", opts.archs) if a]
    entries = kernel_commands(opts.build_dir)
    jobs = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="fastar-arch-gate-") as tmp:
        objects = [Path(tmp) / (Path(e["file"]).stem + ".o") for e in entries]

        def compile_one(pair):
            entry, obj = pair
            run = subprocess.run(retarget(entry["command"], archs, obj), cwd=entry["directory"],
                                 capture_output=True, text=True)
            return entry["file"], run

        with ThreadPoolExecutor(jobs) as pool:
            failed = [(f, r) for f, r in pool.map(compile_one, zip(entries, objects)) if r.returncode]
        for file, run in failed:
            print(f"arch_gate: {file} does not compile for sm_{archs}:\n{run.stdout}{run.stderr}", file=sys.stderr)
        if failed:
            return 1
        print(f"arch_gate: {len(objects)} kernel files compiled for sm_{', sm_'.join(archs)} "
              f"in {time.time() - start:.0f} s")
        env = dict(os.environ, FASTAR_STATIC_GATE_OBJECTS=os.pathsep.join(map(str, objects)),
                   FASTAR_STATIC_GATE_ARCHS=",".join(f"sm_{a}" for a in archs))
        gate = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               str(ROOT / "tests" / "test_cuda_static.py")], cwd=ROOT, env=env)
        return gate.returncode


if __name__ == "__main__":
    sys.exit(main())
