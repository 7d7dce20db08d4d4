"""SmoothQuant: W8A8 quantization with activation outliers migrated into the weights.

Xiao, Lin, Seznec, Wu, Demouth & Han, "SmoothQuant: Accurate and Efficient
Post-Training Quantization for Large Language Models", ICML 2023, arXiv:2211.10438.

Activations are hard to quantize because a few input channels have huge magnitudes;
weights are easy. With per-channel factors ``s_j = max|X_j|^α / max|W_j|^(1−α)`` the
product is rewritten ``X W = (X diag(s)⁻¹)(diag(s) W)``: ``1/s`` is folded into the
preceding RMSNorm (offline, so inference pays nothing; Gemma's ``1 + weight`` norms are
handled, see :mod:`~effinfer.plugins.model.quantization.scaling`) and ``s`` into the
weights; the float model's logits are checked unchanged after folding. ``α``
(0.5 in the paper, more for models with larger outliers) sets how much of the difficulty
migrates. Then every linear layer of the decoder runs W8A8: int8 weights with one scale
per output channel, int8 activations with a scale per token computed on the fly (the
paper's O1/O2 settings; ``activation_scales='static_per_tensor'`` is its O3, with
scales fixed on calibration data), multiplied by a real integer GEMM (``torch._int_mm``,
int32 accumulation) and rescaled in float.

Channel statistics come from the shared calibration facility
(:func:`effinfer.plugins.model.calibration.activation_stats`), measured on the float
model before any change.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from effinfer.core import Paper, Requirement, Technique, hookimpl
from effinfer.core.stages import ModelStage
from effinfer.plugins.model.calibration import activation_stats
from effinfer.plugins.model.quantization.scaling import (ScaleGroup, block_groups, check_function_kept,
                                                         fold_scales)
from effinfer.plugins.model.quantization.config import (CalibrationConfig, TargetConfig, maybe_save, selected_linears,
                                                        swap_in, weight_math_threads)
from effinfer.plugins.model.quantization.layers import Int8DynamicLinear, PackedLayer
from effinfer.plugins.model.quantization.layerwise import decoder_layers

def smoothing_groups(layer: nn.Module, down_proj: bool = False) -> list[ScaleGroup]:
    """SmoothQuant's groups of this block: attention norm → q,k,v; MLP norm → gate,up; optionally up → down."""
    return block_groups(layer, "smoothquant", value_output=False, down_proj=down_proj)


def smoothing_factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^α / max|W_j|^(1−α)`` over the weights that read channel ``j``."""
    weight_absmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0).clamp(min=1e-5)
    scales = act_absmax.clamp(min=1e-5).pow(alpha) / weight_absmax.pow(1 - alpha)
    return scales.clamp(min=1e-5)


class SmoothQuant(Technique):
    name = "smoothquant"
    node = "model.compression.quantization.ptq.weight_activation"
    paper = Paper(title="SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language Models",
                  year=2022, arxiv="2211.10438")
    summary = ("W8A8 quantization: per-channel smoothing factors migrate activation outliers into the weights "
               "(folded into the RMSNorms, α sets how much), then int8 weights × int8 per-token activations run "
               "through a real integer GEMM (torch._int_mm).")
    lossless = False
    requires = frozenset({Requirement.CALIBRATION_DATA})
    removes_features = frozenset({"dense_weights"})
    #: `effinfer bench --suite quick`: 8 × 256 calibration tokens
    bench_config = {"alpha": 0.5, "n_samples": 8, "seq_len": 256}

    class Config(TargetConfig, CalibrationConfig):
        alpha: float = Field(0.5, ge=0.0, le=1.0, description="migration strength: 0 keeps the activations as "
                                                              "they are, 1 moves all of their range into weights")
        activation_scales: Literal["dynamic_per_token", "static_per_tensor"] = Field(
            "dynamic_per_token", description="int8 activation scales: computed per token at run time, or one "
                                             "static scale per layer from calibration (the paper's O3)")
        smooth_down_proj: bool = Field(False, description="also smooth down_proj's input by folding into up_proj")

    @hookimpl
    def effinfer_transform_model(self, stage: ModelStage) -> None:
        config = self.config
        started = time.perf_counter()
        tokens = stage.calibration_batches(config.n_samples, config.seq_len)
        stats = activation_stats(stage.model, tokens, config.batch_size)
        path, layers = decoder_layers(stage.model)
        act_absmax = {name: s.absmax.clone() for name, s in stats.items()}
        probe = tokens[:1, :64]
        with torch.no_grad():
            before = stage.model(input_ids=probe, use_cache=False).logits
        folded = 0
        for index, layer in enumerate(layers):
            groups = smoothing_groups(layer, config.smooth_down_proj)
            folded += len(groups)
            for group in groups:
                names = [f"{path}.{index}.{n}" for n in group.linears]
                weights = [layer.get_submodule(n).weight.detach().float() for n in group.linears]
                scales = smoothing_factors(act_absmax[names[0]], weights, config.alpha)
                fold_scales(layer, group, scales, stage.patcher)
                for name in names:
                    act_absmax[name] = act_absmax[name] / scales
        with torch.no_grad():
            check_function_kept(before, stage.model(input_ids=probe, use_cache=False).logits, "the model",
                                "smoothquant")
        self.note(f"smoothed {folded} input groups with α={config.alpha}")
        self._quantize(stage, act_absmax, started, tokens)

    def _quantize(self, stage: ModelStage, act_absmax: dict[str, torch.Tensor], started: float,
                  tokens: torch.Tensor) -> None:
        config = self.config
        path, _ = decoder_layers(stage.model)
        linears = [(n, m) for n, m in selected_linears(stage.model, config.skip_modules) if n.startswith(path)]
        swapped: dict[str, PackedLayer] = {}
        static = config.activation_scales == "static_per_tensor"
        with weight_math_threads():
            for name, linear in linears:
                act_scale = (act_absmax[name].amax() / 127.0).clamp(min=1e-8) if static else None
                swapped[name] = Int8DynamicLinear(linear.weight, linear.bias, act_scale)
        self.note(swap_in(stage, linears, swapped, "W8A8 (int8 per-channel weights, int8 activations)"))
        self.note(f"calibrated on {tokens.shape[0]}×{tokens.shape[1]} tokens in "
                  f"{time.perf_counter() - started:.1f} s; linear layers outside the decoder blocks stay in float")
        maybe_save(stage, config.save_dir, self)


@hookimpl
def effinfer_register_techniques(register):
    register(SmoothQuant)
