"""Round-to-nearest (RTN) weight-only quantization.

The baseline every weight-only PTQ paper compares against: each group of weights is
scaled to the integer grid and rounded, with no calibration data. 8-, 4-, 3- and 2-bit
grids, symmetric or asymmetric, per output channel or in groups. Weights are stored
packed and run through PyTorch's packed int8/int4 CPU kernels where the format has one
(int8 per channel symmetric; int4 in groups of 32–256), otherwise they are dequantized
per call or, with ``execution='fake'``, stored dequantized. See the RTN baselines in
Frantar et al., "GPTQ", arXiv:2210.17323, and Dettmers & Zettlemoyer, "The case for
4-bit precision: k-bit inference scaling laws", arXiv:2212.09720.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator
from torch import nn

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.stages import ModelStage
from effinfer.plugins.model.quantization.config import (BITS_DESCRIPTION, GROUP_DESCRIPTION, WeightQuantConfig,
                                                        grid_text, group_size_problems, maybe_save,
                                                        round_to_nearest_linear, selected_linears, swap_in,
                                                        weight_math_threads)
from effinfer.plugins.model.quantization.layers import QuantizedLinear

__all__ = ["RTN", "QuantizedLinear", "linear_layers"]


def linear_layers(model: nn.Module, skip: list[str]) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` modules of ``model`` whose names contain none of ``skip``."""
    return selected_linears(model, skip)


class RTN(Technique):
    name = "rtn"
    node = "model.compression.quantization.ptq.weight_only"
    paper = Paper(title="GPTQ: Accurate Post-Training Quantization for Generative Pre-trained "
                        "Transformers (RTN baseline)", year=2022, arxiv="2210.17323")
    summary = ("Round-to-nearest weight-only quantization: every weight group is scaled to an "
               "8/4/3/2-bit grid (symmetric or asymmetric) and rounded, with no calibration. Weights are "
               "stored packed; int8 and int4 run through PyTorch's packed CPU kernels.")
    lossless = False
    removes_features = frozenset({"dense_weights"})

    class Config(WeightQuantConfig):
        bits: Literal[2, 3, 4, 8] = Field(8, description=BITS_DESCRIPTION)
        group_size: int | None = Field(None, ge=8, le=8192, multiple_of=8,
                                       description=GROUP_DESCRIPTION + " (default for fewer than 8 bits: 32, "
                                                                       "16 for 2-bit)")
        symmetric: bool = Field(True, description="symmetric grid without zero points (else a uint8 zero point "
                                                  "per group)")

        @model_validator(mode="before")
        @classmethod
        def _low_bits_need_groups(cls, data: object) -> object:
            if isinstance(data, dict) and "group_size" not in data and data.get("bits", 8) != 8:
                data = {**data, "group_size": 16 if data.get("bits") == 2 else 32}
            return data

    def check_model_config(self, config: Any) -> list[str]:
        """A ``group_size`` that does not divide the input features of every linear layer not in skip_modules,
        refused before loading (the model's config tells their sizes)."""
        return group_size_problems(config, self.config.group_size, self.config.skip_modules)

    @hookimpl
    def effinfer_transform_model(self, stage: ModelStage) -> None:
        config = self.config
        layers = selected_linears(stage.model, config.skip_modules)
        with weight_math_threads():
            swapped = {name: round_to_nearest_linear(linear.weight, linear.bias, name, config)
                       for name, linear in layers}
        self.note(swap_in(stage, layers, swapped, f"quantized {len(layers)} linear layers to {grid_text(config)}"))
        maybe_save(stage, config.save_dir, self)


@hookimpl
def effinfer_register_techniques(register):
    register(RTN)
