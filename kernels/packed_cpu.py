"""PyTorch's own packed CPU kernels for quantized linear layers (moved here from
``effinfer.plugins.model.quantization.kernels``, which re-exports them).

- **W8A16** — ``torch.ops.aten._weight_int8pack_mm(x, w_int8[N, K], scales[N])``:
  int8 weights, one scale per output channel (symmetric);
- **W4A16** — ``torch.ops.aten._convert_weight_to_int4pack_for_cpu(w_int32[N, K], inner_k_tiles)``
  then ``torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros[K/g, N, 2])``,
  which computes ``w = (code - 8) * scale + zero`` per group of 32/64/128/256 input columns;
- **W8A8** — ``torch._int_mm(x_int8[M, K], w_int8[K, N]) -> int32`` after per-token dynamic
  (or static per-tensor) quantization of the activations; on CPUs where that op is slow (no
  oneDNN int8 kernel: ~40× slower than float32 BLAS on an AMD EPYC) the same int32 product comes
  from float32 BLAS on K-chunks small enough to be exact (:func:`int8_gemm_path` picks, once).

This is the gpt-fast recipe. On this machine kind the weight-only kernels are fast only
with bfloat16 activations, so the model stays float32 and the activations are cast to
bfloat16 just around the kernel call (see DATA-SOURCES.md). Signatures checked on
torch 2.13 (``torch.ops.aten.<op>.default._schema``).

The int4 kernel layout is blocked and ISA dependent; it is never written to disk.
:func:`int4_kernel_codes` recovers the plain codes from it through a permutation probed
from the conversion op itself, so a kernel-format model can be saved portably and a
long prompt can be run through a dequantized float GEMM.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Protocol

import torch


class QuantizedTensor(Protocol):
    """What the kernels read of a packed weight (effinfer.plugins.model.quantization.packing.QuantizedTensor)."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int: ...

    @property
    def symmetric(self) -> bool: ...

    def codes(self) -> torch.Tensor: ...

    def zero_points(self) -> torch.Tensor: ...

INT4_KERNEL_GROUPS = (32, 64, 128, 256)
#: ``inner_k_tiles`` argument of the int4 conversion (its CPU version ignores the value)
INNER_K_TILES = 2
KERNEL_DTYPE = torch.bfloat16


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


def int8_kernel_problem(weight: QuantizedTensor) -> str | None:
    """Why ``weight`` cannot run through the int8 kernel, or ``None`` when it can."""
    if not _has_op("_weight_int8pack_mm"):
        return f"torch {torch.__version__} has no aten._weight_int8pack_mm"
    if weight.bits != 8:
        return f"the int8 kernel needs 8-bit weights (got {weight.bits}-bit)"
    if weight.group_size != weight.in_features:
        return "the int8 kernel has one scale per output channel; use group_size=None"
    if not weight.symmetric:
        return "the int8 kernel has no zero points; use symmetric=True"
    if weight.packed.device.type != "cpu":
        return "the packed kernels here are CPU kernels"
    return None


def int4_kernel_problem(weight: QuantizedTensor) -> str | None:
    """Why ``weight`` cannot run through the int4 kernel, or ``None`` when it can."""
    if not (_has_op("_weight_int4pack_mm_for_cpu") and _has_op("_convert_weight_to_int4pack_for_cpu")):
        return f"torch {torch.__version__} has no CPU int4 packed kernel"
    if weight.bits != 4:
        return f"the int4 kernel needs 4-bit weights (got {weight.bits}-bit)"
    if weight.group_size not in INT4_KERNEL_GROUPS:
        return f"the int4 kernel needs group_size in {INT4_KERNEL_GROUPS} (got {weight.group_size})"
    if weight.out_features % 16:
        return f"the int4 kernel needs out_features divisible by 16 (got {weight.out_features})"
    if weight.packed.device.type != "cpu":
        return "the packed kernels here are CPU kernels"
    return None


