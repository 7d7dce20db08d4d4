"""Packing, grids and stored bytes of the quantization family (hypothesis where it helps)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from effinfer.plugins.model.quantization import kernels
from effinfer.plugins.model.quantization.layers import QuantizedLinear, build_quantized_linear
from effinfer.plugins.model.quantization.packing import (QuantizedTensor, fake_quantize, pack_codes, packed_width,
                                                         quantize, stored_scale, unpack_codes)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 7), n=st.integers(1, 90), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip_every_width(bits, rows, n, seed):
    codes = torch.randint(0, 2**bits, (rows, n), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, packed_width(n, bits))
    assert torch.equal(unpack_codes(packed, bits, n), codes)


@settings(max_examples=50, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 9), groups=st.integers(1, 4),
       group=st.sampled_from([8, 16, 32, 64]), zero=st.sampled_from(["none", "int", "float"]),
       scale=st.floats(1e-2, 1e2), seed=st.integers(0, 2**16))
def test_quantize_round_trip_within_half_a_step(bits, rows, groups, group, zero, scale, seed):
    weight = torch.randn(rows, groups * group, generator=torch.Generator().manual_seed(seed)) * scale
    symmetric, float_zero = zero == "none", zero == "float"
    packed = quantize(weight, bits, group, symmetric, float_zero=float_zero)
    rebuilt = QuantizedTensor.from_codes(packed.codes(), packed.scales.float(), packed.zero_points(), bits, group,
                                         float_zero)
    assert torch.equal(rebuilt.packed, packed.packed)
    assert symmetric or torch.equal(rebuilt.zeros, packed.zeros)
    error = (weight - packed.dequantize()).abs().view(rows, groups, group).amax(-1)
    # a float zero is stored in bf16: the grid may shift by 2^-8 of the offset
    slack = packed.zeros.float().abs() * 2**-8 if float_zero else 0.0
    assert torch.all(error <= packed.scales.float() / 2 * (1 + 1e-5) + slack + 1e-7)
    assert torch.allclose(fake_quantize(weight, bits, group, symmetric, float_zero=float_zero), packed.dequantize(),
                          rtol=1e-6, atol=1e-6 * scale)


@settings(max_examples=30, deadline=None)
@given(value=st.floats(1e-9, 5e4))
@example(value=1.000000001)  # rounds to 1.0 in float32
def test_stored_scales_are_exact_in_fp16_and_bf16_and_never_smaller(value):
    scale = torch.tensor([value])  # scales are float32: compare with what float32 holds of the value
    stored = stored_scale(scale)
    assert stored.item() >= scale.item()
    assert stored.half().float().item() == stored.item() == stored.bfloat16().float().item()


def test_int4_kernel_layout_is_inverted_exactly():
    weight = torch.randn(48, 128)
    for zero in ("none", "int", "float"):
        packed = quantize(weight, 4, 32, zero == "none", float_zero=zero == "float")
        layout, pairs = kernels.int4_kernel_weight(packed)
        back = kernels.int4_kernel_tensor(layout, pairs, 128, zero)
        assert torch.equal(back.packed, packed.packed) and torch.equal(back.scales, packed.scales)
        assert (back.zeros is None) == (zero == "none") and (zero == "none" or torch.equal(back.zeros, packed.zeros))


@pytest.mark.parametrize(("bits", "group", "zero", "execution", "per_weight", "per_group"), [
    (8, None, "none", "auto", 1.0, 2),          # int8 kernel: int8 codes + a bf16 scale per row
    (4, 32, "int", "auto", 0.5, 4),             # int4 kernel: nibbles + bf16 (scale, zero) pairs
    (4, 32, "int", "dequant", 0.5, 3),          # packed nibbles + fp16 scale + uint8 zero
    (4, 64, "float", "dequant", 0.5, 4),        # packed nibbles + fp16 scale + bf16 offset
    (3, 32, "none", "auto", 3 / 8, 2),          # 3-bit: 8 codes in 3 bytes + fp16 scale
    (2, 16, "int", "auto", 0.25, 3),
    (4, 32, "none", "fake", 4.0, 2),            # fake quant keeps fp32 weights (+ scales)
])
def test_weight_bytes_match_the_arithmetic(bits, group, zero, execution, per_weight, per_group):
    rows, columns = 96, 256
    weight = quantize(torch.randn(rows, columns), bits, group, zero == "none", float_zero=zero == "float")
    layer = build_quantized_linear(weight, None, execution)
    stored = sum(t.numel() * t.element_size() for t in [*layer.parameters(), *layer.buffers()])
    groups = rows * (columns // (group or columns))
    assert stored == rows * columns * per_weight + groups * per_group


@pytest.mark.parametrize("float_zero", [False, True])
def test_every_mode_gives_back_the_same_packed_weight(float_zero):
    packed = quantize(torch.randn(64, 128), 4, 32, symmetric=False, float_zero=float_zero)
    for mode in ("kernel", "dequant", "fake"):
        layer = QuantizedLinear(packed, None, mode)
        again = layer.quantized_weight()
        assert torch.equal(again.packed, packed.packed) and torch.equal(again.zeros, packed.zeros)
        assert torch.equal(again.scales, packed.scales)


def test_group_size_that_does_not_divide_is_explained():
    with pytest.raises(ValueError, match=r"group_size=48 does not divide the layer's 64 input features; use one of"):
        quantize(torch.randn(4, 64), 4, 48, True)
