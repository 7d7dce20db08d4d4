"""GPTQ: weight-only quantization with Hessian-based error compensation.

Frantar, Ashkboos, Hoefler & Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023, arXiv:2210.17323.

For each linear layer with inputs ``X`` the layer-wise objective ``||W X - Q X||²`` has
Hessian ``H = 2 X Xᵀ``. Columns are quantized one at a time; the rounding error of a
column, divided by the corresponding diagonal entry of ``H⁻¹``, is spread over the
not-yet-quantized columns through the Cholesky factor of ``H⁻¹`` (the paper's Algorithm
1, with its lazy block updates and dampening ``λ = damp · mean(diag H)``). Options:

- ``group_size`` — a scale/zero per group, computed from the *updated* weights when the
  group's first column is reached (as in the paper);
- ``act_order`` — columns in order of decreasing ``diag(H)`` (the "desc_act" heuristic
  of the reference code); the grid of each group is then fixed from the original
  weights before the pass ("static groups"), so the packed format keeps contiguous
  groups and the same kernels run it.

Layers are processed sequentially (:mod:`~effinfer.plugins.model.quantization.layerwise`):
each decoder layer is calibrated on the outputs of the already quantized layers before it.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from pydantic import Field

from effinfer.core import Paper, Requirement, Technique, hookimpl
from effinfer.core.stages import ModelStage
from effinfer.plugins.model.quantization.config import (CalibrationConfig, WeightQuantConfig, float_zero, grid_text,
                                                        group_size_problems, maybe_save, swap_note, weight_bytes,
                                                        weight_math_threads)
from effinfer.plugins.model.quantization.layers import PackedLayer, build_quantized_linear
from effinfer.plugins.model.quantization.layerwise import (decoder_layers, first_layer_inputs, linears_of,
                                                           run_layer, watch_inputs)
from effinfer.plugins.model.quantization.packing import (QuantizedTensor, check_bits, check_group_size,
                                                         grid_params, quantize_codes)


class HessianAccumulator:
    """Running ``H = 2/n Σ x xᵀ`` over every token seen (float32)."""

    def __init__(self, features: int, device: torch.device | str = "cpu") -> None:
        self.hessian = torch.zeros(features, features, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).float()
        new = flat.shape[0]
        self.hessian *= self.count / (self.count + new)
        self.count += new
        flat = flat * (2.0 / self.count) ** 0.5
        self.hessian += flat.t() @ flat


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of ``(H + λI)⁻¹``."""
    hessian = hessian.clone()
    hessian.diagonal().add_(damp * hessian.diagonal().mean())
    try:
        factor = torch.linalg.cholesky(hessian)
    except torch.linalg.LinAlgError as error:
        raise ValueError(f"the Hessian is not positive definite even with damp={damp}; raise damp "
                         "(e.g. 0.1) or calibrate on more tokens") from error
    return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None,
                  symmetric: bool, act_order: bool = False, damp: float = 0.01, block_size: int = 128,
                  float_zero: bool = False) -> tuple[QuantizedTensor, float]:
    """GPTQ on one weight (``out × in``) given its inputs' Hessian; returns the packed weight and its loss.

    Weights that are exactly zero on entry (a pruner's mask, e.g. ``wanda`` before ``gptq``) stay exactly
    zero: their code is the integer zero point, and what the compensation had added to them is spread
    over the later columns like any rounding error (SparseGPT's joint mode with a fixed mask). A dense
    weight has no exact zeros, so this changes nothing there; with a float zero point 0 is not on the
    grid and the mask cannot be kept.
    """
    check_bits(bits)
    W = weight.detach().float().clone()
    pruned = (W == 0) if not float_zero else None
    out_features, in_features = W.shape
    group = check_group_size(in_features, group_size)
    n_groups = in_features // group
    H = hessian.float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    static = act_order or n_groups == 1
    scales = torch.zeros(out_features, n_groups, device=W.device)
    zeros = torch.zeros(out_features, n_groups, device=W.device)
    if static:
        scales[:], zeros[:] = grid_params(W.view(out_features, n_groups, group), bits, symmetric,
                                             float_zero=float_zero)

    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(in_features, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    if pruned is not None:
        pruned = pruned[:, perm] if bool(pruned.any()) else None
    Hinv = inverse_hessian_factor(H, damp)
    group_of = (perm // group).tolist()
    block = block_size if static else max(group, block_size // group * group)

    codes = torch.zeros_like(W)
    loss = 0.0
    for start in range(0, in_features, block):
        end = min(start + block, in_features)
        W1, Hinv1 = W[:, start:end].clone(), Hinv[start:end, start:end]
        errors = torch.zeros_like(W1)
        for i in range(end - start):
            column, g = start + i, group_of[start + i]
            if not static and column % group == 0:
                scales[:, g], zeros[:, g] = grid_params(W1[:, i:i + group], bits, symmetric,
                                                               float_zero=float_zero)
            w, d = W1[:, i], Hinv1[i, i]
            code = quantize_codes(w, scales[:, g], zeros[:, g], bits)
            if pruned is not None:
                code = torch.where(pruned[:, column], zeros[:, g], code)
            error = (w - (code - zeros[:, g]) * scales[:, g]) / d
            codes[:, column] = code
            loss += float(error.pow(2).sum()) / 2  # (w - q)² / [H⁻¹]_qq, the paper's Δ loss
            W1[:, i:] -= error.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            errors[:, i] = error
        W[:, end:] -= errors @ Hinv[start:end, end:]
    codes = codes[:, torch.argsort(perm)]
    packed = QuantizedTensor.from_codes(codes, scales, None if symmetric else zeros, bits, group, float_zero)
    return packed, loss


class GPTQ(Technique):
    name = "gptq"
    node = "model.compression.quantization.ptq.weight_only"
    paper = Paper(title="GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
                  year=2022, arxiv="2210.17323")
    summary = ("Weight-only quantization that quantizes each layer column by column and compensates the "
               "rounding error of every column on the remaining ones with the inverse Hessian of the layer's "
               "calibration inputs (Cholesky form, lazy block updates, dampening); group size and act-order. "
               "Layers are calibrated sequentially on the outputs of the already quantized ones.")
    lossless = False
    requires = frozenset({Requirement.CALIBRATION_DATA})
    removes_features = frozenset({"dense_weights"})
    #: `effinfer bench --suite quick`: 8 × 256 calibration tokens (about a minute on 2 cores)
    bench_config = {"bits": 4, "group_size": 32, "n_samples": 8, "seq_len": 256}

    class Config(WeightQuantConfig, CalibrationConfig):
        act_order: bool = Field(False, description="quantize columns in order of decreasing Hessian diagonal "
                                                   "(groups then use a grid fixed from the original weights)")
        damp: float = Field(0.01, gt=0.0, le=1.0, description="dampening added to the Hessian diagonal, as a "
                                                              "fraction of its mean")
        block_size: int = Field(128, ge=8, le=8192, description="columns per lazy batch update")

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
        before = 0
        losses: list[float] = []
        for index, layer in enumerate(layers):
            linears = linears_of(layer, f"{path}.{index}", config.skip_modules)
            before += weight_bytes(list(linears.values()))
            hessians = {name: HessianAccumulator(m.in_features, m.weight.device) for name, m in linears.items()}
            with watch_inputs(linears, lambda name, x: hessians[name].add(x)):
                run_layer(layer, batches)
            for name, linear in linears.items():
                with weight_math_threads():
                    packed, loss = gptq_quantize(linear.weight, hessians[name].hessian, config.bits,
                                                 config.group_size, config.symmetric, config.act_order, config.damp,
                                                 config.block_size, float_zero(config))
                    full = f"{path}.{index}.{name}"
                    swapped[full] = build_quantized_linear(packed, linear.bias, config.execution, full,
                                                           config.dense_above_tokens)
                losses.append(loss)
                stage.patcher.replace_module(layer, name, swapped[full])
            batches = run_layer(layer, batches)
        seconds = time.perf_counter() - started
        order = ", act-order" if config.act_order else ""
        self.note(swap_note(f"GPTQ {grid_text(config)}{order}", before,
                            swapped))
        self.note(f"calibrated on {tokens.shape[0]}×{tokens.shape[1]} tokens in {seconds:.1f} s "
                  f"(mean layer loss {sum(losses) / max(1, len(losses)):.4g}); linear layers outside the "
                  f"decoder blocks stay in float")
        maybe_save(stage, config.save_dir, self)


@hookimpl
def effinfer_register_techniques(register):
    register(GPTQ)
