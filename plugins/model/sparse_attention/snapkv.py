"""SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv:2404.14469).

The prompt is compressed by what its last ``observation`` tokens (the question, in a long-context
prompt) attend to: their attention over the earlier entries, summed over those queries and the
query heads of each KV head, is smoothed by average pooling (``kernel``) so that neighbours of a
hit stay with it; the top entries plus the observation window fill the ``budget``. By default
every forward of at least ``observation`` tokens (the prompt, or each chunk of a long one) re-scores
the cache; with ``after_prompt`` the whole prompt is kept until it is complete and compressed once
(a chunked prefill then keeps a fact the question asks about, which per-chunk compression drops);
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
    """``after_prompt``: keep the whole prompt, however many forwards feed it, and compress once, at the
    first forward of fewer than ``observation`` tokens (the first decode step) that comes while
    :attr:`paused` is off, scored by the prompt's last ``observation`` queries (the paper's mode). A
    caller that feeds a long prompt partly one token at a time sets ``paused`` until the prompt is in."""

    name = "snapkv"
    needs_queries = True

    def __init__(self, budget: int, observation: int, kernel: int, after_prompt: bool = False) -> None:
        super().__init__(budget, window=observation)
        self.observation, self.kernel = observation, kernel
        self.after_prompt = after_prompt
        self.paused = False
        self.compressed = False
        self.recent_queries: torch.Tensor | None = None  # after_prompt: the last `observation` queries seen

    def would_evict(self, new: int) -> bool:
        return not self.after_prompt or self.compressed or (new < self.observation and not self.paused)

    def before_evict(self) -> None:
        if self.after_prompt and not self.compressed:
            if self.n and self.recent_queries is not None:  # the slots are still in position order
                self.score(self.recent_queries, self.keys[..., :self.n, :])
            self.compressed = True

    def update(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.after_prompt and not self.compressed and self.would_evict(keys.shape[-2]):
            self.before_evict()  # the prompt is in: score it now, even if it still fits the budget
        return super().update(keys, values, queries)

    def observe(self, queries: torch.Tensor | None, keys: torch.Tensor, new: int) -> None:
        if self.after_prompt and not self.compressed:
            recent = queries if self.recent_queries is None else torch.cat([self.recent_queries, queries], dim=-2)
            self.recent_queries = recent[..., -self.observation:, :].clone()
            return
        if new >= self.observation:
            self.score(queries[..., -self.observation:, :], keys)

    def reset(self) -> None:
        super().reset()
        self.compressed = False

    def score(self, queries: torch.Tensor, keys: torch.Tensor) -> None:
        """Pooled attention of the observation ``queries`` (the last positions) over ``keys``."""
        total = keys.shape[-2]
        scores = attention_scores(queries, keys)
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
        after_prompt: bool = Field(False, description="compress once the whole prompt is in (the paper's mode), "
                                   "not after each forward of at least `observation` tokens (chunked prefill)")

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
        install(stage, self, lambda: ObservationPolicy(config.budget, config.observation, config.kernel,
                                                       config.after_prompt))
