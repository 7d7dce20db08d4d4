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
