"""Execution paths for quantized linear layers on CPU: PyTorch's own packed kernels.

The kernels themselves live in :mod:`effinfer.kernels.packed_cpu` (the one home of operators,
see ``docs/guides/kernels.md``); this module re-exports them for the quantization family and
adds the two conversions back to :class:`~effinfer.plugins.model.quantization.packing.QuantizedTensor`,
which the kernels layer cannot import.
"""

from __future__ import annotations

import torch

from effinfer.kernels.packed_cpu import (  # noqa: F401  (re-exported)
    EXACT_FLOAT_K,
    INNER_K_TILES,
    INT4_KERNEL_GROUPS,
    INT8_GEMM_PATHS,
    KERNEL_DTYPE,
    int4_kernel_codes,
    int4_kernel_dequantize,
    int4_kernel_problem,
    int4_kernel_weight,
    int4_layout,
    int4_weight_only_mm,
    int8_gemm,
    int8_gemm_float,
    int8_gemm_path,
    int8_kernel_problem,
    int8_kernel_weight,
    int8_weight_only_mm,
    kernel_for,
    quantize_per_token,
    w8a8_mm,
)
from effinfer.plugins.model.quantization.packing import QuantizedTensor


def int8_kernel_tensor(qweight: torch.Tensor, scales: torch.Tensor) -> QuantizedTensor:
    """The plain packed form of an int8 kernel weight (exact inverse of :func:`int8_kernel_weight`)."""
    codes = (qweight.to(torch.int16) + 128).to(torch.uint8)
    return QuantizedTensor(codes.clone(), scales.half().unsqueeze(1), None, 8, qweight.shape[1], qweight.shape[1])


def int4_kernel_tensor(packed: torch.Tensor, scales_and_zeros: torch.Tensor, in_features: int,
                       zero: str) -> QuantizedTensor:
    """The plain packed form of an int4 kernel weight (exact inverse of :func:`int4_kernel_weight`).

    ``zero`` says what the source had: ``"none"`` (symmetric), ``"int"`` or ``"float"`` zero points.
    """
    codes = int4_kernel_codes(packed, scales_and_zeros.shape[1], in_features)
    pairs = scales_and_zeros.float().transpose(0, 1)
    scales = pairs[..., 0]
    zeros = None if zero == "none" else 8.0 - pairs[..., 1] / scales
    if zero == "int":
        zeros = torch.round(zeros)
    return QuantizedTensor.from_codes(codes, scales, zeros, 4, in_features // scales.shape[1], zero == "float")
