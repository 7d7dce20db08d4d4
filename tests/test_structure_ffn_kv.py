"""Efficient structure: the shared repair service, MoEfication and GQA/MQA conversion."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError

from effinfer.core.stages import ModulePatcher
from effinfer.core.testing import tiny_model
from effinfer.plugins.model.structure.repair import (Conversion, LayerFitConfig, RepairConfig, fit_layer, fit_layers,
                                                     FitTarget, repair, trainable_parameters)

FAMILIES = ["llama", "qwen2", "gemma3"]


def ids(n: int = 2, length: int = 24, seed: int = 0, vocab: int = 200) -> torch.Tensor:
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def perturbed(module: torch.nn.Module, scale: float = 0.3, seed: int = 1) -> torch.nn.Module:
    new = copy.deepcopy(module)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in new.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale * parameter.std())
    return new


# --------------------------------------------------------------------------- repair service


@pytest.mark.parametrize("family", FAMILIES)
def test_conversion_runs_the_original_and_the_patcher_restores(family):
    model, _ = tiny_model(family, layers=2)
    x = ids()
    reference = model(input_ids=x).logits
    patcher = ModulePatcher()
    conversion = Conversion(patcher)
    layer = model.model.layers[1]
    old = conversion.replace_module(layer, "mlp", perturbed(layer.mlp))
    assert old is not layer.mlp
    converted = model(input_ids=x).logits
    assert not torch.allclose(converted, reference)
    torch.testing.assert_close(conversion.teacher(model)(input_ids=x).logits, reference)
    torch.testing.assert_close(model(input_ids=x).logits, converted)  # swapped back after the teacher ran
    patcher.restore()
    torch.testing.assert_close(model(input_ids=x).logits, reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_fit_lowers_the_output_error(family):
    model, _ = tiny_model(family, layers=3)
    conversion = Conversion(ModulePatcher())
    layer = model.model.layers[1]
    new = perturbed(layer.self_attn, 0.5)
    old = conversion.replace_module(layer, "self_attn", new)
    config = LayerFitConfig(fit_steps=30, fit_lr=3e-3, fit_batch_size=2)
    report = fit_layer(model, 1, "self_attn", old, new, None, ids(4, 16), config, progress=False)
    assert report.error_after < 0.5 * report.error_before
    assert model.model.layers[1].self_attn is new  # what was installed stays installed


def test_layer_fit_identity_has_zero_error_and_checks_indices():
    model, _ = tiny_model("llama", layers=2)
    layer = model.model.layers[0]
    reports = fit_layers(model, [FitTarget(0, "mlp", layer.mlp, copy.deepcopy(layer.mlp))], ids(2, 12),
                         LayerFitConfig(fit_steps=0), progress=False)
    assert reports[0].error_before == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError, match="out of range"):
        fit_layers(model, [FitTarget(5, "mlp", layer.mlp, layer.mlp)], ids(2, 12), LayerFitConfig(), progress=False)


def test_repair_lowers_kl_and_refuses_shared_parameters(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFINFER_CACHE", str(tmp_path))
    model, tokenizer = tiny_model("llama", layers=2)
    conversion = Conversion(ModulePatcher())
    layer = model.model.layers[0]
    new = perturbed(layer.mlp, 0.5)
    conversion.replace_module(layer, "mlp", new)
    config = RepairConfig(repair_steps=25, repair_lr=3e-3, repair_seq_len=32, repair_eval_windows=2,
                          repair_checkpoint=True)
    report = repair(model, tokenizer, trainable_parameters({"mlp": new}), conversion, config, name="test",
                    progress=False)
    assert report.after["kl"] < report.before["kl"]
    assert any("repair (FKL" in line for line in report.notes())
    assert all(p.requires_grad for p in model.model.layers[1].parameters())  # flags restored
    again = repair(model, tokenizer, trainable_parameters({"mlp": new}), conversion, config, name="test",
                   progress=False)
    assert again.cost.cached
    with pytest.raises(ValueError, match="teacher would drift"):
        repair(model, tokenizer, {"norm": model.model.norm.weight}, conversion, config, name="test", progress=False)
    assert repair(model, tokenizer, {}, conversion, RepairConfig(), name="test") is None


@pytest.mark.parametrize("bad", [{"repair_steps": -1}, {"repair_kd_weight": 1.5}, {"repair_lr": 0},
                                 {"repair_objective": "mse"}])
def test_bad_repair_configs_are_refused_with_the_field_named(bad):
    with pytest.raises(ValidationError, match=next(iter(bad))):
        RepairConfig(**bad)