def kernel_for(weight: QuantizedTensor) -> tuple[str | None, str]:
    """``("int8"|"int4", "")`` when a packed kernel runs ``weight``, else ``(None, reason)``."""
    problems = {"int8": int8_kernel_problem(weight), "int4": int4_kernel_problem(weight)}
    for name, problem in problems.items():
        if problem is None:
            return name, ""
    return None, problems["int8" if weight.bits == 8 else "int4"] or ""


# --------------------------------------------------------------------------- int8 weight-only


def int8_kernel_weight(weight: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_int8[N, K], scales_bf16[N])`` for :func:`int8_weight_only_mm`."""
    codes = weight.codes().to(torch.int16) - 128
    return codes.to(torch.int8).contiguous(), weight.scales[:, 0].to(KERNEL_DTYPE).contiguous()


def int8_weight_only_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ dequant(qweight).T`` through the packed int8 kernel, bfloat16 around the call."""
    shape = x.shape
    out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(KERNEL_DTYPE).contiguous(), qweight, scales)
    return out.to(x.dtype).reshape(*shape[:-1], qweight.shape[0])


# --------------------------------------------------------------------------- int4 weight-only


def int4_kernel_weight(weight: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed_uint8, scales_and_zeros_bf16[K/g, N, 2])`` for :func:`int4_weight_only_mm`.

    The kernel computes ``(code - 8) * scale + zero``; ours is ``(code - zp) * scale``,
    so its zero is ``(8 - zp) * scale`` (0 for a symmetric grid; exactly our bf16 offset
    for a float-zero grid).
    """
    codes = weight.codes().to(torch.int32).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INNER_K_TILES)
    scales = weight.scales.float()
    offset = (8.0 - weight.zero_points()) * scales
    pairs = torch.stack([scales, offset], dim=-1).transpose(0, 1)
    return packed, pairs.to(KERNEL_DTYPE).contiguous()


def int4_weight_only_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int,
                        scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """``x @ dequant(packed).T`` through the packed int4 kernel, bfloat16 around the call.

    The kernel needs a contiguous ``x`` (a sliced hidden state, e.g. ``logits_to_keep=1``, is not).
    """
    shape = x.shape
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(KERNEL_DTYPE).contiguous(), packed,
                                                     group_size, scales_and_zeros)
    return out.to(x.dtype).reshape(*shape[:-1], scales_and_zeros.shape[1])


def int4_kernel_dequantize(packed: torch.Tensor, scales_and_zeros: torch.Tensor, in_features: int,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight an int4 kernel weight stands for, ``(code - 8) * scale + zero`` as the kernel computes."""
    out_features, groups = scales_and_zeros.shape[1], scales_and_zeros.shape[0]
    codes = int4_kernel_codes(packed, out_features, in_features).view(out_features, groups, -1)
    pairs = scales_and_zeros.float().transpose(0, 1)                                  # N × G × 2
    weight = (codes.float() - 8.0) * pairs[..., :1] + pairs[..., 1:]
    return weight.view(out_features, in_features).to(dtype)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The 4-bit values of a uint8 tensor, low nibble first, flattened."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten()


