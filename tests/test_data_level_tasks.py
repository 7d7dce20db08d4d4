"""The data-level tasks: built from real corpus passages, scored by EM/F1 and ROUGE, run end to end."""

from __future__ import annotations

import time

import pytest

from effinfer.core.compose import ComposedModel
from effinfer.core.testing import tiny_model
from effinfer.evaluation.suites import SUITES, get_suite
from effinfer.evaluation.tasks_data_level import (DataTasksSpec, build_examples, qa_scores, rouge, run_example)


def test_qa_examples_quote_the_gold_passage_among_distractors():
    spec = DataTasksSpec(n_examples=6, passages=4)
    examples = build_examples(spec, "long_context_qa")
    assert len(examples) == 6
    for example in examples:
        documents = example.request.documents
        assert len(documents) == 4
        prefix = example.request.metadata["question"].strip('"')
        gold = documents[example.gold_document]
        assert f"{prefix} {example.answers[0]}" in gold or f"{prefix} " in gold
        assert sum(prefix in d for d in documents) == 1


def test_scores():
    assert qa_scores(" Paris, the capital", ["Paris"]) == (1.0, 1.0)
    assert qa_scores("London", ["Paris"]) == (0.0, 0.0)
    scores = rouge("the cat sat on the mat", ["the cat sat on the mat today"])
    assert scores["rouge1_precision"] == pytest.approx(1.0)


def test_bad_task_names_are_refused():
    with pytest.raises(ValueError, match="unknown data-level task"):
        DataTasksSpec(names=["squad"])


def test_the_data_suite_and_old_fingerprints():
    assert get_suite("data").data_tasks is not None
    assert "data_tasks" not in SUITES["quick"].model_dump(exclude_none=True)


@pytest.mark.parametrize("task", ["long_context_qa", "multi_doc_summary", "fewshot_bigbench"])
def test_every_task_runs_on_a_tiny_model(task, request):
    if task == "fewshot_bigbench":
        request.getfixturevalue("needs_bigbench")
    model, tokenizer = tiny_model("llama")
    spec = DataTasksSpec(n_examples=1, passages=2, passage_chars=300, demonstrations=2, max_new_tokens=2,
                         summary_tokens=4)
    example = build_examples(spec, task)[0]
    with ComposedModel(model, tokenizer, []) as composed:
        outcome = run_example(composed, example, spec, time.perf_counter)
    assert outcome.tokens_before == outcome.tokens_after > 0 and outcome.seconds > 0
    assert all(0.0 <= v <= 1.0 for v in outcome.score.values())
