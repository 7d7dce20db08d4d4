"""Efficient structure: the shared repair service, MoEfication and GQA/MQA conversion."""

from __future__ import annotations

import copy
import re

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
    start = {k: v.clone() for k, v in new.state_dict().items()}
    report = repair(model, tokenizer, trainable_parameters({"mlp": new}), conversion, config, name="test",
                    progress=False)
    assert report.after["kl"] < report.before["kl"]
    assert any("repair (FKL" in line for line in report.notes())
    assert all(p.requires_grad for p in model.model.layers[1].parameters())  # flags restored
    repaired = {k: v.clone() for k, v in new.state_dict().items()}
    new.load_state_dict(start)  # the same conversion again: its repair is read back
    again = repair(model, tokenizer, trainable_parameters({"mlp": new}), conversion, config, name="test",
                   progress=False)
    assert again.cost.cached
    assert all(torch.equal(new.state_dict()[k], v) for k, v in repaired.items())
    with torch.no_grad():  # another starting point (a conversion that came out differently) is trained anew
        new.load_state_dict(start)
        next(new.parameters()).mul_(1.01)
    other = repair(model, tokenizer, trainable_parameters({"mlp": new}), conversion, config, name="test",
                   progress=False)
    assert not other.cost.cached
    with pytest.raises(ValueError, match="teacher would drift"):
        repair(model, tokenizer, {"norm": model.model.norm.weight}, conversion, config, name="test", progress=False)
    assert repair(model, tokenizer, {}, conversion, RepairConfig(), name="test") is None


@pytest.mark.parametrize("bad", [{"repair_steps": -1}, {"repair_kd_weight": 1.5}, {"repair_lr": 0},
                                 {"repair_objective": "mse"}])
def test_bad_repair_configs_are_refused_with_the_field_named(bad):
    with pytest.raises(ValidationError, match=next(iter(bad))):
        RepairConfig(**bad)


# --------------------------------------------------------------------------- MoEfication

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from effinfer.core.stages import ModelStage  # noqa: E402
from effinfer.plugins.model.structure.moefication import (MoEFFN, MoEfication, balanced_assign,  # noqa: E402
                                                          balanced_kmeans)


def stage_of(model, tokenizer, patcher=None):
    return ModelStage(model, tokenizer, patcher or ModulePatcher(),
                      calibration=lambda n, length: ids(n, length, seed=7, vocab=len(tokenizer)))


