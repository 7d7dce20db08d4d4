"""ASVD: activation-aware SVD.

Yuan, Shang, Song, Wu, Yan & Sun, "ASVD: Activation-aware Singular Value Decomposition
for Compressing Large Language Models", arXiv:2312.05821. Input channels with large
activations matter more, so the SVD is taken of ``W S`` with ``S = diag(mean|x_j|^α)``
(the mean absolute activation of each input channel on calibration text, α = 0.5 as in
the paper) and the scaling is undone on the right factor: ``W ≈ (U_r Σ_r)(V_rᵀ S⁻¹)``.
The statistics come from the shared, cached
:func:`~effinfer.plugins.model.calibration.activation_stats` (one pass over the dense model).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from effinfer.core import Feature, Paper, Requirement, Technique, hookimpl
from effinfer.core.stages import ModelStage
from effinfer.plugins.model.calibration import activation_stats
from effinfer.plugins.model.low_rank.factorize import LowRankConfig, factorize, factorize_decoder, low_rank_problems
from effinfer.plugins.model.quantization.config import CalibrationConfig


class ASVD(Technique):
    name = "asvd"
    node = "model.compression.structure_optimization.low_rank"
    paper = Paper(title="ASVD: Activation-aware Singular Value Decomposition for Compressing Large Language Models",
                  year=2023, arxiv="2312.05821")
    summary = ("Truncated SVD of each linear layer scaled by its input channels' mean |activation|^α on "
               "calibration text (the scaling undone on the right factor), at a parameter ratio.")
    requires = frozenset({Requirement.CALIBRATION_DATA})
    needs_features = frozenset({Feature.DENSE_WEIGHTS})
    removes_features = frozenset({Feature.DENSE_WEIGHTS})
    bench_config = {"param_ratio": 0.8, "n_samples": 8, "seq_len": 256}

    class Config(LowRankConfig, CalibrationConfig):
        alpha: float = Field(0.5, ge=0.0, le=2.0, description="exponent of the activation scaling (0 = plain SVD)")

    def check_model_config(self, config: Any) -> list[str]:
        return low_rank_problems(self.config, config)

    @hookimpl
    def effinfer_transform_model(self, stage: ModelStage) -> None:
        config = self.config
        tokens = stage.calibration_batches(config.n_samples, config.seq_len)
        stats = activation_stats(stage.model, tokens, config.batch_size)
        scales = {name: stat.mean_abs.clamp_min(1e-6).pow(config.alpha) for name, stat in stats.items()}

        def factor(weight: torch.Tensor, scale: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
            return factorize(weight, rank, scale.to(weight.device))

        factorize_decoder(stage, self, factor, fixed=scales)
