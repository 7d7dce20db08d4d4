"""H2O: heavy-hitter oracle (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference
of Large Language Models", arXiv:2306.14048).

Each cached entry accumulates the attention it receives (softmax weights summed over every later
query, and over the query heads sharing its KV head); the cache keeps the ``recent`` newest
entries plus the heavy hitters of highest accumulated attention, ``budget`` in all per layer and
KV head. Scores accumulate over the compact cache, as in the paper's greedy eviction.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.kv_cache import attention_scores
from effinfer.core.stages import SystemStage
from effinfer.plugins.model.sparse_attention.eviction import BudgetConfig, EvictionPolicy, install


class HeavyHitterPolicy(EvictionPolicy):
    name = "h2o"
    needs_queries = True

    def observe(self, queries: torch.Tensor | None, keys: torch.Tensor, new: int) -> None:
        total = keys.shape[-2]
        self.scores[..., :total] += attention_scores(queries, keys)


class H2O(Technique):
    name = "h2o"
    node = "model.compression.sparsification.sparse_attention.dynamic"
    paper = Paper(title="H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
                  year=2023, arxiv="2306.14048")
    summary = ("Heavy hitters + recent window: entries with the most accumulated attention stay in a KV "
               "cache bounded at `budget` per layer.")

    class Config(BudgetConfig):
        recent: int | None = Field(None, ge=0, description="newest entries always kept (default: half the budget)")

        @model_validator(mode="after")
        def _recent_fits(self):
            if self.recent is not None and self.recent > self.budget:
                raise ValueError(f"recent ({self.recent}) must not exceed budget ({self.budget})")
            return self

    bench_config = {"budget": 128}

    @hookimpl
    def effinfer_configure_system(self, stage: SystemStage) -> None:
        recent = self.config.budget // 2 if self.config.recent is None else self.config.recent
        install(stage, self, lambda: HeavyHitterPolicy(self.config.budget, recent))
