"""KV-cache quantization policies: packing, round-trip error bounds, bytes held, the cache interface."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from effinfer.core.kv_cache import KVPolicy, PolicyCache, policy_cache
from effinfer.core.testing import TINY_FAMILIES, tiny_model
from effinfer.plugins.model.kv_cache import KiviPolicy, PerTokenQuantPolicy
from effinfer.plugins.model.kv_cache.packing import pack, quantize, unpack


@settings(max_examples=20, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), rows=st.integers(1, 5), width=st.integers(1, 6), seed=st.integers(0, 99))
def test_pack_round_trips(bits, rows, width, seed):
    codes = torch.randint(0, 1 << bits, (rows, width * 8), generator=torch.Generator().manual_seed(seed),
                          dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape[-1] == width * bits
    assert torch.equal(unpack(packed, bits), codes)


def half_step(x, bits, dim):
    return (x.amax(dim, keepdim=True) - x.amin(dim, keepdim=True)) / ((1 << bits) - 1) / 2 + 1e-6


@settings(max_examples=15, deadline=None)
@given(bits=st.sampled_from([4, 8]), sizes=st.lists(st.integers(1, 9), min_size=1, max_size=4), seed=st.integers(0, 99))
def test_per_token_cache_round_trips_within_half_a_step(bits, sizes, seed):
    g = torch.Generator().manual_seed(seed)
    policy = PerTokenQuantPolicy(bits)
    chunks = [torch.randn(1, 2, k, 16, generator=g) * 3 for k in sizes]
    for chunk in chunks:
        keys, values = policy.update(chunk, -chunk)
    everything = torch.cat(chunks, dim=-2)
    assert (keys - everything).abs().le(half_step(everything, bits, -1)).all()
    assert (values + everything).abs().le(half_step(everything, bits, -1)).all()
    assert len(policy) == sum(sizes)


@settings(max_examples=15, deadline=None)
@given(bits=st.sampled_from([2, 4]), group=st.sampled_from([4, 8]), sizes=st.lists(st.integers(1, 11), min_size=1,
                                                                                      max_size=5),
       seed=st.integers(0, 99))
def test_kivi_quantizes_keys_per_channel_values_per_token_and_keeps_the_residual_exact(bits, group, sizes, seed):
    g = torch.Generator().manual_seed(seed)
    policy = KiviPolicy(bits, group)
    chunks = [(torch.randn(1, 2, k, 8, generator=g), torch.randn(1, 2, k, 8, generator=g)) for k in sizes]
    for k, v in chunks:
        keys, values = policy.update(k, v)
    all_k = torch.cat([k for k, _ in chunks], dim=-2)
    all_v = torch.cat([v for _, v in chunks], dim=-2)
    total = all_k.shape[-2]
    quantized = total // group * group
    assert policy.quantized == quantized and len(policy) == total
    # the newest tokens not filling a group stay exact
    assert torch.equal(keys[..., quantized:, :], all_k[..., quantized:, :])
    assert torch.equal(values[..., quantized:, :], all_v[..., quantized:, :])
    for start in range(0, quantized, group):  # keys: one scale per channel per group of tokens
        block = all_k[..., start:start + group, :]
        assert (keys[..., start:start + group, :] - block).abs().le(half_step(block, bits, -2)).all()
    head = all_v[..., :quantized, :]
    assert (values[..., :quantized, :] - head).abs().le(half_step(head, bits, -1)).all()


def test_kivi2_holds_under_an_eighth_of_fp32_bytes():
    policy = KiviPolicy(2, 32)
    for _ in range(4):
        policy.update(torch.randn(1, 3, 512, 64), torch.randn(1, 3, 512, 64))
    fp32 = 2 * 3 * 64 * 4 * policy.seen
    assert policy.nbytes() <= fp32 / 8
    int8 = PerTokenQuantPolicy(8)
    int8.update(torch.randn(1, 3, 256, 64), torch.randn(1, 3, 256, 64))
    assert int8.nbytes() == 2 * 3 * 256 * (64 + 8)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_quantized_caches_run_every_layout_and_crop_their_residual(family):
    model, _ = tiny_model(family)
    ids = torch.randint(3, 200, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = model(input_ids=ids).logits
        for make in (lambda: PerTokenQuantPolicy(8), lambda: KiviPolicy(4, 16)):
            cache = policy_cache(lambda i, c: make())(model)
            assert isinstance(cache, PolicyCache)
            logits = torch.cat([model(input_ids=ids[:, s:s + 9], cache=cache, use_cache=True).logits
                                for s in range(0, 40, 9)], dim=1)
            assert cache.get_seq_length() == 40
            assert torch.corrcoef(torch.stack([logits.flatten(), reference.flatten()]))[0, 1] > 0.95
            for policy in cache.policies():  # (Gemma 3's own sliding layers cannot roll back past their window)
                policy.crop(2)
                assert policy.seen == 38


def test_the_base_policy_is_the_full_cache(tiny):
    model, _ = tiny
    ids = torch.randint(3, 200, (1, 30))
    cache = policy_cache(lambda i, c: KVPolicy())(model)
    with torch.inference_mode():
        full = model(input_ids=ids).logits
        parts = torch.cat([model(input_ids=ids[:, s:s + 7], cache=cache, use_cache=True).logits
                           for s in range(0, 30, 7)], dim=1)
    torch.testing.assert_close(parts, full, rtol=0, atol=1e-4)
    assert cache.nbytes() >= sum(p.keys.numel() * 8 for p in cache.policies())
