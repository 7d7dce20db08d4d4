"""Wanda: pruning by weights and activations.

Sun, Liu, Bair & Kolter, "A Simple and Effective Pruning Approach for Large Language
Models", ICLR 2024, arXiv:2306.11695. The importance of weight ``W_ij`` is
``|W_ij| · ‖X_j‖₂``, the magnitude times the L2 norm of input feature ``j`` over the
calibration tokens; weights are compared within each output row (the paper's
per-output comparison group), or within every ``M`` consecutive inputs for ``N:M``. No
weight update. Layers are processed sequentially: each block's input norms are measured
on the outputs of the already pruned blocks before it, as in the reference code.
"""

from __future__ import annotations


import torch
from torch import nn

from effinfer.core import Paper, Requirement, hookimpl
from effinfer.core.stages import ModelStage
from effinfer.plugins.model.pruning.sparse import MaskPruner, PruneConfig, mask_for, prune_decoder
from effinfer.plugins.model.quantization.config import CalibrationConfig


class ColumnNorms:
    """Running sum of ``x_j²`` over every token seen (float32)."""

    def __init__(self, linear: nn.Linear) -> None:
        self.squares = torch.zeros(linear.in_features, device=linear.weight.device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).float()
        self.squares += flat.pow(2).sum(0)
        self.tokens += flat.shape[0]

    def norms(self) -> torch.Tensor:
        return self.squares.sqrt()


def wanda_prune(weight: torch.Tensor, stat: ColumnNorms, config: PruneConfig) -> torch.Tensor:
    scores = weight.abs() * stat.norms().to(weight.device).unsqueeze(0)
    return weight * mask_for(scores, config, per_row=True)


class Wanda(MaskPruner):
    name = "wanda"
    node = "model.compression.sparsification.weight_pruning.unstructured"
    paper = Paper(title="A Simple and Effective Pruning Approach for Large Language Models", year=2023,
                  arxiv="2306.11695")
    summary = ("Prunes the weights of lowest |W|·‖X‖ (magnitude times the L2 norm of the input feature on "
               "calibration data) within each output row, unstructured or N:M, without a weight update; blocks "
               "are calibrated sequentially on the already pruned ones' outputs.")
    requires = frozenset({Requirement.CALIBRATION_DATA})
    bench_config = {"sparsity": 0.5, "n_samples": 8, "seq_len": 256}
    bench_compositions = ("wanda+gptq",)

    class Config(PruneConfig, CalibrationConfig):
        pass

    @hookimpl
    def effinfer_transform_model(self, stage: ModelStage) -> None:
        prune_decoder(stage, self, wanda_prune, ColumnNorms, ColumnNorms.add)
