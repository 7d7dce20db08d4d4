"""Asymmetric min-max quantization along one axis and bit packing, for KV caches.

``quantize(x, bits, dim)`` maps each slice along ``dim`` (a token's channels, or a channel's
tokens) to ``0 … 2^bits - 1`` with a float32 scale and minimum per slice; the error of every
element is at most half a step (``scale / 2``). ``pack``/``unpack`` store 2- and 4-bit codes
4 and 2 to a byte along the last axis (8-bit codes are bytes already), so the cache really holds
``bits / 8`` bytes per element plus its scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Quantized:
    """Packed codes (``uint8``, last axis ``D * bits / 8``) and the float32 ``scale`` and ``low`` of each slice."""

    codes: torch.Tensor
    scale: torch.Tensor
    low: torch.Tensor
    bits: int

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return (unpack(self.codes, self.bits).to(torch.float32) * self.scale + self.low).to(dtype)

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in (self.codes, self.scale, self.low))


def quantize(x: torch.Tensor, bits: int, dim: int) -> Quantized:
    """Round ``x`` to ``bits`` bits with one scale and minimum per slice along ``dim``."""
    x = x.float()
    low = x.amin(dim=dim, keepdim=True)
    high = x.amax(dim=dim, keepdim=True)
    levels = (1 << bits) - 1
    scale = ((high - low) / levels).clamp_min(1e-8)
    codes = ((x - low) / scale).round_().clamp_(0, levels).to(torch.uint8)
    return Quantized(pack(codes, bits), scale, low, bits)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``uint8`` codes below ``2^bits`` → ``8 / bits`` codes per byte along the last axis."""
    if bits == 8:
        return codes
    per_byte = 8 // bits
    if codes.shape[-1] % per_byte:
        raise ValueError(f"the last axis ({codes.shape[-1]}) must be a multiple of {per_byte} to pack {bits}-bit codes")
    grouped = codes.view(*codes.shape[:-1], -1, per_byte)
    out = grouped[..., 0].clone()
    for i in range(1, per_byte):
        out |= grouped[..., i] << (bits * i)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`."""
    if bits == 8:
        return packed
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per_byte)]
    return torch.stack(parts, dim=-1).view(*packed.shape[:-1], packed.shape[-1] * per_byte)


def cat(parts: list[Quantized], dim: int) -> Quantized:
    return Quantized(torch.cat([p.codes for p in parts], dim), torch.cat([p.scale for p in parts], dim),
                     torch.cat([p.low for p in parts], dim), parts[0].bits)
