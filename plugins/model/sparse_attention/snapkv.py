"""SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv:2404.14469).

The prompt is compressed by what its last ``observation`` tokens (the question, in a long-context
prompt) attend to: their attention over the earlier entries, summed over those queries and the
query heads of each KV head, is smoothed by average pooling (``kernel``) so that neighbours of a
hit stay with it; the top entries plus the observation window fill the ``budget``. Every forward
of at least ``observation`` tokens (the prompt, or each chunk of a long one) re-scores the cache;
during decoding the generated tokens sit in the protected window and, once past it, are the first
evicted, so the cache stays bounded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.kv_cache import attention_scores
from effinfer.core.stages import SystemStage
from effinfer.plugins.model.sparse_attention.eviction import BudgetConfig, EvictionPolicy, install


class ObservationPolicy(EvictionPolicy):
    name = "snapkv"
    needs_queries = True

    def __init__(self, budget: int, observation: int, kernel: int) -> None:
        super().__init__(budget, window=observation)
        self.observation, self.kernel = observation, kernel

    def observe(self, queries: torch.Tensor | None, keys: torch.Tensor, new: int) -> None:
        if new < self.observation:
            return
        total = keys.shape[-2]
        scores = attention_scores(queries[..., -self.observation:, :], keys)
        batch, heads, _ = scores.shape
        order = self.positions[..., :total].argsort(-1)  # slots are unordered: pool neighbours in position
        pooled = F.avg_pool1d(scores.gather(-1, order).view(batch * heads, 1, total), self.kernel, stride=1,
                              padding=self.kernel // 2, count_include_pad=False).view(batch, heads, -1)
        self.scores[..., :total] = torch.empty_like(pooled).scatter_(-1, order, pooled[..., :total])


class SnapKV(Technique):
    name = "snapkv"
    node = "model.compression.sparsification.sparse_attention.dynamic"
    paper = Paper(title="SnapKV: LLM Knows What You are Looking for Before Generation", year=2024,
                  arxiv="2404.14469")
    summary = ("Prompt KV compression by an observation window: the entries the prompt's last tokens attend to "
               "most (pooled) are kept, within `budget` per layer.")

    class Config(BudgetConfig):
        observation: int = Field(32, ge=1, le=4096, description="last prompt tokens whose attention scores entries")
        kernel: int = Field(7, ge=1, le=63, description="average-pooling width over the scores (odd)")

        @model_validator(mode="after")
        def _fits(self):
            if self.observation > self.budget:
                raise ValueError(f"observation ({self.observation}) must not exceed budget ({self.budget})")
            if self.kernel % 2 == 0:
                raise ValueError(f"kernel must be odd (got {self.kernel})")
            return self

    bench_config = {"budget": 128, "observation": 16}

    @hookimpl
    def effinfer_configure_system(self, stage: SystemStage) -> None:
        config = self.config
        install(stage, self, lambda: ObservationPolicy(config.budget, config.observation, config.kernel))
