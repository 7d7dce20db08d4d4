"""The kernels' view of a group-wise quantized weight, in the project's packed layout.

The layout is the one of :mod:`effinfer.plugins.model.quantization.packing`: unsigned
``bits``-bit codes packed row-wise, little end first (``8 // bits`` codes per byte for 2/4/8
bits; 3-bit codes eight to three bytes), ``out × groups`` scales and zero points. The kernels
fold the three zero-point kinds (symmetric, uint8 zero points, bf16 float offsets) into one
float32 *bias* per group once, so every implementation computes ``w = code * scale + bias``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: bit-widths the Triton kernels read directly (codes never straddle a byte)
BYTE_ALIGNED_BITS = (2, 4, 8)


@dataclass
class PackedWeight:
    """Packed codes plus per-group float32 ``scales`` and ``bias`` (``out × groups``)."""

    packed: torch.Tensor   # uint8, out × ceil(in * bits / 8)
    scales: torch.Tensor   # float32, out × groups
    bias: torch.Tensor     # float32, out × groups
    bits: int
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes a matmul reads: codes plus the two float32 per-group tensors."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.bias))

    @classmethod
    def from_parts(cls, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                   group_size: int, in_features: int) -> PackedWeight:
        """From the quantization family's stored parts: ``zeros`` is ``None`` (symmetric: zero ``2**(bits-1)``),
        uint8 zero points in code units, or bfloat16 offsets (``w = (code - 2**(bits-1)) * scale + offset``)."""
        if in_features % group_size:
            raise ValueError(f"group_size={group_size} does not divide in_features={in_features}")
        scales = scales.float()
        middle = float(2 ** (bits - 1))
        if zeros is None:
            bias = -middle * scales
        elif zeros.is_floating_point():
            bias = zeros.float() - middle * scales
        else:
            bias = -zeros.float() * scales
        return cls(packed.contiguous(), scales.contiguous(), bias.contiguous(), bits, group_size, in_features)

    @classmethod
    def from_quantized(cls, tensor) -> PackedWeight:
        """From a ``QuantizedTensor`` (duck-typed: ``packed``, ``scales``, ``zeros``, ``bits``, ``group_size``,
        ``in_features``)."""
        return cls.from_parts(tensor.packed, tensor.scales, tensor.zeros, tensor.bits, tensor.group_size,
                              tensor.in_features)

    def to(self, device: torch.device | str) -> PackedWeight:
        return PackedWeight(self.packed.to(device), self.scales.to(device), self.bias.to(device), self.bits,
                            self.group_size, self.in_features)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """``rows × n`` uint8 codes of a packed ``rows × ceil(n * bits / 8)`` tensor."""
    rows = packed.shape[0]
    if bits == 8:
        return packed[:, :n]
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(rows, -1)[:, :n]
    # 3, 5, 6, 7 bits: eight codes in one little-endian word of `bits` bytes
    width = -(-packed.shape[1] // bits) * bits
    octets = torch.nn.functional.pad(packed, (0, width - packed.shape[1])).view(rows, -1, bits).long()
    words = (octets << (8 * torch.arange(bits, device=packed.device))).sum(-1, keepdim=True)
    codes = (words >> (bits * torch.arange(8, device=packed.device))) & (2**bits - 1)
    return codes.to(torch.uint8).reshape(rows, -1)[:, :n]
