"""SparseGPT: one-shot pruning with OBS-style reconstruction of the remaining weights.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", ICML 2023, arXiv:2301.00774. For a linear layer with inputs ``X`` and
Hessian ``H = 2 X Xᵀ`` (GPTQ's :class:`~effinfer.plugins.model.quantization.gptq.HessianAccumulator`
and dampened inverse Cholesky factor, shared), columns are visited left to right in
blocks; in each block the mask is chosen by the OBS saliency ``w² / [H⁻¹]²_jj`` (exactly
``round(sparsity · rows · block)`` weights of the block, or ``M − N`` of every ``M``
columns per row for ``N:M``, chosen when the group's first column is reached), and the
error of every zeroed weight is spread over the not yet visited columns of its row
through the Cholesky factor (the paper's Algorithm 1 with lazy block updates). Blocks are
calibrated sequentially on the outputs of the already pruned blocks.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from effinfer.core import Paper, Requirement, hookimpl
from effinfer.core.stages import ModelStage
from effinfer.plugins.model.pruning.sparse import MaskPruner, PruneConfig, prune_decoder, prune_lowest
from effinfer.plugins.model.quantization.config import CalibrationConfig
from effinfer.plugins.model.quantization.gptq import HessianAccumulator, inverse_hessian_factor


def sparsegpt_prune_weight(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                           nm: tuple[int, int] | None = None, block_size: int = 128, damp: float = 0.01
                           ) -> torch.Tensor:
    """SparseGPT on one weight (``out × in``) given its inputs' Hessian; returns the pruned, updated weight."""
    W = weight.detach().float().clone()
    rows, cols = W.shape
    H = hessian.float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv = inverse_hessian_factor(H, damp)
    if nm:
        n, m = nm
        if block_size % m:
            block_size = max(m, block_size // m * m)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        W1, Hinv1 = W[:, start:end].clone(), Hinv[start:end, start:end]
        diag = Hinv1.diagonal()
        errors = torch.zeros_like(W1)
        if nm is None:
            keep = prune_lowest(W1.pow(2) / diag.pow(2).unsqueeze(0), sparsity)
        else:
            keep = torch.ones_like(W1, dtype=torch.bool)
        for i in range(end - start):
            if nm is not None and i % m == 0:
                saliency = W1[:, i:i + m].pow(2) / diag[i:i + m].pow(2).unsqueeze(0)
                keep[:, i:i + m].scatter_(1, torch.topk(saliency, m - n, dim=1, largest=False).indices, False)
            w = W1[:, i]
            q = w * keep[:, i]
            error = (w - q) / Hinv1[i, i]
            W1[:, i:] -= error.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            errors[:, i] = error
        W[:, start:end] = W1 * keep
        W[:, end:] -= errors @ Hinv[start:end, end:]
    return W


class SparseGPT(MaskPruner):
    name = "sparsegpt"
    node = "model.compression.sparsification.weight_pruning.unstructured"
    paper = Paper(title="SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", year=2023,
                  arxiv="2301.00774")
    summary = ("One-shot pruning that chooses each block's mask by the OBS saliency w²/[H⁻¹]² and updates the "
               "remaining weights of every row to compensate (inverse-Hessian Cholesky factor of the calibration "
               "inputs, GPTQ's machinery); unstructured or N:M; blocks calibrated sequentially.")
    requires = frozenset({Requirement.CALIBRATION_DATA})
    bench_config = {"sparsity": 0.5, "n_samples": 8, "seq_len": 256}

    class Config(PruneConfig, CalibrationConfig):
        damp: float = Field(0.01, gt=0.0, le=1.0, description="dampening added to the Hessian diagonal, as a "
                                                              "fraction of its mean")
        block_size: int = Field(128, ge=8, le=8192, description="columns per mask selection and lazy update")

    @hookimpl
    def effinfer_transform_model(self, stage: ModelStage) -> None:
        def prune(weight: torch.Tensor, stat: HessianAccumulator, config: Any) -> torch.Tensor:
            return sparsegpt_prune_weight(weight, stat.hessian, config.sparsity, config.nm(), config.block_size,
                                          config.damp)  # prune_decoder runs it on one thread

        prune_decoder(stage, self, prune, lambda m: HessianAccumulator(m.in_features, m.weight.device),
                      HessianAccumulator.add)
