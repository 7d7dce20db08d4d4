"""Experiment sweeps: a grid (models × technique stacks × config values) run as one experiment each.

A sweep file::

    name: rtn-grid
    models: [smollm2-135m-instruct]
    stacks:                       # each a list of technique specs ("name:key=value,…"), [] = baseline
      - []
      - ["rtn"]
    grid:                         # optional: config values to cross, per technique name
      rtn: {bits: [4, 8], group_size: [32, 128]}
    base:                         # optional: any other Experiment field (generation, runtime, prompts)
      generation: {max_new_tokens: 16}

expands into one :class:`~effinfer.core.experiment.Experiment` per model × stack × combination
of the grid values of the stack's techniques; all are validated before anything runs (every
problem reported at once). Each run's result (completions, timings, or the error) is appended
as one JSON line to ``<out>/results.jsonl`` the moment it finishes (written, flushed and
fsynced), keyed by a hash of the experiment; a sweep started again (after Ctrl-C, a crash or
SIGKILL) first cuts a torn last line, then skips every key already there, so no run is done or
stored twice. A run that fails is stored with its error and never stops the others
(``--retry-failed`` runs failed ones again). Runs go to Ray tasks when Ray is installed
(``pip install -e '.[ray]'``; local Ray, or ``--address`` for a cluster), else in this process.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from effinfer.core.errors import ExperimentError
from effinfer.core.experiment import Experiment, TechniqueSpec, parse_technique


class SweepFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "sweep"
    models: list[str] = Field(min_length=1)
    stacks: list[list[str]] = Field(default_factory=lambda: [[]], min_length=1)
    grid: dict[str, dict[str, list[Any]]] = Field(default_factory=dict)
    base: dict[str, Any] = Field(default_factory=dict)


def expand(sweep: SweepFile) -> list[Experiment]:
    """Every experiment of the grid, validated (an :class:`ExperimentError` lists every problem)."""
    experiments, problems = [], []
    for model in sweep.models:
        for stack in sweep.stacks:
            specs = [parse_technique(s) if isinstance(s, str) else TechniqueSpec.model_validate(s) for s in stack]
            axes = [(i, key, values) for i, spec in enumerate(specs)
                    for key, values in sweep.grid.get(spec.name, {}).items()]
            for combo in itertools.product(*(values for _, _, values in axes)):
                chosen = [spec.model_copy(deep=True) for spec in specs]
                for (i, key, _), value in zip(axes, combo):
                    chosen[i].config[key] = value
                fields = dict(sweep.base) | {"model": model, "techniques": [c.model_dump() for c in chosen]}
                label = "+".join(f"{c.name}" + "".join(f",{k}={v}" for k, v in sorted(c.config.items()))
                                 for c in chosen) or "baseline"
                fields.setdefault("name", f"{sweep.name}/{model}/{label}")
                try:
                    experiment = Experiment.checked(**fields)
                    experiment.build_stack()
                except ExperimentError as error:
                    problems += [f"{fields['name']}: {p}" for p in error.problems]
                    continue
                experiments.append(experiment)
    if problems:
        raise ExperimentError(problems)
    return experiments


def run_key(experiment: Experiment) -> str:
    return hashlib.sha256(json.dumps(experiment.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def run_one(experiment_json: str) -> dict[str, Any]:
    """Run one experiment; its result record (never raises: a failure is a record with ``error``)."""
    from effinfer.core.runner import run_experiment

    experiment = Experiment.model_validate_json(experiment_json)
    started = time.perf_counter()
    record: dict[str, Any] = {"key": run_key(experiment), "name": experiment.name, "model": experiment.model,
                              "techniques": [t.model_dump() for t in experiment.techniques]}
    try:
        result = run_experiment(experiment)
        generation = result.generation
        tokens = sum(len(s) for s in generation.sequences)
        record |= {"status": "ok", "outputs": [c.text for c in result.completions], "new_tokens": tokens,
                   "prefill_s": generation.prefill_seconds, "decode_s": generation.decode_seconds,
                   "decode_tok_s": tokens / generation.decode_seconds if generation.decode_seconds else None,
                   "load_s": result.load_seconds, "setup_s": result.setup_seconds}
    except Exception as error:  # one failing run never loses the others
        record |= {"status": "failed", "error": f"{type(error).__name__}: {error}",
                   "traceback": traceback.format_exc(limit=5)}
    record["seconds"] = time.perf_counter() - started
    record["finished_at"] = time.time()
    return record


class Ledger:
    """``results.jsonl``: one line per finished run, appended atomically enough for SIGKILL."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()

    def _repair(self) -> None:
        """Cut a torn last line (the process was killed while writing it)."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(end)

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def pending(experiments: list[Experiment], ledger: Ledger, retry_failed: bool = False) -> list[Experiment]:
    done = {r["key"] for r in ledger.records() if r.get("status") == "ok" or not retry_failed}
    return [e for e in experiments if run_key(e) not in done]


def run_in_process(experiments: list[Experiment], on_result: Callable[[dict], None]) -> None:
    for experiment in experiments:
        on_result(run_one(experiment.model_dump_json()))


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def run_on_ray(experiments: list[Experiment], on_result: Callable[[dict], None], address: str | None = None,
               cpus_per_run: float = 1.0) -> None:
    """One Ray task per experiment; each result handed to ``on_result`` as soon as it finishes."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    task = ray.remote(num_cpus=cpus_per_run, max_retries=0)(run_one)
    futures = {task.remote(e.model_dump_json()): e for e in experiments}
    while futures:
        done, _ = ray.wait(list(futures), num_returns=1)
        for future in done:
            experiment = futures.pop(future)
            try:
                record = ray.get(future)
            except Exception as error:  # the worker died: store the failure, keep the others
                record = {"key": run_key(experiment), "name": experiment.name, "status": "failed",
                          "error": f"{type(error).__name__}: {error}", "finished_at": time.time()}
            on_result(record)


def load_sweep(path: Path) -> SweepFile:
    from pydantic import ValidationError

    from effinfer.core.experiment import format_validation_errors

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ExperimentError([f"{path}: cannot read the sweep file ({error})"]) from None
    if not isinstance(data, dict):
        raise ExperimentError([f"{path}: a sweep file is a mapping with models, stacks, grid, base"])
    try:
        return SweepFile.model_validate(data)
    except ValidationError as error:
        raise ExperimentError(format_validation_errors(error, SweepFile, prefix=f"{path}: ")) from None


def iter_summary(records: list[dict[str, Any]]) -> Iterator[str]:
    for r in records:
        detail = f"{r.get('decode_tok_s') or 0:.1f} tok/s" if r.get("status") == "ok" else r.get("error", "").replace("\n", " ")[:100]
        yield f"{r.get('status', '?'):>6}  {r.get('name', r.get('key'))}  {detail}"
