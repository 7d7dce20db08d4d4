"""The static engine runs the KV-cache policies itself: same greedy tokens as the full cache when the
budget holds every entry, the HF path's logits under eviction, and decode reads only the budget."""

from __future__ import annotations

import warnings

import pytest
import torch

from effinfer.core.generation import GenerationConfig, PlainDecoding
from effinfer.core.kv_cache import KVPolicy, policy_cache
from effinfer.core.testing import TINY_FAMILIES, tiny_model
from effinfer.plugins.model.kv_cache import KiviPolicy, PerTokenQuantPolicy
from effinfer.plugins.model.sparse_attention import (HeavyHitterPolicy, LastQueryPolicy, ObservationPolicy,
                                                     RecentPolicy, SinkWindowPolicy)
from effinfer.plugins.system.engine import StaticDecoding
from effinfer.plugins.system.engine.policy import policy_decode, policy_prefill
from effinfer.plugins.system.engine.static import shared_engine
from effinfer.plugins.system.offloading.kv import OffloadedKVPolicy


def policies(budget: int, folder) -> dict[str, callable]:
    return {
        "streaming_llm": lambda: SinkWindowPolicy(budget, 4),
        "sliding_window": lambda: RecentPolicy(budget),
        "h2o": lambda: HeavyHitterPolicy(budget, budget // 2),
        "snapkv": lambda: ObservationPolicy(budget, 8, 3),
        "snapkv_prompt": lambda: ObservationPolicy(budget, 8, 3, after_prompt=True),
        "tova": lambda: LastQueryPolicy(budget, 0),
        "offload_kv": lambda: OffloadedKVPolicy(8, 16, folder),
    }


def generate(strategy, model, ids, factory, tokens=12):
    config = GenerationConfig(max_new_tokens=tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the static engine must not step aside
        return strategy.generate(model, ids, torch.ones_like(ids), config, set(), cache_factory=factory).sequences


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_policy_with_room_for_everything_gives_the_full_cache_tokens(family, tmp_path):
    model, _ = tiny_model(family, layers=2)
    ids = torch.randint(3, 200, (1, 40), generator=torch.Generator().manual_seed(2))
    full = generate(StaticDecoding(), model, ids, None)
    assert full == generate(PlainDecoding(), model, ids, None)
    for name, make in {**policies(64, tmp_path), "full": KVPolicy}.items():
        ours = generate(StaticDecoding(), model, ids, policy_cache(lambda i, c, make=make: make(), name))
        assert ours == full, name


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_the_static_engine_matches_the_hf_path_under_eviction_and_quantization(family, tmp_path):
    model, _ = tiny_model(family, layers=2)
    ids = torch.randint(3, 200, (1, 48), generator=torch.Generator().manual_seed(3))
    makes = {**policies(16, tmp_path), "kivi": lambda: KiviPolicy(2, 8), "kv_int4": lambda: PerTokenQuantPolicy(4)}
    for name, make in makes.items():
        caches = [policy_cache(lambda i, c, make=make: make(), name)(model) for _ in range(2)]
        engine = shared_engine(model)
        with torch.inference_mode():
            state, out = policy_prefill(engine.layout, caches[0], ids, torch.ones_like(ids))
            ours = [out.logits[:, -1]]
            hf = [model(input_ids=ids, cache=caches[1], use_cache=True).logits[:, -1].float()]
            for step in range(6):
                token = ours[-1].argmax(-1)
                ours.append(policy_decode(engine.layout, state, token))
                hf.append(model(input_ids=token[:, None], position_ids=torch.tensor([[48 + step]]), cache=caches[1],
                                use_cache=True).logits[:, -1].float())
        torch.testing.assert_close(torch.stack(ours), torch.stack(hf), rtol=1e-4, atol=1e-4, msg=name)


def test_sparse_policies_on_the_static_engine_read_only_the_budget(tiny, tmp_path):
    model, _ = tiny
    ids = torch.randint(3, 200, (1, 60), generator=torch.Generator().manual_seed(4))
    budget = 16
    for name, make in policies(budget, tmp_path).items():
        if name == "offload_kv":
            continue
        seen: list[int] = []

        def factory(i, c, make=make):
            policy = make()
            update = policy.update

            def recording(keys, values, queries=None):
                out = update(keys, values, queries)
                if keys.shape[-2] == 1:
                    seen.append(out[0].shape[-2])
                return out

            policy.update = recording
            return policy

        generate(StaticDecoding(), model, ids, policy_cache(factory, name), tokens=20)
        assert seen and max(seen) <= budget + 1, (name, max(seen))


def test_padded_batches_run_quantized_policies_and_refuse_eviction(tiny):
    model, tokenizer = tiny
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    config = GenerationConfig(max_new_tokens=6)
    full = StaticDecoding().generate(model, ids, mask, config, set()).sequences
    kept = StaticDecoding().generate(model, ids, mask, config, set(),
                                     cache_factory=policy_cache(lambda i, c: KVPolicy(), "full")).sequences
    assert kept == full
    with pytest.raises(ValueError, match="left-padded"):
        StaticDecoding().generate(model, ids, mask, config, set(),
                                  cache_factory=policy_cache(lambda i, c: SinkWindowPolicy(16, 4), "s"))
