"""Attention replacements with a recurrent state: hedgehog, mamba_convert, retention_convert."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from transformers import DynamicCache

from effinfer.core.errors import EffinferError
from effinfer.core.stages import ModulePatcher
from effinfer.core.testing import tiny_model
from effinfer.plugins.model.structure.hedgehog import Hedgehog
from effinfer.plugins.model.structure.mamba import MambaConvert
from effinfer.plugins.model.structure.recurrent import (RecurrentCacheLayer, RecurrentStateError, chosen_layers,
                                                        state_bytes)
from effinfer.plugins.model.structure.repair import Conversion
from effinfer.plugins.model.structure.retention import RetentionConvert

FAMILIES = ["llama", "qwen2", "gemma3"]
TECHNIQUES = {"hedgehog": (Hedgehog, {}), "hedgehog_window": (Hedgehog, {"window": 5}),
              "retention": (RetentionConvert, {}), "mamba": (MambaConvert, {})}


def converted(family: str, key: str, depth: int = 3, **config):
    """A tiny model with the technique's layers swapped (no training), the conversion and its mixers."""
    model, tokenizer = tiny_model(family, layers=depth)
    cls, defaults = TECHNIQUES[key]
    technique = cls({**defaults, "chunk_size": 4, **config})
    conversion = Conversion(ModulePatcher())
    swapped = technique.convert(model, conversion)
    with torch.no_grad():  # move the new parameters off their identity-like start
        generator = torch.Generator().manual_seed(1)
        for _, _, mixer in swapped:
            for parameter in mixer.new_parameters().values():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    model.eval()
    return model, tokenizer, conversion, swapped


def rope_for(model, x, positions):
    rotary = model.model.rotary_emb
    if model.config.model_type == "gemma3_text":
        return rotary(x, positions, "sliding_attention")
    return rotary(x, positions)


OUT_ATOL, OUT_RTOL = 2e-4, 1e-3


@settings(max_examples=12, deadline=None)
@example(key="retention", family="gemma3", batch=2, length=13, chunk=1, split=0)  # failed at atol 2e-5
@given(key=st.sampled_from(sorted(TECHNIQUES)), family=st.sampled_from(FAMILIES), batch=st.integers(1, 3),
       length=st.integers(1, 19), chunk=st.integers(1, 8), split=st.integers(0, 19))
def test_parallel_form_equals_recurrent_form(key, family, batch, length, chunk, split):
    """Chunked parallel (any chunk size, from any incoming state) == one token at a time, outputs and state."""
    model, _, _, swapped = converted(family, key, chunk_size=chunk)
    check_forms_agree(model, swapped[0][2], batch, length, split)


def check_forms_agree(model, mixer, batch: int, length: int, split: int) -> None:
    """The mixer's chunked parallel form, its recurrent form and a prefill of ``split`` tokens continued from
    its state give the same outputs and states (also used by tests/test_structure_linformer.py)."""
    generator = torch.Generator().manual_seed(length)
    x = torch.randn(batch, length, model.config.hidden_size, generator=generator)
    rope = rope_for(model, x, torch.arange(length)[None].expand(batch, -1))
    with torch.no_grad():
        y_rec, s_rec = mixer.mix(x, rope, None, None, "recurrent")
        y_par, s_par = mixer.mix(x, rope, None, None, "parallel")
        cut = min(split, length)  # a prefill of `cut` tokens, then the rest from its state
        first = tuple(t[:, :cut] for t in rope)
        rest = tuple(t[:, cut:] for t in rope)
        y1, s1 = mixer.mix(x[:, :cut], first, None, None, "parallel") if cut else (x[:, :0, :0], {})
        y2, s2 = mixer.mix(x[:, cut:], rest, None, s1, "parallel") if cut < length else (x[:, :0, :0], s1)
    # outputs pass through a per-head norm that divides by a small per-head spread, which magnifies fp32
    # summation-order differences (up to 5e-5 seen, CI fresh clone); the states are compared tighter below
    torch.testing.assert_close(y_par, y_rec, atol=OUT_ATOL, rtol=OUT_RTOL)
    assert s_par.keys() == s_rec.keys() == s2.keys()
    for name in s_rec:
        torch.testing.assert_close(s_par[name], s_rec[name], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(s2[name], s_rec[name], atol=2e-5, rtol=1e-4)
    if 0 < cut < length:
        torch.testing.assert_close(torch.cat([y1, y2], dim=1), y_rec, atol=OUT_ATOL, rtol=OUT_RTOL)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("key", sorted(TECHNIQUES))
def test_generate_equals_full_forward_argmax(family, key):
    """HF generate (prefill in parallel form, decode steps in recurrent form, state in the cache) gives the
    tokens that the no-cache full forward's argmax gives; layer 0 is replaced too."""
    model, _, _, _ = converted(family, key, depth=3, count=3)
    prompt = torch.randint(3, 200, (1, 9), generator=torch.Generator().manual_seed(2))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False, cache=cache)
        full = model(out, use_cache=False).logits.argmax(-1)
    assert out.shape[1] == 19
    assert torch.equal(full[0, 8:-1], out[0, 9:])
    assert all(isinstance(layer, RecurrentCacheLayer) for layer in cache.layers)
    assert cache.get_seq_length() == 18  # the state layers count the tokens they have seen


