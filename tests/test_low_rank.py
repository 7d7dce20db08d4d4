"""Low-rank factorization: exactness at full rank, the rank rule, the three techniques on every layout, reload."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from effinfer.core.compose import ComposedModel
from effinfer.core.errors import ExperimentError
from effinfer.core.experiment import Experiment
from effinfer.core.testing import tiny_model
from effinfer.plugins.model.calibration import text_source
from effinfer.plugins.model.low_rank.factorize import LowRankLinear, break_even_rank, factorize, rank_for
from effinfer.plugins.model.low_rank.svd_llm import whitening
from effinfer.plugins.model.pruning import load_pruned

TEXT = ("The quick brown fox jumps over the lazy dog. A low-rank layer keeps the directions the inputs use. ") * 40
SMALL = "n_samples=4,seq_len=48"


def build(*specs: str) -> list:
    return Experiment(techniques=list(specs)).build_stack()


@settings(max_examples=15, deadline=None)
@given(out=st.integers(2, 24), inp=st.integers(2, 24), seed=st.integers(0, 100),
       kind=st.sampled_from(["plain", "diagonal", "whitened"]))
def test_factorization_at_full_rank_reproduces_the_layer(out, inp, seed, kind):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inp, generator=generator)
    bias = torch.randn(out, generator=generator)
    x = torch.randn(3, 4 * inp, inp, generator=generator)
    transform = inverse = None
    if kind == "diagonal":
        transform = torch.rand(inp, generator=generator) + 0.1
    elif kind == "whitened":
        transform, inverse = whitening(2 * x.reshape(-1, inp).t() @ x.reshape(-1, inp), 1e-6)
    up, down = factorize(weight, min(out, inp), transform, inverse)
    layer = LowRankLinear(up, down, bias)
    assert torch.allclose(layer(x), torch.nn.functional.linear(x, weight, bias), atol=1e-4)


def test_truncation_is_the_best_rank_r_approximation_and_whitening_minimises_the_output_error():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 12, generator=generator)
    x = torch.randn(200, 12, generator=generator) * torch.linspace(0.05, 4, 12)
    up, down = factorize(weight, 4)
    singular = torch.linalg.svdvals(weight.double())
    assert torch.isclose((weight - up @ down).double().norm(), singular[4:].norm(), rtol=1e-4)
    lower, inverse = whitening(x.t() @ x, 1e-8)
    up_w, down_w = factorize(weight, 4, lower, inverse)
    plain_error = (x @ (weight - up @ down).t()).norm()
    whitened_error = (x @ (weight - up_w @ down_w).t()).norm()
    assert whitened_error < plain_error
    assert torch.isclose(whitened_error.double(), torch.linalg.svdvals((weight.double() @ lower))[4:].norm(),
                         rtol=1e-3)  # SVD-LLM: each truncated singular value is the loss it causes


def test_the_rank_rule_keeps_the_parameter_ratio_and_leaves_non_saving_layers_dense():
    assert rank_for(576, 1536, 0.8, 8) == 328  # 0.8 · 576·1536/2112 = 335.1 → 328
    rank = rank_for(576, 1536, 0.8, 8)
    assert rank * (576 + 1536) <= 0.8 * 576 * 1536
    assert rank_for(64, 16, 0.5, 8) is None  # 0.5 · 12.8 = 6 → 0 after rounding to 8
    assert rank_for(64, 64, 0.999, 1) == 31 and 31 < break_even_rank(64, 64)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("spec", ["svd:param_ratio=0.6", f"asvd:param_ratio=0.6,{SMALL}",
                                  f"svd_llm:param_ratio=0.6,{SMALL}"])
def test_low_rank_techniques_factorize_every_layout_and_restore(family, spec):
    model, tokenizer = tiny_model(family)
    ids = text_source(tokenizer, TEXT, seed=7)(2, 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), ComposedModel(model, tokenizer, build(spec),
                                        calibration=text_source(tokenizer, TEXT, seed=1)) as composed:
        layers = [m for m in composed.model.modules() if isinstance(m, LowRankLinear)]
        assert layers and all(m.rank * (m.in_features + m.out_features) <= 0.6 * m.in_features * m.out_features
                              for m in layers)
        assert torch.isfinite(composed.model(ids).logits).all()
        notes = " ".join(n for _, _, n in composed.report.entries)
        assert "factorized" in notes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_svd_llm_beats_plain_svd_on_the_calibration_text():
    model, tokenizer = tiny_model("llama", hidden=96, intermediate=192)
    ids = text_source(tokenizer, TEXT, seed=1)(4, 48)
    with torch.no_grad():
        reference = model(ids).logits
        errors = {}
        for spec in ("svd:param_ratio=0.5", f"svd_llm:param_ratio=0.5,{SMALL}"):
            with ComposedModel(model, tokenizer, build(spec), calibration=text_source(tokenizer, TEXT, seed=1)) as c:
                errors[spec.split(":")[0]] = float((c.model(ids).logits - reference).pow(2).mean())
    assert errors["svd_llm"] < errors["svd"]


def test_factorized_model_saves_and_reloads_identically(tmp_path):
    model, tokenizer = tiny_model("qwen2")
    ids = text_source(tokenizer, TEXT, seed=7)(2, 32)
    folder = tmp_path / "svd"
    with torch.no_grad():
        with ComposedModel(model, tokenizer, build(f"svd_llm:param_ratio=0.6,{SMALL},save_dir='{folder}'"),
                           calibration=text_source(tokenizer, TEXT, seed=1)) as composed:
            got = composed.model(ids).logits
        reloaded, _ = load_pruned(folder)
        assert sum(isinstance(m, LowRankLinear) for m in reloaded.modules()) == 14
        assert torch.equal(reloaded(ids).logits, got)


@pytest.mark.parametrize(("specs", "expected"), [
    (["svd:param_ratio=1.0"], "param_ratio: Input should be less than 1 (got 1.0); allowed: 0.0 < value < 1.0"),
    (["asvd:alpha=3"], "alpha: Input should be less than or equal to 2 (got 3); allowed: 0.0 ≤ value ≤ 2.0"),
    (["svd_llm:rank_multiple=0"], "rank_multiple: Input should be greater than or equal to 1 (got 0)"),
    (["rtn", "svd"], "svd needs 'dense_weights', which rtn (earlier in the stack) removes"),
    (["gptq", "svd_llm"], "svd_llm needs 'dense_weights', which gptq (earlier in the stack) removes"),
])
def test_bad_configs_and_low_rank_after_packing_are_refused_up_front(specs, expected):
    with pytest.raises(ExperimentError) as caught:
        build(*specs)
    assert expected in str(caught.value), str(caught.value)


def test_a_ratio_too_small_for_a_layer_is_told_from_the_model_config():
    config = tiny_model("llama")[0].config
    assert "rank below rank_multiple" in " ".join(build("svd:param_ratio=0.1")[0].check_model_config(config))
    assert build("svd:param_ratio=0.8")[0].check_model_config(config) == []
