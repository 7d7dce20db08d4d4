"""Retrieval returns the planted passage; recall@k; the budget holds."""

from __future__ import annotations

import pytest

from effinfer.core.stages import DataStage, Request
from effinfer.core.testing import tiny_model
from effinfer.plugins.data.prompt_compression.common import count_tokens
from effinfer.plugins.data.rag.retrieval import RAG, chunk, fuse, recall_at_k

DISTRACTORS = [
    "The orchestra rehearsed the symphony for three weeks before the premiere in the old opera house.",
    "Farmers in the valley grow barley and rye, and the harvest festival is held every September.",
    "The railway line was extended to the coast in 1902, which brought tourists to the small fishing town.",
    "Glaciers carved the fjords over thousands of years, leaving steep cliffs along the narrow inlets.",
    "The museum's collection includes bronze tools, painted pottery and a carved wooden canoe.",
]
PLANTED = "The lighthouse keeper Amelia Varga painted the lighthouse tower bright crimson in 1931."


@pytest.mark.parametrize("retriever", ["bm25", "dense", "hybrid"])
def test_retrieval_returns_the_planted_passage(retriever):
    model, tokenizer = tiny_model("llama")
    documents = DISTRACTORS[:3] + [PLANTED] + DISTRACTORS[3:]
    request = Request.from_text("What colour did Amelia Varga paint the lighthouse tower?", documents)
    technique = RAG({"retriever": retriever, "rate": 0.3, "min_tokens": 0, "chunk_tokens": 400, "top_k": 1})
    technique.effinfer_transform_request(request, DataStage(model, tokenizer))
    assert request.documents == [PLANTED]
    assert request.metadata["retrieved"] == [3]
    assert recall_at_k(request.metadata["retrieved"], 3, 1) == 1.0


def test_chunks_follow_sentences_and_budget_holds():
    model, tokenizer = tiny_model("llama")
    text = " ".join(DISTRACTORS)
    chunks = chunk(tokenizer, text, 150)
    assert " ".join(chunks) == text and len(chunks) > 1
    request = Request.from_text("When was the railway extended?", [text, PLANTED])
    technique = RAG({"rate": 0.4, "min_tokens": 0, "chunk_tokens": 100})
    technique.effinfer_transform_request(request, DataStage(model, tokenizer))
    total = count_tokens(tokenizer, text) + count_tokens(tokenizer, PLANTED)
    assert sum(count_tokens(tokenizer, d) for d in request.documents) <= int(0.4 * total)
    assert any("railway" in d for d in request.documents)


def test_reciprocal_rank_fusion():
    assert fuse([0, 1, 2], [2, 0, 1])[0] == 0
