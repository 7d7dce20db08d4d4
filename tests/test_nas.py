"""Evolutionary NAS: a candidate under the bytes budget, a real Pareto front, every layout."""

from __future__ import annotations

import pytest
import torch

from effinfer.core.compose import ComposedModel
from effinfer.core.errors import ExperimentError
from effinfer.core.experiment import Experiment
from effinfer.core.testing import tiny_model
from effinfer.plugins.model.calibration import text_source
from effinfer.plugins.model.nas.evolution import pareto
from effinfer.plugins.model.pruning.sparse import SparseLinear

TEXT = ("The quick brown fox jumps over the lazy dog. The search keeps what the budget allows. ") * 60


def test_pareto_front_keeps_only_undominated_points():
    points = [(10, 5.0, (0,)), (20, 4.0, (1,)), (15, 6.0, (2,)), (30, 4.5, (3,)), (40, 3.0, (4,))]
    assert [p[0] for p in pareto(points)] == [10, 20, 40]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_search_applies_a_candidate_under_the_budget_and_reports_its_cost(family):
    model, tokenizer = tiny_model(family, layers=3)
    ids = text_source(tokenizer, TEXT, seed=7)(2, 24)
    stack = Experiment(techniques=["nas_evolution:bytes_budget=0.6,evaluations=6,population=3,eval_samples=2,"
                                   "seq_len=32"]).build_stack()
    dense = sum(m.weight.numel() * 4 for n, m in model.named_modules()
                if ".layers." in n and isinstance(m, torch.nn.Linear))
    with torch.no_grad(), ComposedModel(model, tokenizer, stack, calibration=text_source(tokenizer, TEXT, seed=1)) as c:
        stored = sum(t.numel() * t.element_size() for layer in c.model.model.layers
                     for m in layer.modules() if isinstance(m, (torch.nn.Linear, SparseLinear))
                     for t in [*m.buffers(recurse=False), *(p for k, p in m.named_parameters(recurse=False)
                                                            if k != "bias")])
        assert stored <= 0.6 * dense
        assert torch.isfinite(c.model(ids).logits).all()
        notes = " ".join(n for _, _, n in c.report.entries)
        assert "Pareto front" in notes and "search cost" in notes
        front = stack[0].front
        assert all(a[0] < b[0] and a[1] > b[1] for a, b in zip(front, front[1:]))
    assert len(model.model.layers) == 3


def test_an_impossible_budget_is_refused_with_the_fix():
    model, tokenizer = tiny_model("llama")
    stack = Experiment(techniques=["nas_evolution:bytes_budget=0.01,sparsities=[0.0],allow_drop=false"]).build_stack()
    with pytest.raises(Exception, match="cannot be met"):
        with ComposedModel(model, tokenizer, stack, calibration=text_source(tokenizer, TEXT, seed=1)):
            pass
    with pytest.raises(ExperimentError, match="0 ≤ value < 1"):
        Experiment(techniques=["nas_evolution:sparsities=[1.5]"]).build_stack()
