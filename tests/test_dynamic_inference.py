"""Token-level early exit: threshold 1.0 is the full model, LayerSkip is lossless, KV fill, bad configs."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from effinfer.core.engines import HFEngine
from effinfer.core.generation import GenerationConfig, PlainDecoding, encode_prompts
from effinfer.core.stages import SystemStage
from effinfer.core.testing import TINY_FAMILIES, tiny_llama, tiny_model
from effinfer.evaluation.metrics.memory import CacheRecorder
from effinfer.plugins.model.dynamic_inference import exits as exits_module
from effinfer.plugins.model.dynamic_inference.early_exit import EarlyExit, EarlyExitError
from effinfer.plugins.model.dynamic_inference.exits import check_exits, default_exits
from effinfer.plugins.model.dynamic_inference.layerskip import LayerSkip
from effinfer.plugins.system.engine import StaticEngine

TRAINING = {"train_prompts": 2, "train_new_tokens": 8, "train_steps": 5}


@pytest.fixture(autouse=True)
def private_exit_cache(tmp_path, monkeypatch):
    """Trained exits go to a temporary folder, not the user's cache."""
    monkeypatch.setattr(exits_module, "checkpoint_path", lambda kind, key: tmp_path / kind / f"{key}.pt")


def decode(strategy, model, tokenizer, sample=False):
    ids, mask = encode_prompts(tokenizer, ["Hello there, how are you?", "abc"], True)
    config = GenerationConfig(max_new_tokens=16, do_sample=sample, seed=3)
    return strategy.generate(model, ids, mask, config, set())


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_threshold_one_is_the_full_model_and_layerskip_is_plain_greedy(family):
    model, tokenizer = tiny_model(family, layers=4, seed=1)
    engine = StaticEngine()
    plain = decode(PlainDecoding(), model, tokenizer).sequences
    assert decode(engine.decoding(), model, tokenizer).sequences == plain
    never = EarlyExit({"threshold": 1.0, **TRAINING})
    strategy = never.effinfer_decoding_strategy(SystemStage(model, tokenizer, engine=engine))
    assert decode(strategy, model, tokenizer).sequences == plain
    assert set(strategy.layers_per_token) == {4}
    skip = LayerSkip({"draft_layers": 2, **TRAINING}).effinfer_decoding_strategy(
        SystemStage(model, tokenizer, engine=engine))
    result = decode(skip, model, tokenizer)
    assert result.sequences == plain and result.drafted_per_step