@pytest.mark.parametrize("key", sorted(TECHNIQUES))
def test_hybrid_cache_keeps_softmax_kv_and_constant_state(key):
    """Replaced layers hold a constant-size state, the others ordinary KV that grows; a new cache starts afresh."""
    model, _, _, swapped = converted("llama", key, depth=4, layers=[1, 3])
    sizes = []
    for length in (8, 24):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(torch.randint(3, 200, (1, length)), cache=cache, use_cache=True)
        assert [isinstance(layer, RecurrentCacheLayer) for layer in cache.layers] == [False, True, False, True]
        sizes.append(state_bytes(cache))
    assert sizes[0]["kv"] * 3 == sizes[1]["kv"]
    if key == "hedgehog_window":  # the window fills up to 5 keys, then stays
        assert sizes[0]["state"] == sizes[1]["state"]
    else:
        assert sizes[0]["state"] == sizes[1]["state"] > 0


@pytest.mark.parametrize("key", sorted(TECHNIQUES))
def test_left_padding_gives_what_a_row_gives_alone(key):
    model, tokenizer, _, _ = converted("qwen2", key)
    from effinfer.core.generation import GenerationConfig, PlainDecoding
    prompts = [torch.randint(3, 200, (1, n), generator=torch.Generator().manual_seed(n)) for n in (5, 11)]
    alone = [PlainDecoding().generate(model, p, torch.ones_like(p), GenerationConfig(max_new_tokens=6), set())
             .sequences[0] for p in prompts]
    pad = tokenizer.pad_token_id
    ids = torch.full((2, 11), pad)
    mask = torch.zeros(2, 11, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, -p.shape[1]:], mask[row, -p.shape[1]:] = p[0], 1
    batched = PlainDecoding().generate(model, ids, mask, GenerationConfig(max_new_tokens=6), set()).sequences
    assert batched == alone


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cls", [Hedgehog, RetentionConvert, MambaConvert])
def test_zero_layers_is_the_original(family, cls):
    from effinfer.core.compose import ComposedModel
    model, tokenizer = tiny_model(family, layers=2)
    x = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        reference = model(x).logits
    technique = cls({"count": 0})
    with ComposedModel(model, tokenizer, [technique], calibration=lambda n, s: torch.randint(3, 200, (n, s))) as c:
        with torch.no_grad():
            assert torch.equal(c.model(x).logits, reference)
    assert "no attention layer replaced" in technique.notes[0] if technique.notes else True


def test_composition_fits_repairs_and_restores():
    """Through the stage hook: swap, layer-wise fit (error falls), KD repair, notes; the patcher restores."""
    from effinfer.core.compose import ComposedModel
    model, tokenizer = tiny_model("llama", layers=2)
    x = torch.randint(3, 200, (1, 16))
    with torch.no_grad():
        reference = model(x).logits
    technique = Hedgehog({"layers": [1], "window": 4, "fit_steps": 8, "fit_samples": 2, "fit_seq_len": 16,
                          "repair_steps": 2, "repair_seq_len": 16, "repair_checkpoint": False,
                          "repair_eval_windows": 0})
    composed = ComposedModel(model, tokenizer, [technique], calibration=lambda n, s: torch.randint(3, 200, (n, s)))
    with composed:
        assert type(composed.model.model.layers[1].self_attn).__name__ == "HedgehogAttention"
        notes = " | ".join(note for _, _, note in composed.report.entries)
        assert "layer-wise fit of 1 submodule" in notes and "repair (FKL" in notes and "[1] of 2" in notes
        completions, _ = composed.generate(["Hello"])
        assert completions[0].tokens
    with torch.no_grad():
        assert torch.equal(model(x).logits, reference)


