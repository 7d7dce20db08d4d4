"""AWQ: activation-aware weight quantization.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan & Han, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration", MLSys 2024, arXiv:2306.00978.

A few input channels carry much larger activations than the others; the weights that
multiply them matter most. AWQ protects them by scaling instead of mixed precision: the
input channel ``j`` of the linear layers that share an input is multiplied by
``s_j = mean|x_j|^α`` (normalized), and the operation that produces that input (an
RMSNorm, or the preceding linear layer) is divided by ``s_j``, which leaves the float
model unchanged while the quantization grid now favours the salient channels. ``α`` is
searched on a grid in ``[0, 1)`` to minimize the output error of the group's quantized
linear layers on calibration activations. A second search then shrinks each group's
clipping range (``max |w|``) to minimize the output error per group of weights (not for
query/key projections, whose errors the attention scores amplify). The scaled, clipped
weights are quantized round-to-nearest and packed.

The scaling groups of a block: ``input_layernorm → q,k,v``, ``v → o`` (only when
``v_proj`` and ``o_proj`` have matching widths, i.e. without grouped-query attention),
the MLP's input norm (``post_attention_layernorm`` in Llama/Qwen2,
``pre_feedforward_layernorm`` in Gemma) ``→ gate, up`` and ``up → down``; see
:mod:`~effinfer.plugins.model.quantization.scaling` for Gemma's ``1 + weight`` norms. The
block's float output is checked unchanged after folding (a block of another layout is
refused, not damaged). The loss of a group is the summed squared error of its linear
layers' outputs (the paper measures the block's output; for the projections here this is
the same objective term by term).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from pydantic import Field
from torch import nn

from effinfer.core import Paper, Requirement, Technique, hookimpl
from effinfer.core.stages import ModelStage
from effinfer.plugins.model.quantization.config import (CalibrationConfig, WeightQuantConfig, float_zero, grid_text,
                                                        group_size_problems, maybe_save, swap_note, weight_bytes,
                                                        weight_math_threads)
from effinfer.plugins.model.quantization.layers import PackedLayer, build_quantized_linear
from effinfer.plugins.model.quantization.layerwise import (collect_inputs, decoder_layers, first_layer_inputs,
                                                           linears_of, run_layer)
from effinfer.plugins.model.quantization.packing import check_group_size, fake_quantize, quantize
from effinfer.plugins.model.quantization.scaling import (ScaleGroup, block_groups, check_function_kept,
                                                         fold_scales)

NO_CLIP = ("q_proj", "k_proj")


def scale_groups(layer: nn.Module) -> list[ScaleGroup]:
    """AWQ's groups of a block: attention norm → q,k,v; v → o (without GQA); MLP norm → gate,up; up → down."""
    return block_groups(layer, "awq", value_output=True, down_proj=True)


FakeQuant = Callable[[torch.Tensor, "torch.Tensor | float"], torch.Tensor]


def quantized_output_error(x: torch.Tensor, weights: list[torch.Tensor], scales: torch.Tensor, fake: FakeQuant,
                           reference: list[torch.Tensor]) -> float:
    """Σ ||x Wᵀ − (x/s) Q(W·s)ᵀ||² over the group's weights (``fake(w, clip)`` is ``Q``)."""
    scaled_x = x / scales
    return sum(float((scaled_x @ fake(w * scales, 1.0).t() - ref).pow(2).sum()) for w, ref in zip(weights, reference))


def search_scales(x: torch.Tensor, weights: list[torch.Tensor], fake: FakeQuant, grid: int
                  ) -> tuple[torch.Tensor, float, float]:
    """The best ``s = mean|x|^α`` over ``α ∈ {0, 1/grid, …}``: ``(scales, α, error ratio vs α=0)``."""
    x_mean = x.abs().mean(0).clamp(min=1e-5)
    reference = [x @ w.t() for w in weights]
    best, best_alpha, best_error, first = torch.ones_like(x_mean), 0.0, float("inf"), None
    for step in range(grid):
        alpha = step / grid
        scales = x_mean.pow(alpha)
        scales = scales / (scales.max() * scales.min()).sqrt()
        error = quantized_output_error(x, weights, scales, fake, reference)
        first = error if first is None else first
        if error < best_error:
            best, best_alpha, best_error = scales, alpha, error
    return best, best_alpha, best_error / first if first else 1.0


def search_clipping(x: torch.Tensor, weight: torch.Tensor, group_size: int | None, fake: FakeQuant, grid: int,
                    max_shrink: float, rows_per_step: int = 256) -> torch.Tensor:
    """Per (row, group) clipping factor in ``[1 - max_shrink, 1]`` minimizing the group's output error."""
    out_features, in_features = weight.shape
    group = check_group_size(in_features, group_size)
    n_groups = in_features // group
    x_groups = x.view(-1, n_groups, group)                                     # tokens × G × g
    best = torch.ones(out_features, n_groups, device=weight.device)
    for start in range(0, out_features, rows_per_step):
        w = weight[start:start + rows_per_step].view(-1, n_groups, group)       # rows × G × g
        reference = torch.einsum("tgk,rgk->rgt", x_groups, w)
        best_error = torch.full(w.shape[:2], float("inf"), device=weight.device)
        for step in range(int(max_shrink * grid) + 1):
            ratio = 1.0 - step / grid
            quantized = fake(w.reshape(w.shape[0], -1), ratio).view_as(w)
            error = (torch.einsum("tgk,rgk->rgt", x_groups, quantized) - reference).pow(2).mean(-1)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best[start:start + rows_per_step] = torch.where(better, torch.full_like(error, ratio),
                                                            best[start:start + rows_per_step])
    return best


