"""The quantized KV cache formats of docs/quantized_kvcache.md, as fastar.reference states them: hand-computed
vectors, the error bounds the docs promise, fp8 against PyTorch's casts, packing round trips and the KIVI
window split. The kernels that append to and read a quantized cache are tested against these references."""
from __future__ import annotations

import pytest
import torch

from fastar.reference import (
    KV_FORMATS,
    dequantize_reference,
    kivi_split,
    pack_codes,
    quantize_fp8_reference,
    quantize_int8_reference,
    quantize_kivi_keys_reference,
    quantize_kivi_values_reference,
    unpack_codes,
)


def test_formats():
    assert set(KV_FORMATS) == {"int8", "fp8_e4m3", "fp8_e5m2", "int4", "int2"}


def test_pack_codes_hand_computed():
    assert pack_codes(torch.tensor([1, 2, 3, 4], dtype=torch.uint8), 4).tolist() == [0x21, 0x43]
    # byte 0 = 1 | 2 << 2 | 3 << 4 | 0 << 6, byte 1 = 3 | 3 << 2 | 0 << 4 | 1 << 6
    assert pack_codes(torch.tensor([1, 2, 3, 0, 3, 3, 0, 1], dtype=torch.uint8), 2).tolist() == [0x39, 0x4F]


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_round_trip(bits):
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (3, 5, 64), generator=gen, dtype=torch.int64).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, 5, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_pack_rejects_partial_bytes():
    with pytest.raises(ValueError, match="whole bytes"):
        pack_codes(torch.zeros(3, dtype=torch.uint8), 4)


