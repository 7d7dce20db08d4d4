"""EAGLE (arXiv:2401.15077): a one-layer feature head drafts, the shared verifier keeps it lossless.

- lossless: greedy output equals transformers' plain greedy on tiny Llama, Qwen2 and Gemma 3
  models, on the static engine and on the HF path, and (a hypothesis property) on random tiny
  models, prompts, lengths, draft lengths and prompt-feature windows;
- the trained head agrees with the target's next token on held-out answers far more often than
  the untrained one; a second training with the same options is read from its checkpoint;
- bad configurations and layouts the head cannot copy are refused with the field and the range.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effinfer.core.compose import ComposedModel
from effinfer.core.errors import ExperimentError
from effinfer.core.experiment import Experiment
from effinfer.core.generation import GenerationConfig, encode_prompts, stop_token_ids
from effinfer.core.stages import Request
from effinfer.core.testing import TINY_FAMILIES, tiny_llama, tiny_model
from effinfer.plugins.system.engine import StaticDecoding, StaticEngine
from effinfer.plugins.system.speculative import eagle_head
from effinfer.plugins.system.speculative.eagle import Eagle, EagleDecoding
from effinfer.plugins.system.speculative.eagle_head import UnsupportedLayout, head_config, train_eagle

PROMPT = "abc abc abd. The window of a sliding layer is short; abc abc abd"
SMALL = {"train_prompts": 4, "train_new_tokens": 16, "epochs": 2, "prompt_features": 4, "num_draft_tokens": 3}
ANSWERS = [f"Tell me about {w}{w} and the rest of {w}." for w in "abcdefghijklmnopqrstuvwxyz"]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Training prompts from a fixed list; checkpoints in a scratch folder; one thread."""
    monkeypatch.setattr(eagle_head, "training_prompts", lambda count, corpora: ANSWERS[:count])
    monkeypatch.setattr(eagle_head, "checkpoint_path", lambda kind, key: tmp_path / kind / f"{key}.pt")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("engine", ["static", "hf"])
@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_eagle_reproduces_plain_greedy_on_each_family(family, engine):
    # float64 keeps near-ties from flipping between the two paths (the float32 head feeds the LM head in float64)
    model, tokenizer = tiny_model(family, layers=3, seed=4, dtype=torch.float64)
    config = GenerationConfig(max_new_tokens=24)
    request = Request.from_text(PROMPT)
    with ComposedModel(model, tokenizer, [], engine="hf") as plain:
        [reference], _ = plain.generate([request], config)
    stack = Experiment(techniques=[{"name": "eagle", "config": SMALL}]).build_stack()
    with ComposedModel(model, tokenizer, stack, engine=engine) as composed:
        [completion], result = composed.generate([request], config)
        assert isinstance(composed.strategy, EagleDecoding)
    assert completion.tokens == reference.tokens
    assert max(result.drafted_per_step) == 3 and min(result.drafted_per_step) >= 1  # the last steps: the budget


@functools.cache
def trained_llama(seed: int) -> tuple[torch.nn.Module, object, object]:
    """A random tiny Llama and its head, trained once per seed (inside the first test that asks)."""
    model, tokenizer = tiny_llama(layers=3, hidden=32, heads=4, kv_heads=2, intermediate=64, seed=seed,
                                  dtype=torch.float64)
    head, _ = train_eagle(model, tokenizer, Eagle.Config(**SMALL), StaticEngine())
    return model, tokenizer, head


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2), prompt=st.text(alphabet="abcde fgh.", min_size=1, max_size=30),
       new_tokens=st.integers(1, 24), drafts=st.integers(1, 6), window=st.integers(1, 40))
def test_every_draft_length_and_window_reproduces_plain_greedy(seed, prompt, new_tokens, drafts, window):
    model, tokenizer, head = trained_llama(seed)
    ids, mask = encode_prompts(tokenizer, [prompt, prompt[::-1] + "abc"], chat_template=True)
    config = GenerationConfig(max_new_tokens=new_tokens)
    stops = stop_token_ids(tokenizer, model, config)
    strategy = EagleDecoding(Eagle.Config(num_draft_tokens=drafts, prompt_features=window), head, StaticEngine())
    result = strategy.generate(model, ids, mask, config, stops)
    assert result.sequences == StaticDecoding().generate(model, ids, mask, config, stops).sequences
    assert all(0 <= a <= d <= drafts for a, d in zip(result.accepted_per_step, result.drafted_per_step))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_trained_head_predicts_the_targets_next_token(family):
    model, tokenizer = tiny_model(family, layers=2, seed=0)
    options = Eagle.Config(train_prompts=10, train_new_tokens=32, epochs=20)
    _, report = train_eagle(model, tokenizer, options, StaticEngine())
    assert report.held_out_positions >= 100 and report.final_loss < report.first_loss
    assert report.held_out_top1 > report.untrained_top1 + 0.15, report.describe()


def test_the_head_is_read_back_from_its_checkpoint():
    model, tokenizer = tiny_model("qwen2", layers=2, seed=1)
    options = Eagle.Config(**SMALL)
    head, report = train_eagle(model, tokenizer, options, StaticEngine())
    assert not report.cached and report.steps == SMALL["epochs"] * 3  # 4 answers, one held out
    assert all(p.requires_grad for p in model.parameters()), "training must not freeze the model for good"
    again, cached = train_eagle(model, tokenizer, options, StaticEngine())
    assert cached.cached and cached.final_loss == report.final_loss and cached.held_out_top1 == report.held_out_top1
    for (name, parameter), (_, loaded) in zip(head.named_parameters(), again.named_parameters()):
        assert torch.equal(parameter, loaded), name
    _, other = train_eagle(model, tokenizer, Eagle.Config(**SMALL | {"epochs": 3}), StaticEngine())
    assert not other.cached, "other training options train a new head"


def problems(*techniques: str) -> str:
    with pytest.raises(ExperimentError) as error:
        Experiment(techniques=list(techniques)).build_stack()
    return str(error.value)


@pytest.mark.parametrize(("spec", "message"), [
    ("eagle:num_draft_tokens=0", "num_draft_tokens: Input should be greater than or equal to 1 (got 0); "
                                 "allowed: 1 ≤ value ≤ 16"),
    ("eagle:num_draft_tokens=17", "allowed: 1 ≤ value ≤ 16"),
    ("eagle:prompt_features=0", "prompt_features: Input should be greater than or equal to 1"),
    ("eagle:train_prompts=1", "train_prompts: Input should be greater than or equal to 2"),
    ("eagle:lr=0", "lr: Input should be greater than 0"),
    ("eagle:heads=3", "heads"),
])
def test_bad_configs_are_refused_with_the_field_and_range(spec, message):
    assert message in problems(spec)


def test_a_layout_the_head_cannot_copy_is_refused():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedLayout, match=r"one decoder layer of a \['gemma3_text', 'llama', 'qwen2'\] "
                                                r"model; this model's type is 'gpt2'"):
        head_config(GPT2Config())
    assert "gpt2" not in Eagle.layouts
