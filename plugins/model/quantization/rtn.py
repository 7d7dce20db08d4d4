"""Round-to-nearest (RTN) weight-only quantization.

The baseline every weight-only PTQ paper compares against: each group of weights is
scaled to the integer grid and rounded, with no calibration data. Weights are stored
packed (int8 per output channel, or int4 in groups) and dequantized on the fly in
each forward pass. See the RTN baselines in Frantar et al., "GPTQ", arXiv:2210.17323,
and Dettmers & Zettlemoyer, "The case for 4-bit precision", arXiv:2212.09720.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.stages import ModelStage
from effinfer.plugins.model.quantization.packing import QuantizedTensor, quantize


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is stored packed and dequantized per call."""

    def __init__(self, weight: QuantizedTensor, bias: torch.Tensor | None, out_features: int) -> None:
        super().__init__()
        self.bits, self.group_size = weight.bits, weight.group_size
        self.in_features, self.out_features = weight.in_features, out_features
        self.register_buffer("packed", weight.packed)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("zeros", weight.zeros)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None, symmetric: bool
                    ) -> QuantizedLinear:
        return cls(quantize(linear.weight, bits, group_size, symmetric), linear.bias, linear.out_features)

    def quantized_weight(self) -> QuantizedTensor:
        return QuantizedTensor(self.packed, self.scales, self.zeros, self.bits, self.group_size, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight().dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}"


def linear_layers(model: nn.Module, skip: list[str]) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` modules of ``model`` whose names contain none of ``skip``."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not any(s in name for s in skip)]


class RTN(Technique):
    name = "rtn"
    node = "model.compression.quantization.ptq.weight_only"
    paper = Paper(title="GPTQ: Accurate Post-Training Quantization for Generative Pre-trained "
                        "Transformers (RTN baseline)", year=2022, arxiv="2210.17323")
    summary = ("Round-to-nearest weight-only quantization: every weight group is scaled to an "
               "int8 or int4 grid and rounded, with no calibration. Weights are stored packed "
               "and dequantized on the fly.")
    lossless = False
    removes_features = frozenset({"dense_weights"})

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        bits: Literal[2, 4, 8] = Field(8, description="bits per weight")
        group_size: int | None = Field(
            None, ge=8, le=8192,
            description="input columns per scale; None = one scale per output channel",
        )
        symmetric: bool = Field(True, description="symmetric grid (no zero point)")
        skip_modules: list[str] = Field(
            default_factory=lambda: ["lm_head"],
            description="linear layers whose name contains one of these stay in float "
                        "(lm_head is tied to the embeddings in SmolLM2)",
        )

        @model_validator(mode="after")
        def _low_bits_need_groups(self) -> RTN.Config:
            if self.bits < 8 and self.group_size is None:
                self.group_size = 32 if self.bits == 4 else 16
            return self

    @hookimpl
    def effinfer_transform_model(self, stage: ModelStage) -> None:
        layers = linear_layers(stage.model, self.config.skip_modules)
        before = after = 0
        for name, linear in layers:
            quantized = QuantizedLinear.from_linear(linear, self.config.bits, self.config.group_size,
                                                    self.config.symmetric)
            before += linear.weight.numel() * linear.weight.element_size()
            after += quantized.quantized_weight().nbytes
            stage.patcher.replace_module(stage.model, name, quantized)
        self.note(f"quantized {len(layers)} linear layers to int{self.config.bits} "
                  f"(group {self.config.group_size or 'per-channel'}): "
                  f"{before / 2**20:.1f} MiB → {after / 2**20:.1f} MiB")


@hookimpl
def effinfer_register_techniques(register):
    register(RTN)
