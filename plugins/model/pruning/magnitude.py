"""Magnitude pruning: zero the weights of smallest absolute value.

Han, Pool, Tran & Dally, "Learning both Weights and Connections for Efficient Neural
Networks", NeurIPS 2015, arXiv:1506.02626 — the baseline every LLM pruning paper
(SparseGPT, Wanda) compares against. The comparison group is the whole layer (the
lowest ``round(sparsity · numel)`` magnitudes of each linear layer are zeroed), or every
``M`` consecutive input weights of a row for an ``N:M`` pattern. No calibration data.
"""

from __future__ import annotations

from typing import Any

import torch

from effinfer.core import Paper, hookimpl
from effinfer.core.stages import ModelStage
from effinfer.plugins.model.pruning.sparse import MaskPruner, PruneConfig, mask_for, prune_decoder


def magnitude_prune(weight: torch.Tensor, _stat: Any, config: PruneConfig) -> torch.Tensor:
    return weight * mask_for(weight.abs(), config, per_row=False)


class Magnitude(MaskPruner):
    name = "magnitude"
    node = "model.compression.sparsification.weight_pruning.unstructured"
    paper = Paper(title="Learning both Weights and Connections for Efficient Neural Networks", year=2015,
                  arxiv="1506.02626")
    summary = ("Zeroes the weights of smallest magnitude in every linear layer of the decoder blocks "
               "(unstructured at a sparsity ratio, or an N:M pattern such as 2:4); no calibration. Stored dense "
               "with zeros, as a bitmask + values, or in CSR.")
    bench_config = {"sparsity": 0.5}

    Config = PruneConfig

    @hookimpl
    def effinfer_transform_model(self, stage: ModelStage) -> None:
        prune_decoder(stage, self, magnitude_prune)
