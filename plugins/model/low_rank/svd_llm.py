"""SVD-LLM: truncation-aware data whitening.

Wang, Zheng, Zhang & Zhang, "SVD-LLM: Truncation-aware Singular Value Decomposition for
Large Language Model Compression", ICLR 2025, arXiv:2403.07378. With the Gram matrix of
a layer's calibration inputs ``X Xᵀ = S Sᵀ`` (``S`` its Cholesky factor), the SVD of
``W S`` makes each truncated singular value equal to the loss it causes,
``‖(W − W') X‖_F = σ_i``, so truncating the smallest ones minimises the layer's output
error: ``W ≈ (U_r Σ_r)(V_rᵀ S⁻¹)``. The Gram matrix is GPTQ's Hessian accumulator
(shared), dampened on the diagonal when it is not positive definite; blocks are
calibrated sequentially on the outputs of the already factorized ones.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from effinfer.core import Feature, Paper, Requirement, Technique, hookimpl
from effinfer.core.stages import ModelStage
from effinfer.plugins.model.low_rank.factorize import LowRankConfig, factorize, factorize_decoder, low_rank_problems
from effinfer.plugins.model.quantization.config import CalibrationConfig
from effinfer.plugins.model.quantization.gptq import HessianAccumulator


def whitening(gram: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, S⁻¹)`` with ``S Sᵀ = gram + λ I`` (lower Cholesky), ``λ`` raised until it factors."""
    gram = gram.double()
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    scale = float(gram.diagonal().mean()) or 1.0
    for factor in (damp, damp * 10, damp * 100, 1.0):
        try:
            lower = torch.linalg.cholesky(gram + factor * scale * eye)
        except torch.linalg.LinAlgError:
            continue
        return lower, torch.linalg.solve_triangular(lower, eye, upper=False)
    raise ValueError("the calibration inputs' Gram matrix is not positive definite even with damp=1; calibrate on "
                     "more tokens")


class SVDLLM(Technique):
    name = "svd_llm"
    node = "model.compression.structure_optimization.low_rank"
    paper = Paper(title="SVD-LLM: Truncation-aware Singular Value Decomposition for Large Language Model "
                        "Compression", year=2024, arxiv="2403.07378")
    summary = ("Truncated SVD of each linear layer after whitening its inputs with the Cholesky factor of their "
               "Gram matrix on calibration text, so every dropped singular value is exactly the output error it "
               "causes; blocks calibrated sequentially.")
    requires = frozenset({Requirement.CALIBRATION_DATA})
    needs_features = frozenset({Feature.DENSE_WEIGHTS})
    removes_features = frozenset({Feature.DENSE_WEIGHTS})
    bench_config = {"param_ratio": 0.8, "n_samples": 8, "seq_len": 256}

    class Config(LowRankConfig, CalibrationConfig):
        damp: float = Field(1e-4, gt=0.0, le=1.0, description="added to the Gram diagonal (fraction of its mean) "
                                                              "before the Cholesky factorization")

    def check_model_config(self, config: Any) -> list[str]:
        return low_rank_problems(self.config, config)

    @hookimpl
    def effinfer_transform_model(self, stage: ModelStage) -> None:
        damp = self.config.damp

        def factor(weight: torch.Tensor, stat: HessianAccumulator, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
            lower, inverse = whitening(stat.hessian.to(weight.device), damp)
            return factorize(weight, rank, lower, inverse)

        factorize_decoder(stage, self, factor, lambda m: HessianAccumulator(m.in_features, m.weight.device),
                          HessianAccumulator.add)
