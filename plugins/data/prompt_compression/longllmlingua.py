"""LongLLMLingua: question-aware coarse-to-fine compression with document reordering.

Jiang et al., "LongLLMLingua: Accelerating and Enhancing LLMs in Long Context Scenarios via
Prompt Compression", ACL 2024, arXiv:2310.06839. As in the paper:

1. **Question-aware coarse compression** — each document ``d`` is scored by how well it
   predicts the question: the mean log-likelihood of the question tokens after ``d`` and
   the restrictive sentence "We can get the answer to this question in the given documents."
   (the paper's r_k, computed with the small LM).
2. **Document reordering** — documents are put in order of that score, most relevant first
   (LLMs use the beginning of the context best).
3. **Dynamic compression ratio** — in rank order, each document gets what is left of the
   budget: the top documents are kept whole, the one at the budget's edge is compressed at
   the token level, the rest are dropped.
4. **Question-aware fine compression** — the token level keeps the tokens with the highest
   contrastive score ``log p(x_i | question, x_<i) − log p(x_i | x_<i)`` plus their
   self-information (tokens the question makes more likely, and surprising ones).

The paper's subsequence recovery (mapping the target LM's output back to the original
wording) is not needed for the tasks here and is not implemented.
"""

from __future__ import annotations

import torch
from pydantic import Field

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.stages import DataStage, Request
from effinfer.plugins.data.prompt_compression.common import (BudgetConfig, budget_of, context_texts, count_tokens,
                                                             decode_kept, fit_to_budget, model_device, question_of,
                                                             token_information, unchanged, write_back)

RESTRICT = "We can get the answer to this question in the given documents."


@torch.inference_mode()
def question_scores(model, tokenizer, texts: list[str], question: str, max_tokens: int = 512) -> list[float]:
    """Mean log p(question | document, restrictive sentence) per document (higher: more relevant)."""
    q_ids = tokenizer(" " + question + " " + RESTRICT, add_special_tokens=False)["input_ids"][:128]
    device = model_device(model)
    scores = []
    for text in texts:
        d_ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        ids = torch.tensor([d_ids + q_ids], device=device)
        logits = model(input_ids=ids).logits[0, len(d_ids) - 1:-1].float()
        scores.append(float(logits.log_softmax(-1).gather(-1, ids[0, len(d_ids):, None]).mean()))
    return scores


def contrastive_keep(model, tokenizer, text: str, question: str, budget: int, weight: float) -> str:
    """``text`` cut to ``budget`` tokens by question-aware contrastive perplexity plus self-information."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if budget >= len(ids):
        return text
    if budget <= 0:
        return ""
    plain = token_information(model, ids)
    q_ids = tokenizer(question + "\n", add_special_tokens=False)["input_ids"]
    conditioned = token_information(model, ids, prefix=q_ids)
    plain_finite = torch.where(torch.isinf(plain), conditioned, plain)
    score = weight * (plain_finite - conditioned) + conditioned  # contrast + self-information given the question
    flags = [False] * len(ids)
    for i in torch.topk(score, budget).indices.tolist():
        flags[i] = True
    return decode_kept(tokenizer, ids, flags)


class LongLLMLingua(Technique):
    name = "longllmlingua"
    node = "data.input_compression.prompt_pruning"
    paper = Paper(title="LongLLMLingua: Accelerating and Enhancing LLMs in Long Context Scenarios via Prompt "
                        "Compression", year=2024, arxiv="2310.06839")
    summary = ("Question-aware coarse-to-fine compression: ranks documents by how well they predict the question, "
               "reorders them most relevant first, keeps the top ones whole and compresses the one at the budget's "
               "edge by question-conditioned contrastive perplexity.")
    lossless = False
    bench_config = {"rate": 0.33}

    class Config(BudgetConfig):
        reorder: bool = Field(True, description="put the kept documents in relevance order (most relevant first)")
        contrast_weight: float = Field(1.0, ge=0.0, le=10.0,
                                       description="weight of the contrastive term at the token level")

    @hookimpl
    def effinfer_transform_request(self, request: Request, stage: DataStage) -> None:
        texts, documents = context_texts(request)
        tokenizer = stage.tokenizer
        counts = [count_tokens(tokenizer, t) for t in texts]
        total = sum(counts)
        if unchanged(self.config, total):
            self.note(f"left a {total}-token context alone (rate {self.config.rate})")
            return
        budget = budget_of(self.config, total)
        question = question_of(request)
        scores = question_scores(stage.model, tokenizer, texts, question) if len(texts) > 1 else [0.0]
        ranking = sorted(range(len(texts)), key=lambda i: -scores[i])
        left, shares = budget, {}
        for index in ranking:  # dynamic ratio: whole documents in rank order, the edge one compressed
            shares[index] = min(counts[index], left)
            left -= shares[index]
        order = ranking if self.config.reorder else sorted(ranking)
        compressed = [contrastive_keep(stage.model, tokenizer, texts[i], question, shares[i],
                                       self.config.contrast_weight) if shares[i] else "" for i in order]
        priority = [order.index(i) for i in ranking]  # trim the least relevant first
        compressed = fit_to_budget(tokenizer, compressed, budget, priority=priority)
        write_back(request, compressed, documents)
        if documents and "retrieved" not in request.metadata:
            request.metadata["kept_documents"] = [i for i in order if shares[i] > 0]
        after = sum(count_tokens(tokenizer, t) for t in compressed)
        self.note(f"compressed {total} context tokens to {after} (budget {budget}); "
                  f"{sum(1 for s in shares.values() if s)}/{len(texts)} documents kept, most relevant first")
