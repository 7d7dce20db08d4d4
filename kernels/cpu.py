"""CPU implementations: bounded-memory, BLAS-backed versions of the operators.

- :func:`dequant_matmul` runs the native packed matmul (:mod:`.native`) for up to 8 float32 tokens
  (decode) and the native blocked GEMM above that (prefill), which dequantizes the weight panel by panel
  inside the GEMM; otherwise (no compiler, other bit-widths, gradients) it dequantizes in torch: the whole
  weight into one BLAS GEMM from ``DENSE_ROWS`` tokens on, blocks of output rows below;
- :func:`decode_attention` is flash-decoding on CPU: the cache is cut into splits of
  ``SPLIT`` positions, each split gives a partial output and its log-sum-exp, and the partials
  merge exactly (Dao et al., *Flash-Decoding for long-context inference*, 2023); each split is a
  batched GEMM, so both cores work at batch 1;
- :func:`add_rmsnorm` and :func:`rotary_kv_write` are the references' math in place where possible.
"""

from __future__ import annotations

import math
import torch

from effinfer.kernels import native, reference
from effinfer.kernels.packed import PackedWeight, unpack_codes

#: output rows dequantized at once by the blocked GEMV (bounds the temporary to ~4 MB at K=1024)
ROW_BLOCK = 1024
#: without the native kernels: at or above this many tokens the whole weight is dequantized into one GEMM
DENSE_ROWS = 16
#: cache positions per flash-decoding split
SPLIT = 512


def _dequantize_rows(weight: PackedWeight, rows: slice, dtype: torch.dtype) -> torch.Tensor:
    codes = unpack_codes(weight.packed[rows], weight.bits, weight.in_features)
    n = codes.shape[0]
    grouped = codes.view(n, -1, weight.group_size).to(torch.float32)
    dense = grouped * weight.scales[rows].unsqueeze(-1) + weight.bias[rows].unsqueeze(-1)
    return dense.view(n, weight.in_features).to(dtype)


def _native_takes(x: torch.Tensor, weight: PackedWeight) -> bool:
    """The native kernels have no backward: they run only where no gradient flows through ``x``."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() > 0
            and not (torch.is_grad_enabled() and x.requires_grad)
            and native.problem() is None and native.packed_problem(weight) is None)


def dequant_matmul(x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
    if _native_takes(x, weight):
        if flat.shape[0] <= native.MAX_TOKENS:
            return native.dequant_matmul(x, weight)
        return native.gemm(x, weight)
    if flat.shape[0] >= DENSE_ROWS:
        out = flat.to(dtype) @ _dequantize_rows(weight, slice(None), dtype).t()
    else:
        out = torch.cat([flat.to(dtype) @ _dequantize_rows(weight, slice(start, start + ROW_BLOCK), dtype).t()
                         for start in range(0, weight.out_features, ROW_BLOCK)], dim=-1)
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.out_features)


def _split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Flash-decoding over ``k``/``v`` ``[Hkv, n, D]`` for ``q`` ``[Hq, D]`` (float32), exact merge of splits."""
    heads_kv, n, dim = k.shape
    groups = q.shape[0] // heads_kv
    qg = q.view(heads_kv, groups, dim)
    outs, lses = [], []
    for start in range(0, n, SPLIT):
        scores = torch.matmul(qg, k[:, start:start + SPLIT].transpose(1, 2)) * scale       # Hkv × G × s
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        outs.append(torch.matmul(torch.exp(scores - lse), v[:, start:start + SPLIT]))
        lses.append(lse)
    if len(outs) == 1:
        return outs[0].reshape(-1, dim)
    lse = torch.stack(lses)                                                                # S × Hkv × G × 1
    weights = torch.softmax(lse, dim=0)
    return (torch.stack(outs) * weights).sum(0).reshape(-1, dim)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        n = int(lengths[b])
        out[b] = _split_attention(q[b].float(), k_cache[b, :, :n].float(), v_cache[b, :, :n].float(), scale).to(q.dtype)
    return out


def paged_decode_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
                           lengths: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        n = int(lengths[b])
        k = reference.gather_pages(k_pages, block_table[b], n).float()
        v = reference.gather_pages(v_pages, block_table[b], n).float()
        out[b] = _split_attention(q[b].float(), k, v, scale).to(q.dtype)
    return out


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float = 1e-6,
                offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = x if residual is None else torch.add(x, residual)
    h = hidden.float()
    rstd = torch.rsqrt(h.square().mean(-1, keepdim=True).add_(eps))
    scale = weight.float() + offset if offset else weight.float()
    return h.mul_(rstd).mul_(scale).to(x.dtype) if h is not hidden else (h * rstd * scale).to(x.dtype), hidden


def rotary_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    index = positions.long()
    k_cache.index_copy_(2, index, reference.rotate(k, cos, sin).to(k_cache.dtype))
    v_cache.index_copy_(2, index, v.to(v_cache.dtype))
    return reference.rotate(q, cos, sin)
