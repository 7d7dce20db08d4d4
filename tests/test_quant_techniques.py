"""The five quantization techniques (and rtn) on a tiny model: apply, restore, save/reload, configs."""

from __future__ import annotations

import pytest
import torch

from effinfer.core.compose import ComposedModel
from effinfer.core.errors import ExperimentError
from effinfer.core.experiment import Experiment
from effinfer.core.stages import ModulePatcher
from effinfer.core.testing import tiny_llama
from effinfer.core.calibration import calibration_source
from effinfer.plugins.model.calibration import activation_stats, text_source
from effinfer.plugins.model.quantization.checkpoint import load_quantized, save_quantized
from effinfer.plugins.model.quantization.layers import PackedLayer
from effinfer.plugins.model.quantization.scaling import ScaleGroup, fold_scales

TEXT = ("The quick brown fox jumps over the lazy dog. Quantization stores weights in fewer bits; "
        "calibration text shows the quantizer which activations are large. ") * 40
SMALL = {"n_samples": 4, "seq_len": 48}

STACKS = {
    "rtn_w3": ("rtn", {"bits": 3, "symmetric": False}),
    "gptq_w4": ("gptq", {"bits": 4, **SMALL}),
    "gptq_w4_act_order": ("gptq", {"bits": 4, "act_order": True, "symmetric": True, **SMALL}),
    "awq_w4": ("awq", {"bits": 4, "alpha_grid": 4, "clip_grid": 4, **SMALL}),
    "smoothquant": ("smoothquant", {"smooth_down_proj": True, **SMALL}),
    "llm_int8": ("llm_int8", {"threshold": 1.5, **SMALL}),
    "qat_self_generated": ("qat", {"steps": 2, "seq_len": 24, "n_samples": 2, "batch_size": 2,
                                   "data": "self_generated"}),
}


def build(name: str, config: dict) -> list:
    return Experiment(techniques=[{"name": name, "config": config}]).build_stack()


@pytest.fixture
def calibration(tiny):
    return text_source(tiny[1], TEXT, seed=1)


@pytest.mark.parametrize("key", list(STACKS))
def test_quantizes_restores_and_reloads_identically(key, tiny, calibration, tmp_path):
    model, tokenizer = tiny
    name, config = STACKS[key]
    ids = text_source(tokenizer, TEXT, seed=7)(2, 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = model(ids).logits
        with ComposedModel(model, tokenizer, build(name, config), calibration=calibration) as composed:
            layers = [m for m in composed.model.modules() if isinstance(m, PackedLayer)]
            assert len(layers) == 14  # 2 blocks × 7 projections; lm_head skipped
            out = composed.model(ids).logits
            notes = " ".join(note for _, _, note in composed.report.entries)
            assert "execution:" in notes and "MiB" in notes
            assert torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0) > 0.5
            save_quantized(composed.model, tokenizer, tmp_path / key, {"name": name, "config": config})
        reloaded, reloaded_tokenizer = load_quantized(tmp_path / key)
        assert torch.equal(reloaded(ids).logits, out)
    assert reloaded_tokenizer.decode(ids[0]) == tokenizer.decode(ids[0])
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # the composition restored it


def test_notes_say_which_execution_path_ran(tiny, calibration):
    model, tokenizer = tiny
    expected = {"rtn:bits=4": "int4 packed kernel", "rtn:bits=8": "int8 packed kernel",
                "rtn:bits=3": "int3 dequantize-per-call", "rtn:bits=4,execution=fake": "fake-quant",
                "rtn:bits=4,execution=dequant": "int4 dequantize-per-call"}
    for spec, path in expected.items():
        with ComposedModel(model, tokenizer, Experiment(techniques=[spec]).build_stack()) as composed:
            assert f"14 × {path}" in composed.report.entries[0][2]


def test_save_dir_writes_a_checkpoint(tiny, calibration, tmp_path):
    model, tokenizer = tiny
    with ComposedModel(model, tokenizer, build("gptq", {"save_dir": str(tmp_path / "ckpt"), **SMALL}),
                       calibration=calibration) as composed:
        assert any("saved 14 quantized layers" in note for _, _, note in composed.report.entries)
        ids = torch.randint(0, 200, (1, 12))
        out = composed.model(ids).logits
    assert torch.equal(load_quantized(tmp_path / "ckpt")[0](ids).logits, out)


