"""Eviction policies (sparse attention as a compact KV cache) against plain-torch references."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from effinfer.core.compose import ComposedModel
from effinfer.core.generation import GenerationConfig
from effinfer.core.kv_cache import KVPolicy, policy_cache
from effinfer.core.testing import TINY_FAMILIES, tiny_model
from effinfer.plugins.model.sparse_attention import (H2O, HeavyHitterPolicy, LastQueryPolicy, ObservationPolicy,
                                                     RecentPolicy, SinkWindowPolicy, StreamingLLM)

HEADS, KV_HEADS, DIM = 4, 2, 8


def chunks_of(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    for k in sizes:
        yield (torch.randn(1, KV_HEADS, k, DIM, generator=g), torch.randn(1, KV_HEADS, k, DIM, generator=g),
               torch.randn(1, HEADS, k, DIM, generator=g) * 0.5)


def weights(query_rows, keys, new):
    """Plain softmax weights of each query head over ``keys`` (the last ``new`` are causal), summed
    over queries and the query heads of each KV head: ``KV_HEADS × n``."""
    group = HEADS // KV_HEADS
    n = keys.shape[-2]
    out = torch.zeros(KV_HEADS, n)
    for h in range(HEADS):
        g = h // group
        for i in range(query_rows.shape[1]):
            row_position = n - query_rows.shape[1] + i
            logits = keys[g] @ query_rows[h, i]
            logits[row_position + 1:] = float("-inf")
            out[g] += logits.softmax(-1)
    return out


class Reference:
    """Kept entries per KV head as python lists of (position, key, value, score)."""

    def __init__(self, budget, window, kind, sinks=0, observation=0, kernel=1):
        self.budget, self.window, self.kind, self.sinks = budget, window, kind, sinks
        self.observation, self.kernel = observation, kernel
        self.heads = [[] for _ in range(KV_HEADS)]
        self.seen = 0

    def priority(self, entry):
        position, _, _, score = entry
        if position >= self.seen - self.window:
            return float("inf")
        if self.kind in ("recent", "sinks"):
            return float("inf") if position < self.sinks else float(position)
        return score

    def evict(self):
        for g in range(KV_HEADS):
            entries = self.heads[g]
            if len(entries) > self.budget:
                ranked = sorted(entries, key=self.priority, reverse=True)[:self.budget]
                self.heads[g] = sorted(ranked, key=lambda e: e[0])

    def update(self, keys, values, queries):
        self.evict()
        new = keys.shape[-2]
        for g in range(KV_HEADS):
            self.heads[g] += [[self.seen + i, keys[0, g, i], values[0, g, i], 0.0] for i in range(new)]
        self.seen += new
        stacked = torch.stack([torch.stack([e[1] for e in head]) for head in self.heads])
        if self.kind == "h2o":
            w = weights(queries[0], stacked, new)
            for g in range(KV_HEADS):
                for j, e in enumerate(self.heads[g]):
                    e[3] += float(w[g, j])
        elif self.kind == "tova":
            w = weights(queries[0, :, -1:], stacked, new)
            for g in range(KV_HEADS):
                for j, e in enumerate(self.heads[g]):
                    e[3] = float(w[g, j])
        elif self.kind == "snapkv" and new >= self.observation:
            w = weights(queries[0, :, -self.observation:], stacked, new)
            r = self.kernel // 2
            for g in range(KV_HEADS):
                n = w.shape[1]
                for j, e in enumerate(self.heads[g]):
                    e[3] = float(w[g, max(0, j - r):min(n, j + r + 1)].mean())

    def positions(self):
        self.evict()
        return [[e[0] for e in head] for head in self.heads]

    def keys(self):
        return torch.stack([torch.stack([e[1] for e in head]) for head in self.heads])


def make(kind, budget, window, sinks, observation, kernel):
    if kind == "recent":
        return RecentPolicy(budget), Reference(budget, budget, "recent")
    if kind == "sinks":
        sinks = min(sinks, budget - 1)
        return SinkWindowPolicy(budget, sinks), Reference(budget, budget - sinks, "sinks", sinks=sinks)
    if kind == "h2o":
        return HeavyHitterPolicy(budget, window), Reference(budget, window, "h2o")
    if kind == "tova":
        return LastQueryPolicy(budget, window), Reference(budget, window, "tova")
    observation = min(observation, budget)
    return (ObservationPolicy(budget, observation, kernel),
            Reference(budget, observation, "snapkv", observation=observation, kernel=kernel))


@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(["recent", "sinks", "h2o", "tova", "snapkv"]), budget=st.integers(4, 12),
       window_share=st.floats(0, 1), sinks=st.integers(0, 4), observation=st.integers(1, 6),
       kernel=st.sampled_from([1, 3, 5]), sizes=st.lists(st.integers(1, 8), min_size=1, max_size=5),
       seed=st.integers(0, 1000))
def test_each_policy_keeps_what_the_plain_torch_reference_keeps(kind, budget, window_share, sinks, observation,
                                                                kernel, sizes, seed):
    window = int(window_share * budget)
    policy, reference = make(kind, budget, window, sinks, observation, kernel)
    for keys, values, queries in chunks_of(sizes, seed):
        got_keys, _ = policy.update(keys, values, queries)
        reference.update(keys, values, queries)
        assert got_keys.shape[-2] == len(reference.heads[0])  # the forward attends to every entry kept + new
    positions, kept_keys, _ = policy.entries()
    assert positions.tolist()[0] == reference.positions()
    assert torch.equal(kept_keys[0], reference.keys())
    assert len(policy) == min(budget, sum(sizes))


@pytest.mark.parametrize("family", TINY_FAMILIES)
@settings(max_examples=3, deadline=None)
@given(kind=st.sampled_from(["recent", "sinks", "h2o", "tova", "snapkv"]), extra=st.integers(0, 20),
       chunk=st.integers(1, 40))
def test_a_budget_at_least_the_sequence_is_the_full_cache(family, kind, extra, chunk):
    model, _ = tiny_model(family)
    ids = torch.randint(3, 200, (1, 48), generator=torch.Generator().manual_seed(extra))
    budget = 48 + extra
    policy = policy_cache(lambda i, c: make(kind, budget, 2, 2, 4, 3)[0])(model)
    full = policy_cache(lambda i, c: KVPolicy())(model)
    with torch.inference_mode():
        for start in range(0, 48, chunk):
            piece = ids[:, start:start + chunk]
            a = model(input_ids=piece, cache=policy, use_cache=True).logits
            b = model(input_ids=piece, cache=full, use_cache=True).logits
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_decode_reads_a_bounded_cache(family):
    model, _ = tiny_model(family)
    cache = policy_cache(lambda i, c: SinkWindowPolicy(16, 2))(model)
    ids = torch.randint(3, 200, (1, 40))
    with torch.inference_mode():
        model(input_ids=ids, cache=cache, use_cache=True)
        for token in range(5):
            model(input_ids=torch.tensor([[5 + token]]), cache=cache, use_cache=True)
    assert cache.get_seq_length() == 45
    assert all(len(p) == 16 for p in cache.policies())
    positions, _, _ = cache.policies()[0].entries()
    assert positions[0, 0].tolist() == [0, 1, *range(31, 45)]


def test_techniques_run_through_a_composition_and_refuse_two_caches(tiny):
    model, tokenizer = tiny
    config = GenerationConfig(max_new_tokens=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the static engine steps aside for the policy cache
        with ComposedModel(model, tokenizer, engine="hf") as plain:
            expected = plain.generate(["hello there"], config)[1].sequences
        with ComposedModel(model, tokenizer, [StreamingLLM({"budget": 512})]) as composed:
            assert composed.generate(["hello there"], config)[1].sequences == expected
        with pytest.raises(ValueError, match="both provide the KV cache"):
            with ComposedModel(model, tokenizer, [StreamingLLM({"budget": 64}), H2O({"budget": 64})]):
                pass


def test_padded_batches_are_refused_by_evicting_policies(tiny):
    model, _ = tiny
    cache = policy_cache(lambda i, c: RecentPolicy(8))(model)
    with pytest.raises(ValueError, match="left-padded"):
        model(input_ids=torch.ones(2, 4, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]),
              cache=cache, use_cache=True)


def test_snapkv_pooling_matches_torch_avg_pool():
    scores = torch.rand(1, 1, 9)
    pooled = F.avg_pool1d(scores, 3, stride=1, padding=1, count_include_pad=False)
    manual = torch.tensor([scores[0, 0, max(0, j - 1):j + 2].mean() for j in range(9)])
    torch.testing.assert_close(pooled[0, 0], manual)


@settings(max_examples=10, deadline=None)
@given(chunks=st.lists(st.integers(1, 40), min_size=2, max_size=5), budget=st.integers(16, 40), seed=st.integers(0, 99))
def test_snapkv_after_prompt_keeps_what_one_whole_prompt_forward_keeps(chunks, budget, seed):
    """Fed in chunks (some single tokens, with compression paused), the after-prompt mode keeps exactly
    the entries that per-forward SnapKV keeps when the whole prompt comes in one forward."""
    g = torch.Generator().manual_seed(seed)
    total = sum(chunks) + 8
    keys, values = torch.randn(1, 2, total + 1, 8, generator=g), torch.randn(1, 2, total + 1, 8, generator=g)
    queries = torch.randn(1, 4, total + 1, 8, generator=g)
    whole = ObservationPolicy(budget, 8, 3)
    chunked = ObservationPolicy(budget, 8, 3, after_prompt=True)
    whole.update(keys[..., :total, :], values[..., :total, :], queries[..., :total, :])
    chunked.paused = True
    start = 0
    for size in [*chunks, 8]:
        chunked.update(keys[..., start:start + size, :], values[..., start:start + size, :],
                       queries[..., start:start + size, :])
        start += size
    assert chunked.n == total  # nothing evicted while the prompt came in
    chunked.paused = False
    for policy in (whole, chunked):
        policy.update(keys[..., total:, :], values[..., total:, :], queries[..., total:, :])
    assert torch.equal(whole.entries()[0], chunked.entries()[0])