def test_low_threshold_exits_early_and_fills_the_skipped_kv():
    model, tokenizer = tiny_llama(layers=4, seed=2)
    always = EarlyExit({"threshold": 0.0, "exit_layers": [1], **TRAINING})
    strategy = always.effinfer_decoding_strategy(SystemStage(model, tokenizer, engine=StaticEngine()))
    recorder = CacheRecorder(None)  # the evaluator's KV-bytes probe sees the static buffers early exit fills
    ids, mask = encode_prompts(tokenizer, ["Hello there, how are you?", "abc"], True)
    out = strategy.generate(model, ids, mask, GenerationConfig(max_new_tokens=16), set(), cache_factory=recorder)
    assert set(strategy.layers_per_token) == {2} and all(len(s) == 16 for s in out.sequences)
    assert recorder.kv_bytes() > 0 and recorder.allocated_token_slots()
    # the KV written for the skipped blocks is that block's K/V of the exit hidden state: check one column
    from effinfer.plugins.model.dynamic_inference.layers import StepContext, fill_kv
    from effinfer.plugins.system.engine import shared_engine
    from effinfer.plugins.system.engine.forward import apply_rotary

    engine = shared_engine(model)
    cache = engine.cache_for(1, 8, name="test-fill")
    cache.reset(torch.ones(1, 1, dtype=torch.long))
    hidden = torch.randn(1, 1, model.config.hidden_size)
    context = StepContext(engine.layout, cache, hidden, 0)
    fill_kv(engine.layout, cache, context, 3, hidden)
    layer = model.model.layers[3]
    x = layer.input_layernorm(hidden)
    value = layer.self_attn.v_proj(x).view(1, 1, -1, engine.layout.head_dim).transpose(1, 2)
    key = layer.self_attn.k_proj(x).view(1, 1, -1, engine.layout.head_dim).transpose(1, 2)
    cos, sin = context.rope["full_attention"]
    torch.testing.assert_close(cache.values[3][:, :, :1], value)
    torch.testing.assert_close(cache.keys[3][:, :, :1], apply_rotary(key, cos, sin))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fused_fill_writes_what_the_block_by_block_fill_writes(family):
    from effinfer.plugins.model.dynamic_inference.layers import StepContext, fill_kv, fused_fill
    from effinfer.plugins.system.engine import shared_engine

    model, _ = tiny_model(family, layers=4, seed=5)
    layout = shared_engine(model).layout
    fused = fused_fill(layout)
    if fused is None:  # Gemma 3 (four norms, q/k norms, two rotary tables): filled block by block
        assert layout.sandwich_norms
        return
    caches = [shared_engine(model).cache_for(1, 8, name=f"test-fused-{i}") for i in range(2)]
    hidden = torch.randn(1, 1, model.config.hidden_size)
    for cache in caches:
        cache.reset(torch.ones(1, 3, dtype=torch.long))
        cache.keys.zero_()
        cache.values.zero_()
    context = StepContext(layout, caches[0], hidden, 5)
    fused.fill(layout, caches[0], context, 0, hidden)
    for index in range(1, 4):
        fill_kv(layout, caches[1], context, index, hidden)
    torch.testing.assert_close(caches[0].keys, caches[1].keys, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(caches[0].values, caches[1].values, rtol=1e-4, atol=1e-5)
    assert caches[0].keys[1:, :, :, 5].abs().sum() > 0 and caches[0].keys[0].abs().sum() == 0
    with torch.no_grad():  # an in-place weight edit rebuilds the folded matrix
        model.model.layers[2].self_attn.k_proj.weight.mul_(2)
    assert fused_fill(layout) is not fused


def test_layerskip_is_lossless_when_sampling():
    model, tokenizer = tiny_llama(layers=4, seed=3)
    skip = LayerSkip({"draft_layers": 2, **TRAINING}).effinfer_decoding_strategy(
        SystemStage(model, tokenizer, engine=StaticEngine()))
    out = decode(skip, model, tokenizer, sample=True)
    assert all(len(s) == 16 for s in out.sequences)  # distribution exactness: the shared verifier's own tests


def test_bad_configs_are_refused():
    config = tiny_llama(layers=4)[0].config
    assert check_exits(4, [3]) and check_exits(4, [0, 2]) == [] and check_exits(1, None)
    assert "out of range" in EarlyExit({"exit_layers": [5]}).check_model_config(config)[0]
    assert "draft_layers ≤ 3" in LayerSkip({"draft_layers": 4}).check_model_config(config)[0]
    assert default_exits(30) == [11, 14, 17, 20, 23, 26] and default_exits(2) == [0]
    with pytest.raises(ValidationError):
        EarlyExit({"threshold": 1.5})
    with pytest.raises(ValidationError):
        EarlyExit({"confidence": "entropy"})
    model, tokenizer = tiny_llama(layers=4)
    skip = LayerSkip({"draft_layers": 2, **TRAINING}).effinfer_decoding_strategy(
        SystemStage(model, tokenizer, engine=HFEngine()))
    with pytest.raises(EarlyExitError, match="static"):
        decode(skip, model, tokenizer)


def test_cascade_escalates_by_its_threshold():
    from effinfer.plugins.model.dynamic_inference.cascade import Cascade

    model, tokenizer = tiny_llama(layers=2, seed=4)
    engine = StaticEngine()
    full = decode(engine.decoding(), model, tokenizer).sequences
    always = Cascade({"cheap": ["rtn:bits=4"], "threshold": -0.0}).effinfer_decoding_strategy(
        SystemStage(model, tokenizer, engine=engine))
    assert always.threshold == 0.0
    assert decode(always, model, tokenizer).sequences == full and always.escalated_fraction() == 1.0
    never = Cascade({"cheap": ["rtn:bits=4"], "threshold": -50.0}).effinfer_decoding_strategy(
        SystemStage(model, tokenizer, engine=engine))
    cheap = decode(engine.decoding(), never.cheap, tokenizer).sequences
    assert decode(never, model, tokenizer).sequences == cheap and never.escalated_fraction() == 0.0
    with pytest.raises(ValidationError, match="threshold ≤ 0"):
        Cascade({"threshold": 1.0})
    with pytest.raises(ValidationError, match="cheap is empty"):
        Cascade({"cheap": []})
