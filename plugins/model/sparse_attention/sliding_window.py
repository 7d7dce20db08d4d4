"""Sliding-window attention over the KV cache: only the last ``budget`` tokens are kept.

The local-attention pattern of Longformer (Beltagy et al., arXiv:2004.05150) and Mistral's
sliding window, applied at inference to a model trained with full attention: the simplest
bounded cache, and the baseline StreamingLLM (arXiv:2309.17453) shows degrading once the
first tokens leave the window.
"""

from __future__ import annotations

import torch

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.stages import SystemStage
from effinfer.plugins.model.sparse_attention.eviction import BudgetConfig, EvictionPolicy, install


class RecentPolicy(EvictionPolicy):
    """Keep the ``budget`` most recent positions."""

    name = "sliding_window"

    def __init__(self, budget: int) -> None:
        super().__init__(budget, window=budget)

    def priority(self, total: int) -> torch.Tensor:
        return self.positions[..., :total].float()


class SlidingWindow(Technique):
    name = "sliding_window"
    node = "model.compression.sparsification.sparse_attention.static"
    paper = Paper(title="Longformer: The Long-Document Transformer", year=2020, arxiv="2004.05150")
    summary = "Sliding-window KV cache: only the most recent `budget` tokens are kept and attended to."

    class Config(BudgetConfig):
        pass

    bench_config = {"budget": 128}

    @hookimpl
    def effinfer_configure_system(self, stage: SystemStage) -> None:
        install(stage, self, lambda: RecentPolicy(self.config.budget))
