"""Integer grids for weight matrices and bit-packing into bytes.

Shared by every weight quantizer. A weight ``W`` (``out × in``) is split into groups of
``group_size`` consecutive input columns (one group per row when ``group_size`` is
``None``); each group gets a scale and a zero point. Dequantization is
``w = (code - zero) * scale`` with unsigned ``bits``-bit codes:

- symmetric grids use the fixed zero ``2**(bits-1)`` (nothing stored) and
  ``scale = absmax / (2**(bits-1) - 1)``;
- asymmetric grids store a ``uint8`` zero point per group and span ``[min, max]``
  (the range always includes 0, so zero weights stay exact), as GPTQ and AWQ do;
- asymmetric grids with a *float* zero (``float_zero=True``) span exactly ``[min, max]``
  and store a bfloat16 offset per group: ``w = (code - 2**(bits-1)) * scale + offset``.
  This is the format of PyTorch's int4 kernel (and of gpt-fast, and of GGUF's Q4_1,
  from which the default SmolLM2 model was dequantized).

Scales are stored as float16 values that bfloat16 also represents exactly (at most 8
significant bits, no fp16 subnormals). The CPU packed kernels take bfloat16 scales, so a
model moved between the reference layout and the kernel layout keeps bit-identical
parameters, and saving a kernel-format model loses nothing.

Codes are packed row-wise, little end first: 2- and 4-bit codes share a byte, 3-bit
(and other widths that do not divide 8) pack eight codes into ``bits`` bytes, so a 3-bit
weight really takes three eighths of a byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
#: the smallest stored scale: fp16's smallest normal number (keeps scales bf16-exact)
MIN_SCALE = 2.0**-14


@dataclass
class QuantizedTensor:
    """Packed codes plus per-group parameters; :meth:`dequantize` rebuilds the float weight."""

    packed: torch.Tensor          # uint8, out × ceil(in * bits / 8)
    scales: torch.Tensor          # float16, out × groups
    zeros: torch.Tensor | None    # out × groups: uint8 zero points, bf16 offsets (float zero), None (symmetric)
    bits: int
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def float_zero(self) -> bool:
        return self.zeros is not None and self.zeros.is_floating_point()

    def codes(self) -> torch.Tensor:
        """The unsigned codes, ``out × in`` uint8."""
        return unpack_codes(self.packed, self.bits, self.in_features)

    def zero_points(self) -> torch.Tensor:
        """Per-group zero points in code units, as float (``2**(bits-1)`` everywhere when symmetric)."""
        middle = float(2 ** (self.bits - 1))
        if self.zeros is None:
            return torch.full(self.scales.shape, middle, device=self.scales.device)
        if self.float_zero:
            return middle - self.zeros.float() / self.scales.float()
        return self.zeros.float()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = self.codes().float().view(self.out_features, -1, self.group_size)
        scales = self.scales.float().unsqueeze(-1)
        if self.float_zero:
            weight = (codes - 2 ** (self.bits - 1)) * scales + self.zeros.float().unsqueeze(-1)
        else:
            weight = (codes - self.zero_points().unsqueeze(-1)) * scales
        return weight.view(self.out_features, self.in_features).to(dtype)

    @property
    def nbytes(self) -> int:
        tensors = [self.packed, self.scales] + ([self.zeros] if self.zeros is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                   group_size: int, float_zero: bool = False) -> QuantizedTensor:
        """Pack ``out × in`` codes with ``scales`` and zero points in code units (``None`` = symmetric).

        With ``float_zero`` the zero points are stored as bfloat16 offsets (see the module docstring).
        """
        if zeros is not None:
            zeros = (offsets(scales, zeros, bits) if float_zero else zeros.round().to(torch.uint8))
        return cls(pack_codes(codes.to(torch.uint8), bits), scales.half(), zeros, bits, group_size, codes.shape[1])


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; use one of {SUPPORTED_BITS}")


#: group sizes suggested when one does not divide a layer
SUGGESTED_GROUPS = (16, 32, 64, 128, 256)


def group_size_problem(in_features: int, group_size: int | None, suggest: list[int] | None = None) -> str | None:
    """Why ``group_size`` cannot split a layer with ``in_features`` inputs (``None``: it can).
    ``suggest`` (default: the suggested sizes dividing ``in_features``) are the sizes offered instead."""
    group = in_features if group_size is None else group_size
    if group > 0 and in_features % group == 0:
        return None
    if suggest is None:
        suggest = [g for g in SUGGESTED_GROUPS if in_features % g == 0]
    return (f"group_size={group_size} does not divide the layer's {in_features} input features; "
            f"use one of {suggest} or None (one group per row)")


def check_group_size(in_features: int, group_size: int | None) -> int:
    """The effective group size (``in_features`` when ``None``); explains a size that does not divide."""
    problem = group_size_problem(in_features, group_size)
    if problem:
        raise ValueError(problem)
    return in_features if group_size is None else group_size


def stored_scale(scale: torch.Tensor) -> torch.Tensor:
    """The scale as stored, rounded *up* to a value both float16 and bfloat16 represent.

    Rounding down would clip a group's extreme weights by more than half a step.
    """
    scale = scale.float().clamp(min=MIN_SCALE, max=60000.0)
    rounded = scale.bfloat16()
    up = torch.nextafter(rounded, torch.full_like(rounded, float("inf")))
    return torch.where(rounded.float() < scale, up, rounded).float()


def offsets(scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """bfloat16 offsets ``(2**(bits-1) - zero) * scale`` of float zero points (code units)."""
    return ((2 ** (bits - 1) - zeros.float()) * scales.float()).bfloat16()


def grid_params(groups: torch.Tensor, bits: int, symmetric: bool, clip: torch.Tensor | float = 1.0,
                float_zero: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (in code units) of each group (the last dimension of ``groups``).

    ``clip`` (a factor in ``(0, 1]``, per group or global) shrinks the range first, as
    AWQ's clipping search does. Returns float tensors shaped like ``groups[..., 0]``; with
    ``float_zero`` the zero is fractional and exactly what the stored bf16 offset gives back.
    """
    if symmetric:
        half = 2 ** (bits - 1) - 1
        scale = stored_scale(groups.abs().amax(-1) * clip / half)
        return scale, torch.full_like(scale, float(2 ** (bits - 1)))
    levels = 2**bits - 1
    if float_zero:
        low, high = groups.amin(-1), groups.amax(-1)
        middle, spread = (high + low) / 2, (high - low) / 2 * clip
        low, high = middle - spread, middle + spread
        scale = stored_scale((high - low) / levels)
        offset = offsets(scale, -low / scale, bits).float()
        return scale, 2 ** (bits - 1) - offset / scale
    low = groups.amin(-1).clamp(max=0) * clip
    high = groups.amax(-1).clamp(min=0) * clip
    scale = stored_scale((high - low) / levels)
    return scale, torch.round(-low / scale).clamp(0, levels)


