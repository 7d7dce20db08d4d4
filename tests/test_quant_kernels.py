"""The integer kernels agree with the dequantized float reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from effinfer.plugins.model.quantization import kernels
from effinfer.plugins.model.quantization.layers import Int8DynamicLinear, OutlierInt8Linear, QuantizedLinear
from effinfer.plugins.model.quantization.packing import quantize


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.float() - reference).norm() / reference.norm())


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 9), out_blocks=st.integers(1, 4), groups=st.integers(1, 4),
       group=st.sampled_from([32, 64]), symmetric=st.booleans(), seed=st.integers(0, 1000))
def test_int4_kernel_matches_the_dequantized_reference(rows, out_blocks, groups, group, symmetric, seed):
    torch.manual_seed(seed)
    weight, x = torch.randn(16 * out_blocks, groups * group), torch.randn(rows, groups * group)
    packed = quantize(weight, 4, group, symmetric)
    layer = QuantizedLinear(packed, None, "kernel")
    assert layer.kernel == "int4"
    # bf16 activations around the kernel: a few 1e-3 of relative error, no more
    assert relative_error(layer(x), x @ packed.dequantize().t()) < 2e-2


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 9), out_features=st.integers(1, 40), in_features=st.sampled_from([16, 48, 96]),
       seed=st.integers(0, 1000))
def test_int8_kernel_matches_the_dequantized_reference(rows, out_features, in_features, seed):
    torch.manual_seed(seed)
    weight, x = torch.randn(out_features, in_features), torch.randn(rows, in_features)
    packed = quantize(weight, 8, None, True)
    layer = QuantizedLinear(packed, torch.randn(out_features), "kernel")
    assert layer.kernel == "int8"
    assert relative_error(layer(x), x @ packed.dequantize().t() + layer.bias) < 2e-2


def test_dense_above_switches_long_inputs_to_a_float_gemm():
    packed = quantize(torch.randn(32, 64), 8, None, True)
    layer = QuantizedLinear(packed, None, "kernel", dense_above=4)
    long, short = torch.randn(8, 64), torch.randn(2, 64)
    assert torch.allclose(layer(long), long @ packed.dequantize().t(), atol=1e-5)
    assert relative_error(layer(short), short @ packed.dequantize().t()) < 2e-2


def test_int_mm_is_an_exact_integer_gemm():
    a = torch.randint(-127, 128, (5, 64), dtype=torch.int8)
    b = torch.randint(-127, 128, (64, 24), dtype=torch.int8)
    assert torch.equal(kernels.int8_gemm(a, b), a.int() @ b.int())


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 20), inner=st.sampled_from([1, 64, 576, 1024, 1025, 1536, 2049]),
       cols=st.integers(1, 24), extreme=st.booleans(), seed=st.integers(0, 2**16))
def test_float_int8_gemm_equals_the_integer_gemm_bit_for_bit(rows, inner, cols, extreme, seed):
    generator = torch.Generator().manual_seed(seed)
    if extreme:  # every product at its largest magnitude: the worst case for float32 exactness
        x = torch.full((rows, inner), -127, dtype=torch.int8)
        w = torch.full((inner, cols), -127, dtype=torch.int8)
    else:
        x = torch.randint(-127, 128, (rows, inner), dtype=torch.int8, generator=generator)
        w = torch.randint(-127, 128, (inner, cols), dtype=torch.int8, generator=generator)
    exact = x.long() @ w.long()
    assert torch.equal(kernels.int8_gemm_float(x, w).long(), exact)
    assert torch.equal(kernels.int8_gemm(x, w).long(), exact)  # whichever path this CPU chose


def test_int8_gemm_path_can_be_forced(monkeypatch):
    kernels.int8_gemm_path.cache_clear()
    try:
        for path in kernels.INT8_GEMM_PATHS:
            monkeypatch.setenv("EFFINFER_INT8_GEMM", path)
            kernels.int8_gemm_path.cache_clear()
            assert kernels.int8_gemm_path() == path
    finally:
        monkeypatch.delenv("EFFINFER_INT8_GEMM")
        kernels.int8_gemm_path.cache_clear()


@pytest.mark.parametrize("static", [False, True])
def test_w8a8_layer_is_close_to_float(static):
    torch.manual_seed(0)
    weight, x = torch.randn(48, 64), torch.randn(3, 7, 64)
    scale = x.abs().amax() / 127 if static else None
    layer = Int8DynamicLinear(weight, None, scale)
    reference = x @ weight.t()
    assert layer(x).shape == reference.shape
    assert relative_error(layer(x), reference) < 2e-2
    assert relative_error(layer(x), x @ layer.dense_weight().t()) < 1.5e-2


def test_llm_int8_keeps_outlier_features_in_float():
    torch.manual_seed(0)
    weight, x = torch.randn(32, 64), torch.randn(6, 64)
    x[:, 5] *= 80.0  # an emergent-outlier feature dimension
    plain = Int8DynamicLinear(weight, None)
    decomposed = OutlierInt8Linear(weight, None, torch.tensor([5]))
    runtime = OutlierInt8Linear(weight, None, torch.tensor([], dtype=torch.long), runtime_threshold=6.0)
    reference = x @ weight.t()
    assert relative_error(decomposed(x), reference) < relative_error(plain(x), reference) / 3
    assert relative_error(runtime(x), reference) < relative_error(plain(x), reference) / 3
    assert decomposed.outlier_weight.dtype == torch.float16 and decomposed.qweight[:, 5].abs().sum() == 0


@pytest.mark.parametrize(("bits", "group"), [(8, None), (4, 32)])
def test_kernels_take_strided_inputs(bits, group):
    """A sliced hidden state (``logits_to_keep=1`` on a batch) is not contiguous; the kernels must take it."""
    packed = quantize(torch.randn(32, 64), bits, group, True)
    layer = QuantizedLinear(packed, None, "kernel")
    hidden = torch.randn(3, 5, 64)
    last = hidden[:, -1:, :]
    assert not last.is_contiguous()
    assert torch.equal(layer(last), layer(last.contiguous()))


@pytest.mark.parametrize("zero", ["none", "int", "float"])
def test_int4_dense_path_equals_the_packed_weight(zero):
    """``dense_above`` long inputs use the int4 kernel weight dequantized directly: the same weight."""
    packed = quantize(torch.randn(48, 128), 4, 32, zero == "none", float_zero=zero == "float")
    layer = QuantizedLinear(packed, None, "kernel", dense_above=4)
    reference = packed.dequantize()
    if zero == "int":  # the kernel's zero, (8 - zp) * scale, is a bf16 number: as the kernel computes it
        offset = (8 - packed.zero_points()) * packed.scales.float()
        slack = (offset.abs() * 2**-8).repeat_interleave(32, dim=1)
        assert torch.all((layer.dense_weight() - reference).abs() <= slack)
    else:
        assert torch.equal(layer.dense_weight(), reference)
    long = torch.randn(8, 128)
    assert torch.allclose(layer(long), long @ layer.dense_weight().t(), atol=1e-5)


def test_a_native_layer_reads_the_buffers_it_holds_now():
    torch.manual_seed(0)
    weight, x = torch.randn(32, 64), torch.randn(3, 64)
    layer = QuantizedLinear(quantize(weight, 8, 32, False), None, "native")
    before = layer(x)
    assert layer.packed_weight() is layer.packed_weight()  # kept between calls
    layer.kernel_scales = layer.kernel_scales * 2  # a new tensor (as a technique or .to() may give it)
    assert layer.packed_weight().scales is layer.kernel_scales
    assert not torch.allclose(layer(x), before)