class AWQ(Technique):
    name = "awq"
    node = "model.compression.quantization.ptq.weight_only"
    paper = Paper(title="AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration",
                  year=2023, arxiv="2306.00978")
    summary = ("Weight-only quantization that protects the weights of salient input channels (large mean "
               "activation) by per-channel scaling folded into the preceding norm or linear layer, with the "
               "scaling exponent α searched on calibration activations, then a per-group clipping search; "
               "weights are then rounded and packed.")
    lossless = False
    requires = frozenset({Requirement.CALIBRATION_DATA})
    removes_features = frozenset({"dense_weights"})
    #: `effinfer bench --suite quick`: 8 × 256 calibration tokens, coarser searches
    bench_config = {"bits": 4, "group_size": 32, "n_samples": 8, "seq_len": 256, "alpha_grid": 10, "clip_grid": 10,
                    "search_tokens": 1024, "clip_tokens": 256}

    class Config(WeightQuantConfig, CalibrationConfig):
        alpha_grid: int = Field(20, ge=1, le=100, description="scaling exponents tried: α = 0, 1/n, …, (n−1)/n")
        clip: bool = Field(True, description="search a clipping range per weight group (not for q/k projections)")
        clip_grid: int = Field(20, ge=1, le=100, description="clipping factors tried: 1 − k/n")
        max_shrink: float = Field(0.5, ge=0.0, lt=1.0, description="smallest clipping factor tried is 1 − max_shrink")
        search_tokens: int = Field(2048, ge=16, le=1_000_000,
                                   description="calibration tokens used by the searches (a seeded subsample)")
        clip_tokens: int = Field(512, ge=16, le=100_000, description="tokens used by the clipping search")

    def check_model_config(self, config: Any) -> list[str]:
        """A ``group_size`` that does not divide the input features of the decoder layers' linear layers,
        refused before loading (the model's config tells their sizes)."""
        return group_size_problems(config, self.config.group_size, self.config.skip_modules, decoder_only=True)

    @hookimpl
    def effinfer_transform_model(self, stage: ModelStage) -> None:
        config = self.config
        started = time.perf_counter()
        tokens = stage.calibration_batches(config.n_samples, config.seq_len)
        path, layers = decoder_layers(stage.model)
        batches = first_layer_inputs(stage.model, tokens, config.batch_size)
        swapped: dict[str, PackedLayer] = {}
        searches: list[tuple[float, float]] = []
        before = sum(weight_bytes(list(linears_of(layer, f"{path}.{i}", config.skip_modules).values()))
                     for i, layer in enumerate(layers))
        for index, layer in enumerate(layers):
            readers = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
            inputs = collect_inputs(layer, batches, readers, config.search_tokens)
            float_output = run_layer(layer, batches[:1])[0].hidden
            with weight_math_threads():
                searches += self._scale(layer, inputs, stage)
            check_function_kept(float_output, run_layer(layer, batches[:1])[0].hidden, f"{path}.{index}", "awq")
            with weight_math_threads():
                for name, linear in linears_of(layer, f"{path}.{index}", config.skip_modules).items():
                    full = f"{path}.{index}.{name}"
                    swapped[full] = self._quantize(name, linear, inputs[name], full)
                    stage.patcher.replace_module(layer, name, swapped[full])
            del inputs
            batches = run_layer(layer, batches)
        seconds = time.perf_counter() - started
        self.note(swap_note(f"AWQ {grid_text(config)}", before, swapped))
        alpha = sum(a for a, _ in searches) / max(1, len(searches))
        gain = sum(g for _, g in searches) / max(1, len(searches))
        self.note(f"calibrated on {tokens.shape[0]}×{tokens.shape[1]} tokens in {seconds:.1f} s; {len(searches)} "
                  f"scaling groups, mean α {alpha:.2f}, group output error × {gain:.2f} vs α=0; "
                  f"clipping {'searched' if config.clip else 'off'}")
        maybe_save(stage, config.save_dir, self)

    def fake(self, weight: torch.Tensor, clip: torch.Tensor | float) -> torch.Tensor:
        config = self.config
        return fake_quantize(weight, config.bits, config.group_size, config.symmetric, clip, float_zero(config))

    def _scale(self, layer: nn.Module, inputs: dict[str, torch.Tensor], stage: ModelStage
               ) -> list[tuple[float, float]]:
        """Search and fold the scales of every group of the block; ``inputs`` are rescaled to match."""
        found = []
        for group in scale_groups(layer):
            weights = [layer.get_submodule(n).weight.detach().float() for n in group.linears]
            scales, alpha, gain = search_scales(inputs[group.linears[0]], weights, self.fake, self.config.alpha_grid)
            fold_scales(layer, group, scales, stage.patcher)
            for name in group.linears:
                inputs[name] = inputs[name] / scales
            found.append((alpha, gain))
        return found

    def _quantize(self, name: str, linear: nn.Linear, x: torch.Tensor, full: str) -> PackedLayer:
        config = self.config
        clip: torch.Tensor | float = 1.0
        if config.clip and not name.endswith(NO_CLIP):
            clip = search_clipping(x[:config.clip_tokens], linear.weight.detach().float(), config.group_size,
                                   self.fake, config.clip_grid, config.max_shrink)
        packed = quantize(linear.weight, config.bits, config.group_size, config.symmetric, clip, float_zero(config))
        return build_quantized_linear(packed, linear.bias, config.execution, full, config.dense_above_tokens)


@hookimpl
def effinfer_register_techniques(register):
    register(AWQ)
