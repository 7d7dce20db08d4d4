"""Plain-torch references of every operator: the simplest correct formula, float32 inside.

Every other implementation (:mod:`.cpu`, :mod:`.triton_ops`) is tested against these.
"""

from __future__ import annotations

import math

import torch

from effinfer.kernels.packed import PackedWeight, unpack_codes


def dequantize(weight: PackedWeight) -> torch.Tensor:
    """The float32 ``out × in`` weight: ``code * scale + bias`` per group."""
    codes = unpack_codes(weight.packed, weight.bits, weight.in_features).float()
    grouped = codes.view(weight.out_features, -1, weight.group_size)
    return (grouped * weight.scales.unsqueeze(-1) + weight.bias.unsqueeze(-1)).view(weight.out_features, -1)


def dequant_matmul(x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    """``x @ dequantize(weight).T`` (W8A16 / W4A16 linear without bias), in ``x``'s dtype."""
    return (x.float() @ dequantize(weight).t()).to(x.dtype)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """One query token per sequence over a static KV cache.

    ``q``: ``[B, Hq, D]``; ``k_cache``/``v_cache``: ``[B, Hkv, T, D]`` with ``Hq % Hkv == 0`` (GQA);
    ``lengths``: ``[B]`` valid cache entries per sequence (≥ 1). Returns ``[B, Hq, D]``.
    """
    batch, heads, dim = q.shape
    groups = heads // k_cache.shape[1]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    out = torch.empty_like(q)
    for b in range(batch):
        n = int(lengths[b])
        k = k_cache[b, :, :n].float().repeat_interleave(groups, 0)            # Hq × n × D
        v = v_cache[b, :, :n].float().repeat_interleave(groups, 0)
        weights = torch.softmax((k @ q[b].float().unsqueeze(-1)).squeeze(-1) * scale, dim=-1)
        out[b] = (weights.unsqueeze(1) @ v).squeeze(1).to(q.dtype)
    return out


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """``[Hkv, length, D]`` of one sequence from a paged cache ``[blocks, Hkv, block_size, D]``."""
    block_size = cache.shape[2]
    pages = block_table[: -(-length // block_size)].long()
    return cache[pages].permute(1, 0, 2, 3).reshape(cache.shape[1], -1, cache.shape[3])[:, :length]


def paged_decode_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
                           lengths: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """:func:`decode_attention` over a paged cache: ``k_pages``/``v_pages`` ``[blocks, Hkv, block_size, D]``,
    ``block_table`` ``[B, max_blocks]`` (int32 page numbers)."""
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        n = int(lengths[b])
        k = gather_pages(k_pages, block_table[b], n).unsqueeze(0)
        v = gather_pages(v_pages, block_table[b], n).unsqueeze(0)
        out[b] = decode_attention(q[b:b + 1], k, v, torch.tensor([n]), scale)[0]
    return out


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float = 1e-6,
                offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual``; ``(rmsnorm(h) * (weight + offset), h)``. ``offset=1`` is Gemma's norm."""
    hidden = x if residual is None else x + residual
    h = hidden.float()
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * (weight.float() + offset)).to(x.dtype), hidden


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's rotary embedding ``x * cos + rotate_half(x) * sin`` (``cos``/``sin`` broadcast over heads)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos.float() + rotated.float() * sin.float()).to(x.dtype)


def rotary_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate ``q``/``k`` (``[B, H, L, D]``) by ``cos``/``sin`` (``[B, L, D]``), write rotated ``k`` and ``v``
    into ``k_cache``/``v_cache`` (``[B, Hkv, T, D]``) at ``positions`` (``[L]``); returns the rotated ``q``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    k_cache[:, :, positions.long()] = rotate(k, cos, sin).to(k_cache.dtype)
    v_cache[:, :, positions.long()] = v.to(v_cache.dtype)
    return rotate(q, cos, sin)
