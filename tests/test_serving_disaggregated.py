"""Disaggregated prefill/decode: the co-located engine's greedy tokens, the handed-off KV, no leaked blocks."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from test_serving import _greedy_alone  # tests/ is on sys.path (pytest rootdir-relative imports)

from effinfer.core.testing import tiny_model
from effinfer.plugins.system.serving.disaggregated import (DecodeWorker, DisaggregatedConfig, DisaggregatedServer,
                                                           PrefillWorker)
from effinfer.plugins.system.serving.engine import ContinuousBatchingEngine, EngineConfig, ServeRequest


def _prompts(vocab: int, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _colocated(model, prompts, lengths, eos=None):
    engine = ContinuousBatchingEngine(model, EngineConfig(block_size=4, num_blocks=200, max_batched_tokens=32),
                                      eos_ids=eos)
    requests = [ServeRequest(str(i), p, max_tokens=n) for i, (p, n) in enumerate(zip(prompts, lengths))]
    for request in requests:
        engine.add(request)
    engine.run_until_done()
    return [r.output for r in requests]


def _local(model, prefill_blocks=64, decode_blocks=40, **decode):
    config = DisaggregatedConfig(
        runner="local",
        prefill=EngineConfig(block_size=4, num_blocks=prefill_blocks, max_batched_tokens=16, max_num_seqs=4),
        decode=EngineConfig(block_size=4, num_blocks=decode_blocks, **({"max_num_seqs": 3} | decode)))
    return DisaggregatedServer(model, config)


def _assert_no_leak(server):
    for role, state in server.blocks(clear_prefix_cache=True).items():
        assert state["free"] == state["total"] and state["tables"] == 0, role


def _requests(prompts, lengths):
    return [ServeRequest(str(i), p, max_tokens=n) for i, (p, n) in enumerate(zip(prompts, lengths))]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_disaggregated_gives_the_colocated_greedy_tokens(family):
    """Batched chunked prefills, handoffs waiting for decode blocks and slots, a shared prefix, max_tokens=1."""
    model, _ = tiny_model(family)
    shared = _prompts(model.config.vocab_size, [20], seed=1)[0]
    prompts = _prompts(model.config.vocab_size, [5, 40, 17, 3, 33]) + [shared + [7, 8], shared + [9]]
    lengths = [12, 4, 9, 1, 6, 11, 8]
    expected = _colocated(model, prompts, lengths)
    assert expected == [_greedy_alone(model, p, n) for p, n in zip(prompts, lengths)]  # and each alone
    server = _local(model)
    records = server.generate(_requests(prompts, lengths))
    assert [r.output for r in records] == expected
    assert [r.finish_reason for r in records] == ["length"] * len(prompts)
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 4
    assert [r.kv_bytes for r in records] == [0 if n == 1 else len(p) * kv_per_token for p, n in zip(prompts, lengths)]
    assert all(r.handoff_s is not None and r.handoff_s >= r.transfer_s >= 0 for r, n in zip(records, lengths) if n > 1)
    _assert_no_leak(server)


@settings(max_examples=8, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30), st.integers(1, 10)), min_size=1, max_size=5),
       st.integers(2, 6), st.integers(1, 4))
def test_disaggregated_matches_colocated_for_any_mix(shapes, block, max_seqs):
    """Any prompt lengths / output lengths / block size / decode slots: same tokens, every block back."""
    model, _ = tiny_model("llama", layers=1)
    prompts = _prompts(model.config.vocab_size, [n for n, _ in shapes], seed=len(shapes))
    lengths = [m for _, m in shapes]
    config = DisaggregatedConfig(runner="local",
                                 prefill=EngineConfig(block_size=block, num_blocks=40, max_batched_tokens=8),
                                 decode=EngineConfig(block_size=block, num_blocks=30, max_num_seqs=max_seqs))
    server = DisaggregatedServer(model, config)
    assert [r.output for r in server.generate(_requests(prompts, lengths))] == _colocated(model, prompts, lengths)
    _assert_no_leak(server)


class _Sink:
    def __init__(self):
        self.handoffs = []

    def call(self, method, handoffs):
        assert method == "admit"
        self.handoffs += handoffs


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_handed_off_kv_equals_the_colocated_prefill_kv(family):
    model, _ = tiny_model(family)
    prompts = _prompts(model.config.vocab_size, [13, 29])
    worker = PrefillWorker(model, EngineConfig(block_size=4, num_blocks=64, max_batched_tokens=16))
    sink = _Sink()
    worker.connect(sink)
    worker.submit(_requests(prompts, [5, 5]))
    while worker.engine.has_work():
        worker.step()
    handoffs = {h.request.id: h for h in sink.handoffs}
    for i, prompt in enumerate(prompts):
        engine = ContinuousBatchingEngine(model, EngineConfig(block_size=4, num_blocks=64))
        engine.add(ServeRequest("x", prompt, max_tokens=3))
        engine.step()  # the whole prompt in one iteration; its KV stays in the pool while decoding
        slots = engine.cache.slots_of("x", 0, len(prompt))
        handoff = handoffs[str(i)]
        assert handoff.keys.device.type == "cpu" and handoff.keys.shape[1] == len(prompt)
        torch.testing.assert_close(handoff.keys, engine.cache.keys[:, slots], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(handoff.values, engine.cache.values[:, slots], atol=1e-5, rtol=1e-5)
        assert handoff.request.output == engine.running[0].output
    if family == "llama":  # and Hugging Face's own cache of the prompt
        with torch.inference_mode():
            cache = model(torch.tensor([prompts[1]]), use_cache=True).past_key_values
        for layer in range(model.config.num_hidden_layers):
            hf_keys = cache.layers[layer].keys if hasattr(cache, "layers") else cache.key_cache[layer]
            torch.testing.assert_close(handoffs["1"].keys[layer], hf_keys[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_a_request_that_stops_at_its_first_token_finishes_on_the_prefill_worker():
    model, _ = tiny_model("llama")
    prompt = _prompts(model.config.vocab_size, [11])[0]
    first = _colocated(model, [prompt], [1])[0][0]
    config = DisaggregatedConfig(runner="local")
    server = DisaggregatedServer(model, config, eos_ids={first})
    stopped, ignoring = server.generate([ServeRequest("a", prompt, max_tokens=6),
                                         ServeRequest("b", prompt, max_tokens=6, ignore_eos=True)])
    assert (stopped.output, stopped.finish_reason, stopped.kv_bytes) == ([first], "stop", 0)
    assert ignoring.output == _colocated(model, [prompt], [6])[0] and ignoring.kv_bytes > 0


def test_refusals_and_bad_config_name_the_fix(monkeypatch):
    from pydantic import ValidationError

    from effinfer.plugins.system.serving import disaggregated

    model, _ = tiny_model("llama", layers=1)
    server = _local(model, decode_blocks=4)
    too_long, fine = server.generate([ServeRequest("big", [5] * 10, max_tokens=20), ServeRequest("ok", [5] * 3, 2)])
    assert too_long.finish_reason == "error" and "raise kv_cache_mb" in too_long.error
    assert fine.finish_reason == "length" and len(fine.output) == 2
    _assert_no_leak(server)
    with pytest.raises(ValidationError, match="threads"):
        DisaggregatedConfig(threads=0)
    monkeypatch.setattr(disaggregated, "ray_available", lambda: False)
    with pytest.raises(ValueError, match=r"pip install -e '\.\[ray\]'"):
        DisaggregatedServer(model, DisaggregatedConfig(runner="ray"))
    assert DisaggregatedServer(model, DisaggregatedConfig(runner="auto")).runner == "local"


def test_time_limit_aborts_what_is_left_and_frees_its_blocks():
    model, _ = tiny_model("llama", layers=1)
    prompts = _prompts(model.config.vocab_size, [9, 9])
    server = _local(model, decode_blocks=600)
    records, _ = server.serve([(0.0, ServeRequest("a", prompts[0], max_tokens=2000)),
                               (60.0, ServeRequest("c", prompts[1], max_tokens=3))], time_limit=0.5)
    assert [r.finish_reason for r in records] == ["abort", "unfinished"]
    assert 1 <= len(records[0].output) < 2000
    _assert_no_leak(server)


@pytest.mark.real_model
def test_disaggregated_smollm2_gives_the_colocated_tokens(smollm2):
    model, tokenizer = smollm2
    texts = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    expected = _colocated(model, prompts, [8, 8, 8])
    server = DisaggregatedServer(model, DisaggregatedConfig(runner="local"))
    records = server.generate(_requests(prompts, [8, 8, 8]))
    assert [r.output for r in records] == expected
    assert "Paris" in tokenizer.decode(records[0].output)
    assert records[0].kv_bytes == len(prompts[0]) * 2 * 30 * 3 * 64 * 4
    _assert_no_leak(server)


@pytest.mark.slow  # Ray starts in ~20 s (skipped without Ray: pip install -e '.[ray]')
def test_workers_as_ray_actors_give_the_colocated_tokens():
    ray = pytest.importorskip("ray")
    model, _ = tiny_model("llama")
    prompts = _prompts(model.config.vocab_size, [14, 30])
    expected = _colocated(model, prompts, [6, 9])
    try:
        with DisaggregatedServer(functools.partial(tiny_model, "llama"), DisaggregatedConfig(runner="ray")) as server:
            records = server.generate(_requests(prompts, [6, 9]))
            assert [r.output for r in records] == expected
            assert all(r.kv_bytes > 0 and r.handoff_s >= 0 for r in records)
            _assert_no_leak(server)
        with pytest.raises(RuntimeError, match="need 64 CPU"):  # workers Ray cannot place: refused, not a hang
            DisaggregatedServer(model, DisaggregatedConfig(runner="ray", threads=64, start_timeout_s=3))
    finally:
        ray.shutdown()


def test_decode_worker_waits_for_blocks_in_order():
    """Handoffs that do not fit now stay queued (in order) and are admitted as decodes free blocks."""
    model, _ = tiny_model("llama", layers=1)
    prompts = _prompts(model.config.vocab_size, [12, 12, 12])
    prefill = PrefillWorker(model, EngineConfig(block_size=4, num_blocks=64))
    decode = DecodeWorker(model, EngineConfig(block_size=4, num_blocks=9, prefix_caching=False))
    prefill.connect(type("Direct", (), {"call": lambda self, method, *a: getattr(decode, method)(*a)})())
    prefill.submit(_requests(prompts, [4, 4, 4]))
    while prefill.engine.has_work():
        prefill.step()
    assert len(decode._pending) == 3
    finished = []
    while len(finished) < 3:
        finished += decode.step()
        assert len(decode.engine.running) <= 2  # 12 + 4 tokens = 4 blocks each, 9 in the pool
    assert [r.id for r in finished] == ["0", "1", "2"]
    assert [r.output for r in finished] == _colocated(model, prompts, [4, 4, 4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_handoff_pickles_its_kv_as_bytes_and_back(dtype):
    """What Ray's object store does to a handoff (protocol 5): the same K/V, dtype and shape come out."""
    import pickle

    from effinfer.plugins.system.serving.disaggregated import Handoff

    keys, values = torch.randn(3, 7, 2, 8).to(dtype), torch.randn(3, 7, 2, 8).to(dtype)
    handoff = Handoff(ServeRequest("a", [1, 2, 3], 4), keys, values, 0.0, 1.0, 0.5)
    back = pickle.loads(pickle.dumps(handoff, protocol=5))
    assert back.keys.dtype == dtype and torch.equal(back.keys, keys) and torch.equal(back.values, values)
    assert back.kv_bytes == handoff.kv_bytes and back.request.prompt == [1, 2, 3] and back.sent == 1.0


def test_a_decode_worker_out_of_blocks_preempts_and_recomputes_exactly():
    """Two admitted requests outgrow the decode pool: one is preempted, recomputed there, and still exact."""
    model, _ = tiny_model("llama", layers=1)
    prompts = _prompts(model.config.vocab_size, [12, 12], seed=4)
    server = _local(model, decode_blocks=12, prefix_caching=False)
    records = server.generate(_requests(prompts, [20, 20]))
    assert sum(r.preemptions for r in records) >= 1
    assert [r.output for r in records] == _colocated(model, prompts, [20, 20])
    _assert_no_leak(server)
