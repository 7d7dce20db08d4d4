"""effinfer.kernels — the one home of operators, below core.

Each operator has a plain-torch reference (:mod:`.reference`), a CPU implementation
(:mod:`.cpu`) and a Triton implementation (:mod:`.triton_ops`), behind one dispatcher
(:func:`.dispatch.backend_for`: Triton on CUDA, the CPU one elsewhere;
``EFFINFER_KERNELS=reference|cpu|triton`` or ``backend=`` forces one). PyTorch's own packed
CPU int8/int4 kernels, used by the quantization family, live in :mod:`.packed_cpu`.
See ``docs/guides/kernels.md``.
"""

from __future__ import annotations

import sys

if __name__ == "kernels":  # pragma: no cover - only when the checkout's root is on sys.path
    # `python -c` / `python -m` run from a checkout put its root first on sys.path, where this folder
    # shadows the PyPI package `kernels` that transformers (≥ 5.25) imports; hand that one over.
    import importlib
    import os

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path, _mine = list(sys.path), sys.modules.pop("kernels")
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    try:
        sys.modules["kernels"] = importlib.import_module("kernels")
    except ImportError:  # no such package installed: nothing is shadowed, stay what we are
        sys.modules["kernels"] = _mine
    finally:
        sys.path[:] = _path

from collections.abc import Callable
from dataclasses import dataclass

import torch

from effinfer.kernels import cpu, native, reference
from effinfer.kernels.dispatch import BACKENDS, backend_for, triton_kernels, triton_problem
from effinfer.kernels.packed import PackedWeight

__all__ = ["BACKENDS", "OPERATORS", "PackedWeight", "add_rmsnorm", "backend_for", "decode_attention",
           "dequant_matmul", "greedy_tokens", "implementation", "paged_decode_attention", "rotary_kv_write",
           "triton_problem"]


@dataclass(frozen=True)
class Operator:
    name: str
    summary: str


OPERATORS = {
    "dequant_matmul": Operator("dequant_matmul", "W8A16/W4A16 dequantize-and-multiply (GEMV decode, GEMM prefill)"),
    "decode_attention": Operator("decode_attention", "split-K flash-decoding over a static [B, H, T, D] KV cache"),
    "paged_decode_attention": Operator("paged_decode_attention", "split-K flash-decoding over a paged KV cache"),
    "add_rmsnorm": Operator("add_rmsnorm", "fused residual add + RMSNorm"),
    "rotary_kv_write": Operator("rotary_kv_write", "fused rotary embedding of q/k + KV-cache write"),
}


def implementation(name: str, backend: str) -> Callable:
    """The function implementing operator ``name`` on ``backend`` (``reference``, ``cpu`` or ``triton``)."""
    if name not in OPERATORS:
        raise ValueError(f"unknown operator {name!r}; known: {sorted(OPERATORS)}")
    if backend == "triton":
        return getattr(triton_kernels(), name)
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; use one of {BACKENDS}")
    return getattr(reference if backend == "reference" else cpu, name)


def dequant_matmul(x: torch.Tensor, weight: PackedWeight, *, backend: str | None = None) -> torch.Tensor:
    """``x @ W.T`` for a packed group-wise quantized ``W`` (see :class:`PackedWeight`)."""
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"x has {x.shape[-1]} features but the weight expects {weight.in_features}")
    return implementation("dequant_matmul", backend_for(x.device, backend))(x, weight)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     scale: float | None = None, *, backend: str | None = None) -> torch.Tensor:
    """Attention of one new token per sequence (``q`` ``[B, Hq, D]``) over ``lengths`` entries of a static
    ``[B, Hkv, T, D]`` cache (GQA when ``Hq > Hkv``); ``scale`` defaults to ``1/sqrt(D)``."""
    _check_lengths(lengths, k_cache.shape[2])
    return implementation("decode_attention", backend_for(q.device, backend))(q, k_cache, v_cache, lengths, scale)


def paged_decode_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
                           lengths: torch.Tensor, scale: float | None = None, *,
                           backend: str | None = None) -> torch.Tensor:
    """:func:`decode_attention` over a paged cache ``[blocks, Hkv, block_size, D]`` and a ``[B, max_blocks]``
    block table."""
    _check_lengths(lengths, block_table.shape[1] * k_pages.shape[2])
    return implementation("paged_decode_attention", backend_for(q.device, backend))(
        q, k_pages, v_pages, block_table, lengths, scale)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float = 1e-6,
                offset: float = 0.0, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual`` (``x`` alone when ``residual`` is None); returns ``(rmsnorm(h) * (weight + offset), h)``."""
    return implementation("add_rmsnorm", backend_for(x.device, backend))(x, residual, weight, eps, offset)


def rotary_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor, *,
                    backend: str | None = None) -> torch.Tensor:
    """Rotary embedding of ``q``/``k`` ``[B, H, L, D]`` (``cos``/``sin`` ``[B, L, D]``, HF convention); the rotated
    ``k`` and ``v`` go into the caches at ``positions``; returns the rotated ``q``."""
    if int(positions.max()) >= k_cache.shape[2]:
        raise ValueError(f"position {int(positions.max())} is past the cache's {k_cache.shape[2]} slots")
    return implementation("rotary_kv_write", backend_for(q.device, backend))(
        q, k, v, cos, sin, k_cache, v_cache, positions)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)``: the native vector scan for float32 CPU logits (torch's argmax spends ~1 % of a
    decode step on a 49k vocabulary here), torch's argmax elsewhere; the same index either way."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.shape[-1] and native.problem() is None:
        return native.argmax(logits)
    return logits.argmax(dim=-1)


def _check_lengths(lengths: torch.Tensor, capacity: int) -> None:
    if int(lengths.min()) < 1 or int(lengths.max()) > capacity:
        raise ValueError(f"lengths must lie in 1..{capacity} (the cache's capacity); got "
                         f"{int(lengths.min())}..{int(lengths.max())}")
