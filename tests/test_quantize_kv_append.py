"""Tests of fastar.quantize_kv_append (docs/quantized_kvcache.md) on every backend.

Oracle: the float references of fastar.reference (quantize_int8_reference, quantize_fp8_reference), row by row:
the codes and scales must be bit-identical. Caches start as poison (0x55 bytes, NaN scales) so that a slot
written by mistake, or one left unwritten, shows."""
from __future__ import annotations

import pytest
import torch

import fastar
from fastar.reference import KV_FORMATS, quantize_fp8_reference, quantize_int8_reference

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FP8 = ["fp8_e4m3", "fp8_e5m2"]
POISON = 0x55


def poisoned(shape, dtype):
    return torch.full(shape, POISON, dtype=torch.uint8).view(dtype)


def append(backend, key, value, slots, k_cache, v_cache, k_scale, v_scale):
    """Runs the op on the backend's device on copies of the caches; returns them on the CPU."""
    dev = [t.to(backend.device) for t in (key, value, slots, k_cache, v_cache, k_scale, v_scale)]
    with backend.using_ops():
        assert fastar.quantize_kv_append(*dev) is None
    return [t.cpu() for t in dev[3:]]


def expected(fmt, rows, scale_rows=None):
    """The reference codes (as bytes) and scales of rows [..., D] (scale_rows: fp8's fixed scales, broadcast)."""
    if fmt == "int8":
        codes, scale = quantize_int8_reference(rows)
        return codes.view(torch.uint8), scale
    if scale_rows is None:  # fp8 scales computed per row
        scale_rows = rows.float().abs().amax(-1) / torch.finfo(KV_FORMATS[fmt]).max
    safe = torch.where(scale_rows > 0, scale_rows, torch.ones_like(scale_rows))
    return quantize_fp8_reference(rows, safe.unsqueeze(-1), fmt).view(torch.uint8), scale_rows


def random_rows(gen, shape, dtype):
    x = torch.randn(shape, generator=gen) * torch.rand(*shape[:-1], 1, generator=gen) * 8
    return x.to(dtype)


@pytest.mark.parametrize("fmt", ["int8"] + FP8)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("paged", [False, True])
def test_per_token_scales_match_the_reference(backend, fmt, dtype, paged):
    gen = torch.Generator().manual_seed(len(fmt) + int(paged))
    N, Hkv, D, slots_total = 7, 3, 64, 24
    key, value = random_rows(gen, (N, Hkv, D), dtype), random_rows(gen, (N, Hkv, D), dtype)
    key[2, 1] = 0.0  # an all-zero row: scale 0, codes 0
    slots = torch.tensor([5, 0, 23, -1, 11, 12, 7])
    shape = (6, 4, Hkv, D) if paged else (slots_total, Hkv, D)
    caches = [poisoned(shape, KV_FORMATS[fmt]) for _ in range(2)]
    scales = [torch.full(shape[:-1], float("nan")) for _ in range(2)]
    k_cache, v_cache, k_scale, v_scale = append(backend, key, value, slots, *caches, *scales)
    for got_codes, got_scale, rows in ((k_cache, k_scale, key), (v_cache, v_scale, value)):
        got_codes = got_codes.view(torch.uint8).reshape(slots_total, Hkv, D)
        got_scale = got_scale.reshape(slots_total, Hkv)
        want_codes, want_scale = expected(fmt, rows)
        written = slots >= 0
        assert torch.equal(got_codes[slots[written]], want_codes[written])
        assert torch.equal(got_scale[slots[written]], want_scale[written])
        untouched = torch.ones(slots_total, dtype=torch.bool)
        untouched[slots[written]] = False
        assert (got_codes[untouched] == POISON).all() and got_scale[untouched].isnan().all()


@pytest.mark.parametrize("fmt", FP8)
@pytest.mark.parametrize("per_head", [False, True])
def test_fixed_fp8_scales_are_read(backend, fmt, per_head):
    gen = torch.Generator().manual_seed(3)
    N, Hkv, D = 5, 4, 128
    key, value = random_rows(gen, (N, Hkv, D), torch.bfloat16), random_rows(gen, (N, Hkv, D), torch.bfloat16)
    key[0, 0, :4] = torch.tensor([1e6, -1e6, 1e-9, -1e-9])  # saturate, and round to (signed) zero
    k_scale = torch.rand(Hkv if per_head else 1, generator=gen) + 0.1
    v_scale = torch.rand(Hkv if per_head else 1, generator=gen) + 0.1
    slots = torch.tensor([4, 3, 2, 1, 0])
    caches = [poisoned((5, Hkv, D), KV_FORMATS[fmt]) for _ in range(2)]
    k_cache, v_cache, k_out, v_out = append(backend, key, value, slots, *caches, k_scale.clone(), v_scale.clone())
    assert torch.equal(k_out, k_scale) and torch.equal(v_out, v_scale)  # read, not written
    for got, rows, scale in ((k_cache, key, k_scale), (v_cache, value, v_scale)):
        want, _ = expected(fmt, rows, scale.reshape(1, -1).expand(N, Hkv) if per_head else scale.expand(N, Hkv))
        assert torch.equal(got.view(torch.uint8)[slots], want)
    limit = torch.finfo(KV_FORMATS[fmt]).max
    assert k_cache[4, 0, :2].float().tolist() == [limit, -limit]


