"""Retrieval-augmented generation over the request's documents: chunk, retrieve, fit to a budget.

Lewis et al., "Retrieval-Augmented Generation for Knowledge-Intensive NLP Tasks", NeurIPS 2020,
arXiv:2005.11401 (retrieve, then condition the generator on the retrieved text); BM25 is
Robertson & Zaragoza, "The Probabilistic Relevance Framework: BM25 and Beyond" (2009), here the
``bm25s`` package (Lù, arXiv:2407.03618); dense retrieval embeds chunks and query with
all-MiniLM-L6-v2 (:mod:`effinfer.plugins.data.encoder`) and ranks by cosine similarity.

The request's documents are the collection: each is cut into chunks of about ``chunk_tokens``
model tokens at sentence ends; chunks are scored against the question (``metadata['question']``
or the last user message) by BM25, by dense similarity, or by both (``hybrid``: reciprocal
rank fusion, Cormack et al. 2009); optionally the top candidates are reranked by the
experiment's own LM (log-likelihood of the question after the chunk). The best chunks are
taken, in rank order, while they fit the token budget (``top_k`` at most), and become the
request's documents; which document each came from is left in ``metadata['retrieved']``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.stages import DataStage, Request
from effinfer.plugins.data.prompt_compression.common import (BudgetConfig, budget_of, count_tokens, fit_to_budget,
                                                             question_of, unchanged)
from effinfer.plugins.data.prompt_compression.longllmlingua import question_scores

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def chunk(tokenizer: Any, text: str, chunk_tokens: int) -> list[str]:
    """Consecutive sentence groups of about ``chunk_tokens`` tokens (a longer sentence is its own chunk)."""
    chunks, current, size = [], [], 0
    for sentence in filter(None, (s.strip() for s in SENTENCE_END.split(text))):
        n = count_tokens(tokenizer, sentence)
        if current and size + n > chunk_tokens:
            chunks.append(" ".join(current))
            current, size = [], 0
        current.append(sentence)
        size += n
    if current:
        chunks.append(" ".join(current))
    return chunks


def bm25_scores(chunks: list[str], query: str) -> list[float]:
    import bm25s

    index = bm25s.BM25()
    try:
        index.index(bm25s.tokenize(chunks, return_ids=False, show_progress=False), show_progress=False)
    except ValueError:  # nothing but stopwords in every chunk: no term to score
        return [0.0] * len(chunks)
    query_tokens = bm25s.tokenize([query], return_ids=False, show_progress=False)[0]
    if not query_tokens:
        return [0.0] * len(chunks)
    return [float(s) for s in index.get_scores(query_tokens)]


def dense_scores(chunks: list[str], query: str) -> list[float]:
    from effinfer.plugins.data.encoder import embed

    vectors = embed(chunks + [query])
    return (vectors[:-1] @ vectors[-1]).tolist()


def rank(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def fuse(*rankings: list[int], k: int = 60) -> list[int]:
    """Reciprocal rank fusion of several rankings of the same items."""
    score: dict[int, float] = {}
    for ranking in rankings:
        for position, item in enumerate(ranking):
            score[item] = score.get(item, 0.0) + 1.0 / (k + position + 1)
    return sorted(score, key=lambda i: -score[i])


class RAG(Technique):
    name = "rag"
    node = "data.input_compression.rag"
    paper = Paper(title="Retrieval-Augmented Generation for Knowledge-Intensive NLP Tasks", year=2020,
                  arxiv="2005.11401")
    summary = ("Chunks the request's documents, retrieves the chunks most relevant to the question by BM25, "
               "MiniLM dense similarity or both (reciprocal rank fusion), optionally reranks them with the LM, "
               "and keeps the best ones that fit a token budget.")
    lossless = False
    bench_config = {"rate": 0.33, "retriever": "bm25"}
    bench_compositions = ("rag+rtn+prompt_lookup",)

    class Config(BudgetConfig):
        retriever: Literal["bm25", "dense", "hybrid"] = Field("bm25", description="how chunks are scored")
        chunk_tokens: int = Field(96, ge=8, le=4096, description="tokens per chunk (sentence-aligned)")
        top_k: int = Field(8, ge=1, le=256, description="at most this many chunks are kept")
        rerank: int = Field(0, ge=0, le=64, description="rerank this many top candidates by the LM's "
                                                        "log-likelihood of the question (0: no reranking)")
        original_order: bool = Field(False, description="put the kept chunks back in document order")

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        if self.config.retriever in ("bm25", "hybrid"):
            try:
                import bm25s  # noqa: F401
            except ImportError:
                raise ValueError(f"rag retriever={self.config.retriever!r} needs the bm25s package: "
                                 "pip install 'effinfer[data]' (or use retriever=dense)") from None

    @hookimpl
    def effinfer_transform_request(self, request: Request, stage: DataStage) -> None:
        if not request.documents:
            self.note("no documents to retrieve from; the request is left alone")
            return
        tokenizer = stage.tokenizer
        total = sum(count_tokens(tokenizer, d) for d in request.documents)
        if unchanged(self.config, total):
            self.note(f"left a {total}-token context alone (rate {self.config.rate})")
            return
        budget = budget_of(self.config, total)
        question = question_of(request)
        chunks, origin = [], []
        for number, document in enumerate(request.documents):
            for piece in chunk(tokenizer, document, self.config.chunk_tokens):
                chunks.append(piece)
                origin.append(number)
        order = self.ranking(chunks, question)
        if self.config.rerank:
            head = order[:self.config.rerank]
            lm = question_scores(stage.model, tokenizer, [chunks[i] for i in head], question)
            order = [head[i] for i in rank(lm)] + order[self.config.rerank:]
        kept, used = [], 0
        for index in order:
            if len(kept) >= self.config.top_k:
                break
            n = count_tokens(tokenizer, chunks[index])
            if used + n <= budget:
                kept.append(index)
                used += n
        if not kept:  # the best chunk alone is over the budget: keep its head
            kept = order[:1]
        if self.config.original_order:
            kept.sort()
        texts = fit_to_budget(tokenizer, [chunks[i] for i in kept], budget)
        request.documents = [t for t in texts if t.strip()]
        request.metadata["retrieved"] = [origin[i] for i in kept]
        self.note(f"kept {len(kept)} of {len(chunks)} chunks ({self.config.retriever}): {total} → "
                  f"{sum(count_tokens(tokenizer, t) for t in texts)} context tokens (budget {budget})")

    def ranking(self, chunks: list[str], question: str) -> list[int]:
        if self.config.retriever == "bm25":
            return rank(bm25_scores(chunks, question))
        if self.config.retriever == "dense":
            return rank(dense_scores(chunks, question))
        return fuse(rank(bm25_scores(chunks, question)), rank(dense_scores(chunks, question)))


def recall_at_k(retrieved: list[int], gold: int, k: int) -> float:
    """1 when the gold document is among the first ``k`` retrieved chunks' documents."""
    return float(gold in retrieved[:k])


__all__ = ["RAG", "bm25_scores", "chunk", "dense_scores", "fuse", "rank", "recall_at_k"]
