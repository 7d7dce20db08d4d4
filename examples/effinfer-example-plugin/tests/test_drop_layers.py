"""Tests of the drop_layers plugin on a tiny random model: seconds, no download."""

import pytest

from effinfer.core.compose import ComposedModel
from effinfer.core.errors import ExperimentError
from effinfer.core.experiment import Experiment
from effinfer.core.generation import GenerationConfig
from effinfer.core.registry import get_registry
from effinfer.core.testing import tiny_llama
from effinfer_example_plugin import DropLayers


def test_the_entry_point_registers_the_technique():
    entry = get_registry().techniques["drop_layers"]
    assert entry.technique is DropLayers
    assert entry.distribution == "effinfer-example-plugin"
    assert not [b for b in get_registry().broken if b.distribution == entry.distribution]  # ours loaded cleanly


def test_bad_config_is_refused_before_any_model_is_loaded():
    with pytest.raises(ExperimentError, match="drop"):
        Experiment(techniques=["drop_layers:drop=0"]).build_stack()


def test_layers_are_dropped_and_restored():
    model, tokenizer = tiny_llama(layers=4)
    with ComposedModel(model, tokenizer, [DropLayers({"drop": 2})]) as composed:
        assert len(composed.model.model.layers) == 2
        assert composed.report.entries == [("model", "drop_layers", "dropped 2 of 4 decoder layers")]
        completions, _ = composed.generate(["Hello"], GenerationConfig(max_new_tokens=4))
        assert completions[0].tokens
    assert len(model.model.layers) == 4  # the composition undid the change on exit