def moefy(model, tokenizer, **config):
    technique = MoEfication({"n_samples": 4, "seq_len": 32, "router_steps": 20, "router_batch": 64} | config)
    stage = stage_of(model, tokenizer)
    technique.effinfer_transform_model(stage)
    return technique, stage


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("experts", [1, 4])
def test_moefication_identity_equals_the_dense_ffn(family, experts):
    model, tokenizer = tiny_model(family, layers=2)
    x = ids(2, 20)
    reference = model(input_ids=x).logits
    technique, stage = moefy(model, tokenizer, experts=experts, top_k=experts)
    assert isinstance(model.model.layers[0].mlp, MoEFFN)
    torch.testing.assert_close(model(input_ids=x).logits, reference, rtol=1e-5, atol=1e-5)
    one = model(input_ids=x[:1, :1]).logits  # the one-token path
    stage.patcher.restore()
    torch.testing.assert_close(one, model(input_ids=x[:1, :1]).logits, rtol=1e-5, atol=1e-5)
    assert technique.ffn_fraction == pytest.approx(1.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_moefication_top_k_runs_fewer_flops_and_generates(family):
    model, tokenizer = tiny_model(family, layers=2)
    technique, _ = moefy(model, tokenizer, experts=8, top_k=2, router_hidden=0)
    moe = model.model.layers[1].mlp
    assert technique.ffn_fraction < 0.3
    assert moe.macs_per_token() == 3 * 64 * 16 * 2 + 64 * 8
    assert any("top-k recall" in note for note in technique.notes)
    out = model.generate(ids(1, 6), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 11)


def random_moe(experts, top_k, hidden=16, size=4, bias=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    w_in = torch.randn(experts, 2 * size, hidden, generator=generator)
    w_out = torch.randn(experts, size, hidden, generator=generator)
    router = torch.nn.Linear(hidden, experts)
    torch.nn.init.normal_(router.weight, generator=generator)
    b_in = torch.randn(experts, 2 * size, generator=generator) if bias else None
    b_out = torch.randn(hidden, generator=generator) if bias else None
    return MoEFFN(w_in, w_out, torch.nn.SiLU(), router, top_k, b_in, b_out)


@settings(max_examples=25, deadline=None)
@given(experts=st.integers(1, 8), data=st.data(), tokens=st.integers(1, 9), bias=st.booleans(),
       seed=st.integers(0, 1000))
def test_moe_paths_equal_the_masked_dense_reference(experts, data, tokens, bias, seed):
    top_k = data.draw(st.integers(1, experts))
    moe = random_moe(experts, top_k, bias=bias, seed=seed)
    x = torch.randn(1, tokens, 16, generator=torch.Generator().manual_seed(seed + 1))
    out = moe(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, moe.reference(x), rtol=1e-4, atol=1e-4)
    per_token = torch.cat([moe(x[:, t:t + 1]) for t in range(tokens)], dim=1)  # the one-token gather path
    torch.testing.assert_close(per_token, out, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # inference: the cached per-expert views, rebuilt when the weights change in place
        torch.testing.assert_close(moe(x[:, :1]), out[:, :1], rtol=1e-4, atol=1e-4)
        moe.w_in.mul_(0.5)
        torch.testing.assert_close(moe(x[:, :1]), moe.reference(x[:, :1]), rtol=1e-4, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(clusters=st.integers(1, 8), size=st.integers(1, 10), dims=st.integers(1, 12), seed=st.integers(0, 1000))
def test_balanced_kmeans_gives_equal_clusters(clusters, size, dims, seed):
    features = torch.randn(clusters * size, dims, generator=torch.Generator().manual_seed(seed))
    assignment = balanced_kmeans(features, clusters, iterations=5, seed=seed)
    assert torch.bincount(assignment, minlength=clusters).tolist() == [size] * clusters


def test_balanced_assignment_prefers_the_best_column():
    scores = torch.tensor([[1.0, 0.0], [0.9, 0.0], [0.8, 0.7], [0.0, 1.0]])
    assert balanced_assign(scores, 2).tolist() == [0, 0, 1, 1]


def test_moefication_bad_configs_are_refused_with_the_field_named():
    with pytest.raises(ValidationError, match="top_k"):
        MoEfication({"experts": 4, "top_k": 5})
    with pytest.raises(ValidationError, match="experts"):
        MoEfication({"experts": 0})
    model, tokenizer = tiny_model("llama", layers=1)  # intermediate 128
    problems = MoEfication({"experts": 12, "top_k": 2}).check_model_config(model.config)
    assert problems and "experts=12" in problems[0] and "16" in problems[0]
    with pytest.raises(ValueError, match="does not divide"):
        moefy(model, tokenizer, experts=12, top_k=2)
    model.model.layers[0].mlp = torch.nn.Sequential(torch.nn.Linear(64, 64))
    with pytest.raises(ValueError, match="gated FFN"):
        moefy(model, tokenizer, experts=4, top_k=2)


# --------------------------------------------------------------------------- GQA / MQA conversion

from effinfer.plugins.model.structure.gqa_convert import GQAConvert, choose_groups, equal_partitions  # noqa: E402


def convert(model, tokenizer, **config):
    technique = GQAConvert({"n_samples": 2, "seq_len": 32} | config)
    stage = stage_of(model, tokenizer)
    technique.effinfer_transform_model(stage)
    return technique, stage


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("grouping", ["consecutive", "error"])
def test_gqa_identity_equals_the_original(family, grouping):
    model, tokenizer = tiny_model(family, layers=2, kv_heads=2 if family != "gemma3" else 1)
    x = ids(2, 20)
    reference = model(input_ids=x).logits
    kv = model.config.num_key_value_heads
    technique, _ = convert(model, tokenizer, kv_heads=kv, grouping=grouping)
    torch.testing.assert_close(model(input_ids=x).logits, reference)
    assert technique.kv_fraction == 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_gqa_to_mqa_shrinks_the_cache_and_restores(family):
    model, tokenizer = tiny_model(family, layers=2, heads=4, kv_heads=4, **({"head_dim": 16} if family == "gemma3"
                                                                            else {}))
    x = ids(1, 8)
    reference = model.generate(x, max_new_tokens=4, do_sample=False)
    technique, stage = convert(model, tokenizer, kv_heads=1)
    assert model.config.num_key_value_heads == 1
    assert model.model.layers[0].self_attn.num_key_value_groups == 4
    out = model(input_ids=x, use_cache=True)
    keys = out.past_key_values.layers[0].keys
    assert keys.shape[1] == 1  # batch × KV heads × tokens × head_dim
    assert technique.kv_fraction == pytest.approx(0.25)
    assert model.generate(x, max_new_tokens=4, do_sample=False).shape == reference.shape
    stage.patcher.restore()
    assert model.config.num_key_value_heads == 4
    torch.testing.assert_close(model.generate(x, max_new_tokens=4, do_sample=False), reference)


def test_gqa_error_grouping_permutes_query_heads_without_changing_the_function():
    """With non-neighbouring groups and 'first' pooling of duplicated heads the function is unchanged."""
    model, tokenizer = tiny_model("llama", layers=1, heads=4, kv_heads=4)
    attention = model.model.layers[0].self_attn
    with torch.no_grad():  # heads 0 and 2 equal, 1 and 3 equal: the best pairs are not neighbours
        for proj in (attention.k_proj, attention.v_proj):
            w = proj.weight.view(4, 16, 64)
            w[2] = w[0]
            w[3] = w[1]
    x = ids(2, 12)
    reference = model(input_ids=x).logits
    technique, _ = convert(model, tokenizer, kv_heads=2, grouping="error", pooling="first")
    assert technique.groups[0] == [[0, 2], [1, 3]]
    torch.testing.assert_close(model(input_ids=x).logits, reference, rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(groups=st.integers(1, 4), size=st.integers(1, 3), seed=st.integers(0, 100))
def test_groupings_are_equal_partitions_and_error_is_no_worse(groups, size, seed):
    heads = torch.randn(groups * size, 5, generator=torch.Generator().manual_seed(seed))
    from effinfer.plugins.model.structure.gqa_convert import group_error
    best = choose_groups(heads, groups, "error")
    plain = choose_groups(heads, groups, "consecutive")
    for partition in (best, plain):
        assert sorted(h for g in partition for h in g) == list(range(groups * size))
        assert all(len(g) == size for g in partition)
    assert group_error(heads, best) <= group_error(heads, plain) + 1e-5
    assert len(list(equal_partitions(list(range(4)), 2))) == 3


def test_gqa_bad_configs_are_refused_with_the_allowed_values():
    model, tokenizer = tiny_model("llama", layers=1, hidden=48, heads=6, kv_heads=3)
    problems = GQAConvert({"kv_heads": 2}).check_model_config(model.config)
    assert problems and "kv_heads=2" in problems[0] and "1, 3" in problems[0]
    with pytest.raises(ValueError, match="use one of 1, 3"):
        convert(model, tokenizer, kv_heads=2)
    with pytest.raises(ValidationError, match="kv_heads"):
        GQAConvert({"kv_heads": 0})
    with pytest.raises(ValidationError, match="pooling"):
        GQAConvert({"pooling": "max"})


def test_gqa_repair_trains_the_new_projections(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFINFER_CACHE", str(tmp_path))
    model, tokenizer = tiny_model("llama", layers=2, heads=4, kv_heads=4)
    technique, _ = convert(model, tokenizer, kv_heads=1, repair_steps=15, repair_lr=3e-3, repair_seq_len=32)
    kl = re.search(r"KL to the original ([\d.]+) → ([\d.]+)", " ".join(technique.notes))
    assert kl and float(kl.group(2)) < float(kl.group(1)), technique.notes
    assert any("repair (FKL" in n for n in technique.notes)
    assert not any(p.requires_grad for p in model.parameters() if p.requires_grad and p.dim() > 1
                   and any(p is q for q in model.model.layers[0].self_attn.k_proj.parameters()))


def test_gqa_repair_of_all_parameters_trains_a_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFINFER_CACHE", str(tmp_path))
    model, tokenizer = tiny_model("qwen2", layers=2, heads=4, kv_heads=2)
    x = ids(1, 10)
    reference = model(input_ids=x).logits
    technique, stage = convert(model, tokenizer, kv_heads=1, repair_steps=3, repair_train="all", repair_seq_len=32,
                               repair_eval_windows=0)
    assert stage.model is not model and stage.model.config.num_key_value_heads == 1
    assert model.config.num_key_value_heads == 2
    torch.testing.assert_close(model(input_ids=x).logits, reference)  # the original is untouched
    assert not any(p.requires_grad for n, p in stage.model.named_parameters() if ".layers." in n)