def quantize_codes(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round ``values`` onto the grid (``scale``/``zero`` broadcast against them); float codes."""
    return torch.clamp(torch.round(values / scale + zero), 0, 2**bits - 1)


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                  clip: torch.Tensor | float = 1.0, float_zero: bool = False) -> torch.Tensor:
    """``quantize(...).dequantize()`` without packing: the float weight the grid can represent."""
    out_features, in_features = weight.shape
    group = check_group_size(in_features, group_size)
    grouped = weight.float().reshape(out_features, in_features // group, group)
    scale, zero = grid_params(grouped, bits, symmetric, clip, float_zero)
    codes = quantize_codes(grouped, scale.unsqueeze(-1), zero.unsqueeze(-1), bits)
    return ((codes - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(out_features, in_features).to(weight.dtype)


def quantize(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
             clip: torch.Tensor | float = 1.0, float_zero: bool = False) -> QuantizedTensor:
    """Round-to-nearest quantization of a 2-D weight, packed."""
    check_bits(bits)
    out_features, in_features = weight.shape
    group = check_group_size(in_features, group_size)
    grouped = weight.detach().float().reshape(out_features, in_features // group, group)
    scale, zero = grid_params(grouped, bits, symmetric, clip, float_zero)
    codes = quantize_codes(grouped, scale.unsqueeze(-1), zero.unsqueeze(-1), bits)
    return QuantizedTensor.from_codes(codes.reshape(out_features, in_features), scale,
                                      None if symmetric else zero, bits, group, float_zero)


def packed_width(n: int, bits: int) -> int:
    """Bytes per row of ``n`` packed ``bits``-bit codes."""
    return -(-n * bits // 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes (uint8, ``rows × n``) into bytes, row-wise."""
    if not 1 <= bits <= 8:
        raise ValueError(f"cannot pack {bits}-bit codes; bits must be in 1..8")
    rows, n = codes.shape
    if bits == 8:
        return codes.to(torch.uint8).clone()
    if 8 % bits == 0:
        per_byte = 8 // bits
        padded = torch.nn.functional.pad(codes, (0, (-n) % per_byte)).view(rows, -1, per_byte)
        shifts = torch.arange(per_byte, dtype=torch.uint8, device=codes.device) * bits
        return (padded << shifts).sum(-1, dtype=torch.uint8)
    # eight codes make one word of `bits` bytes
    padded = torch.nn.functional.pad(codes, (0, (-n) % 8)).view(rows, -1, 8).long()
    words = (padded << (torch.arange(8, device=codes.device) * bits)).sum(-1, keepdim=True)
    octets = (words >> (torch.arange(bits, device=codes.device) * 8)) & 0xFF
    return octets.to(torch.uint8).reshape(rows, -1)[:, :packed_width(n, bits)].contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``rows × n`` uint8 codes."""
    rows = packed.shape[0]
    if bits == 8:
        return packed[:, :n]
    mask = 2**bits - 1
    if 8 % bits == 0:
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, dtype=torch.uint8, device=packed.device) * bits
        codes = (packed.unsqueeze(-1) >> shifts) & torch.tensor(mask, dtype=torch.uint8, device=packed.device)
        return codes.reshape(rows, -1)[:, :n]
    words_bytes = torch.nn.functional.pad(packed, (0, (-packed.shape[1]) % bits)).view(rows, -1, bits).long()
    words = (words_bytes << (torch.arange(bits, device=packed.device) * 8)).sum(-1, keepdim=True)
    codes = (words >> (torch.arange(8, device=packed.device) * bits)) & mask
    return codes.to(torch.uint8).reshape(rows, -1)[:, :n]