def test_fp8_conversion_matches_torch_on_every_code_boundary(backend):
    """Every fp8 value, the midpoints between neighbours (ties to even) and points just off them, at scale 1."""
    for fmt in FP8:
        dtype = KV_FORMATS[fmt]
        values = torch.arange(256, dtype=torch.uint8).view(dtype).float()
        values = values[values.isfinite()].unique()
        mids = (values[1:] + values[:-1]) / 2
        x = torch.cat([values, mids, mids.nextafter(torch.tensor(float("inf"))),
                       mids.nextafter(torch.tensor(float("-inf")))])
        x = x[x.abs() <= torch.finfo(dtype).max]
        pad = (-x.numel()) % 64
        rows = torch.cat([x, torch.zeros(pad)]).reshape(-1, 1, 64)
        N = rows.shape[0]
        one = torch.ones(1)
        k_cache, _, _, _ = append(backend, rows, rows, torch.arange(N), poisoned((N, 1, 64), dtype),
                                  poisoned((N, 1, 64), dtype), one.clone(), one.clone())
        assert torch.equal(k_cache.view(torch.uint8), rows.to(dtype).view(torch.uint8)), fmt


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_unaligned_rows(backend, dtype):
    """Rows that do not start 16-byte aligned (a view one element in), and a head dim of 12: the element-wise
    path of the CUDA kernel, the same codes."""
    gen = torch.Generator().manual_seed(4)
    for N, Hkv, D, offset in [(3, 2, 64, 1), (3, 2, 12, 0)]:
        wide = random_rows(gen, (N, Hkv, D + 8), dtype)
        key, value = wide[..., offset:offset + D], wide[..., 8 - offset:8 - offset + D] * 2
        caches = [poisoned((4, Hkv, D), torch.int8) for _ in range(2)]
        scales = [torch.full((4, Hkv), float("nan")) for _ in range(2)]
        slots = torch.tensor([3, 0, 2])
        k_cache, v_cache, k_scale, v_scale = append(backend, key, value, slots, *caches, *scales)
        for got, got_scale, rows in ((k_cache, k_scale, key), (v_cache, v_scale, value)):
            want, want_scale = expected("int8", rows)
            assert torch.equal(got.view(torch.uint8)[slots], want) and torch.equal(got_scale[slots], want_scale)


def test_empty_inputs_write_nothing(backend):
    empty = torch.zeros(0, 2, 8)
    k_cache, v_cache, _, _ = append(backend, empty, empty, torch.zeros(0, dtype=torch.long),
                                    poisoned((3, 2, 8), torch.int8), poisoned((3, 2, 8), torch.int8),
                                    torch.zeros(3, 2), torch.zeros(3, 2))
    assert (k_cache.view(torch.uint8) == POISON).all() and (v_cache.view(torch.uint8) == POISON).all()


def args(N=2, Hkv=2, D=8, slots=4, fmt="int8", dtype=torch.float32):
    key = torch.randn(N, Hkv, D).to(dtype)
    cache = lambda: poisoned((slots, Hkv, D), KV_FORMATS[fmt])  # noqa: E731
    return dict(key=key, value=key.clone(), slot_mapping=torch.arange(N), k_cache=cache(), v_cache=cache(),
                k_scale=torch.zeros(slots, Hkv), v_scale=torch.zeros(slots, Hkv))


BAD = [
    (dict(key=torch.zeros(2, 2, 8, dtype=torch.int32)), TypeError, "key must be float32"),
    (dict(value=torch.zeros(2, 2, 8, dtype=torch.float16)), TypeError, "value must have key's dtype"),
    (dict(key=torch.zeros(2, 8), value=torch.zeros(2, 8)), ValueError, "key must be \\[num_tokens"),
    (dict(slot_mapping=torch.arange(2, dtype=torch.int32)), TypeError, "slot_mapping must be int64"),
    (dict(slot_mapping=torch.arange(3)), ValueError, "one slot per token"),
    (dict(k_cache=torch.zeros(4, 2, 8), v_cache=torch.zeros(4, 2, 8)), TypeError, "int8, float8_e4m3fn"),
    (dict(v_cache=torch.zeros(4, 2, 8, dtype=torch.float8_e4m3fn)), TypeError, "v_cache must have k_cache's dtype"),
    (dict(k_cache=torch.zeros(4, 2, 4, dtype=torch.int8)), ValueError, "k_cache must be"),
    (dict(v_cache=torch.zeros(5, 2, 8, dtype=torch.int8)), ValueError, "v_cache must have k_cache's shape"),
    (dict(k_scale=torch.zeros(4, 2, dtype=torch.float16)), TypeError, "k_scale must be float32"),
    (dict(v_scale=torch.zeros(2)), ValueError, "one scale per slot and kv head"),
]


