"""Experiment validation happens before loading, and every message names the fix."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from effinfer.core import Requirement, Technique, hookimpl
from effinfer.core.errors import ExperimentError
from effinfer.core.experiment import Experiment, Runtime, parse_technique, stack_conflicts


def problems_of(**fields) -> str:
    with pytest.raises(ExperimentError) as caught:
        Experiment(**fields).build_stack()
    return str(caught.value)


def test_unknown_technique_has_close_matches():
    message = problems_of(techniques=["promt_lookup"])
    assert "unknown technique 'promt_lookup'; did you mean: prompt_lookup" in message


def test_bad_config_value_names_field_and_range():
    message = problems_of(techniques=["selective_context:ratio=1.5"])
    assert "techniques[0] (selective_context): ratio:" in message
    assert "got 1.5" in message and "allowed: 0.0 ≤ value ≤ 0.9" in message


def test_bad_literal_lists_the_choices():
    assert "allowed: one of 2, 3, 4, 8" in problems_of(techniques=["rtn:bits=5"])


def test_unknown_config_field_lists_known_fields():
    message = problems_of(techniques=["prompt_lookup:ngram=3"])
    assert "ngram: Extra inputs are not permitted" in message
    assert "known fields: max_ngram, min_ngram, num_draft_tokens" in message


def test_fields_of_optional_sections_and_list_items_get_their_range_and_known_fields():
    from pydantic import Field, ValidationError

    from effinfer.core.experiment import format_validation_errors

    class Speed(BaseModel):
        model_config = {"extra": "forbid"}
        repeats: int = Field(3, ge=1, le=100)
        warmup: int | None = Field(None, ge=0)

    class Suite(BaseModel):
        model_config = {"extra": "forbid"}
        speed: Speed | None = None
        grid: list[Speed] = []

    with pytest.raises(ValidationError) as caught:
        Suite.model_validate({"speed": {"repeats": 0, "warmup": -1, "colour": 1}, "grid": [{"repats": 2}]})
    assert format_validation_errors(caught.value, Suite, prefix="suite.yaml: ") == [
        "suite.yaml: speed.repeats: Input should be greater than or equal to 1 (got 0); allowed: 1 ≤ value ≤ 100",
        "suite.yaml: speed.warmup: Input should be greater than or equal to 0 (got -1); allowed: value ≥ 0",
        "suite.yaml: speed.colour: Extra inputs are not permitted (got 1); known fields: repeats, warmup",
        "suite.yaml: grid.0.repats: Extra inputs are not permitted (got 2); known fields: repeats, warmup",
    ]
    with pytest.raises(ExperimentError) as refused:
        Experiment.checked(techniques=[{"name": "rtn", "confg": {}}])
    message = str(refused.value)
    assert "techniques.0.confg: Extra inputs are not permitted" in message and "known fields: name, config" in message


def test_cross_field_rule_is_reported():
    assert "min_ngram (4) must be ≤ max_ngram (2)" in problems_of(techniques=["prompt_lookup:min_ngram=4,max_ngram=2"])


def test_all_problems_are_reported_together():
    message = problems_of(techniques=["nope", "rtn:bits=5", "prompt_lookup", "prompt_lookup"])
    assert "4 problem(s)" not in message or "nope" in message
    assert "unknown technique 'nope'" in message
    assert "bits" in message
    assert "'prompt_lookup' appears 2 times" in message


class Strategy(Technique):
    name, node = "other_strategy", "system.inference_engine.speculative_decoding"

    @hookimpl
    def effinfer_decoding_strategy(self, stage):
        return None


class NeedsDense(Technique):
    name, node = "needs_dense", "model.compression.sparsification.weight_pruning.unstructured"
    needs_features = frozenset({"dense_weights"})
    incompatible_with = frozenset({"selective_context"})
    requires = frozenset({Requirement.CUDA})

    @hookimpl
    def effinfer_transform_model(self, stage):
        pass


def test_two_decoding_strategies_conflict(registry):
    message = "; ".join(stack_conflicts([registry.get("prompt_lookup")(), Strategy()], Runtime()))
    assert "prompt_lookup and other_strategy are both decoding strategies" in message


def test_feature_removed_earlier_in_the_stack(registry):
    problems = stack_conflicts([registry.get("rtn")(), NeedsDense()], Runtime())
    assert any("needs_dense needs 'dense_weights', which rtn (earlier in the stack) removes" in p for p in problems)
    assert not any("dense_weights" in p for p in stack_conflicts([NeedsDense(), registry.get("rtn")()], Runtime()))


def test_declared_incompatibility_and_cuda_requirement(registry):
    problems = stack_conflicts([registry.get("selective_context")(), NeedsDense()], Runtime())
    assert "selective_context and needs_dense are declared incompatible" in problems
    assert "needs_dense requires CUDA but runtime.device is 'cpu'" in problems


def test_technique_strings_parse_yaml_scalars():
    spec = parse_technique("rtn:bits=4, group_size=32,symmetric=false")
    assert spec.name == "rtn" and spec.config == {"bits": 4, "group_size": 32, "symmetric": False}
    with pytest.raises(ValueError, match="must look like key=value"):
        parse_technique("rtn:bits")


def test_yaml_round_trip(tmp_path):
    experiment = Experiment(name="x", techniques=["rtn:bits=4"], runtime={"threads": 2})
    path = tmp_path / "x.yaml"
    path.write_text(experiment.to_yaml())
    assert Experiment.from_yaml(path) == experiment


def test_yaml_errors_name_the_file_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: x\nruntime:\n  threads: 0\n  dtype: float64\nunknown_key: 1\n")
    with pytest.raises(ExperimentError) as caught:
        Experiment.from_yaml(path)
    message = str(caught.value)
    assert "runtime.threads" in message and "allowed: 1 ≤ value ≤ 512" in message
    assert "runtime.dtype" in message
    assert "unknown_key: Extra inputs are not permitted" in message
    with pytest.raises(ExperimentError, match="does not exist"):
        Experiment.from_yaml(tmp_path / "missing.yaml")


def test_validation_happens_before_loading(monkeypatch):
    import effinfer.core.runner as runner

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before validation")

    monkeypatch.setattr(runner, "load_model", must_not_load)
    with pytest.raises(ExperimentError):
        runner.run_experiment(Experiment(techniques=["rtn:bits=7"]))
