"""Tests of fastar.quantize_kivi_append (docs/quantized_kvcache.md, KIVI int4 / int2) on every backend.

Oracle: fastar.reference's KIVI quantizers (quantize_kivi_keys_reference, quantize_kivi_values_reference) and
pack_codes: codes, float16 scales and zeros must be bit-identical. The cache starts as poison (0x55 bytes) so that
a slot written by mistake, or one left unwritten, shows."""
from __future__ import annotations

import pytest
import torch

import fastar
from fastar.reference import pack_codes, quantize_kivi_keys_reference, quantize_kivi_values_reference

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BITS = {"int4": 4, "int2": 2}
POISON = 0x55


def cache(num_slots, Hkv, D, G, bits):
    """(k_codes, v_codes, k_scale, k_zero, v_scale, v_zero): codes poisoned, scales and zeros NaN."""
    codes = [torch.full((num_slots, Hkv, D * bits // 8), POISON, dtype=torch.uint8) for _ in range(2)]
    key_meta = [torch.full((num_slots // G, Hkv, D), float("nan"), dtype=torch.float16) for _ in range(2)]
    value_meta = [torch.full((num_slots, Hkv, D // G), float("nan"), dtype=torch.float16) for _ in range(2)]
    return codes + key_meta + value_meta


def append(backend, key, value, key_groups, value_slots, store, G):
    """Runs the op on the backend's device on copies of the cache; returns them on the CPU."""
    dev = [t.to(backend.device) for t in (key, value, key_groups, value_slots, *store)]
    with backend.using_ops():
        assert fastar.quantize_kivi_append(*dev, group_size=G) is None
    return [t.cpu() for t in dev[4:]]


def rows(gen, shape, dtype, spread=True):
    """Random rows whose channels have very different ranges (KIVI's reason for per-channel keys)."""
    x = torch.randn(shape, generator=gen)
    if spread:
        x = x * torch.logspace(-3, 1.5, shape[-1])[torch.randperm(shape[-1], generator=gen)]
    return x.to(dtype)


def check_keys(key, key_groups, got, fmt, G):
    """The cache groups key_groups[g] hold the reference's quantization of key rows [g * G, (g + 1) * G)."""
    k_codes, _, k_scale, k_zero = got[:4]
    codes, scale, zero = quantize_kivi_keys_reference(key.transpose(0, 1), fmt, G)  # [Hkv, N, D], [Hkv, N/G, D]
    for g, group in enumerate(key_groups.tolist()):
        if group < 0:
            continue
        want = pack_codes(codes[:, g * G:(g + 1) * G].transpose(0, 1), BITS[fmt])
        assert torch.equal(k_codes[group * G:(group + 1) * G], want), f"key group {g}: codes"
        assert torch.equal(k_scale[group].view(torch.int16), scale[:, g].view(torch.int16)), f"key group {g}: scale"
        assert torch.equal(k_zero[group].view(torch.int16), zero[:, g].view(torch.int16)), f"key group {g}: zero"


def check_values(value, value_slots, got, fmt, G):
    _, v_codes, _, _, v_scale, v_zero = got
    codes, scale, zero = quantize_kivi_values_reference(value, fmt, G)
    for n, slot in enumerate(value_slots.tolist()):
        if slot < 0:
            continue
        assert torch.equal(v_codes[slot], pack_codes(codes[n], BITS[fmt])), f"value {n}: codes"
        assert torch.equal(v_scale[slot].view(torch.int16), scale[n].view(torch.int16)), f"value {n}: scale"
        assert torch.equal(v_zero[slot].view(torch.int16), zero[n].view(torch.int16)), f"value {n}: zero"


def untouched(got, key_groups, value_slots, G):
    """The slots and groups the op must not have written still hold the poison."""
    k_codes, v_codes, k_scale, _, v_scale, _ = got
    written_k = {group * G + i for group in key_groups.tolist() if group >= 0 for i in range(G)}
    written_v = {s for s in value_slots.tolist() if s >= 0}
    for slot in range(k_codes.shape[0]):
        if slot not in written_k:
            assert (k_codes[slot] == POISON).all(), f"key slot {slot} written"
        if slot not in written_v:
            assert (v_codes[slot] == POISON).all() and v_scale[slot].isnan().all(), f"value slot {slot} written"
    for group in range(k_scale.shape[0]):
        if group not in key_groups.tolist():
            assert k_scale[group].isnan().all(), f"key group {group}: scales written"


@pytest.mark.parametrize("fmt", ["int4", "int2"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("G", [32, 8])
def test_codes_scales_and_zeros_match_the_reference(backend, fmt, dtype, G):
    gen = torch.Generator().manual_seed(G + BITS[fmt] + FLOAT_DTYPES.index(dtype))
    Hkv, D, num_slots = 3, 64, 8 * G
    key, value = rows(gen, (3 * G, Hkv, D), dtype), rows(gen, (6, Hkv, D), dtype, spread=False)
    key[G:2 * G, 1, 7] = 0.25  # a constant channel: scale 0, codes 0
    value[2, 0, :G] = -1.5  # a constant value group
    key_groups, value_slots = torch.tensor([5, -1, 0]), torch.tensor([3, num_slots - 1, -1, 0, 17, 2])
    got = append(backend, key, value, key_groups, value_slots, cache(num_slots, Hkv, D, G, BITS[fmt]), G)
    check_keys(key, key_groups, got, fmt, G)
    check_values(value, value_slots, got, fmt, G)
    untouched(got, key_groups, value_slots, G)


@pytest.mark.parametrize("fmt", ["int4", "int2"])
def test_float16_edges_of_scales_and_zeros(backend, fmt):
    """Ranges whose scale is a float16 subnormal or rounds up to the next binade, and values near 65504: the
    scale and zero round to float16 as torch's Tensor.half() does."""
    G, Hkv, D = 4, 1, 32
    gen = torch.Generator().manual_seed(3)
    width = torch.cat([torch.tensor([1e-7, 3e-6, 6.1e-5, 0.25, 1.0, 2047.9, 30000.0, 65000.0]),
                       torch.logspace(-6, 4.5, D - 8)])
    base = torch.cat([torch.tensor([0.0, -3e-6, 1e-3, -65000.0 + 30000.0, 7.0, -1.0, 35000.0, -32500.0]),
                      torch.randn(D - 8, generator=gen)])
    key = base + torch.rand(G, Hkv, D, generator=gen) * width
    key[0] = base
    key[1] = base + width
    key[:, :, 7] = key[:, :, 7].clamp(-65504, 65504)
    value = key[:2].clone()
    key_groups, value_slots = torch.tensor([0]), torch.tensor([1, 2])
    got = append(backend, key, value, key_groups, value_slots, cache(G, Hkv, D, G, BITS[fmt]), G)
    check_keys(key, key_groups, got, fmt, G)
    check_values(value, value_slots, got, fmt, G)


def test_strided_rows_and_empty_inputs(backend):
    gen = torch.Generator().manual_seed(5)
    G, Hkv, D = 8, 2, 32
    wide = rows(gen, (G, Hkv, D + 5), torch.bfloat16)
    key = wide[..., 3:3 + D]  # a view: unit stride along D, rows D + 5 apart
    value = rows(gen, (2, Hkv, 2 * D), torch.bfloat16)[..., ::2]  # no unit stride: copied by the glue
    got = append(backend, key, value, torch.tensor([1]), torch.tensor([0, 9]), cache(2 * G, Hkv, D, G, 4), G)
    check_keys(key, torch.tensor([1]), got, "int4", G)
    check_values(value, torch.tensor([0, 9]), got, "int4", G)
    empty = torch.empty(0, Hkv, D)
    store = cache(G, Hkv, D, G, 4)
    got = append(backend, empty, empty, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), store, G)
    for before, after in zip(store, got):
        assert torch.equal(before.view(torch.uint8), after.view(torch.uint8))


@pytest.mark.parametrize("change, error, match", [
    (dict(key=torch.zeros(8, 2, 32, dtype=torch.int32)), TypeError, "key must be float32"),
    (dict(value=torch.zeros(3, 2, 16)), ValueError, r"value must be \[num_tokens, 2, 32\]"),
    (dict(key=torch.zeros(6, 2, 32)), ValueError, "not a whole number of groups"),
    (dict(group_size=5), ValueError, r"group_size \(5\) must divide the head dim 32"),
    (dict(key_groups=torch.tensor([0, 1])), ValueError, r"key_groups must be \[1\]"),
    (dict(value_slots=torch.tensor([0.0, 1.0, 2.0])), TypeError, "value_slots must be int64"),
    (dict(k_codes=torch.zeros(16, 2, 12, dtype=torch.uint8), v_codes=torch.zeros(16, 2, 12, dtype=torch.uint8)),
     ValueError, "head_dim / 2 .int4. or head_dim / 4 .int2."),
    (dict(k_codes=torch.zeros(16, 2, 16, dtype=torch.int8)), TypeError, "must be uint8"),
    (dict(k_scale=torch.zeros(2, 2, 32)), TypeError, "k_scale must be float16"),
    (dict(v_zero=torch.zeros(16, 2, 2, dtype=torch.float16)), ValueError,
     r"v_zero must be a contiguous float16 \[16, 2, 4\]"),
])
def test_bad_arguments_raise(backend, change, error, match):
    G = 8
    args = dict(key=torch.zeros(8, 2, 32), value=torch.zeros(3, 2, 32), key_groups=torch.tensor([0]),
                value_slots=torch.tensor([0, 1, 2]))
    args.update(zip(("k_codes", "v_codes", "k_scale", "k_zero", "v_scale", "v_zero"), cache(16, 2, 32, G, 4)))
    args["group_size"] = G
    args.update(change)
    with backend.using_ops(), pytest.raises(error, match=match):
        fastar.quantize_kivi_append(**{k: backend.to(v) for k, v in args.items()})


def test_group_must_fill_whole_bytes(backend):
    args = [torch.zeros(2, 1, 8), torch.zeros(1, 1, 8), torch.tensor([0]), torch.tensor([0])] + cache(4, 1, 8, 2, 2)
    with backend.using_ops(), pytest.raises(ValueError, match="must fill whole bytes of 2-bit codes: a multiple of 4"):
        fastar.quantize_kivi_append(*backend.to(args), group_size=2)


@pytest.mark.parametrize("which", ["key_groups", "value_slots"])
def test_ids_out_of_range(backend, which):
    """The CPU raises before writing; CUDA skips the id."""
    G, Hkv, D = 4, 1, 8
    key, value = torch.randn(2 * G, Hkv, D), torch.randn(2, Hkv, D)
    key_groups, value_slots = torch.tensor([0, 1]), torch.tensor([0, 1])
    if which == "key_groups":
        key_groups = torch.tensor([0, 2])  # the cache has 2 groups
    else:
        value_slots = torch.tensor([8, 1])
    store = cache(2 * G, Hkv, D, G, 4)
    if backend.name == "cpu":
        with pytest.raises(IndexError, match=rf"{which}\[\d\] = \d+ is outside \[-1, \d+\)"):
            append(backend, key, value, key_groups, value_slots, store, G)
        return
    got = append(backend, key, value, key_groups, value_slots, store, G)
    skip_k = torch.where(key_groups >= 2, -1, key_groups)
    skip_v = torch.where(value_slots >= 2 * G, -1, value_slots)
    check_keys(key, skip_k, got, "int4", G)
    check_values(value, skip_v, got, "int4", G)
    untouched(got, skip_k, skip_v, G)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 70000.0])
def test_values_float16_cannot_hold(backend, bad):
    """CPU: ValueError naming the element, nothing written. CUDA: the scale of the value's channel in its key group
    (of its channel group for a value) is NaN, the others exact."""
    G, Hkv, D = 4, 2, 8
    gen = torch.Generator().manual_seed(9)
    key, value = torch.randn(2 * G, Hkv, D, generator=gen), torch.randn(2, Hkv, D, generator=gen)
    key[G + 1, 1, 3] = bad
    value[0, 0, 6] = bad
    store = cache(2 * G, Hkv, D, G, 4)
    key_groups, value_slots = torch.tensor([1, 0]), torch.tensor([3, 4])
    if backend.name == "cpu":
        with pytest.raises(ValueError, match=r"key\[5, 1, 3\] = .*within \+-65504"):
            append(backend, key, value, key_groups, value_slots, store, G)
        return
    k_codes, v_codes, k_scale, k_zero, v_scale, v_zero = append(backend, key, value, key_groups, value_slots, store, G)
    assert k_scale[0].isnan().nonzero().tolist() == [[1, 3]] and not k_scale[1].isnan().any()
    assert v_scale[3, 0, 1].isnan() and not v_scale[3, 0, 0].isnan() and not v_scale[3, 1].isnan().any()
    fine = [k_codes, v_codes, k_scale, k_zero, v_scale, v_zero]
    check_keys(key[:G], torch.tensor([1]), fine, "int4", G)
    check_values(value[1:], torch.tensor([4]), fine, "int4", G)


def test_compiles_without_graph_breaks():
    G, Hkv, D = 4, 1, 8
    store = cache(G, Hkv, D, G, 4)

    @torch.compile(fullgraph=True)
    def step(key, value):
        fastar.quantize_kivi_append(key, value, torch.tensor([0]), torch.tensor([1]), *store, group_size=G)

    key, value = torch.randn(G, Hkv, D), torch.randn(1, Hkv, D)
    step(key, value)
    check_keys(key, torch.tensor([0]), store, "int4", G)
    check_values(value, torch.tensor([1]), store, "int4", G)
