"""LLMLingua: coarse-to-fine prompt compression by a small LM's perplexity.

Jiang et al., "LLMLingua: Compressing Prompts for Accelerated Inference of Large Language
Models", EMNLP 2023, arXiv:2310.05736. Three parts, as in the paper:

1. **Budget controller** — the documents (demonstrations) are ranked by their perplexity
   under the small LM and the most perplexing (most informative) ones are kept, in their
   original order, until they hold ``granular_factor ×`` the token budget; the rest is dropped
   whole. The instruction/question (the user message) is never compressed.
2. **Iterative token-level prompt compression (ITPC)** — the kept text is cut into segments;
   each segment's tokens are scored by self-information *conditional on the already
   compressed prefix* (a KV cache holds only the kept tokens), and the least informative
   tokens of the segment are dropped to reach the remaining rate.
3. The paper's distribution alignment (instruction-tuning the small LM on the target LM's
   outputs) is not needed here: the small LM is the experiment's own model.

The small LM is the experiment's model (``DataStage.model``); the compressed documents are
cut to the budget exactly (:func:`~.common.fit_to_budget`).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.stages import DataStage, Request
from effinfer.plugins.data.prompt_compression.common import (BudgetConfig, PrefixScorer, budget_of, context_texts,
                                                             count_tokens, decode_kept, fit_to_budget, token_information,
                                                             unchanged, write_back)

PAPER = Paper(title="LLMLingua: Compressing Prompts for Accelerated Inference of Large Language Models",
              year=2023, arxiv="2310.05736")


def perplexity(model, ids: list[int]) -> float:
    """Token perplexity of ``ids`` under ``model`` (the first token unconditioned is left out)."""
    if len(ids) < 2:
        return 0.0
    info = token_information(model, ids)[1:]
    return float(torch.exp(info.mean()))


def budget_controller(model, tokenizer, texts: list[str], budget: int, factor: float) -> list[int]:
    """Indices of the documents kept (original order): highest perplexity first, up to ``factor × budget`` tokens."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    ranking = sorted(range(len(texts)), key=lambda i: -perplexity(model, ids[i][:512]))
    kept, total = [], 0
    for index in ranking:
        if total >= factor * budget:
            break
        kept.append(index)
        total += len(ids[index])
    return sorted(kept)


def iterative_compress(model, tokenizer, texts: list[str], budget: int, segment: int) -> list[str]:
    """ITPC over ``texts`` (one stream, a KV cache of the kept tokens): about ``budget`` tokens kept in all."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    total = sum(len(i) for i in ids)
    rate = budget / max(total, 1)
    scorer = PrefixScorer(model)
    separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    out = []
    carry = 0.0  # fractional tokens owed between segments, so the rate holds over the stream
    for number, doc in enumerate(ids):
        if number:
            scorer.keep(separator)
        keep_flags: list[bool] = []
        for start in range(0, len(doc), segment):
            piece = doc[start:start + segment]
            carry += rate * len(piece)
            k = min(len(piece), int(math.floor(carry)))
            carry -= k
            info = scorer.score(piece)
            flags = [False] * len(piece)
            for i in torch.topk(info, k).indices.tolist() if k else []:
                flags[i] = True
            scorer.keep([t for t, f in zip(piece, flags) if f])
            keep_flags += flags
        out.append(decode_kept(tokenizer, doc, keep_flags))
    return out


class LLMLingua(Technique):
    name = "llmlingua"
    node = "data.input_compression.prompt_pruning"
    paper = PAPER
    summary = ("Budget controller over the demonstrations (keeps the most perplexing ones), then iterative "
               "token-level compression: each segment's tokens are scored by a small LM's self-information "
               "conditional on the already compressed prefix and the least informative are dropped.")
    lossless = False
    bench_config = {"rate": 0.33}
    bench_compositions = ("llmlingua+rtn+prompt_lookup",)

    class Config(BudgetConfig):
        granular_factor: float = Field(2.0, ge=1.0, le=10.0,
                                       description="the budget controller keeps documents up to this × the budget "
                                                   "(the token level compresses the rest)")
        segment_tokens: int = Field(64, ge=4, le=1024, description="tokens per ITPC segment")
        budget_controller: bool = Field(True, description="drop whole documents first (several documents only)")

    @hookimpl
    def effinfer_transform_request(self, request: Request, stage: DataStage) -> None:
        texts, documents = context_texts(request)
        tokenizer = stage.tokenizer
        total = sum(count_tokens(tokenizer, t) for t in texts)
        if unchanged(self.config, total):
            self.note(f"left a {total}-token context alone (rate {self.config.rate}, min_tokens "
                      f"{self.config.min_tokens})")
            return
        budget = budget_of(self.config, total)
        kept = list(range(len(texts)))
        if self.config.budget_controller and len(texts) > 1:
            kept = budget_controller(stage.model, tokenizer, texts, budget, self.config.granular_factor)
        compressed = iterative_compress(stage.model, tokenizer, [texts[i] for i in kept], budget,
                                        self.config.segment_tokens)
        compressed = fit_to_budget(tokenizer, compressed, budget)
        after = sum(count_tokens(tokenizer, t) for t in compressed)
        write_back(request, compressed, documents)
        self.note(f"compressed {total} context tokens to {after} (budget {budget}; kept {len(kept)}/{len(texts)} "
                  "documents)")

