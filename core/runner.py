"""Run an :class:`~effinfer.core.experiment.Experiment`: validate, load, compose, generate."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from effinfer.core.calibration import calibration_source
from effinfer.core.compose import Completion, ComposedModel, StageReport
from effinfer.core.experiment import Experiment
from effinfer.core.generation import GenerationResult
from effinfer.core.models import load_model
from effinfer.core.registry import Registry
from effinfer.core.stages import Request
from effinfer.core.technique import Requirement

__all__ = ["ExperimentRun", "apply_runtime", "calibration_source", "run_experiment"]


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


def run_experiment(experiment: Experiment, registry: Registry | None = None, model: Any = None,
                   tokenizer: Any = None) -> ExperimentRun:
    """Validate the stack (before loading anything), load the model, apply, generate, restore."""
    techniques = experiment.build_stack(registry)
    apply_runtime(experiment)
    started = time.perf_counter()
    if model is None:
        model, tokenizer = load_model(experiment.model, experiment.runtime.dtype, experiment.runtime.device)
    loaded = time.perf_counter()
    needs_calibration = any(Requirement.CALIBRATION_DATA in t.requires for t in techniques)
    calibration = calibration_source(tokenizer, experiment.runtime.seed) if needs_calibration else None
    requests = [Request.from_text(p, experiment.documents) for p in experiment.prompts]
    with ComposedModel(model, tokenizer, techniques, calibration=calibration,
                       engine=experiment.runtime.engine, compile=experiment.runtime.compile,
                       registry=registry) as composed:
        set_up = time.perf_counter()
        completions, result = composed.generate(requests, experiment.generation)
    return ExperimentRun(experiment, completions, result, composed.report, loaded - started, set_up - loaded)
