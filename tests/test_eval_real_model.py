"""The quick suite on the real SmolLM2-135M: one technique against the baseline (about a minute)."""

from __future__ import annotations

import pytest

from effinfer.evaluation import Evaluator

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


def test_quick_suite_with_prompt_lookup_on_smollm2():
    with Evaluator("smollm2-135m-instruct", suite="quick", store=False) as evaluator:
        record = evaluator.evaluate(["prompt_lookup"])
    base = record.baseline
    assert base.ok and record.ok, (base.error, record.error)
    # DATA-SOURCES.md: ≈21 token perplexity on 1024-token windows; shorter windows score a little higher
    assert 15 < base.value("perplexity.wikipedia.token") < 35
    from effinfer.data.bigbench import unavailable_reason

    if unavailable_reason() is None:
        assert base.value("accuracy.mean.acc") > 0.3  # chance is about 0.2 on these two tasks
    else:  # the task files cannot be had here: the run says so instead of failing
        assert unavailable_reason() in base.notes and "accuracy.mean.acc" not in base.metrics
    assert 134_515_008 * 4 <= base.value("memory.weight_bytes") < 134_515_008 * 4 * 1.01  # tied embeddings once
    assert base.value("speed.p128_b1.decode_tok_s") > 0.5
    # a lossless decoding strategy: same greedy outputs, drafts accepted, perplexity copied
    assert record.value("fidelity.greedy_identical") == 1.0
    assert any(note.startswith("lossless claim verified") for note in record.notes)
    assert record.value("speculative.acceptance_rate") > 0
    assert record.metrics["perplexity.wikipedia.token"].inherited
    # speed side by side: the baseline re-timed next to the stack, ratios of adjacent rounds
    ratio = record.metrics["speed.p128_b1.decode_ratio"]
    assert ratio.n == 5 and ratio.low <= ratio.value <= ratio.high
    assert record.value("speed.p128_b1.baseline_decode_tok_s") > 0.5 and "speed.drift" in record.metrics
    assert record.value("generation.decode_ratio") > 0
    # the stack's model copy (0.5 GB) is released before the record is stored
    weights = base.value("memory.weight_bytes")
    assert record.value("memory.rss_after_release_bytes") < base.value("memory.rss_after_release_bytes") + weights / 4
