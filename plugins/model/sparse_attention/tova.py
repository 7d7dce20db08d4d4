"""TOVA: token omission via attention (Oren et al., "Transformers are Multi-State RNNs",
arXiv:2401.06104).

A training-free bounded cache: at every forward, the entries are ranked by the attention the
*current* (last) query gives them, averaged over the query heads of each KV head, and the lowest
are dropped once the cache exceeds ``budget``. Unlike H2O nothing accumulates: the state is what
the present token finds useful.
"""

from __future__ import annotations

import torch
from pydantic import Field

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.kv_cache import attention_scores
from effinfer.core.stages import SystemStage
from effinfer.plugins.model.sparse_attention.eviction import BudgetConfig, EvictionPolicy, install


class LastQueryPolicy(EvictionPolicy):
    name = "tova"
    needs_queries = True

    def observe(self, queries: torch.Tensor | None, keys: torch.Tensor, new: int) -> None:
        total = keys.shape[-2]
        self.scores[..., :total] = attention_scores(queries[..., -1:, :], keys)


class TOVA(Technique):
    name = "tova"
    node = "model.compression.sparsification.sparse_attention.dynamic"
    paper = Paper(title="Transformers are Multi-State RNNs", year=2024, arxiv="2401.06104")
    summary = ("Token omission via attention: the KV cache (bounded at `budget`) drops the entries the current "
               "token attends to least.")

    class Config(BudgetConfig):
        window: int = Field(0, ge=0, description="newest entries always kept (the paper keeps none)")

    bench_config = {"budget": 128}

    @hookimpl
    def effinfer_configure_system(self, stage: SystemStage) -> None:
        if self.config.window > self.config.budget:
            raise ValueError(f"tova: window ({self.config.window}) exceeds budget ({self.config.budget})")
        install(stage, self, lambda: LastQueryPolicy(self.config.budget, self.config.window))
