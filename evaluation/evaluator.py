"""The :class:`Evaluator`: one bench, one baseline, any number of technique stacks, speed side by side.

For every stack it loads a fresh copy of the model (a reload from the cached safetensors,
or a deep copy of a given model object), applies the stack with
:class:`~effinfer.core.compose.ComposedModel` (``keep_originals=False``: the copy is
consumed), gives calibration batches to techniques that declare
``Requirement.CALIBRATION_DATA``, runs the phases of :mod:`effinfer.evaluation.phases`
and stores the record. An exception inside a stack marks that run ``failed`` with the
error and the sweep goes on. A stack whose measurement is already stored is skipped
unless ``redo`` (or, with ``redo_drifted``, unless its record is flagged ``speed.drift``).

Speed is compared side by side: the baseline's model stays alive for the whole bench (one
extra copy of the uncompressed model) and each stack's speed cells and prompt set run in
rounds alternating with it, so every ratio comes from adjacent measurements
(:mod:`effinfer.evaluation.phases`). Memory is bounded: after each stack the static engine's
per-model buffers are dropped, its model copy's tensors emptied, the garbage collector
runs and glibc returns freed heap pages to the system (``malloc_trim``); the RSS after
that release is recorded per stack (``memory.rss_after_release_bytes``) and the bench's
peak RSS in the environment (``bench_memory``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import tempfile
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from effinfer.core.compose import compose_stack
from effinfer.core.experiment import Experiment, Runtime, TechniqueSpec, resolve_stack
from effinfer.core.models import DEFAULT_MODEL, load_model
from effinfer.core.registry import Registry, get_registry
from effinfer.core.technique import Technique
from effinfer.data import corpus_text
from effinfer.evaluation.environment import collect_environment, machine_identity
from effinfer.evaluation.metrics.lm_eval_bridge import prepare_tasks
from effinfer.evaluation.metrics.memory import CacheRecorder, hollow_module, peak_rss_bytes, release_memory
from effinfer.evaluation.metrics.roofline import Bandwidth, measure_bandwidth
from effinfer.evaluation.metrics.timing import Clock, default_clock
from effinfer.evaluation.phases import PHASES, BaselinePeer, Reference, StackRun
from effinfer.evaluation.records import RunRecord, StackSpec
from effinfer.evaluation.store import ResultsStore, now
from effinfer.evaluation.suites import Suite, get_suite

StackLike = Sequence[str | TechniqueSpec | dict[str, Any]] | Experiment | None
BASELINE = "baseline"
#: bumped when the measurement protocol changes the numbers (2: speed side by side with the baseline)
PROTOCOL = 2


def stack_spec(stack: StackLike, name: str | None = None) -> StackSpec:
    """Normalize a stack (strings, specs, dicts or an Experiment) into a :class:`StackSpec`."""
    if isinstance(stack, Experiment):
        entries = list(stack.techniques)
    else:
        entries = [TechniqueSpec.model_validate(item) if not isinstance(item, TechniqueSpec) else item
                   for item in (stack or [])]
    techniques = [{"name": e.name, "config": dict(sorted(e.config.items()))} for e in entries]
    return StackSpec(name=name or stack_name(techniques), techniques=techniques)


def stack_name(techniques: list[dict[str, Any]]) -> str:
    """``rtn:bits=4+prompt_lookup``; ``baseline`` for an empty stack."""
    if not techniques:
        return BASELINE
    parts = []
    for t in techniques:
        options = ",".join(f"{k}={v}" for k, v in t["config"].items())
        parts.append(f"{t['name']}:{options}" if options else t["name"])
    return "+".join(parts)


@dataclass
class BenchResult:
    """The outcome of a sweep: the baseline and one record per stack, in order."""

    bench_id: int | None
    baseline: RunRecord | None
    runs: list[RunRecord]
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def records(self) -> list[RunRecord]:
        """Baseline first, then the stacks (skipping a repeated baseline stack)."""
        head = [self.baseline] if self.baseline is not None else []
        return head + [r for r in self.runs if r is not self.baseline]

    @property
    def failed(self) -> list[RunRecord]:
        return [r for r in self.runs if r.status == "failed"]


class Evaluator:
    """Scores technique stacks next to a baseline, in the same process, speed side by side.

    ``model`` is a model source string or a ``(model, tokenizer)`` pair (deep-copied per
    stack). ``store`` is a :class:`ResultsStore`, a database path, ``None``/``True`` for the
    default database, or ``False`` to store nothing. ``progress`` is an optional
    :class:`rich.progress.Progress`; ``clock`` a monotonic clock (tests inject fakes).
    ``drift_tolerance`` overrides the suite's ``speed.drift_tolerance`` (relative change of
    the baseline measured next to a stack that flags the stack's speed as drifted).
    """

    def __init__(self, model: str | tuple[Any, Any] = DEFAULT_MODEL, *, suite: str | Path | Suite = "quick",
                 store: ResultsStore | str | Path | bool | None = None, runtime: Runtime | None = None,
                 registry: Registry | None = None, progress: Any = None, command: str = "",
                 model_name: str | None = None, clock: Clock | None = None,
                 drift_tolerance: float | None = None) -> None:
        self.suite = get_suite(suite)
        if drift_tolerance is not None and not drift_tolerance > 0:
            raise ValueError(f"drift_tolerance must be > 0 (a fraction such as 0.1 for 10%), got {drift_tolerance}")
        self.drift_tolerance = drift_tolerance if drift_tolerance is not None else (
            self.suite.speed.drift_tolerance if self.suite.speed is not None else 0.10)
        self.runtime = runtime or Runtime()
        self.registry = registry or get_registry()
        self.progress = progress
        self.command = command
        self.clock = clock or default_clock()
        self._source = model
        self.model_name = model_name or (model if isinstance(model, str) else f"{type(model[0]).__name__} object")
        self._owns_store = not isinstance(store, ResultsStore) and store is not False
        self.store: ResultsStore | None = (None if store is False
                                           else ResultsStore.open(None if store is True else store))
        if self.runtime.threads:
            torch.set_num_threads(self.runtime.threads)
        self.environment = collect_environment()
        self.bench_id: int | None = None
        self.baseline_record: RunRecord | None = None
        self.reference = Reference()
        self._corpus_ids: dict[str, tuple[torch.Tensor, bool]] = {}
        self._tasks_dir: Path | None = None
        self._bandwidth: Bandwidth | None = None
        self._tokenizer: Any = None
        #: the baseline's composed model, kept for side-by-side speed (released by :meth:`close`)
        self._peer: BaselinePeer | None = None
        self._peak_rss = 0

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Finish the bench, release the baseline's model, remove temporary task files, close an owned store."""
        if self._peer is not None:
            self._peer.close()
            self._peer = None
            release_memory()
        if self.store is not None and self.bench_id is not None:
            self.store.finish_bench(self.bench_id)
            self.bench_id = None
        if self._tasks_dir is not None:
            shutil.rmtree(self._tasks_dir, ignore_errors=True)
            self._tasks_dir = None
        if self.store is not None and self._owns_store:
            self.store.close()
            self.store = None

    # ------------------------------------------------------------------ public API

    def key(self, spec: StackSpec) -> str:
        """Identity of a measurement: model, suite, stack, runtime and machine (not the time or git sha)."""
        payload = {"model": self.model_name, "suite": self.suite.fingerprint(), "stack": spec.techniques,
                   "runtime": self.runtime.model_dump(mode="json"), "machine": machine_identity(),
                   "protocol": PROTOCOL}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def stored(self, spec: StackSpec) -> RunRecord | None:
        """The stored successful run of this stack, linked to its baseline, if any."""
        if self.store is None:
            return None
        found = self.store.find_ok(self.key(spec))
        if found is not None and not found.is_baseline:
            found.baseline = self.store.baseline_of(found.bench_id)
        return found

    def baseline(self) -> RunRecord:
        """The baseline of this bench, measured on first use."""
        if self.baseline_record is None:
            self.baseline_record = self._measure(stack_spec(None))
        return self.baseline_record

    def evaluate(self, techniques: StackLike, *, name: str | None = None, redo: bool = False) -> RunRecord:
        """Measure one stack (or return its stored measurement); see :func:`effinfer.evaluation.evaluate`."""
        spec = stack_spec(techniques, name)
        if not redo and (found := self.stored(spec)) is not None:
            return found
        if spec.is_baseline:
            return self.baseline()
        baseline = self.baseline()
        return self._measure(spec, baseline)

    def sweep(self, stacks: Sequence[StackLike], *, redo: bool = False, redo_drifted: bool = False) -> BenchResult:
        """Evaluate every stack against one baseline; failures are recorded and the sweep goes on.

        ``redo`` re-measures every stack; ``redo_drifted`` only the stored ones whose record is
        flagged ``speed.drift`` (the baseline timed next to them moved beyond the tolerance).
        """
        specs = [stack_spec(s) for s in stacks]
        plan = [(spec, None if redo else self._reusable(self.stored(spec), redo_drifted)) for spec in specs]
        pending = [spec for spec, found in plan if found is None]
        overall = self._progress_task("bench", total=len(plan) + (1 if pending else 0))
        runs: list[RunRecord] = []
        if pending:
            self.baseline()
            self._advance(overall)
        for spec, found in plan:
            if found is not None:
                runs.append(found)
            elif spec.is_baseline:
                runs.append(self.baseline())
            else:
                runs.append(self._measure(spec, self.baseline_record))
            self._advance(overall)
        baseline = self.baseline_record or next((r.baseline for r in runs if r.baseline is not None), None)
        if baseline is None:
            baseline = next((r for r in runs if r.is_baseline), None)
        return BenchResult(self.bench_id, baseline, runs, self.environment)

    @staticmethod
    def _reusable(found: RunRecord | None, redo_drifted: bool) -> RunRecord | None:
        """A stored record, unless ``redo_drifted`` and its speed was flagged as drifted."""
        if found is not None and redo_drifted and found.value("speed.drift"):
            return None
        return found

    # ------------------------------------------------------------------ one stack

    def _measure(self, spec: StackSpec, baseline: RunRecord | None = None) -> RunRecord:
        record = RunRecord(spec=spec, key=self.key(spec), model=self.model_name, suite=self.suite.name,
                           started=now(), environment=self.environment, baseline=baseline,
                           bench_id=self._bench())
        task = self._progress_task(spec.name, total=None)
        started = self.clock()
        try:
            techniques = resolve_stack([TechniqueSpec.model_validate(t) for t in spec.techniques],
                                       self.runtime, self.registry)
            self._run_stack(record, techniques, task)
        except Exception as error:  # a technique's failure must not end the sweep
            record.status = "failed"
            record.error = f"{type(error).__name__}: {error}\n\n" + "".join(traceback.format_exception(error))[-4000:]
        finally:
            record.seconds = self.clock() - started
            self._note_memory(record)
            record.environment = self.environment  # now with the measured bandwidth and bench memory
        self._finish_task(task, record)
        if self.store is not None:
            self.store.save_run(record)
        return record

    def _run_stack(self, record: RunRecord, techniques: list[Technique], task: Any) -> None:
        torch.manual_seed(self.runtime.seed)
        loaded = self.clock()
        model, tokenizer = self._fresh_model()
        applied = self.clock()
        record.add("setup.load_s", applied - loaded, unit="s")
        # the one set-up path (calibration, the runtime's engine, layout check); the recorder wraps
        # the stack's cache factory as the system stage is set up
        composed = compose_stack(model, tokenizer, techniques, self.runtime, registry=self.registry,
                                 keep_originals=False, wrap_cache_factory=CacheRecorder)
        try:
            composed.apply()
            record.add("setup.apply_s", self.clock() - applied, unit="s")
            record.notes += [f"{level} · {name}: {note}" for level, name, note in composed.report.entries]
            own_factory = composed.stack_cache_factory
            recorder = composed.system.cache_factory
            run = StackRun(record=record, composed=composed, techniques=techniques, suite=self.suite,
                           reference=self.reference,
                           corpus_ids=lambda name, at_least=None: self.corpus_ids(name, tokenizer, at_least),
                           tasks_dir=self.tasks_dir, bandwidth=self.bandwidth, clock=self.clock,
                           cache_factory=own_factory, recorder=recorder,
                           advance=lambda phase: self._describe(task, f"{record.name}: {phase}"))
            run.peer, run.drift_tolerance = self._peer, self.drift_tolerance
            try:
                for phase in PHASES:
                    self._observe_peak()  # the peak-memory phase resets the high-water mark
                    phase_started = self.clock()
                    phase(run)
                    record.add(f"evaluator.{phase.__name__.removesuffix('_phase')}_s",
                               self.clock() - phase_started, unit="s")
                self._observe_peak()
                if record.is_baseline and self._peer is None and self._side_by_side():
                    self._peer = BaselinePeer(run.composed, record, run.recorder)
            finally:
                self._release_stack(run)
        finally:
            composed.restore()

    def _release_stack(self, run: StackRun) -> None:
        """Empty a finished stack's model tensors, so a reference someone still holds (a plugin's
        cache, a compiled graph) keeps almost nothing alive.

        The model copy is this stack's alone (``_fresh_model``), so emptying it is safe; the
        baseline kept as the side-by-side peer is left whole. (The static engine's per-model table
        holds its models weakly, so it lets go of them by itself.)
        """
        keep = self._peer.composed.model if self._peer is not None else None
        model = run.composed.model
        if model is not keep and not (not isinstance(self._source, str) and model is self._source[0]):
            hollow_module(model)

    def _side_by_side(self) -> bool:
        """Whether later stacks time their speed next to the baseline (the suite measures speed)."""
        return self.suite.speed is not None or self.suite.generation is not None

    def _observe_peak(self) -> None:
        self._peak_rss = max(self._peak_rss, peak_rss_bytes())

    def _note_memory(self, record: RunRecord) -> None:
        """Release what the stack left, record the RSS after that and the bench's peak so far."""
        self._observe_peak()
        rss = release_memory()
        bench = self.environment.setdefault("bench_memory", {"rss_after_release_bytes": {}})
        bench["peak_rss_bytes"] = self._peak_rss
        if rss is not None:
            record.add("memory.rss_after_release_bytes", rss, unit="B", higher_is_better=False,
                       params={"when": "after the stack's model, composition and caches were released"})
            bench["rss_after_release_bytes"][record.name] = rss

    def _fresh_model(self) -> tuple[Any, Any]:
        """A model nobody else holds: reloaded from its source, or a deep copy of the given object."""
        if isinstance(self._source, str):
            model, tokenizer = load_model(self._source, self.runtime.dtype, self.runtime.device)
            return model, tokenizer
        model, tokenizer = self._source
        return copy.deepcopy(model).to(self.runtime.device).eval(), tokenizer

    # ------------------------------------------------------------------ shared inputs

    def corpus_ids(self, name: str, tokenizer: Any, at_least: int | None = None) -> torch.Tensor:
        """Token ids of a corpus's test split: at least ``at_least`` tokens (all when ``None``).

        Only as much text as needed is tokenized (a slow tokenizer on 2 M characters takes
        many seconds); the ids are kept for the evaluator's lifetime and extended on demand.
        """
        text = corpus_text(name, split="test")
        ids, complete = self._corpus_ids.get(name, (None, False))
        chars = 8 * at_least if at_least else len(text)
        while ids is None or (not complete and (at_least is None or len(ids) < at_least)):
            complete = chars >= len(text)
            piece = text if complete else text[:text.rfind(" ", 0, chars) + 1 or chars]
            ids = tokenizer(piece, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
            if not complete:
                ids = ids[:-1]  # the token at the cut may differ from the whole text's tokenization
            chars *= 2
        self._corpus_ids[name] = (ids, complete)
        return ids

    def tasks_dir(self) -> Path:
        """The lm-eval YAML tasks of the suite, written once per evaluator."""
        if self._tasks_dir is None:
            spec = self.suite.tasks
            folder = Path(tempfile.mkdtemp(prefix="effinfer-tasks-"))
            prepare_tasks(folder, spec.names, spec.limit)
            self._tasks_dir = folder
        return self._tasks_dir

    def bandwidth(self) -> float | None:
        """Read bandwidth of this machine (measured once, recorded in the environment)."""
        if self.suite.roofline is None:
            return None
        if self._bandwidth is None:
            spec = self.suite.roofline
            self._bandwidth = measure_bandwidth(spec.buffer_mib, spec.repeats, self.runtime.device)
            self.environment["memory_bandwidth"] = self._bandwidth.as_dict()
        return self._bandwidth.read

    # ------------------------------------------------------------------ store + progress

    def _bench(self) -> int | None:
        if self.store is not None and self.bench_id is None:
            self.bench_id = self.store.start_bench(self.suite.name, self.model_name, self.command, self.environment)
        return self.bench_id

    def _progress_task(self, description: str, total: float | None) -> Any:
        return None if self.progress is None else self.progress.add_task(description, total=total)

    def _advance(self, task: Any) -> None:
        if task is not None:
            self.progress.advance(task)

    def _describe(self, task: Any, description: str) -> None:
        if task is not None:
            self.progress.update(task, description=description)

    def _finish_task(self, task: Any, record: RunRecord) -> None:
        if task is not None:
            mark = "[green]ok[/]" if record.ok else "[red]failed[/]"
            self.progress.update(task, description=f"{record.name}: {mark} ({record.seconds:.0f} s)",
                                 total=1, completed=1)

