"""linformer: Linformer-style low-rank attention as a causal bounded memory (ABC) + an exact window."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from transformers import DynamicCache

from effinfer.core.errors import EffinferError
from effinfer.core.stages import ModulePatcher
from effinfer.core.testing import tiny_model
from effinfer.plugins.model.structure.linformer import Linformer, LowRankAttention
from effinfer.plugins.model.structure.recurrent import RecurrentCacheLayer, state_bytes
from effinfer.plugins.model.structure.repair import Conversion
from test_structure_alternates import FAMILIES, check_forms_agree, rope_for  # tests/ is on sys.path (pytest)


def converted(family: str, depth: int = 3, perturb: bool = True, **config):
    """A tiny model with linformer layers swapped in (no training); the new parameters moved off their start."""
    model, tokenizer = tiny_model(family, layers=depth)
    technique = Linformer({"chunk_size": 4, "slots": 3, "window": 3, "pool_block": 2, **config})
    swapped = technique.convert(model, Conversion(ModulePatcher()))
    if perturb:
        with torch.no_grad():
            generator = torch.Generator().manual_seed(1)
            for _, _, mixer in swapped:
                for parameter in mixer.new_parameters().values():
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    model.eval()
    return model, tokenizer, swapped


@settings(max_examples=16, deadline=None)
@given(family=st.sampled_from(FAMILIES), projection=st.sampled_from(["learned", "pooled"]),
       window=st.integers(0, 6), sinks=st.integers(0, 2), batch=st.integers(1, 3), length=st.integers(1, 19),
       chunk=st.integers(1, 8), split=st.integers(0, 19))
def test_parallel_form_equals_recurrent_form(family, projection, window, sinks, batch, length, chunk, split):
    """Chunked parallel (any chunk, from any incoming state) == one token at a time: outputs and state."""
    model, _, swapped = converted(family, projection=projection, window=window, sinks=sinks, chunk_size=chunk)
    check_forms_agree(model, swapped[0][2], batch, length, split)


def original_and_converted_logits(family, ids, **config):
    model, _ = tiny_model(family, layers=3)
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
    # the last layer: Gemma 3's tiny model makes the others sliding-window layers (8 tokens), which a
    # replacement does not mimic
    technique = Linformer({"layers": [2], "chunk_size": 5, **config})
    swapped = technique.convert(model, Conversion(ModulePatcher()))
    with torch.no_grad():
        for _, _, mixer in swapped:  # the memory bias and slot weights matter only to the memory
            for parameter in mixer.new_parameters().values():
                parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
        return reference, model(ids, use_cache=False).logits, swapped[0][2]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("projection", ["learned", "pooled"])
def test_a_window_covering_the_context_is_softmax_attention(family, projection):
    ids = torch.randint(3, 200, (2, 14), generator=torch.Generator().manual_seed(0))
    reference, logits, _ = original_and_converted_logits(family, ids, projection=projection, window=14, slots=2)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_token_per_pooled_slot_is_softmax_attention(family):
    """No window, pool_block 1, r ≥ the length: each slot holds one key and the memory is exact attention
    (β set to 0, its start value)."""
    ids = torch.randint(3, 200, (2, 14), generator=torch.Generator().manual_seed(0))
    model, _ = tiny_model(family, layers=3)
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
    Linformer({"layers": [2], "projection": "pooled", "window": 0, "slots": 16, "pool_block": 1,
               "chunk_size": 5}).convert(model, Conversion(ModulePatcher()))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, use_cache=False).logits, reference, atol=1e-4, rtol=1e-4)


def test_a_short_window_with_memory_differs_from_softmax_attention():
    """The identity above is not vacuous: with the window shorter than the context the memory is used."""
    ids = torch.randint(3, 200, (1, 14), generator=torch.Generator().manual_seed(0))
    reference, logits, _ = original_and_converted_logits("llama", ids, window=4, slots=2)
    assert (logits - reference).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("projection", ["learned", "pooled"])
def test_generate_equals_full_forward_argmax(family, projection):
    """HF generate (parallel prefill, recurrent decode, state in the cache) gives the no-cache argmax's tokens,
    every layer replaced (layer 0 too)."""
    model, _, _ = converted(family, count=3, projection=projection)
    prompt = torch.randint(3, 200, (1, 9), generator=torch.Generator().manual_seed(2))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, cache=cache)
        full = model(out, use_cache=False).logits.argmax(-1)
    assert torch.equal(full[0, 8:-1], out[0, 9:])
    assert all(isinstance(layer, RecurrentCacheLayer) for layer in cache.layers)
    assert cache.get_seq_length() == 16


@pytest.mark.parametrize("projection", ["learned", "pooled"])
def test_state_bytes_do_not_grow_with_the_context(projection):
    model, _, swapped = converted("llama", depth=4, layers=[1, 3], projection=projection, slots=4, window=5)
    sizes = []
    for length in (8, 40):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(torch.randint(3, 200, (1, length)), cache=cache, use_cache=True)
        assert [isinstance(layer, RecurrentCacheLayer) for layer in cache.layers] == [False, True, False, True]
        sizes.append(state_bytes(cache))
    assert sizes[0]["kv"] * 5 == sizes[1]["kv"]
    assert sizes[0]["state"] == sizes[1]["state"] > 0
    mixer = swapped[0][2]  # K̃, Ṽ (r × d) and m per KV head + the window's keys, values, φ and validity
    per_layer = mixer.num_kv_heads * (2 * 4 * mixer.head_dim + 4 + 5 * (2 * mixer.head_dim + 4)) * 4 + 5 * 4
    assert sizes[0]["state"] == 2 * (per_layer + 8)  # + the row's token count (positions of the sink slot)


@pytest.mark.parametrize("projection", ["learned", "pooled"])
def test_left_padding_gives_what_a_row_gives_alone(projection):
    from effinfer.core.generation import GenerationConfig, PlainDecoding
    model, tokenizer, _ = converted("qwen2", projection=projection)
    prompts = [torch.randint(3, 200, (1, n), generator=torch.Generator().manual_seed(n)) for n in (5, 11)]
    alone = [PlainDecoding().generate(model, p, torch.ones_like(p), GenerationConfig(max_new_tokens=6), set())
             .sequences[0] for p in prompts]
    ids = torch.full((2, 11), tokenizer.pad_token_id)
    mask = torch.zeros(2, 11, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, -p.shape[1]:], mask[row, -p.shape[1]:] = p[0], 1
    assert PlainDecoding().generate(model, ids, mask, GenerationConfig(max_new_tokens=6), set()).sequences == alone


@pytest.mark.parametrize("sinks, masses, last", [(0, [2.0, 2.0, 5.0], 4), (1, [1.0, 2.0, 6.0], 3)])
def test_pooled_slots_are_running_means_by_position(sinks, masses, last):
    """The first `sinks` positions get a slot each, then slot s holds pool_block positions; later positions go
    to the last slot."""
    model, _, swapped = converted("llama", projection="pooled", window=0, slots=3, pool_block=2, sinks=sinks,
                                  perturb=False)
    mixer: LowRankAttention = swapped[0][2]
    x = torch.randn(1, 9, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, state = mixer.mix(x, rope_for(model, x, torch.arange(9)[None]), None, None, "parallel")
        _, k, _ = mixer.heads(x, rope_for(model, x, torch.arange(9)[None]))
    assert state["m"][0, 0].tolist() == masses
    assert int(state["n"]) == 9
    torch.testing.assert_close(state["mk"][0, :, 2], k[0, :, last:].sum(1))


def test_learned_sink_slot_holds_the_first_token_alone():
    model, _, swapped = converted("gemma3", window=0, slots=4, sinks=1)
    mixer: LowRankAttention = swapped[0][2]
    x = torch.randn(2, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    rope = rope_for(model, x, torch.arange(7)[None].expand(2, -1))
    with torch.no_grad():
        _, state = mixer.mix(x, rope, None, None, "parallel")
        _, k, _ = mixer.heads(x, rope)
    torch.testing.assert_close(state["m"][..., 0], torch.ones_like(state["m"][..., 0]))
    torch.testing.assert_close(state["mk"][:, :, 0], k[:, :, 0])
    torch.testing.assert_close(state["m"].sum(-1), torch.full_like(state["m"][..., 0], 7.0))


@pytest.mark.parametrize("config, field", [
    ({"slots": 0}, "slots"), ({"slots": 5000}, "slots"), ({"projection": "random"}, "projection"),
    ({"window": -1}, "window"), ({"pool_block": 0}, "pool_block"), ({"count": -1}, "count"),
    ({"layers": [1, 1]}, "layers"), ({"chunk_size": 0}, "chunk_size"), ({"fit_lr": 0}, "fit_lr"),
    ({"sinks": -1}, "sinks"), ({"slots": 4, "sinks": 4}, "sinks=4 must be < slots=4"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_configs_are_refused_with_the_field(config, field):
    with pytest.raises(ValidationError, match=field):
        Linformer.Config(**config)


def test_layers_out_of_range_and_unknown_layouts_are_refused():
    model, _ = tiny_model("llama", layers=3)
    assert "layers: [7] out of range" in Linformer({"layers": [7]}).check_model_config(model.config)[0]
    attention = model.model.layers[0].self_attn
    del attention.k_proj
    with pytest.raises(EffinferError, match="has no k_proj"):
        LowRankAttention(attention, model.config, 0)


def test_composition_fits_and_restores():
    from effinfer.core.compose import ComposedModel
    model, tokenizer = tiny_model("qwen2", layers=2)
    x = torch.randint(3, 200, (1, 16))
    with torch.no_grad():
        reference = model(x).logits
    technique = Linformer({"layers": [1], "window": 4, "slots": 4, "fit_steps": 6, "fit_samples": 2,
                           "fit_seq_len": 16, "repair_steps": 0})
    with ComposedModel(model, tokenizer, [technique],
                       calibration=lambda n, s: torch.randint(3, 200, (n, s))) as composed:
        assert isinstance(composed.model.model.layers[1].self_attn, LowRankAttention)
        notes = " | ".join(note for _, _, note in composed.report.entries)
        assert "layer-wise fit of 1 submodule" in notes and "4 learned slots" in notes
        completions, _ = composed.generate(["Hello"])
        assert completions[0].tokens
    with torch.no_grad():
        assert torch.equal(model(x).logits, reference)


@pytest.mark.real_model
def test_smollm2_with_two_linformer_layers_generates(smollm2):
    from effinfer.core.calibration import calibration_source
    from effinfer.core.compose import ComposedModel
    model, tokenizer = smollm2
    technique = Linformer({"layers": [10, 20], "slots": 16, "window": 16, "fit_steps": 4, "fit_samples": 2,
                           "fit_seq_len": 64, "repair_steps": 0})
    with ComposedModel(model, tokenizer, [technique], calibration=calibration_source(tokenizer, 0),
                       engine="hf") as composed:
        ids = tokenizer(["The capital of France is"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = composed.model(ids, use_cache=False).logits
        assert torch.isfinite(logits).all()
        completions, _ = composed.generate(["The capital of France is"])
        assert completions[0].tokens
    assert not any(isinstance(layer.self_attn, LowRankAttention) for layer in model.model.layers)