@pytest.mark.parametrize("change, error, match", BAD, ids=[m for _, _, m in BAD])
def test_bad_arguments_raise(backend, change, error, match):
    a = {**args(), **change}
    with backend.using_ops(), pytest.raises(error, match=match):
        fastar.quantize_kv_append(**{name: t.to(backend.device) for name, t in a.items()})


def test_fp8_scale_shapes_are_checked(backend):
    a = {**args(fmt="fp8_e4m3"), "k_scale": torch.ones(3), "v_scale": torch.ones(3)}
    with backend.using_ops(), pytest.raises(ValueError, match="one per kv head \\[2\\]"):
        fastar.quantize_kv_append(**{name: t.to(backend.device) for name, t in a.items()})
    a = {**args(fmt="fp8_e4m3"), "k_scale": torch.ones(2), "v_scale": torch.ones(1)}
    with backend.using_ops(), pytest.raises(ValueError, match="both per tensor or both per kv head"):
        fastar.quantize_kv_append(**{name: t.to(backend.device) for name, t in a.items()})


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_fixed_fp8_scales_must_be_positive_and_finite_on_the_cpu(bad):
    a = {**args(fmt="fp8_e5m2"), "k_scale": torch.ones(2), "v_scale": torch.tensor([1.0, bad])}
    with pytest.raises(ValueError, match=r"v_scale\[1\] = .*; a fixed fp8 scale must be positive and finite"):
        fastar.quantize_kv_append(**a)
    assert (a["k_cache"].view(torch.uint8) == POISON).all()


@pytest.mark.parametrize("slot", [4, -2])
def test_slot_out_of_range(backend, slot):
    """The CPU raises before writing; CUDA (and the SIMT build) skip the token."""
    a = args()
    a["slot_mapping"] = torch.tensor([1, slot])
    if backend.name == "cpu":
        with pytest.raises(IndexError, match=f"slot_mapping\\[1\\] = {slot} is outside \\[-1, 4\\)"):
            fastar.quantize_kv_append(**a)
        assert (a["k_cache"].view(torch.uint8) == POISON).all()
        return
    k_cache, _, k_scale, _ = append(backend, *a.values())
    want, _ = expected("int8", a["key"][0])
    assert torch.equal(k_cache.view(torch.uint8)[1], want)
    assert (k_cache.view(torch.uint8)[[0, 2, 3]] == POISON).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
def test_non_finite_values(backend, bad, fmt):
    """The CPU raises before writing; CUDA stores the row as NaN (its scale) and leaves the other rows exact."""
    a = args(fmt=fmt)
    a["value"][1, 0, 3] = bad
    if backend.name == "cpu":
        with pytest.raises(ValueError, match=r"value\[1, 0, 3\] is (nan|inf); a quantized cache stores finite"):
            fastar.quantize_kv_append(**a)
        assert (a["v_cache"].view(torch.uint8) == POISON).all()
        return
    _, v_cache, _, v_scale = append(backend, *a.values())
    assert v_scale[1, 0].isnan()
    want_codes, want_scale = expected(fmt, a["value"][0])
    assert torch.equal(v_cache.view(torch.uint8)[0], want_codes) and torch.equal(v_scale[0], want_scale)
    assert torch.equal(v_scale[1, 1], expected(fmt, a["value"][1, 1])[1])


def test_compiles_without_graph_breaks():
    a = args(N=3, slots=5, dtype=torch.bfloat16)
    eager = {name: t.clone() for name, t in a.items()}
    fastar.quantize_kv_append(**eager)

    def step(key, value, slot_mapping, k_cache, v_cache, k_scale, v_scale):
        fastar.quantize_kv_append(key * 1, value, slot_mapping, k_cache, v_cache, k_scale, v_scale)
        return k_cache.float().sum()

    torch.compile(step, fullgraph=True)(**a)
    for name in ("k_cache", "v_cache", "k_scale", "v_scale"):
        assert torch.equal(a[name].view(torch.uint8), eager[name].view(torch.uint8)), name