def test_static_engine_hands_the_model_to_the_hf_path_with_a_warning():
    from effinfer.core.compose import ComposedModel
    from effinfer.core.technique import Feature
    model, tokenizer = tiny_model("llama", layers=2)
    technique = RetentionConvert({"layers": [0], "fit_steps": 0})
    assert Feature.STOCK_ATTENTION in RetentionConvert.removes_features
    with ComposedModel(model, tokenizer, [technique], engine="static",
                       calibration=lambda n, s: torch.randint(3, 200, (n, s))) as composed:
        with pytest.warns(RuntimeWarning, match="static engine unavailable"):
            completions, _ = composed.generate(["Hi"])
    assert completions[0].tokens


def test_width_prune_after_a_replacement_is_refused_before_loading():
    from effinfer.core.experiment import Runtime, TechniqueSpec, resolve_stack
    from effinfer.core.registry import get_registry
    registry = get_registry()
    if "hedgehog" not in registry.techniques or "width_prune" not in registry.techniques:
        pytest.skip("hedgehog is not registered in this install")
    with pytest.raises(EffinferError, match="width_prune needs 'stock_attention', which hedgehog"):
        resolve_stack([TechniqueSpec(name="hedgehog"), TechniqueSpec(name="width_prune")], Runtime(), registry)


def test_speculative_strategies_and_kv_policies_are_refused_before_loading():
    from effinfer.core.experiment import Runtime, TechniqueSpec, resolve_stack
    from effinfer.core.registry import get_registry
    registry = get_registry()
    for other in ("prompt_lookup", "streaming_llm"):
        if other not in registry.techniques:
            continue
        with pytest.raises(EffinferError, match=f"mamba_convert and {other} are declared incompatible"):
            resolve_stack([TechniqueSpec(name="mamba_convert"), TechniqueSpec(name=other)], Runtime(), registry)


def test_a_state_cannot_be_rolled_back():
    model, _, _, _ = converted("llama", "retention", depth=2, count=2)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.randint(3, 200, (1, 6)), cache=cache, use_cache=True)
    cache.crop(0)  # nothing removed: allowed
    with pytest.raises(RecurrentStateError, match="cannot be rolled back"):
        cache.crop(-2)


@pytest.mark.parametrize("config, field", [
    ({"count": -1}, "count"), ({"layers": [1, 1]}, "layers"), ({"layers": [-2]}, "layers"),
    ({"chunk_size": 0}, "chunk_size"), ({"window": -1}, "window"), ({"feature_dim": 2}, "feature_dim"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_hedgehog_configs_are_refused_with_the_field(config, field):
    with pytest.raises(ValidationError, match=field):
        Hedgehog.Config(**config)


def test_bad_mamba_and_retention_configs_are_refused_with_the_field():
    with pytest.raises(ValidationError, match="dt_min"):
        MambaConvert.Config(dt_min=0.5, dt_max=0.1)
    with pytest.raises(ValidationError, match="conv_kernel"):
        MambaConvert.Config(conv_kernel=17)
    with pytest.raises(ValidationError, match="learn_decay"):
        RetentionConvert.Config(learn_decay="sometimes")


def test_layers_out_of_range_are_refused_before_loading():
    model, _ = tiny_model("llama", layers=3)
    assert "layers: [5] out of range" in Hedgehog({"layers": [5]}).check_model_config(model.config)[0]
    assert "count=4" in MambaConvert({"count": 4}).check_model_config(model.config)[0]
    assert chosen_layers(Hedgehog.Config(count=2), 30) == [10, 20]
    assert chosen_layers(Hedgehog.Config(count=3), 3) == [0, 1, 2]
