"""Weight offloading: the streamed model's logits equal the in-memory model's."""

from __future__ import annotations

import copy

import pytest
import torch

from effinfer.core.compose import ComposedModel
from effinfer.core.generation import GenerationConfig
from effinfer.core.testing import TINY_FAMILIES, tiny_model
from effinfer.plugins.system.offloading import HostToDeviceStreamer, LayerStreamer, OffloadWeights, layer_streamer


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("prefetch", [True, False])
def test_offloaded_logits_equal_in_memory_logits(family, prefetch, tmp_path):
    model, _ = tiny_model(family, layers=4)
    ids = torch.randint(3, 200, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
        streamed = copy.deepcopy(model)
        streamer = LayerStreamer(streamed, tmp_path, prefetch=prefetch)
        assert all(p.numel() == 0 for layer in streamer.layers for p in layer.parameters())
        for _ in range(2):  # twice: the second pass starts from prefetched slots
            assert torch.equal(streamed(input_ids=ids).logits, expected)
    assert streamer.reads > len(streamer.layers)  # more layers than slots: the second pass reads again


def test_each_tier_refuses_a_model_on_the_other_device(tmp_path):
    model, _ = tiny_model("llama", layers=2)
    assert type(layer_streamer(copy.deepcopy(model), tmp_path)) is LayerStreamer  # a CPU model: disk ↔ RAM
    with pytest.raises(ValueError, match="CUDA"):
        HostToDeviceStreamer(copy.deepcopy(model))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="RAM ↔ GPU streaming needs CUDA")
@pytest.mark.parametrize("prefetch", [True, False])
def test_host_to_gpu_streamed_logits_equal_in_memory_logits(prefetch):
    model, _ = tiny_model("llama", layers=4)
    model = model.cuda()
    ids = torch.randint(3, 200, (2, 17), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
        streamed = copy.deepcopy(model)
        streamer = layer_streamer(streamed, prefetch=prefetch)
        assert isinstance(streamer, HostToDeviceStreamer)
        for _ in range(2):
            assert torch.equal(streamed(input_ids=ids).logits, expected)


def test_offload_weights_runs_in_a_composition_on_the_static_engine(tiny, tmp_path):
    model, tokenizer = tiny
    config = GenerationConfig(max_new_tokens=5)
    with ComposedModel(model, tokenizer) as plain:
        expected = plain.generate(["hello"], config)[1].sequences
    with ComposedModel(model, tokenizer, [OffloadWeights({"folder": str(tmp_path)})]) as composed:
        assert composed.generate(["hello"], config)[1].sequences == expected
    # the composition restored the weights
    with ComposedModel(model, tokenizer) as plain:
        assert plain.generate(["hello"], config)[1].sequences == expected


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_offloaded_kv_gives_the_full_cache_logits_and_keeps_only_the_budget_in_ram(family, tmp_path):
    from effinfer.core.kv_cache import policy_cache
    from effinfer.plugins.system.offloading import offloaded_kv_factory

    model, _ = tiny_model(family, layers=2)
    ids = torch.randint(3, 200, (2, 70), generator=torch.Generator().manual_seed(1))
    cache = policy_cache(offloaded_kv_factory(budget=8, block=16, folder=tmp_path), "offload_kv")(model)
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
        pieces = [model(input_ids=ids[:, s:s + 13], cache=cache, use_cache=True).logits for s in range(0, 70, 13)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, rtol=1e-5, atol=1e-5)
    policies = cache.policies()
    assert len({id(p.staging) for p in policies}) == 1  # one staging buffer for every layer
    for policy in policies:
        assert policy.seen == 70 and policy.on_disk == 48 and policy.keys.shape[-2] == 22
        assert policy.disk_bytes() == 2 * policy.on_disk * policy.keys[0, :, 0].numel() * 4 * 2
        policy.crop(3)
        assert policy.seen == 67
        with pytest.raises(NotImplementedError, match="raise budget"):
            policy.crop(30)


def test_offload_kv_runs_in_a_composition_on_the_static_engine_with_the_full_cache_tokens(tiny, tmp_path):
    from effinfer.plugins.system.offloading import OffloadKV

    model, tokenizer = tiny
    config = GenerationConfig(max_new_tokens=8)
    prompt = ["hello there, " * 6]
    with ComposedModel(model, tokenizer) as plain:
        expected = plain.generate(prompt, config)[1].sequences
    with ComposedModel(model, tokenizer, [OffloadKV({"budget": 4, "block": 4, "folder": str(tmp_path)})]) as composed:
        assert composed.generate(prompt, config)[1].sequences == expected