def test_int8_hand_computed():
    codes, scale = quantize_int8_reference(torch.tensor([[1.0, -2.54, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    assert scale[0].item() == pytest.approx(0.02, rel=1e-6) and scale[1].item() == 0.0
    assert codes.tolist() == [[50, -127, 25, 0], [0, 0, 0, 0]]


def test_int8_error_is_at_most_half_a_step():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 100, 128, generator=gen) * torch.rand(4, 8, 100, 1, generator=gen) * 10
    codes, scale = quantize_int8_reference(x)
    assert codes.dtype == torch.int8 and scale.shape == x.shape[:-1] and codes.abs().max() == 127
    err = (dequantize_reference(codes, scale.unsqueeze(-1)) - x.double()).abs()
    assert (err <= scale.double().unsqueeze(-1) * (0.5 + 1e-6)).all()


def test_fp8_hand_computed_and_saturating():
    x = torch.tensor([0.1, 1e6, -1e6, 3.0])
    e4m3 = quantize_fp8_reference(x, torch.tensor(1.0), "fp8_e4m3").float()
    assert e4m3.tolist() == [0.1015625, 448.0, -448.0, 3.0]  # 0.1 = 1.6 * 2^-4 rounds to mantissa 1.625
    e5m2 = quantize_fp8_reference(x, torch.tensor(2.0), "fp8_e5m2").float()
    assert e5m2.tolist() == [0.046875, 57344.0, -57344.0, 1.5]  # torch's own e5m2 cast would give +-inf
    with pytest.raises(ValueError, match="fp8"):
        quantize_fp8_reference(x, torch.tensor(1.0), "int8")


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_in_range_matches_torch_bit_for_bit(fmt):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 64, 128, generator=gen) * 30
    scale = torch.rand(4, 1, 1, generator=gen) + 0.5  # per kv head
    codes = quantize_fp8_reference(x, scale, fmt)
    assert codes.dtype == KV_FORMATS[fmt]
    assert torch.equal(codes.view(torch.uint8), (x / scale).to(KV_FORMATS[fmt]).view(torch.uint8))


def test_kivi_hand_computed():
    codes, scale, zero = quantize_kivi_keys_reference(torch.tensor([[0.0, 5.0], [3.0, 5.0]]), "int2", 2)
    assert codes.tolist() == [[0, 0], [3, 0]] and scale.tolist() == [[1.0, 0.0]] and zero.tolist() == [[0.0, 5.0]]
    assert scale.dtype == zero.dtype == torch.float16
    codes, scale, zero = quantize_kivi_values_reference(torch.tensor([1.0, 2.0, 3.0, 4.0, -1, 14, 4, 9]), "int4", 4)
    assert codes.tolist() == [0, 5, 10, 15, 0, 15, 5, 10] and zero.tolist() == [1, -1]
    assert torch.equal(scale, torch.tensor([0.2, 1.0]).half())  # 3 / 15 and 15 / 15, stored as float16
    # A minimum that float16 rounds up (1.0006 -> 1 + 2^-10): codes come from the stored zero and scale
    # ((4 - zero) / 3 -> 1 - 2^-11), and the minimum, below the zero, codes as 0.
    codes, scale, zero = quantize_kivi_values_reference(torch.tensor([1.0006, 1.5, 2.0, 4.0]), "int2", 4)
    assert zero.item() == 1 + 2**-10 and scale.item() == 1 - 2**-11 and codes.tolist() == [0, 0, 1, 3]


def kivi_bound(scale, zero, bits):
    """Half a step, plus float16's rounding of the stored zero and of the top level (relative 2^-11 each)."""
    scale, zero = scale.double(), zero.double()
    return scale * 0.5 + 2**-11 * (zero.abs() + (2**bits - 1) * scale) + 1e-7


@pytest.mark.parametrize("fmt", ["int4", "int2"])
def test_kivi_error_is_at_most_half_a_step(fmt):
    gen = torch.Generator().manual_seed(2)
    k = torch.randn(2, 4, 96, 64, generator=gen)
    k[..., 3] *= 20  # an outlier channel, the case per-channel key scales are for
    codes, scale, zero = quantize_kivi_keys_reference(k, fmt, 32)
    assert codes.max() == 2 ** {"int4": 4, "int2": 2}[fmt] - 1 and scale.shape == (2, 4, 3, 64)
    per_token = lambda t: t.repeat_interleave(32, dim=-2)  # noqa: E731
    bits = {"int4": 4, "int2": 2}[fmt]
    err = (dequantize_reference(codes, per_token(scale), per_token(zero)) - k.double()).abs()
    assert (err <= kivi_bound(per_token(scale), per_token(zero), bits)).all()
    codes, scale, zero = quantize_kivi_values_reference(k, fmt, 32)
    assert scale.shape == (2, 4, 96, 2)
    per_channel = lambda t: t.repeat_interleave(32, dim=-1)  # noqa: E731
    err = (dequantize_reference(codes, per_channel(scale), per_channel(zero)) - k.double()).abs()
    assert (err <= kivi_bound(per_channel(scale), per_channel(zero), bits)).all()


def test_kivi_groups_must_divide():
    with pytest.raises(ValueError, match="groups of 32"):
        quantize_kivi_keys_reference(torch.zeros(40, 64), "int4", 32)
    with pytest.raises(ValueError, match="groups of 48"):
        quantize_kivi_values_reference(torch.zeros(4, 64), "int4", 48)


@pytest.mark.parametrize("length, keys, values", [(0, 0, 0), (128, 0, 0), (129, 0, 1), (159, 0, 31), (160, 32, 32),
                                                  (161, 32, 33), (200, 64, 72)])
def test_kivi_split_at_every_boundary(length, keys, values):
    assert kivi_split(length, 128, 32) == (keys, values)
    window_keys, window_values = length - keys, length - values
    assert window_values == min(length, 128)
    assert min(length, 128) <= window_keys <= 128 + 31


def test_kivi_split_without_a_window_and_bad_sizes():
    assert kivi_split(70, 0, 32) == (64, 70)
    for residual, group in [(100, 32), (-32, 32), (32, 0)]:
        with pytest.raises(ValueError, match="multiple of group_size"):
            kivi_split(10, residual, group)
