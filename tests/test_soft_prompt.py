"""Soft-prompt compression: memorised contexts come back, placeholders carry the soft tokens, errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effinfer.core.compose import compose_stack
from effinfer.core.errors import ExperimentError
from effinfer.core.experiment import Runtime, TechniqueSpec, resolve_stack
from effinfer.core.generation import GenerationConfig
from effinfer.core.stages import Request
from effinfer.core.testing import TINY_FAMILIES, tiny_model
from effinfer.plugins.data.prompt_compression import soft_prompt as soft_module
from effinfer.plugins.data.prompt_compression.soft_prompt import (Compressor, SoftContextEmbedding, SoftPrompt,
                                                                  SoftPromptError, placeholder_token, soft_loss)
from effinfer.plugins.model.training import train

SMALL = {"soft_tokens": 4, "segment_tokens": 24, "steps": 2, "continuation_tokens": 8, "min_tokens": 0}


@pytest.fixture(autouse=True)
def private_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setattr(soft_module, "checkpoint_path", lambda kind, key: tmp_path / kind / f"{key}.pt")


def with_placeholder(family: str = "llama", **options):
    model, tokenizer = tiny_model(family, **options)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|soft|>"]})
    return model, tokenizer


@torch.no_grad()
def reconstruction_accuracy(model, compressor, ids: torch.Tensor) -> float:
    embed = model.get_input_embeddings()
    soft = compressor.compress(model, embed, ids)
    marker = compressor.marker[None].expand(ids.shape[0], -1, -1)
    logits = model(inputs_embeds=torch.cat([soft, marker, embed(ids)], 1), use_cache=False).logits
    k = soft.shape[1]
    return float((logits[:, k:-1].argmax(-1) == ids).float().mean())


def test_a_trained_compressor_reconstructs_a_memorised_context_far_above_chance():
    model, tokenizer = with_placeholder(layers=2, seed=0)
    model.requires_grad_(False)
    ids = torch.tensor([tokenizer("The blue lighthouse keeps its secret code.", add_special_tokens=False).input_ids])
    embed = model.get_input_embeddings()
    torch.manual_seed(0)
    compressor = Compressor(model.config.hidden_size, 8, float(embed.weight.std()))
    before = reconstruction_accuracy(model, compressor, ids)
    train(dict(compressor.named_parameters()), lambda batch: soft_loss(model, embed, compressor, batch, ids.shape[1],
                                                                       0.0, 1.0),
          itertools.repeat(ids), steps=150, lr=1e-2, progress=False)
    after = reconstruction_accuracy(model, compressor, ids)
    chance = 1 / len(tokenizer)
    assert after >= 0.8 and after > before + 0.3, (before, after, chance)


@pytest.mark.parametrize("family, engine", [(f, "hf") for f in TINY_FAMILIES] + [("llama", "static")])
def test_placeholders_carry_each_requests_soft_tokens_through_generation(family, engine):
    model, tokenizer = with_placeholder(family, layers=2, seed=1)
    technique = SoftPrompt(SMALL)
    docs = ["The river flows through Paris and the castle stands by it. " * 2, "Newton built an engine in 1887."]
    requests = [Request.from_text("Where is the river?", docs), Request.from_text("Who built it?", docs[::-1])]
    seen = []
    with compose_stack(model, tokenizer, [technique], Runtime(engine=engine)) as composed:
        wrapper = model.get_input_embeddings()
        assert isinstance(wrapper, SoftContextEmbedding)
        handle = wrapper.register_forward_hook(lambda module, args, out: seen.append((args[0].clone(), out.clone())))
        completions, _ = composed.generate(requests, GenerationConfig(max_new_tokens=3))
        handle.remove()
        pending = list(wrapper.pending)[-2:]
    assert model.get_input_embeddings() is not wrapper  # restored when the composition exits
    ids, prefill = seen[0]  # the batched prefill: one row per request, in order
    marked = ids == wrapper.placeholder_id
    for row, vectors in enumerate(pending):
        total = len(tokenizer("\n\n".join(docs if row == 0 else docs[::-1]), add_special_tokens=False).input_ids)
        assert int(marked[row].sum()) == len(vectors) == 4 * -(-total // 24)
        torch.testing.assert_close(prefill[row, marked[row]], vectors.to(prefill.dtype))
    context = len(tokenizer("\n\n".join(docs), add_special_tokens=False).input_ids)
    assert all(c.prompt_tokens < context for c in completions)  # the prompt really is shorter than its context


@settings(max_examples=5, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(words=st.integers(1, 60), k=st.integers(1, 6), segment=st.integers(8, 40))
def test_soft_token_count_is_k_per_segment(words, k, segment):
    model, tokenizer = _shared()
    technique = SoftPrompt(SMALL | {"soft_tokens": min(k, segment - 1), "segment_tokens": segment})
    technique.compressor = Compressor(model.config.hidden_size, technique.config.soft_tokens, 0.02)
    n = len(tokenizer(" ".join(["river"] * words), add_special_tokens=False).input_ids)
    vectors = technique.soft_tokens(model, tokenizer(" ".join(["river"] * words), add_special_tokens=False).input_ids)
    assert vectors.shape == (technique.config.soft_tokens * -(-n // segment), model.config.hidden_size)


_SHARED: list = []


def _shared():
    if not _SHARED:
        _SHARED.extend(with_placeholder(layers=1, seed=2))
    return tuple(_SHARED)


def test_short_contexts_are_left_alone():
    model, tokenizer = with_placeholder(layers=1, seed=3)
    technique = SoftPrompt(SMALL | {"min_tokens": 500})
    with compose_stack(model, tokenizer, [technique], Runtime(engine="hf")) as composed:
        request = Request.from_text("Where?", ["A short document."])
        assert composed.transform_request(request).documents == ["A short document."]


def test_a_tokenizer_without_a_free_special_token_is_refused_with_the_fix():
    _, tokenizer = tiny_model("llama")
    with pytest.raises(SoftPromptError, match="add_special_tokens"):
        placeholder_token(tokenizer)


@pytest.mark.parametrize("config, message", [
    ({"soft_tokens": 64, "segment_tokens": 64}, "segment_tokens"),
    ({"continuation": 0.0, "reconstruction": 0.0}, "positive weight"),
    ({"soft_tokens": 0}, "soft_tokens"),
    ({"continuation_tokens": 0}, "continuation_tokens"),
])
def test_bad_configs_are_refused_before_any_model_loads(registry, config, message):
    with pytest.raises(ExperimentError, match=message):
        resolve_stack([TechniqueSpec.model_validate({"name": "soft_prompt", "config": config})], Runtime(), registry)
