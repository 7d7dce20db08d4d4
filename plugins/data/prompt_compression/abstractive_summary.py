"""Abstractive prompt summary: the model summarises each document for the question (RECOMP-style).

Xu et al., "RECOMP: Improving Retrieval-Augmented LMs with Compression and Selective
Augmentation", ICLR 2024, arXiv:2310.04408: an abstractive compressor writes a query-focused
summary of the retrieved documents, which replaces them in the prompt. RECOMP trains a T5
compressor by distillation; no seq2seq summariser is reachable here, so the summariser is the
experiment's own model, prompted per document and batched (all documents summarised in one batched greedy decode).
The summarisation time is part of the data stage, hence of the end-to-end latency the
data-level tasks record. Each summary gets its document's share of the budget as its
``max_new_tokens`` (so the budget holds by construction, then exactly after re-tokenizing).
"""

from __future__ import annotations

from pydantic import Field

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.generation import GenerationConfig, PlainDecoding, encode_prompts, stop_token_ids
from effinfer.core.stages import DataStage, Request
from effinfer.plugins.data.prompt_compression.common import (BudgetConfig, budget_of, context_texts, count_tokens,
                                                             fit_to_budget, model_device, question_of, unchanged,
                                                             write_back)

PROMPT = ("Summarise the passage below in one or two short sentences, keeping the facts (names, numbers) "
          "that help answer: {question}\n\nPassage: {passage}")


class AbstractiveSummary(Technique):
    name = "abstractive_summary"
    node = "data.input_compression.prompt_summary"
    paper = Paper(title="RECOMP: Improving Retrieval-Augmented LMs with Compression and Selective Augmentation",
                  year=2024, arxiv="2310.04408")
    summary = ("The model writes a short question-focused summary of every document (one batched greedy decode) "
               "and the summaries replace the documents; each summary is capped at its share of the budget.")
    lossless = False
    bench_config = {"rate": 0.33}

    class Config(BudgetConfig):
        max_summary_tokens: int = Field(96, ge=4, le=1024, description="cap on one summary's length")

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
        share = max(1, min(self.config.max_summary_tokens, budget // max(len(texts), 1)))
        question = question_of(request)
        prompts = [PROMPT.format(question=question, passage=t) for t in texts]
        ids, mask = encode_prompts(tokenizer, prompts, True, model_device(stage.model))
        config = GenerationConfig(max_new_tokens=share)
        result = PlainDecoding().generate(stage.model, ids, mask, config, stop_token_ids(tokenizer, stage.model, config))
        summaries = [tokenizer.decode(s, skip_special_tokens=True).strip() for s in result.sequences]
        summaries = fit_to_budget(tokenizer, summaries, budget)
        write_back(request, summaries, documents)
        self.note(f"summarised {len(texts)} document(s): {total} → {sum(count_tokens(tokenizer, s) for s in summaries)} "
                  f"context tokens (budget {budget}) in {result.prefill_seconds + result.decode_seconds:.2f} s")