@functools.lru_cache(maxsize=32)
def int4_layout(out_features: int, in_features: int) -> torch.Tensor:
    """For each nibble of the kernel layout, the flat index (``n * K + k``) of its source code.

    Probed from the conversion op: converting base-16 digits of every position's index
    reveals where each position lands, whatever the ISA-specific blocking is.
    """
    size = out_features * in_features
    index = torch.arange(size, dtype=torch.int64).view(out_features, in_features)
    source = torch.zeros(2 * (size // 2 + size % 2), dtype=torch.int64)
    digit = 0
    while 16**digit < size:
        probe = ((index >> (4 * digit)) & 0xF).to(torch.int32)
        converted = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, INNER_K_TILES)
        source += _nibbles(converted).long() << (4 * digit)
        digit += 1
    if not torch.equal(source.sort().values, torch.arange(size)):
        raise RuntimeError("the int4 kernel layout is not a permutation of the codes; this torch "
                           "version packs differently — use execution='dequant'")
    return source.to(torch.int32)


def int4_kernel_codes(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Plain ``out × in`` uint8 codes from the kernel layout."""
    source = int4_layout(out_features, in_features)
    codes = torch.empty(out_features * in_features, dtype=torch.uint8)
    codes[source.long()] = _nibbles(packed)
    return codes.view(out_features, in_features)


# --------------------------------------------------------------------------- int8 × int8 GEMM


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of each row of ``x`` (``M × K``): ``(x_int8, scales[M, 1])``."""
    scales = (x.abs().amax(-1, keepdim=True).float() / 127.0).clamp(min=1e-8)
    return torch.round(x.float() / scales).clamp(-127, 127).to(torch.int8), scales


#: int8 × int8 products are below 2**14, so a sum of up to 1024 of them stays below 2**24, where
#: float32 represents every integer exactly whatever the summation order: a float32 GEMM over such
#: a K-chunk *is* the int32 result
EXACT_FLOAT_K = 1024
INT8_GEMM_PATHS = {"int_mm": "torch._int_mm",
                   "float": "int32-exact float32 GEMM in K-chunks of 1024 (faster than torch._int_mm here)"}


def int8_gemm_float(x_int8: torch.Tensor, w_int8_t: torch.Tensor) -> torch.Tensor:
    """``x_int8 @ w_int8_t`` in int32, computed exactly by float32 BLAS on K-chunks of ≤ 1024."""
    out = None
    for start in range(0, x_int8.shape[1], EXACT_FLOAT_K):
        chunk = slice(start, start + EXACT_FLOAT_K)
        part = (x_int8[:, chunk].float() @ w_int8_t[chunk].float()).to(torch.int32)
        out = part if out is None else out + part
    return out


@functools.cache
def int8_gemm_path() -> str:
    """``"int_mm"`` or ``"float"``: the faster exact int8 GEMM on this CPU, probed once per process.

    ``torch._int_mm`` is fast where oneDNN has int8 kernels for the CPU (Intel AMX) and ~40×
    slower than float32 BLAS elsewhere (measured on an AMD EPYC Zen 5, 2 threads); both give the
    same int32 result. ``EFFINFER_INT8_GEMM=int_mm|float`` forces one.
    """
    forced = os.environ.get("EFFINFER_INT8_GEMM")
    if forced in INT8_GEMM_PATHS:
        return forced
    generator = torch.Generator().manual_seed(0)
    # a prefill-sized product with the weight transposed, as the layers call it (decode-sized ones
    # cost about the same either way)
    x = torch.randint(-127, 128, (128, 512), dtype=torch.int8, generator=generator)
    w = torch.randint(-127, 128, (1024, 512), dtype=torch.int8, generator=generator).t()
    seconds = {name: _best_of(lambda fn=fn: fn(x, w)) for name, fn in
               (("int_mm", torch._int_mm), ("float", int8_gemm_float))}
    return min(seconds, key=seconds.get)


def _best_of(call: Callable[[], object], repeats: int = 3) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times)


def int8_gemm(x_int8: torch.Tensor, w_int8_t: torch.Tensor) -> torch.Tensor:
    """``x_int8 @ w_int8_t`` accumulated in int32: ``torch._int_mm`` (a real integer GEMM) on CUDA and
    on CPUs where it is the faster one, else its exact float32 emulation (:func:`int8_gemm_path`)."""
    if x_int8.is_cuda or int8_gemm_path() == "int_mm":
        return torch._int_mm(x_int8, w_int8_t)
    return int8_gemm_float(x_int8, w_int8_t)


def w8a8_mm(x: torch.Tensor, w_int8_t: torch.Tensor, w_scales: torch.Tensor,
            act_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T`` with int8 weights (``w_int8_t`` is ``K × N``, per-channel ``w_scales[N]``) and int8
    activations: per-token dynamic scales, or the static per-tensor ``act_scale`` when given."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    if act_scale is None:
        x_int8, x_scales = quantize_per_token(flat)
    else:
        x_scales = act_scale.float().reshape(1, 1)
        x_int8 = torch.round(flat.float() / x_scales).clamp(-127, 127).to(torch.int8)
    out = int8_gemm(x_int8, w_int8_t).float() * x_scales * w_scales.float()
    return out.to(x.dtype).reshape(*shape[:-1], w_int8_t.shape[1])
