"""The SIMT emulator's tensor-core instructions (mma.sync m16n8k16, ldmatrix, cp.async; csrc/cuda/tensor_core.cuh).

* Layouts: the fragment and ldmatrix layouts the emulator implements are compared, element by element, with
  CuTe's MMA_Traits / Copy_Traits (the nvidia-cutlass package's headers), evaluated on the host by a small C++
  program (cute_layouts.cpp). mma ownership is probed one fragment element at a time: operands the probe does not
  test are placed by CuTe's layouts, and the one under test is a one-hot fragment.
* Function: a 16x8x16 product through cp.async, ldmatrix and mma against a float64 torch matmul of the same values.
* nvcc: the same test kernels compile for sm_80 and sm_90 to HMMA, LDSM and LDGSTS instructions.
The cp.async queue semantics and the misuse diagnoses are self-tests (test_simt_emulator.py).
"""
from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fastar import _simt
from helpers import cuobjdump

try:
    simt = _simt.load()
except ImportError as exc:  # conftest's REQUIRE check turns this into a failure in CI (test_build.py)
    pytest.skip(f"SIMT build not present: {exc}", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
DTYPES = [pytest.param(True, torch.bfloat16, id="bf16"), pytest.param(False, torch.float16, id="f16")]
LDMATRIX = [(count, trans) for trans in (False, True) for count in (1, 2, 4)]


def _cute_include():
    try:
        import cutlass_library
    except ImportError:
        return None
    inc = Path(cutlass_library.__file__).parent / "source" / "include"
    return inc if (inc / "cute" / "atom" / "mma_traits_sm80.hpp").is_file() else None


@functools.lru_cache(maxsize=None)
def cute_tables(build_dir: str):
    """CuTe's layouts as {"A": {(t, v): (m, k)}, "B": {(t, v): (k, n)}, "C": {(t, v): (m, n)},
    "DST x4": {(t, reg, half): (matrix, row, col)}, "SRC x4": {t: (matrix, row)}, ...}."""
    inc = _cute_include()
    if inc is None:
        pytest.skip("CuTe headers absent: pip install nvidia-cutlass (ships cute/atom/mma_traits_sm80.hpp)")
    cuda_inc = [Path(d) for d in simt.cuda_include_dirs.split(":") if d]
    cuda_inc += [d / "cccl" for d in cuda_inc if (d / "cccl").is_dir()]  # libcu++ of CUDA 13 toolkits
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    exe = Path(build_dir) / "cute_layouts"
    cmd = ["g++", "-std=c++17", "-w", f"-I{inc}", *[f"-I{d}" for d in cuda_inc],
           str(ROOT / "tests" / "cute_layouts.cpp"), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tables: dict = {}
    for line in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines():
        kind, *rest = line.split()
        if kind in ("A", "B", "C"):
            t, v, r, c = map(int, rest)
            tables.setdefault(kind, {})[(t, v)] = (r, c)
        elif kind == "DST":
            name, t, reg, half, mat, row, col = rest[0], *map(int, rest[1:])
            tables.setdefault(f"DST {name}", {})[(t, reg, half)] = (mat, row, col)
        else:
            name, t, mat, row = rest[0], *map(int, rest[1:])
            tables.setdefault(f"SRC {name}", {})[t] = (mat, row)
    assert len(tables["A"]) == 256 and len(tables["B"]) == 128 and len(tables["C"]) == 128
    return tables


@pytest.fixture(scope="module")
def cute(tmp_path_factory):
    return cute_tables(str(tmp_path_factory.mktemp("cute")))


def place(table, matrix, n_values):
    """Fragments [32, n_values] holding matrix[coord] at each (lane, value) of a CuTe table."""
    frag = torch.zeros(32, n_values, dtype=torch.float64)
    for (t, v), rc in table.items():
        frag[t, v] = matrix[rc]
    return frag


def gather(table, frags, shape):
    """The matrix whose element at each CuTe coordinate is the fragment value there; frags [..., 32, values]."""
    out = torch.zeros(*frags.shape[:-2], *shape, dtype=torch.float64)
    for (t, v), (r, c) in table.items():
        out[..., r, c] = frags[..., t, v]
    return out


def run_mma(bf16, a, b, c):
    """a [n, 32, 8], b [n, 32, 4], c [n, 32, 4] fragments -> d [n, 32, 4]."""
    n = a.shape[0]
    d = simt.mma_fragments(bf16, a.flatten().tolist(), b.flatten().tolist(), c.flatten().tolist())
    return torch.tensor(d, dtype=torch.float64).view(n, 32, 4)


@pytest.mark.parametrize("bf16,dtype", DTYPES)
def test_mma_a_fragment_ownership_matches_cute(cute, bf16, dtype):
    # A one-hot at (lane, value); B[k, n] = 1 + k + 16 n placed by CuTe: the row of D that lights up is the
    # element's m and its values give k.
    b_mat = 1 + torch.arange(16.0, dtype=torch.float64)[:, None] + 16 * torch.arange(8.0, dtype=torch.float64)
    slots = sorted(cute["A"])
    a = torch.zeros(len(slots), 32, 8, dtype=torch.float64)
    for p, (t, v) in enumerate(slots):
        a[p, t, v] = 1.0
    b = place(cute["B"], b_mat, 4).expand(len(slots), 32, 4)
    d = gather(cute["C"], run_mma(bf16, a, b, torch.zeros(len(slots), 32, 4)), (16, 8))
    emulated = {}
    for p, slot in enumerate(slots):
        rows = (d[p] != 0).any(dim=1).nonzero().flatten().tolist()
        k = int(d[p, rows[0], 0]) - 1 if len(rows) == 1 else -1
        emulated[slot] = (rows[0], k) if 0 <= k < 16 and torch.equal(d[p, rows[0]], b_mat[k]) else None
    wrong = {s: (emulated[s], cute["A"][s]) for s in slots if emulated[s] != cute["A"][s]}
    assert not wrong, f"(lane, value): (emulator (m, k), CuTe (m, k)): {wrong}"


@pytest.mark.parametrize("bf16,dtype", DTYPES)
def test_mma_b_fragment_ownership_matches_cute(cute, bf16, dtype):
    # B one-hot; A[m, k] = 1 + k + 16 m (integers to 256, exact in bf16): D's lit column is n, its values give k.
    a_mat = 1 + torch.arange(16.0, dtype=torch.float64) + 16 * torch.arange(16.0, dtype=torch.float64)[:, None]
    slots = sorted(cute["B"])
    b = torch.zeros(len(slots), 32, 4, dtype=torch.float64)
    for p, (t, v) in enumerate(slots):
        b[p, t, v] = 1.0
    a = place(cute["A"], a_mat, 8).expand(len(slots), 32, 8)
    d = gather(cute["C"], run_mma(bf16, a, b, torch.zeros(len(slots), 32, 4)), (16, 8))
    emulated = {}
    for p, slot in enumerate(slots):
        cols = (d[p] != 0).any(dim=0).nonzero().flatten().tolist()
        k = int(d[p, 0, cols[0]]) - 1 if len(cols) == 1 else -1
        emulated[slot] = (k, cols[0]) if 0 <= k < 16 and torch.equal(d[p, :, cols[0]], a_mat[:, k]) else None
    wrong = {s: (emulated[s], cute["B"][s]) for s in slots if emulated[s] != cute["B"][s]}
    assert not wrong, f"(lane, value): (emulator (k, n), CuTe (k, n)): {wrong}"


@pytest.mark.parametrize("bf16,dtype", DTYPES)
def test_mma_c_fragment_ownership_matches_cute(cute, bf16, dtype):
    # A[:, 0] = m + 1, B[0, :] = 1 gives D[m, n] = m + 1; A[:, 0] = 1, B[0, :] = n + 1 gives n + 1. Each lane's
    # d values name the (m, n) the emulator gave that fragment element.
    m_col, n_row = torch.zeros(16, 16), torch.zeros(16, 8)
    m_col[:, 0], n_row[0, :] = torch.arange(1.0, 17.0), 1.0
    ones_col, idx_row = torch.zeros(16, 16), torch.zeros(16, 8)
    ones_col[:, 0], idx_row[0, :] = 1.0, torch.arange(1.0, 9.0)
    a = torch.stack([place(cute["A"], m_col, 8), place(cute["A"], ones_col, 8)])
    b = torch.stack([place(cute["B"], n_row, 4), place(cute["B"], idx_row, 4)])
    d = run_mma(bf16, a, b, torch.zeros(2, 32, 4))
    emulated = {(t, v): (int(d[0, t, v]) - 1, int(d[1, t, v]) - 1) for t in range(32) for v in range(4)}
    wrong = {s: (emulated[s], cute["C"][s]) for s in cute["C"] if emulated[s] != cute["C"][s]}
    assert not wrong, f"(lane, value): (emulator (m, n), CuTe (m, n)): {wrong}"


def fp32_sum_bound(a, b, c):
    """Bound on |fp32 result - exact| for D = A B + C summed term by term in float: 17 roundings of partial sums."""
    return 17 * 2.0**-24 * (a.abs() @ b.abs() + c.abs()) + 1e-30


@pytest.mark.parametrize("bf16,dtype", DTYPES)
def test_mma_random_operands_placed_by_cute(cute, bf16, dtype):
    gen = torch.Generator().manual_seed(3)
    n = 8
    a_mat = torch.randn(n, 16, 16, generator=gen).to(dtype).double()
    b_mat = torch.randn(n, 16, 8, generator=gen).to(dtype).double()
    c_mat = torch.randn(n, 16, 8, generator=gen).float().double()
    a = torch.stack([place(cute["A"], x, 8) for x in a_mat])
    b = torch.stack([place(cute["B"], x, 4) for x in b_mat])
    c = torch.stack([place(cute["C"], x, 4) for x in c_mat])
    d = gather(cute["C"], run_mma(bf16, a, b, c), (16, 8))
    expected = a_mat @ b_mat + c_mat
    assert ((d - expected).abs() <= fp32_sum_bound(a_mat, b_mat, c_mat)).all()


@pytest.mark.parametrize("count,trans", LDMATRIX)
def test_ldmatrix_ownership_matches_cute(cute, count, trans):
    name = f"x{count}" + ("_trans" if trans else "")
    dst, src = cute[f"DST {name}"], cute[f"SRC {name}"]
    # Element (matrix j, row r, col c) holds 1 + 64 j + 8 r + c; rows are stored in a scrambled order after a
    # poison row (0xFFFF), so each lane's address decides what it reads. Lanes past 8 * count point at the poison.
    rows = 8 * count
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(count + 10 * trans)).tolist()
    image = [0xFFFF] * 8 * (rows + 1)
    for q in range(rows):
        image[8 * (1 + order[q]) : 8 * (2 + order[q])] = [1 + 8 * q + col for col in range(8)]
    assert sorted(8 * src[t][0] + src[t][1] for t in range(rows)) == list(range(rows))
    offsets = [8 * (1 + order[8 * src[t][0] + src[t][1]]) if t < rows else 0 for t in range(32)]
    regs = simt.ldmatrix(count, trans, image, offsets)
    emulated = {}
    for t in range(32):
        for r in range(count):
            for h in range(2):
                value = regs[t * count + r] >> 16 * h & 0xFFFF
                emulated[(t, r, h)] = ((value - 1) // 64, (value - 1) // 8 % 8, (value - 1) % 8)
    wrong = {s: (emulated[s], dst[s]) for s in dst if emulated[s] != dst[s]}
    assert not wrong, f"(lane, reg, half): (emulator (matrix, row, col), CuTe): {wrong}"


@pytest.mark.parametrize("b_row_major", [True, False], ids=["b_row_major_trans", "b_col_major"])
@pytest.mark.parametrize("bf16,dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mma_tile_through_cp_async_and_ldmatrix(bf16, dtype, b_row_major, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(16, 16, generator=gen).to(dtype).double()
    b = torch.randn(16, 8, generator=gen).to(dtype).double()
    c = torch.randn(16, 8, generator=gen).float().double()
    b_given = b if b_row_major else b.t().contiguous()
    d = simt.mma_tile(bf16, b_row_major, a.flatten().tolist(), b_given.flatten().tolist(), c.flatten().tolist(), False)
    d = torch.tensor(d, dtype=torch.float64).view(16, 8)
    assert ((d - (a @ b + c)).abs() <= fp32_sum_bound(a, b, c)).all()


@pytest.mark.parametrize("bf16,dtype", DTYPES)
def test_missing_cp_async_wait_reads_stale_shared_memory(bf16, dtype):
    a, b, c = torch.ones(16, 16), torch.ones(16, 8), torch.zeros(16, 8)
    args = (bf16, True, a.flatten().tolist(), b.flatten().tolist(), c.flatten().tolist())
    assert simt.mma_tile(*args, False) == [16.0] * 128
    d = simt.mma_tile(*args, True)  # shared memory still holds its 0xFF poison: NaN halves
    assert all(x != x for x in d)


@pytest.mark.parametrize(
    "call",
    [
        lambda: simt.mma_fragments(True, [0.0] * 255, [0.0] * 128, [0.0] * 128),
        lambda: simt.ldmatrix(3, False, [0] * 64, [0] * 32),
        lambda: simt.ldmatrix(1, False, [0] * 64, [60] * 32),
        lambda: simt.mma_tile(True, True, [0.0] * 256, [0.0] * 127, [0.0] * 128, False),
    ],
    ids=["short_a", "count_3", "row_outside", "short_b"],
)
def test_test_kernel_arguments_are_checked(call):
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvcc_compiles_the_wrappers_to_tensor_core_instructions(tmp_path, arch):
    nvcc, tool = shutil.which("nvcc"), cuobjdump()
    if nvcc is None or tool is None:
        pytest.skip("nvcc or cuobjdump not found")
    source = tmp_path / "k.cu"
    source.write_text(
        '#include "simt/tensor_core_selftest.cuh"\n'
        "namespace s = fastar::cuda::selftest;\n"
        "template __global__ void s::mma_tile_kernel<__nv_bfloat16>(const __nv_bfloat16*, const __nv_bfloat16*, "
        "bool, const float*, float*, bool);\n"
        "template __global__ void s::mma_tile_kernel<__half>(const __half*, const __half*, bool, const float*, "
        "float*, bool);\n"
    )
    cubin = tmp_path / "k.cubin"
    cmd = [nvcc, "-std=c++20", f"-I{ROOT / 'csrc'}", "-cubin", f"-arch={arch}", "-o", str(cubin), str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    found = set(re.findall(r"\b(HMMA\.16816\.F32(?:\.BF16)?|LDSM\.16\.MT?88(?:\.[24])?|LDGSTS\.E[.A-Z0-9]*)", sass))
    expected = {"HMMA.16816.F32", "HMMA.16816.F32.BF16", "LDSM.16.M88.4", "LDSM.16.M88.2", "LDSM.16.MT88.2"}
    assert expected <= found, sorted(found)
    assert any(x.startswith("LDGSTS.E.BYPASS.128") for x in found), sorted(found)
    assert any("ZFILL" in x for x in found), sorted(found)
