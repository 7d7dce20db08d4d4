"""Bench memory stays bounded: each stack's model copy and caches are released before the next.

A bench of many stacks on a small model: no model object outlives its stack (only the given
model and the baseline kept for side-by-side timing remain), and the resident set after the
last stack is about what it was after the first round of stacks.
"""

from __future__ import annotations

import gc

import pytest
import torch

from effinfer.core.testing import tiny_llama
from effinfer.evaluation import Evaluator, get_suite
from effinfer.evaluation.metrics import memory
from effinfer.evaluation.metrics.timing import torch_threads

MIB = 2**20
# perplexity, fidelity, speed and generation (what keeps tensors and caches); no tasks, no roofline
SUITE = get_suite("tiny").with_changes(name="tiny-memory", tasks=None, roofline=None)
ROUND = [["rtn"], ["prompt_lookup"], ["selective_context:ratio=0.5"], ["rtn:bits=8"]]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def model():
    # ~26 MB of float32 weights: a leaked copy per stack is far above the allocator's noise
    return tiny_llama(layers=4, hidden=384, heads=6, kv_heads=2, intermediate=1024, seed=0)


def live_models() -> list[torch.nn.Module]:
    gc.collect()
    return [o for o in gc.get_objects() if type(o).__name__ == "LlamaForCausalLM"]


def test_no_model_copy_outlives_its_stack(model):
    with Evaluator(model, suite=SUITE, store=False) as ev:
        result = ev.sweep(ROUND)
        assert all(r.ok for r in result.runs), [r.error for r in result.runs]
        holding_weights = [m for m in live_models() if memory.weight_bytes(m) > 0]
        # the model given to the evaluator and the baseline kept as the side-by-side peer
        assert len(holding_weights) == 2, [id(m) for m in holding_weights]
        assert any(m is model[0] for m in holding_weights)
        assert any(m is ev._peer.composed.model for m in holding_weights)
    assert ev._peer is None  # closing the evaluator releases the baseline too


def test_rss_after_many_stacks_is_about_rss_after_one_round(model):
    if memory.rss_bytes() is None:
        pytest.skip("no /proc/self/status: current RSS cannot be read here")
    weights = memory.weight_bytes(model[0])
    with Evaluator(model, suite=SUITE, store=False) as ev:
        result = ev.sweep(ROUND * 3)
    assert all(r.ok for r in result.runs), [r.error for r in result.runs]
    after = [r.value("memory.rss_after_release_bytes") for r in result.runs]
    first_round, last = max(after[:len(ROUND)]), after[-1]
    # Tolerance: two model copies plus 16 MiB. Without the release each stack left its copy
    # (and its static KV buffers) behind, so eight more stacks would add ≥ 8 copies (~200 MiB);
    # what remains after the release is allocator slack (glibc arenas, even after malloc_trim),
    # torch's and lm-eval's lazily built caches: a few MiB measured, well under one copy.
    assert last - first_round < 2 * weights + 16 * MIB, (
        f"RSS grew {(last - first_round) / MIB:.0f} MiB over {len(after) - len(ROUND)} stacks "
        f"(model {weights / MIB:.0f} MiB): {[round(a / MIB) for a in after]}")
    bench = result.environment["bench_memory"]
    assert bench["peak_rss_bytes"] >= max(after) and len(bench["rss_after_release_bytes"]) >= len(ROUND)
