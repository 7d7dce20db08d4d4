"""StreamingLLM: attention sinks plus a recent window (Xiao et al., "Efficient Streaming Language Models
with Attention Sinks", arXiv:2309.17453).

The first ``sinks`` tokens absorb the attention mass that softmax must put somewhere; keeping them
beside the ``budget - sinks`` most recent tokens keeps the model fluent long after the window
slides, where a plain sliding window collapses. The cache is bounded at ``budget`` entries per
layer (decode reads ``budget + 1``). Positions: each key keeps the rotary position it was written
with, so a query sees the sinks and the window at their true distances; that stays within the
trained range for any context the model accepts (``max_position_embeddings``), which the
prompt limit enforces — the paper's in-cache re-numbering is only needed past that length.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.stages import SystemStage
from effinfer.plugins.model.sparse_attention.eviction import BudgetConfig, EvictionPolicy, install


class SinkWindowPolicy(EvictionPolicy):
    """Keep positions ``< sinks`` and the most recent ``budget - sinks``."""

    name = "streaming_llm"

    def __init__(self, budget: int, sinks: int) -> None:
        super().__init__(budget, window=budget - sinks)
        self.sinks = sinks

    def priority(self, total: int) -> torch.Tensor:
        positions = self.positions[..., :total].float()
        return positions.masked_fill(positions < self.sinks, float("inf"))


class StreamingLLM(Technique):
    name = "streaming_llm"
    node = "model.compression.sparsification.sparse_attention.static"
    paper = Paper(title="Efficient Streaming Language Models with Attention Sinks", year=2023, arxiv="2309.17453")
    summary = ("Attention sinks + recent window: the KV cache keeps the first few tokens and the most recent "
               "ones (budget per layer), so decode reads a bounded cache and the model stays fluent.")

    class Config(BudgetConfig):
        sinks: int = Field(4, ge=0, le=1024, description="first tokens always kept (attention sinks)")

        @model_validator(mode="after")
        def _sinks_fit(self):
            if self.sinks >= self.budget:
                raise ValueError(f"sinks ({self.sinks}) must be below budget ({self.budget})")
            return self

    bench_config = {"budget": 128}

    @hookimpl
    def effinfer_configure_system(self, stage: SystemStage) -> None:
        install(stage, self, lambda: SinkWindowPolicy(self.config.budget, self.config.sinks))
