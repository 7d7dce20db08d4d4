"""Weight offloading: the streamed model's logits equal the in-memory model's."""

from __future__ import annotations

import copy

import pytest
import torch

from effinfer.core.compose import ComposedModel
from effinfer.core.generation import GenerationConfig
from effinfer.core.testing import TINY_FAMILIES, tiny_model
from effinfer.plugins.system.offloading import LayerStreamer, OffloadWeights


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
