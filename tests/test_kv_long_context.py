"""The evaluator's long-context section, on a tiny model through a KV-cache policy."""

from __future__ import annotations

import warnings

from effinfer.core.testing import tiny_llama
from effinfer.evaluation.evaluator import Evaluator
from effinfer.evaluation.suites import get_suite


def test_long_context_section_records_ppl_needle_kv_bytes_and_speed(tmp_path, registry):
    suite = get_suite("tiny").with_changes(tasks=None, long_context={"context": 400, "marks": [200],
                                                                      "depths": [0.5]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with Evaluator(tiny_llama(layers=2, seed=0), suite=suite, store=tmp_path / "r.db", registry=registry,
                       model_name="tiny") as ev:
            base = ev.evaluate([])
            kivi = ev.evaluate([{"name": "kivi", "config": {"bits": 2, "group": 16}}])
            stream = ev.evaluate([{"name": "streaming_llm", "config": {"budget": 64}}])
    for record in (base, kivi, stream):
        assert record.status == "ok", record.error
        for name in ("long.ppl.c200", "long.ppl.c368", "long.needle.c400", "long.decode_tok_s.c368",
                     "long.kv_bytes_per_token.c368"):
            assert name in record.metrics, (name, sorted(record.metrics))
    full_bytes = base.metrics["long.kv_bytes_per_token.c368"].value
    assert kivi.metrics["long.kv_bytes_per_token.c368"].value < full_bytes / 4
    assert stream.metrics["long.kv_bytes_per_token.c368"].value < full_bytes / 2  # 64 kept + 64 slack slots of 384


def test_qa_questions_keep_away_from_the_needle_sentence():
    from effinfer.evaluation.tasks_long_context import NEEDLE, QA_MARGIN, cloze_questions

    filler = [f"and so we went along the road {i} to visit Alonso {i}, then home" for i in range(120)]
    needle = NEEDLE.format(code="123456")
    text = " ".join(filler[:60] + [needle] + filler[60:])
    at = text.find(needle)
    depth = (at - 300) / len(text)  # the draw starts just before the needle
    near = cloze_questions(text, [depth], seed=0)
    assert near and abs(text.find(near[0][0]) - at) < QA_MARGIN  # without `avoid`, the quote sits by the needle
    for quote, word in cloze_questions(text, [depth, 0.1, 0.9], seed=0, avoid=needle):
        position = text.find(quote)
        assert position + len(quote) < at - QA_MARGIN or position > at + len(needle) + QA_MARGIN, (quote, at)
        assert f"{quote} {word}" in text
