"""The evaluator's Python API: score technique stacks next to a baseline measured in the same run.

::

    from effinfer.evaluation import evaluate

    record = evaluate(["rtn:bits=4"], suite="quick")            # baseline measured too
    record.value("perplexity.wikipedia.token"), record.baseline.value("perplexity.wikipedia.token")
    record.value("fidelity.kl_mean"), record.value("speed.p128_b1.decode_ratio")  # speed-up, side by side

    # several stacks against one baseline (kept alive: each stack's speed is timed next to it):
    from effinfer.evaluation import Evaluator
    with Evaluator(model="smollm2-135m-instruct", suite="quick") as ev:
        for stack in (["rtn"], ["prompt_lookup"], ["selective_context", "rtn", "prompt_lookup"]):
            print(ev.evaluate(stack).metrics)

    # tests and plugin packages: a tiny model object, nothing written to disk
    from effinfer.core.testing import tiny_llama
    evaluate(["rtn"], model=tiny_llama(), suite=my_tiny_suite, store=False)

Every metric name is listed in :mod:`effinfer.evaluation.metrics`. Runs land in a
:class:`~effinfer.evaluation.store.ResultsStore` (SQLite; ``$EFFINFER_RESULTS`` or
``~/.cache/effinfer/results/effinfer.db``) unless ``store=False``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from effinfer.core.experiment import Experiment, Runtime
from effinfer.core.models import DEFAULT_MODEL
from effinfer.evaluation.evaluator import BenchResult, Evaluator, StackLike
from effinfer.evaluation.records import RunRecord
from effinfer.evaluation.store import ResultsStore
from effinfer.evaluation.suites import Suite

ModelLike = str | tuple[Any, Any]


def evaluate(
    techniques: StackLike = None,
    *,
    suite: str | Path | Suite = "quick",
    model: ModelLike | None = None,
    store: ResultsStore | str | Path | bool | None = None,
    name: str | None = None,
    redo: bool = False,
    runtime: Runtime | None = None,
) -> RunRecord:
    """Evaluate one technique stack and the baseline in the same run; return the stack's record.

    ``techniques`` is a list of ``"name:key=value,..."`` strings, :class:`TechniqueSpec`
    objects or ``{"name":…, "config":…}`` dicts, or an :class:`~effinfer.core.experiment.Experiment`
    (its model and runtime are used unless ``model``/``runtime`` are given). ``None`` or ``[]``
    evaluates the baseline alone. ``model`` is a model source (alias, folder, ``.gguf``) or a
    ``(model, tokenizer)`` pair (it is deep-copied per stack, never modified). ``store`` is a
    :class:`ResultsStore`, a database path, ``None`` for the default database or ``False`` to
    store nothing. A stack whose measurement is already stored (same model, suite, stack, runtime
    and machine) is returned from the store unless ``redo``. A stack that raises comes back with
    ``status == "failed"`` and the error text (it is stored as failed too); this function does
    not raise for technique errors.

    The returned record's ``.baseline`` is the baseline record; ``record.delta(metric)`` and
    ``record.ratio(metric)`` compare with it.
    """
    if isinstance(techniques, Experiment):
        model = model if model is not None else techniques.model
        runtime = runtime or techniques.runtime
    with Evaluator(model=model if model is not None else DEFAULT_MODEL, suite=suite, store=store,
                   runtime=runtime) as evaluator:
        return evaluator.evaluate(techniques, name=name, redo=redo)


def bench(
    stacks: Sequence[StackLike],
    *,
    suite: str | Path | Suite = "quick",
    model: ModelLike = DEFAULT_MODEL,
    store: ResultsStore | str | Path | bool | None = None,
    redo: bool = False,
    runtime: Runtime | None = None,
    progress: Any = None,
    command: str = "",
    redo_drifted: bool = False,
    drift_tolerance: float | None = None,
) -> BenchResult:
    """Evaluate several stacks against one baseline; failures do not stop the sweep.

    Each stack's speed is timed side by side with the baseline (alternating rounds; ratios of
    adjacent measurements). Returns a :class:`BenchResult` with ``.baseline`` and ``.runs``
    (one record per stack, in order; stored ones are marked ``from_store``). ``redo``
    re-measures every stack; ``redo_drifted`` only stored stacks flagged ``speed.drift`` (the
    baseline timed next to them moved more than ``drift_tolerance``, default the suite's
    ``speed.drift_tolerance``, 10%). ``progress`` is an optional :class:`rich.progress.Progress`.
    """
    with Evaluator(model=model, suite=suite, store=store, runtime=runtime, progress=progress,
                   command=command, drift_tolerance=drift_tolerance) as evaluator:
        return evaluator.sweep(stacks, redo=redo, redo_drifted=redo_drifted)
