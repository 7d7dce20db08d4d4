"""Run an :class:`~effinfer.core.experiment.Experiment`: validate, load, compose, generate."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from effinfer.core.compose import Completion, StageReport, compose_stack
from effinfer.core.errors import ExperimentError
from effinfer.core.experiment import Experiment
from effinfer.core.generation import GenerationResult
from effinfer.core.models import load_model, model_layout
from effinfer.core.registry import Registry
from effinfer.core.stages import Request
from effinfer.core.technique import Technique, layout_problems

__all__ = ["ExperimentRun", "apply_runtime", "check_source_layout", "run_experiment"]


@dataclass
class ExperimentRun:
    experiment: Experiment
    completions: list[Completion]
    generation: GenerationResult
    report: StageReport
    load_seconds: float
    setup_seconds: float


def apply_runtime(experiment: Experiment) -> None:
    torch.manual_seed(experiment.runtime.seed)
    if experiment.runtime.threads:
        torch.set_num_threads(experiment.runtime.threads)


def check_source_layout(techniques: list[Technique], source: str) -> None:
    """Refuse, before loading, a stack a technique of which does not support the source's layout
    (when the source tells its layout without loading; the composition checks again after)."""
    problems = layout_problems(techniques, model_layout(source))
    if problems:
        raise ExperimentError([f"model {source!r}: {problem}" for problem in problems])


def run_experiment(experiment: Experiment, registry: Registry | None = None, model: Any = None,
                   tokenizer: Any = None) -> ExperimentRun:
    """Validate the stack (before loading anything), load the model, apply, generate, restore.

    When the model is loaded here (``model`` is ``None``), everything the CLI checks before
    loading is checked first (:meth:`Experiment.preflight`: CUDA present, the model source,
    ``save_dir`` writable, technique configs against the model's ``config.json``), with every
    problem in one :class:`ExperimentError`; a model passed in is checked by the composition.
    """
    if model is None:
        techniques = experiment.preflight(registry)
        check_source_layout(techniques, experiment.model)
    else:
        techniques = experiment.build_stack(registry)
    apply_runtime(experiment)
    started = time.perf_counter()
    if model is None:
        model, tokenizer = load_model(experiment.model, experiment.runtime.dtype, experiment.runtime.device)
    loaded = time.perf_counter()
    requests = [Request.from_text(p, experiment.documents) for p in experiment.prompts]
    with compose_stack(model, tokenizer, techniques, experiment.runtime, registry=registry) as composed:
        set_up = time.perf_counter()
        completions, result = composed.generate(requests, experiment.generation)
    return ExperimentRun(experiment, completions, result, composed.report, loaded - started, set_up - loaded)
