"""Serving: block allocator invariants, paged attention, continuous batching exactness, schedulers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effinfer.core.testing import tiny_model
from effinfer.plugins.system.serving.engine import (ContinuousBatchingEngine, EngineConfig, ServeRequest,
                                                    StaticBatchingEngine)
from effinfer.plugins.system.serving.paged import BlockAllocator, OutOfBlocks, PagedKVCache, paged_attention
from effinfer.plugins.system.serving.forward import PagedForward
from effinfer.plugins.system.serving.scheduling import (FCFS, OutputLengthPredictor, PriorityPreemptive,
                                                        ShortestJobFirst)
from effinfer.plugins.system.serving.techniques import serving_policy

# ------------------------------------------------------------------ block allocator / paged cache


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "fork"]), st.integers(0, 1000)), max_size=80))
def test_allocator_never_leaks_or_double_uses(ops):
    allocator = BlockAllocator(8)
    held: list[int] = []  # one entry per reference we hold
    for op, pick in ops:
        if op == "alloc":
            try:
                block = allocator.allocate()
            except OutOfBlocks:
                assert allocator.num_free == 0
                continue
            assert block not in held, "a block handed out while still in use"
            held.append(block)
        elif op == "fork" and held:
            held.append(allocator.fork(held[pick % len(held)]))
        elif op == "free" and held:
            allocator.free(held.pop(pick % len(held)))
        allocator.check()
        for block in range(8):
            assert allocator.refs[block] == held.count(block)
    for block in held:
        allocator.free(block)
    allocator.check()
    assert allocator.num_free == 8
    with pytest.raises(ValueError, match="double free"):
        allocator.free(0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["new", "grow", "fork", "end"]), st.integers(0, 50), st.integers(1, 9)),
                max_size=40))
def test_paged_cache_tables_stay_consistent_under_random_sequences(ops):
    """Block tables + prefix cache: every reference accounted for, no block shared unless forked/cached,
    each written token readable at its slot, everything free once all sequences end and the cache is cleared."""
    cache = PagedKVCache(layers=1, kv_heads=1, head_dim=1, num_blocks=24, block_size=4, prefix_caching=True)
    live: dict[int, list[int]] = {}
    serial = 0
    for op, pick, n in ops:
        keys = list(live)
        try:
            if op == "new":
                prompt = [pick % 3] * n  # few distinct prompts: prefixes get shared
                cached = cache.add_sequence(serial, prompt)
                slots = cache.reserve(serial, len(prompt) - cached)
                cache.keys[0, slots, 0, 0] = torch.tensor(prompt[cached:], dtype=torch.float32)
                cache.register_prefix(serial, prompt, len(prompt))
                live[serial] = prompt
                serial += 1
            elif op == "grow" and keys:
                seq = keys[pick % len(keys)]
                slots = cache.reserve(seq, n)
                cache.keys[0, slots, 0, 0] = 100.0 + seq
                live[seq] += [100 + seq] * n
            elif op == "fork" and keys:
                parent = keys[pick % len(keys)]
                cache.fork_sequence(parent, serial)
                live[serial] = list(live[parent])
                serial += 1
            elif op == "end" and keys:
                seq = keys[pick % len(keys)]
                cache.free_sequence(seq)
                del live[seq]
        except OutOfBlocks:
            if op == "new":
                cache.free_sequence(serial)
                serial += 1
        cache.allocator.check()
        refs = [0] * cache.num_blocks
        for table in cache.tables.values():
            for block in table.blocks:
                refs[block] += 1
        for block in cache._prefix.values():
            refs[block] += 1
        assert refs == cache.allocator.refs
        for seq, tokens in live.items():  # copy-on-write kept every sequence's own tokens
            read = cache.keys[0, cache.slots_of(seq, 0, len(tokens)), 0, 0]
            assert read.tolist() == [float(t) for t in tokens]
    for seq in list(live):
        cache.free_sequence(seq)
    cache.clear_prefix_cache()
    assert cache.allocator.num_free == cache.num_blocks


def test_paged_attention_equals_contiguous_attention():
    torch.manual_seed(0)
    heads, kv_heads, dim, block = 4, 2, 8, 4
    cache = PagedKVCache(1, kv_heads, dim, num_blocks=16, block_size=block)
    lengths = [5, 11, 2]
    contiguous = []
    for seq, length in enumerate(lengths):
        cache.add_sequence(seq, list(range(length)))
        if seq == 0:
            cache.reserve(99, 0) if 99 in cache.tables else None
        slots = cache.reserve(seq, length)
        k, v = torch.randn(length, kv_heads, dim), torch.randn(length, kv_heads, dim)
        cache.keys[0, slots], cache.values[0, slots] = k, v
        contiguous.append((k, v))
    longest = max(lengths)
    slots = torch.zeros(len(lengths), longest, dtype=torch.long)
    allowed = torch.zeros(len(lengths), 1, longest, dtype=torch.bool)
    for i, length in enumerate(lengths):
        slots[i, :length] = cache.slots_of(i, 0, length)
        allowed[i, 0, :length] = True
    q = torch.randn(len(lengths), heads, 1, dim)
    paged = paged_attention(q, cache.keys[0], cache.values[0], slots, allowed, scale=dim ** -0.5)
    for i, (k, v) in enumerate(contiguous):
        expected = F.scaled_dot_product_attention(q[i:i + 1], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                                  scale=dim ** -0.5, enable_gqa=True)
        torch.testing.assert_close(paged[i:i + 1], expected)
    assert cache.blocks_needed(11) == 3 and cache.waste()["waste_tokens"] == (2 + 3 + 1) * block - sum(lengths)


# ------------------------------------------------------------------ continuous batching exactness


def _prompts(vocab: int, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _greedy_alone(model, prompt, tokens):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_continuous_batching_gives_each_request_its_greedy_tokens_alone(family):
    """Joins, leaves, chunked prefill mixed with decodes, a shared prefix, preemption: same tokens as alone."""
    model, _ = tiny_model(family)
    shared = _prompts(model.config.vocab_size, [24], seed=1)[0]
    prompts = _prompts(model.config.vocab_size, [5, 40, 17, 3, 60, 9]) + [shared + [7, 8], shared + [9]]
    lengths = [12, 4, 9, 15, 6, 11, 8, 8]
    expected = [_greedy_alone(model, p, n) for p, n in zip(prompts, lengths)]
    # a small pool forces preemptions; a small budget forces chunked prefills next to decodes
    engine = ContinuousBatchingEngine(model, EngineConfig(block_size=4, num_blocks=30, max_num_seqs=4,
                                                          max_batched_tokens=16))
    requests = [ServeRequest(str(i), p, max_tokens=n) for i, (p, n) in enumerate(zip(prompts, lengths))]
    for request in requests[:5]:
        engine.add(request)
    engine.step()
    engine.step()
    for request in requests[5:]:  # join while others run
        engine.add(request)
    engine.run_until_done()
    assert [r.output for r in requests] == expected
    assert engine.cache.prefix_hits > 0
    engine.cache.allocator.check()
    engine.cache.clear_prefix_cache()
    assert engine.cache.allocator.num_free == engine.cache.num_blocks
    assert engine.peak_waste["waste_tokens"] < engine.peak_waste["contiguous_reserved_tokens"] - \
        engine.peak_waste["used_tokens"]


def test_static_batching_peer_gives_the_same_greedy_tokens():
    model, _ = tiny_model("llama")
    prompts = _prompts(model.config.vocab_size, [5, 30, 12])
    engine = StaticBatchingEngine(model, EngineConfig(static_batch_size=2))
    requests = [ServeRequest(str(i), p, max_tokens=7) for i, p in enumerate(prompts)]
    for r in requests:
        engine.add(r)
    engine.run_until_done()
    assert [r.output for r in requests] == [_greedy_alone(model, p, 7) for p in prompts]


def test_requests_that_can_never_fit_are_refused_with_the_fix():
    model, _ = tiny_model("llama")
    engine = ContinuousBatchingEngine(model, EngineConfig(block_size=4, num_blocks=4))
    with pytest.raises(ValueError, match="raise kv_cache_mb"):
        engine.add(ServeRequest("x", [5] * 10, max_tokens=10))
    with pytest.raises(ValueError, match="context"):
        engine.add(ServeRequest("y", [5] * 10, max_tokens=5000))


def test_abort_frees_blocks():
    model, _ = tiny_model("llama")
    engine = ContinuousBatchingEngine(model, EngineConfig(block_size=4, num_blocks=40, prefix_caching=False))
    engine.add(ServeRequest("a", list(range(3, 30)), max_tokens=50))
    engine.step()
    engine.step()
    assert engine.cache.allocator.num_free < 40
    engine.abort("a")
    engine.step()
    assert engine.cache.allocator.num_free == 40 and engine.finished[0].finish_reason == "abort"


# ------------------------------------------------------------------ schedulers


def _synthetic(engine_cls=ContinuousBatchingEngine, scheduler=None, **config):
    model, _ = tiny_model("llama", layers=1)
    return engine_cls(model, EngineConfig(block_size=4, num_blocks=200, **config), scheduler)


def test_fcfs_admits_in_arrival_order_one_at_a_time():
    engine = _synthetic(scheduler=FCFS(), max_num_seqs=1)
    requests = [ServeRequest(str(i), [5, 6, 7], max_tokens=n, arrival=float(i)) for i, n in enumerate([6, 1, 3])]
    for r in reversed(requests):
        engine.add(r)
    engine.run_until_done()
    assert [r.id for r in engine.finished] == ["0", "1", "2"]


def test_sjf_runs_the_shortest_predicted_job_first_and_learns_lengths():
    predictor = OutputLengthPredictor(min_samples=4, refit_every=4)
    engine = _synthetic(scheduler=ShortestJobFirst(predictor), max_num_seqs=1)
    # before any training SJF orders by max_tokens
    requests = [ServeRequest(str(i), [5, 6, 7], max_tokens=n, arrival=float(i)) for i, n in enumerate([6, 1, 3])]
    for r in requests:
        engine.add(r)
    engine.run_until_done()
    assert [r.id for r in engine.finished] == ["1", "2", "0"]
    # train: prompts starting with 9 finish after 2 tokens, prompts starting with 4 use all 20
    for _ in range(8):
        predictor.add([9, 9, 9], 20, 2)
        predictor.add([4, 4, 4], 20, 20)
    assert predictor.predict([9, 9, 9], 20) < 4 < 12 < predictor.predict([4, 4, 4], 20)
    order = ShortestJobFirst(predictor).order([ServeRequest("long", [4, 4, 4], 20, arrival=0.0),
                                               ServeRequest("short", [9, 9, 9], 20, arrival=1.0)], now=2.0)
    assert [r.id for r in order] == ["short", "long"]


def test_priority_preempts_a_running_low_priority_request_and_it_still_finishes_exactly():
    model, _ = tiny_model("llama")
    prompts = _prompts(model.config.vocab_size, [20, 8])
    engine = ContinuousBatchingEngine(model, EngineConfig(block_size=4, num_blocks=100, max_num_seqs=1),
                                      PriorityPreemptive())
    low = ServeRequest("low", prompts[0], max_tokens=10, priority=5)
    engine.add(low)
    for _ in range(4):
        engine.step()
    high = ServeRequest("high", prompts[1], max_tokens=4, priority=0)
    engine.add(high)
    engine.run_until_done()
    assert [r.id for r in engine.finished] == ["high", "low"]
    assert low.preemptions == 1
    assert low.output == _greedy_alone(model, prompts[0], 10)
    assert high.output == _greedy_alone(model, prompts[1], 4)


def test_serving_techniques_select_engine_and_scheduler(registry):
    from effinfer.core.experiment import Experiment

    exp = Experiment.checked(techniques=["paged_kv:block_size=8", "continuous_batching:max_num_seqs=3", "sjf"])
    stack = exp.build_stack(registry)
    policies = {t.role: t for t in stack}
    kind, config, scheduler = serving_policy(policies)
    assert (kind, config.block_size, config.max_num_seqs, scheduler.name) == ("continuous", 8, 3, "sjf")
    static = Experiment.checked(techniques=["static_batching:batch_size=4", "fcfs"]).build_stack(registry)
    kind, config, scheduler = serving_policy({t.role: t for t in static})
    assert (kind, config.static_batch_size, scheduler.name) == ("static", 4, "fcfs")
    from effinfer.core.errors import ExperimentError

    with pytest.raises(ExperimentError, match="incompatible"):
        Experiment.checked(techniques=["fcfs", "sjf"]).build_stack(registry)


def test_a_pool_too_small_for_both_requests_still_serves_each_exactly():
    """Two prompts whose KV does not fit the pool together, prefilled chunk by chunk: both finish, exact."""
    model, _ = tiny_model("llama", layers=1)
    prompts = _prompts(model.config.vocab_size, [30, 30], seed=3)
    engine = ContinuousBatchingEngine(model, EngineConfig(block_size=4, num_blocks=11, max_batched_tokens=8,
                                                          prefix_caching=False))
    requests = [ServeRequest(str(i), p, max_tokens=4) for i, p in enumerate(prompts)]
    for r in requests:
        engine.add(r)
    for _ in range(200):
        if not engine.has_work():
            break
        engine.step()
    assert not engine.has_work()
    assert [r.output for r in requests] == [_greedy_alone(model, p, 4) for p in prompts]


@pytest.mark.parametrize("family,kernel", [("llama", "triton"), ("gemma3", "triton"), ("qwen2", "cpu")])
def test_decode_attention_through_the_kernels_paged_operator_gives_the_same_greedy_tokens(family, kernel,
                                                                                          monkeypatch):
    """attention_kernel routes decode tokens through effinfer.kernels.paged_decode_attention on the pool's pages
    (Triton in its CPU interpreter here; on CUDA it is the default); Gemma 3's sliding layers stay on torch."""
    if kernel == "triton":
        from effinfer.kernels.dispatch import triton_problem

        if triton_problem() is not None:
            pytest.skip(triton_problem())
    model, _ = tiny_model(family)
    prompts = _prompts(model.config.vocab_size, [5, 21, 9])
    lengths = [6, 4, 7]
    expected = [_greedy_alone(model, p, n) for p, n in zip(prompts, lengths)]
    from effinfer import kernels

    calls = []
    operator = kernels.paged_decode_attention
    monkeypatch.setattr(kernels, "paged_decode_attention",
                        lambda *args, **kwargs: calls.append(kwargs["backend"]) or operator(*args, **kwargs))
    engine = ContinuousBatchingEngine(model, EngineConfig(block_size=4, num_blocks=24, max_batched_tokens=16,
                                                          attention_kernel=kernel))
    assert engine.forward.attention_kernel == kernel
    requests = [ServeRequest(str(i), p, max_tokens=n) for i, (p, n) in enumerate(zip(prompts, lengths))]
    for request in requests:
        engine.add(request)
    engine.run_until_done()
    assert [r.output for r in requests] == expected
    assert calls and set(calls) == {kernel}  # the decodes really went through the operator
    with pytest.raises(ValueError, match="attention_kernel"):
        PagedForward(model, "cuda-magic")
