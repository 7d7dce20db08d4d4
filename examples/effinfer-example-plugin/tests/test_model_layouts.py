"""drop_layers on the layouts it supports (Llama, Qwen2, Gemma3 with sliding layers) and the ones it refuses."""

import pytest
import torch
from torch import nn

from effinfer.core.errors import EffinferError
from effinfer.core.stages import ModelStage, ModulePatcher
from effinfer.core.testing import TINY_FAMILIES, tiny_llama, tiny_model
from effinfer_example_plugin import DropLayers, UnsupportedModelError


def drop(model: nn.Module, **config: object) -> ModulePatcher:
    """Run the model stage alone; the returned patcher can undo it."""
    patcher = ModulePatcher()
    DropLayers(config).effinfer_transform_model(ModelStage(model, None, patcher))
    return patcher


def blocks_renumbered(state: dict[str, torch.Tensor], kept: list[int]) -> dict[str, torch.Tensor]:
    """``state`` with only the decoder blocks ``kept``, numbered 0, 1, ... (other weights as they are)."""
    renamed = {}
    for key, value in state.items():
        prefix, found, rest = key.partition("layers.")
        if not found:
            renamed[key] = value
        elif (block := int(rest.split(".")[0])) in kept:
            renamed[f"{prefix}layers.{kept.index(block)}{rest.removeprefix(str(block))}"] = value
    return renamed


@pytest.mark.parametrize("model", [nn.Sequential(nn.Linear(4, 4)), nn.Module()], ids=["no-decoder", "empty"])
def test_a_model_without_decoder_layers_is_refused(model):
    with pytest.raises(UnsupportedModelError, match=r"model\.model\.layers"):
        drop(model)
    assert issubclass(UnsupportedModelError, EffinferError)  # the CLI prints it as an error, not a traceback


def test_blocks_without_a_kv_cache_index_are_refused_before_anything_changes():
    model, _ = tiny_llama(layers=3)
    del model.model.layers[1].self_attn.layer_idx
    with pytest.raises(UnsupportedModelError, match="block 1 .* has none"):
        drop(model, drop=1)
    assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3


def test_dropping_every_layer_is_refused():
    model, _ = tiny_llama(layers=2)
    with pytest.raises(UnsupportedModelError, match="drop=2 would remove all 2 decoder layers; use drop <= 1"):
        drop(model, drop=2, keep_last=False)


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_the_dropped_model_equals_one_built_from_the_kept_blocks(family):
    """Block indices and the per-layer attention types (Gemma3's sliding/full ``layer_types``) follow the blocks."""
    model, tokenizer = tiny_model(family, layers=4)
    kept = [0, 3]  # drop=2 with keep_last: the two blocks before the last go
    reference, _ = tiny_model(family, layers=2)  # Gemma3: sliding then full, as blocks 0 and 3 of four
    reference.load_state_dict(blocks_renumbered(model.state_dict(), kept))
    types = getattr(model.config, "layer_types", None)
    prompt = torch.tensor([tokenizer.encode("a prompt longer than Gemma's sliding window of eight tokens")])

    patcher = drop(model, drop=2)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    assert getattr(model.config, "layer_types", None) == getattr(reference.config, "layer_types", None)
    assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False),
                       reference.generate(prompt, max_new_tokens=8, do_sample=False))
    patcher.restore()
    assert getattr(model.config, "layer_types", None) == types and len(model.model.layers) == 4
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