def test_folding_scales_keeps_the_float_model(tiny):
    model, _ = tiny
    ids = torch.randint(0, 200, (1, 16))
    layer = model.model.layers[0]
    with torch.no_grad():
        before = model(ids).logits
        patcher = ModulePatcher()
        for group in (ScaleGroup("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                      ScaleGroup("mlp.up_proj", ["mlp.down_proj"])):
            width = layer.get_submodule(group.linears[0]).in_features
            fold_scales(layer, group, torch.rand(width) * 3 + 0.1, patcher)
        assert torch.allclose(model(ids).logits, before, atol=1e-4)
        patcher.restore()
        assert torch.equal(model(ids).logits, before)


def test_smoothquant_helps_int8_activations_with_outlier_channels():
    model, tokenizer = tiny_llama(layers=1, seed=3)
    with torch.no_grad():
        for layer in model.model.layers:  # plant activation outliers in a few channels
            layer.input_layernorm.weight[:4] = 40.0
            layer.post_attention_layernorm.weight[:4] = 40.0
    calibration = text_source(tokenizer, TEXT)
    ids = calibration(2, 32)
    with torch.no_grad():
        reference = model(ids).logits
        errors = {}
        for alpha in (0.0, 0.5):
            stack = build("smoothquant", {"alpha": alpha, **SMALL})
            with ComposedModel(model, tokenizer, stack, calibration=calibration) as composed:
                errors[alpha] = float((composed.model(ids).logits - reference).norm())
    assert errors[0.5] < errors[0.0]


def test_activation_stats_are_cached_per_model_and_batch(tiny):
    model, tokenizer = tiny
    tokens = text_source(tokenizer, TEXT)(2, 32)
    first = activation_stats(model, tokens)
    assert activation_stats(model, tokens) is first
    assert activation_stats(model, tokens[:1]) is not first
    assert first["model.layers.0.self_attn.q_proj"].tokens == 64


def test_calibration_source_is_seeded_and_cached(monkeypatch, tiny):
    _, tokenizer = tiny
    import effinfer.data as data

    calls = []
    monkeypatch.setattr(data, "corpus_text", lambda name, split: calls.append((name, split)) or TEXT)
    first = calibration_source(tokenizer, seed=5, corpus="test-corpus")(3, 40)
    again = calibration_source(tokenizer, seed=5, corpus="test-corpus")(3, 40)
    other = calibration_source(tokenizer, seed=6, corpus="test-corpus")(3, 40)
    assert first.shape == (3, 40) and torch.equal(first, again) and not torch.equal(first, other)
    assert calls == [("test-corpus", "calibration")]  # tokenized once


@pytest.mark.parametrize(("spec", "expected"), [
    ("rtn:bits=5", "bits: Input should be 2, 3, 4 or 8 (got 5); allowed: one of 2, 3, 4, 8"),
    ("rtn:group_size=16384", "group_size: Input should be less than or equal to 8192 (got 16384); allowed: 8 ≤ value ≤ 8192"),
    ("gptq:group_size=36", "group_size: Input should be a multiple of 8 (got 36)"),
    ("gptq:damp=0", "damp: Input should be greater than 0 (got 0); allowed: 0.0 < value ≤ 1.0"),
    ("gptq:n_samples=0", "n_samples: Input should be greater than or equal to 1 (got 0); allowed: 1 ≤ value ≤ 4096"),
    ("awq:max_shrink=1.0", "max_shrink: Input should be less than 1 (got 1.0); allowed: 0.0 ≤ value < 1.0"),
    ("awq:alpha_grid=0", "alpha_grid: Input should be greater than or equal to 1 (got 0); allowed: 1 ≤ value ≤ 100"),
    ("smoothquant:alpha=1.5", "alpha: Input should be less than or equal to 1 (got 1.5); allowed: 0.0 ≤ value ≤ 1.0"),
    ("smoothquant:activation_scales=per_channel", "allowed: one of 'dynamic_per_token', 'static_per_tensor'"),
    ("llm_int8:threshold=-1", "threshold: Input should be greater than 0 (got -1); allowed: 0.0 < value ≤ 1000.0"),
    ("qat:lr=0.5", "lr: Input should be less than or equal to 0.01 (got 0.5); allowed: 0.0 < value ≤ 0.01"),
    ("qat:data=wiki", "allowed: one of 'calibration', 'self_generated'"),
    ("qat:steps=0", "steps: Input should be greater than or equal to 1 (got 0); allowed: 1 ≤ value ≤ 100000"),
    ("rtn:bits=3,execution=kernel", "there is no packed kernel for 3-bit weights (only 8 and 4)"),
    ("gptq:bits=4,group_size=16,execution=kernel", "execution='kernel' with bits=4 needs group_size 32, 64, 128 or 256"),
    ("awq:colour=red", "colour: Extra inputs are not permitted"),
])
def test_configs_out_of_range_are_refused_with_field_and_range(spec, expected):
    with pytest.raises(ExperimentError) as caught:
        Experiment(techniques=[spec]).build_stack()
    assert expected in str(caught.value), str(caught.value)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("name", ["rtn", "gptq", "awq", "qat"])
def test_a_group_size_that_does_not_divide_a_layer_is_refused_from_the_config(name, family):
    """Told from the model's config alone (before loading), in the post-load error's wording, per input size."""
    from effinfer.core.testing import tiny_model

    model, _ = tiny_model(family, intermediate=96)  # q/k/v/o/gate/up: 64 inputs, down_proj: 96
    [technique] = build(name, {"bits": 4, "group_size": 64})
    assert technique.check_model_config(model.config) == [
        "group_size=64 does not divide the layer's 96 input features; use one of [16, 32] or None (one group per "
        "row); layers with 96 input features: mlp.down_proj"]
    [fits] = build(name, {"bits": 4, "group_size": 32})
    assert fits.check_model_config(model.config) == [] and fits.check_model_config(None) == []


def test_the_group_size_check_respects_skip_modules_and_the_attention_width():
    from effinfer.core.testing import tiny_gemma3

    model, _ = tiny_gemma3(hidden=64, heads=4, head_dim=24, intermediate=128)  # o_proj takes 4 × 24 = 96
    [rtn] = build("rtn", {"bits": 4, "group_size": 64})
    assert rtn.check_model_config(model.config) == [
        "group_size=64 does not divide the layer's 96 input features; use one of [16, 32] or None (one group per "
        "row); layers with 96 input features: self_attn.o_proj"]
    [skipping] = build("rtn", {"bits": 4, "group_size": 64, "skip_modules": ["lm_head", "o_proj"]})
    assert skipping.check_model_config(model.config) == []
    [with_head] = build("rtn", {"bits": 4, "group_size": 128, "skip_modules": ["self_attn", "mlp"]})
    assert with_head.check_model_config(model.config) == [  # lm_head is quantized when not skipped
        "group_size=128 does not divide the layer's 64 input features; use one of [16, 32, 64] or None (one group "
        "per row); layers with 64 input features: lm_head"]


def test_a_group_size_that_does_not_divide_is_refused_before_loading(tiny_model_dir, monkeypatch):
    from effinfer.core import runner

    monkeypatch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    experiment = Experiment(model=str(tiny_model_dir), techniques=["gptq:bits=4,group_size=48"])
    with pytest.raises(ExperimentError, match=r"gptq: group_size=48 does not divide the layer's 64 input features; "
                                              r"use one of \[16, 32, 64\] or None"):
        runner.run_experiment(experiment)


# --------------------------------------------------------------------------- GPTQ vs RTN, stored bytes


def layer_inputs(model, tokens, module="mlp.down_proj"):
    """The inputs of decoder layer 0's ``module`` on ``tokens`` (``tokens × features``)."""
    from effinfer.plugins.model.quantization.layerwise import collect_inputs, first_layer_inputs

    layer = model.model.layers[0]
    batches = first_layer_inputs(model, tokens, batch_size=4)
    linear = layer.get_submodule(module)
    return linear, collect_inputs(layer, batches, {module: linear})[module]


def reconstruction_errors(linear, x, bits, group, symmetric):
    """``||x Wᵀ − x Qᵀ||²`` for GPTQ's and RTN's ``Q`` on the same grid and the same calibration batch."""
    from effinfer.plugins.model.quantization.gptq import HessianAccumulator, gptq_quantize
    from effinfer.plugins.model.quantization.packing import quantize

    hessian = HessianAccumulator(x.shape[1])
    hessian.add(x)
    weight = linear.weight.detach()
    gptq, _ = gptq_quantize(weight, hessian.hessian, bits, group, symmetric)
    rtn = quantize(weight, bits, group, symmetric)
    reference = x @ weight.t()
    return [float((x @ q.dequantize().t() - reference).pow(2).sum()) for q in (gptq, rtn)]


@pytest.mark.parametrize(("bits", "group", "symmetric"), [(4, 32, False), (3, 16, True), (4, None, True),
                                                          (8, None, True)])
def test_gptq_reconstruction_error_is_below_rtn(tiny, calibration, bits, group, symmetric):
    model, _ = tiny
    linear, x = layer_inputs(model, calibration(8, 48))
    gptq, rtn = reconstruction_errors(linear, x, bits, group, symmetric)
    assert gptq < rtn, (gptq, rtn)


@pytest.mark.real_model
def test_gptq_reconstruction_error_is_below_rtn_on_smollm2(smollm2):
    model, tokenizer = smollm2
    from effinfer.core.calibration import calibration_source as core_source

    tokens = core_source(tokenizer, seed=0)(4, 128)
    for module in ("self_attn.q_proj", "mlp.down_proj"):
        linear, x = layer_inputs(model, tokens, module)
        gptq, rtn = reconstruction_errors(linear, x, 4, 64, False)  # hidden 576: 128 does not divide it
        assert gptq < 0.8 * rtn, (module, gptq, rtn)


def test_packed_model_weight_bytes_match_the_arithmetic(tiny, calibration):
    model, tokenizer = tiny
    linears = {n: (m.out_features, m.in_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    stack = build("gptq", {"bits": 4, "group_size": 32, "symmetric": True, "execution": "dequant", **SMALL})
    with ComposedModel(model, tokenizer, stack, calibration=calibration) as composed:
        layers = {n: m for n, m in composed.model.named_modules() if isinstance(m, PackedLayer)}
        stored = sum(t.numel() * t.element_size() for m in layers.values() for t in [*m.parameters(), *m.buffers()])
    assert set(layers) == set(linears)
    # half a byte per weight + one float16 scale per 32 weights, nothing else (symmetric: no zero points)
    assert stored == sum(out * inp // 2 + out * inp // 32 * 2 for out, inp in linears.values())


@pytest.mark.parametrize("name", ["gptq", "awq", "smoothquant", "llm_int8", "qat"])
def test_bench_configs_are_valid_and_cheaper_than_the_defaults(registry, name):
    technique = registry.techniques[name].technique
    config = technique.Config.model_validate(technique.bench_config)
    defaults = technique.Config()
    assert config.n_samples * config.seq_len <= defaults.n_samples * defaults.seq_len


@pytest.mark.real_model
def test_smollm2_int4_kernel_model_saved_and_reloaded_gives_identical_logits(smollm2, tmp_path):
    model, tokenizer = smollm2
    ids = tokenizer(["The capital of France is", "Quantized weights take half a byte"], return_tensors="pt",
                    padding=True)["input_ids"]
    stack = build("rtn", {"bits": 4, "group_size": 64, "symmetric": False, "execution": "kernel"})
    with torch.no_grad(), ComposedModel(model, tokenizer, stack) as composed:
        assert {m.path() for m in composed.model.modules() if isinstance(m, PackedLayer)} == {"int4 packed kernel"}
        out = composed.model(ids).logits
        save_quantized(composed.model, tokenizer, tmp_path / "w4")
    reloaded, _ = load_quantized(tmp_path / "w4")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, out)
    assert (tmp_path / "w4" / "quantized.safetensors").stat().st_size < 0.5 * sum(
        p.numel() * 4 for p in model.parameters())
