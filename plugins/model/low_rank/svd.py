"""Plain truncated SVD of each linear layer into two thin layers.

The baseline of low-rank LLM compression (e.g. the "FWSVD"/"ASVD" papers' SVD row):
``W ≈ U_r Σ_r V_rᵀ``, the best rank-``r`` approximation in the Frobenius norm
(Eckart & Young, "The approximation of one matrix by another of lower rank",
Psychometrika 1936); ``Σ_r`` is split evenly between the two factors. No calibration.
See :mod:`~effinfer.plugins.model.low_rank.factorize` for the rank rule.
"""

from __future__ import annotations

from typing import Any

import torch

from effinfer.core import Feature, Paper, Technique, hookimpl
from effinfer.core.stages import ModelStage
from effinfer.plugins.model.low_rank.factorize import LowRankConfig, factorize, factorize_decoder, low_rank_problems


def svd_factor(weight: torch.Tensor, _stat: Any, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    return factorize(weight, rank)


class SVD(Technique):
    name = "svd"
    node = "model.compression.structure_optimization.low_rank"
    paper = Paper(title="ASVD: Activation-aware Singular Value Decomposition for Compressing Large Language "
                        "Models (plain SVD baseline)", year=2023, arxiv="2312.05821")
    summary = ("Replaces every linear layer of the decoder blocks by two thin ones from its truncated SVD, at a "
               "parameter ratio; layers whose rank would not save compute stay dense. No calibration.")
    needs_features = frozenset({Feature.DENSE_WEIGHTS})
    removes_features = frozenset({Feature.DENSE_WEIGHTS})
    bench_config = {"param_ratio": 0.8}

    Config = LowRankConfig

    def check_model_config(self, config: Any) -> list[str]:
        return low_rank_problems(self.config, config)

    @hookimpl
    def effinfer_transform_model(self, stage: ModelStage) -> None:
        factorize_decoder(stage, self, svd_factor)
