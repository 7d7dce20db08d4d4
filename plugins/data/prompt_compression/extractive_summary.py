"""Extractive prompt summary: the most central (and question-relevant) sentences, to a token budget.

Sentence ranking by centrality in the spirit of LexRank (Erkan & Radev, "LexRank: Graph-based
Lexical Centrality as Salience in Text Summarization", JAIR 2004, arXiv:1109.2128), with
sentence embeddings (all-MiniLM-L6-v2, :mod:`effinfer.plugins.data.encoder`) instead of
TF-IDF vectors, as in extractive RECOMP (Xu et al., "RECOMP: Improving Retrieval-Augmented
LMs with Compression and Selective Augmentation", ICLR 2024, arXiv:2310.04408), whose
extractive compressor ranks sentences by embedding similarity to the query.

Each sentence of the context gets ``centrality`` (PageRank over the cosine-similarity graph of
all sentences) mixed with its similarity to the question (``question_weight``); the best
sentences are kept while they fit the budget, and put back in their original order.
"""

from __future__ import annotations

import re

import torch
from pydantic import Field

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.stages import DataStage, Request
from effinfer.plugins.data.prompt_compression.common import (BudgetConfig, budget_of, context_texts, count_tokens,
                                                             fit_to_budget, question_of, unchanged, write_back)

SENTENCE = re.compile(r"[^.!?\n]+(?:[.!?]+|\n+|$)\s*")


def sentences_of(text: str) -> list[str]:
    return [m.group() for m in SENTENCE.finditer(text) if m.group().strip()]


def centrality(vectors: torch.Tensor, damping: float = 0.85, iterations: int = 50) -> torch.Tensor:
    """PageRank of the cosine-similarity graph (negative similarities cut to 0)."""
    n = len(vectors)
    if n == 1:
        return torch.ones(1)
    sim = (vectors @ vectors.T).clamp(min=0)
    sim.fill_diagonal_(0)
    transition = sim / sim.sum(1, keepdim=True).clamp(min=1e-9)
    rank = torch.full((n,), 1.0 / n)
    for _ in range(iterations):
        rank = (1 - damping) / n + damping * transition.T @ rank
    return rank * n


class ExtractiveSummary(Technique):
    name = "extractive_summary"
    node = "data.input_compression.prompt_summary"
    paper = Paper(title="RECOMP: Improving Retrieval-Augmented LMs with Compression and Selective Augmentation",
                  year=2024, arxiv="2310.04408")
    summary = ("Keeps the sentences that are most central (PageRank over MiniLM sentence-embedding similarities) "
               "and most similar to the question, up to a token budget, in their original order.")
    lossless = False
    bench_config = {"rate": 0.33}

    class Config(BudgetConfig):
        question_weight: float = Field(0.5, ge=0.0, le=1.0,
                                       description="weight of question similarity against centrality")

    @hookimpl
    def effinfer_transform_request(self, request: Request, stage: DataStage) -> None:
        from effinfer.plugins.data.encoder import embed

        texts, documents = context_texts(request)
        tokenizer = stage.tokenizer
        total = sum(count_tokens(tokenizer, t) for t in texts)
        if unchanged(self.config, total):
            self.note(f"left a {total}-token context alone (rate {self.config.rate})")
            return
        budget = budget_of(self.config, total)
        units = [(d, s) for d, text in enumerate(texts) for s in sentences_of(text)]
        vectors = embed([s for _, s in units] + [question_of(request)])
        central = centrality(vectors[:-1])
        relevance = vectors[:-1] @ vectors[-1]
        w = self.config.question_weight
        score = (1 - w) * central / central.max().clamp(min=1e-9) + w * relevance
        kept, used = set(), 0
        for index in score.argsort(descending=True).tolist():
            n = count_tokens(tokenizer, units[index][1])
            if used + n <= budget:
                kept.add(index)
                used += n
        compressed = ["".join(s for i, (d, s) in enumerate(units) if d == number and i in kept).strip()
                      for number in range(len(texts))]
        compressed = fit_to_budget(tokenizer, compressed, budget)
        write_back(request, compressed, documents)
        self.note(f"kept {len(kept)}/{len(units)} sentences: {total} → "
                  f"{sum(count_tokens(tokenizer, t) for t in compressed)} context tokens (budget {budget})")
