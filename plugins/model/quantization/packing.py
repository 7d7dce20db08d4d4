"""Integer quantization of weight matrices and bit-packing into bytes.

Shared by the weight-only quantizers. A weight ``W`` (``out × in``) is split into
groups of ``group_size`` consecutive input columns (one group per row when
``group_size`` is ``None``); each group gets a scale (and a zero point when
asymmetric). Codes are unsigned ``bits``-bit integers packed little-end-first into
``uint8`` bytes, so 4-bit weights really take half a byte each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PACKABLE_BITS = (2, 4, 8)


@dataclass
class QuantizedTensor:
    """Packed codes plus per-group parameters; ``dequantize()`` rebuilds the float weight."""

    packed: torch.Tensor          # uint8, out × ceil(in * bits / 8)
    scales: torch.Tensor          # float16, out × groups
    zeros: torch.Tensor | None    # uint8, out × groups (asymmetric only)
    bits: int
    group_size: int
    in_features: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = unpack_codes(self.packed, self.bits, self.in_features).to(torch.float32)
        out_features = codes.shape[0]
        codes = codes.view(out_features, -1, self.group_size)
        zero = self.zeros.float() if self.zeros is not None else float(2 ** (self.bits - 1))
        zero = zero.unsqueeze(-1) if isinstance(zero, torch.Tensor) else zero
        weight = (codes - zero) * self.scales.float().unsqueeze(-1)
        return weight.view(out_features, self.in_features).to(dtype)

    @property
    def nbytes(self) -> int:
        tensors = [self.packed, self.scales] + ([self.zeros] if self.zeros is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


def check_group_size(in_features: int, group_size: int | None) -> int:
    group = in_features if group_size is None else group_size
    if in_features % group:
        divisors = [g for g in (16, 32, 64, 128, 256) if in_features % g == 0]
        raise ValueError(
            f"group_size={group_size} does not divide the layer's {in_features} input features; "
            f"use one of {divisors} or None (one group per row)"
        )
    return group


def quantize(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> QuantizedTensor:
    """Round-to-nearest quantization of a 2-D weight, packed."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits={bits} cannot be packed; use one of {PACKABLE_BITS}")
    out_features, in_features = weight.shape
    group = check_group_size(in_features, group_size)
    grouped = weight.detach().float().reshape(out_features, in_features // group, group)
    levels = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1) - 1
        scales = stored_scale(grouped.abs().amax(-1) / half)
        codes = torch.round(grouped / scales.unsqueeze(-1)).clamp(-half - 1, half) + 2 ** (bits - 1)
        zeros = None
    else:
        low = grouped.amin(-1).clamp(max=0)
        high = grouped.amax(-1).clamp(min=0)
        scales = stored_scale((high - low) / levels)
        zero_points = torch.round(-low / scales).clamp(0, levels)
        codes = (torch.round(grouped / scales.unsqueeze(-1)) + zero_points.unsqueeze(-1)).clamp(0, levels)
        zeros = zero_points.to(torch.uint8)
    packed = pack_codes(codes.reshape(out_features, in_features).to(torch.uint8), bits)
    return QuantizedTensor(packed, scales.half(), zeros, bits, group, in_features)


def stored_scale(scale: torch.Tensor) -> torch.Tensor:
    """The scale as stored (float16), rounded *up* so the grid still covers the group.

    Rounding down would clip the group's extreme weights by more than half a step.
    """
    scale = scale.clamp(min=1e-7)
    half = scale.half()
    half = torch.where(half.float() < scale, torch.nextafter(half, torch.full_like(half, float("inf"))), half)
    return half.float()


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes (uint8, ``rows × n``) into bytes, row-wise."""
    per_byte = 8 // bits
    rows, n = codes.shape
    padded = torch.nn.functional.pad(codes, (0, (-n) % per_byte)).view(rows, -1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
    return (padded << shifts).sum(-1, dtype=torch.uint8) if per_byte > 1 else padded.squeeze(-1).clone()


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``rows × n`` uint8 codes."""
    per_byte = 8 // bits
    if per_byte == 1:
        return packed[:, :n]
    shifts = torch.arange(per_byte, dtype=torch.uint8, device=packed.device) * bits
    mask = torch.tensor(2**bits - 1, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & mask
    return codes.reshape(packed.shape[0], -1)[:, :n]
