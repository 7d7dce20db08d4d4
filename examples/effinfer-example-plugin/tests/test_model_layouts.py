"""drop_layers on the layouts it supports (Llama, Qwen2 with per-layer attention types) and the ones it refuses."""

import copy

import pytest
import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from effinfer.core.errors import EffinferError
from effinfer.core.stages import ModelStage, ModulePatcher
from effinfer.core.testing import byte_tokenizer, tiny_llama
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


def test_qwen2_with_sliding_layers_equals_a_model_built_from_the_kept_blocks():
    """The per-layer attention types (``config.layer_types``) follow the kept blocks."""
    tokenizer = byte_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                         max_window_layers=2, initializer_range=0.3, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    assert config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    kept = [0, 3]  # drop=2 with keep_last: the two blocks before the last go
    reference_config = copy.deepcopy(config)
    reference_config.num_hidden_layers, reference_config.layer_types = 2, [config.layer_types[i] for i in kept]
    reference = Qwen2ForCausalLM(reference_config).eval()
    reference.load_state_dict(blocks_renumbered(model.state_dict(), kept))
    prompt = torch.tensor([tokenizer.encode("a prompt longer than the sliding window")])

    patcher = drop(model, drop=2)
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False),
                       reference.generate(prompt, max_new_tokens=8, do_sample=False))
    patcher.restore()
    assert model.config.layer_types == config.layer_types and len(model.model.layers) == 4
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
