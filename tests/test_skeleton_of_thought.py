"""Skeleton-of-Thought: router, skeleton parsing, batched expansion and the fallback to normal decoding."""

from __future__ import annotations

from effinfer.core.compose import ComposedModel
from effinfer.core.generation import GenerationConfig
from effinfer.core.stages import Request
from effinfer.core.testing import tiny_model
from effinfer.plugins.data.output_organization import skeleton_of_thought as sot


def test_router_accepts_list_questions_and_refuses_code_math_and_facts():
    assert sot.route("What are some tips for staying productive while working from home?")
    assert sot.route("How can I improve my time management skills?")
    assert not sot.route("Write a Python function that reverses a list.")
    assert not sot.route("Who was the first president of the United States?")
    assert not sot.route("Solve 12 + 35 = ?")
    assert not sot.route("What are the tips in the text?", has_documents=True)


def test_parse_skeleton():
    assert sot.parse_skeleton(" Plan the day\n2. Take breaks\n3) Avoid noise\nThat is all.", 6) == [
        "Plan the day", "Take breaks", "Avoid noise"]
    assert sot.parse_skeleton(" Only one\n", 6) == ["Only one"]


def test_points_are_expanded_as_one_batch(monkeypatch):
    model, tokenizer = tiny_model("llama")
    technique = sot.SkeletonOfThought({"skeleton_tokens": 8, "point_tokens": 5})
    monkeypatch.setattr(sot, "parse_skeleton", lambda text, n: ["First point", "Second point", "Third point"])
    batches = []
    with ComposedModel(model, tokenizer, [technique]) as composed:
        plain = composed.strategy.plain
        original = plain.generate

        def spy(model, ids, mask, config, stop, cache_factory=None):
            batches.append(ids.shape[0])
            return original(model, ids, mask, config, stop, cache_factory)

        monkeypatch.setattr(plain, "generate", spy)
        completions, _ = composed.generate([Request.from_text("What are some tips for sleeping well?")],
                                           GenerationConfig(max_new_tokens=16))
    assert batches == [1, 3]  # the skeleton, then the three points in one batch
    assert completions[0].text.startswith("1. First point") and "3. Third point" in completions[0].text
    assert technique.decisions == ["skeleton: 3 points"]


def test_refused_questions_decode_normally():
    model, tokenizer = tiny_model("qwen2")
    technique = sot.SkeletonOfThought()
    with ComposedModel(model, tokenizer, [technique]) as composed:
        sot_out, _ = composed.generate([Request.from_text("Who was Ada Lovelace?")], GenerationConfig(max_new_tokens=6))
    with ComposedModel(model, tokenizer, []) as composed:
        plain_out, _ = composed.generate([Request.from_text("Who was Ada Lovelace?")], GenerationConfig(max_new_tokens=6))
    assert sot_out[0].tokens == plain_out[0].tokens
    assert technique.decisions == ["router: normal decoding"]
