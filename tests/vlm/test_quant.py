"""Group quantization and bit-packing: exact round trips, real byte counts, error bounds."""

import pytest
import torch

from core.vlm.quant import (
    cat_groups,
    dequantize_groups,
    pack,
    quantize_groups,
    unpack,
)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 64, 129])
def test_unpack_gives_back_the_packed_codes(bits, n):
    codes = torch.randint(0, 2**bits, (3, 5, n), dtype=torch.uint8)
    assert torch.equal(unpack(pack(codes, bits), bits, n), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packing_stores_bits_per_code_in_uint8(bits):
    packed = pack(torch.zeros(4, 64, dtype=torch.uint8), bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == 4 * 64 * bits // 8


def test_packing_rejects_widths_that_do_not_divide_a_byte():
    with pytest.raises(ValueError):
        pack(torch.zeros(8, dtype=torch.uint8), 3)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dim", [2, 3])
def test_error_stays_within_half_a_step_of_each_group(bits, dim):
    x = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(bits)) * 3 + 1
    q = quantize_groups(x, bits, group_size=16, dim=dim)
    error = (dequantize_groups(q) - x).abs()
    groups = x.unflatten(dim, (-1, 16))
    step = (groups.amax(dim + 1, keepdim=True) - groups.amin(dim + 1, keepdim=True)) / (2**bits - 1)
    bound = (step / 2).expand_as(groups).flatten(dim, dim + 1)
    # float16 scales are rounded up, so the bound may loosen by float16's relative precision.
    assert (error <= bound * (1 + 2**-9) + 1e-6).all()


def test_more_bits_give_less_error():
    x = torch.randn(1, 2, 64, 32, generator=torch.Generator().manual_seed(0))
    errors = [
        (dequantize_groups(quantize_groups(x, bits, 32, dim=2)) - x).abs().mean()
        for bits in (2, 4, 8)
    ]
    assert errors[0] > errors[1] > errors[2]


def test_a_constant_group_is_exact():
    x = torch.full((1, 1, 32, 8), 0.375)
    assert torch.equal(dequantize_groups(quantize_groups(x, 2, 32, dim=2)), x)


def test_quantized_bytes_are_codes_plus_two_float16_per_group():
    q = quantize_groups(torch.randn(1, 3, 128, 64), 2, group_size=32, dim=2)
    codes = 3 * 128 * 64 * 2 // 8
    groups = 3 * (128 // 32) * 64
    assert q.nbytes == codes + groups * 2 * 2


def test_concatenated_groups_dequantize_to_the_concatenated_parts():
    generator = torch.Generator().manual_seed(1)
    parts = [torch.randn(1, 2, 32, 16, generator=generator) for _ in range(3)]
    for dim in (2, 3):
        quantized = [quantize_groups(p, 4, 16, dim=dim) for p in parts]
        joined = dequantize_groups(cat_groups(quantized, dim=2))
        assert torch.equal(joined, torch.cat([dequantize_groups(q) for q in quantized], 2))


def test_groups_must_tile_the_grouped_dim():
    with pytest.raises(ValueError):
        quantize_groups(torch.randn(1, 1, 30, 8), 4, 16, dim=2)
