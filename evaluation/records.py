"""What an evaluation produces: metrics with their uncertainty, grouped in run records.

A :class:`Metric` is one number with its uncertainty (a standard error for accuracies and
perplexities, a spread such as the inter-quartile range for timings). A :class:`RunRecord`
is one evaluated stack (or the baseline) with every metric, the spec that produced it,
the environment, and its status (``ok`` or ``failed`` with the error text).

Metric names are dotted paths, e.g. ``perplexity.wikipedia.token``,
``accuracy.general_knowledge.acc``, ``fidelity.kl_mean``, ``speed.p128_b1.decode_tok_s``,
``memory.weight_bytes``, ``speculative.acceptance_rate`` (see :mod:`effinfer.evaluation.metrics`).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Metric(BaseModel):
    """One measured number with its uncertainty."""

    model_config = ConfigDict(extra="forbid")

    value: float
    stderr: float | None = Field(None, description="standard error of the value (accuracy, perplexity)")
    low: float | None = Field(None, description="lower end of the spread (timings: first quartile or min)")
    high: float | None = Field(None, description="upper end of the spread (timings: third quartile or max)")
    n: int | None = Field(None, description="number of samples behind the value")
    unit: str = ""
    higher_is_better: bool | None = None
    #: copied from the baseline because this stack cannot change it (e.g. perplexity under a
    #: decoding strategy or a prompt compressor: the model's weights are untouched)
    inherited: bool = False
    params: dict[str, Any] = Field(default_factory=dict)

    def spread(self) -> str:
        """A short text form of the uncertainty: ``±0.012`` or ``[1.2, 1.5]``."""
        if self.stderr is not None and math.isfinite(self.stderr):
            return f"±{self.stderr:.3g}"
        if self.low is not None and self.high is not None:
            return f"[{self.low:.3g}, {self.high:.3g}]"
        return ""


class StackSpec(BaseModel):
    """A technique stack as stored: its display name and ``[{name, config}]`` entries."""

    model_config = ConfigDict(extra="forbid")

    name: str
    techniques: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def is_baseline(self) -> bool:
        return not self.techniques


class RunRecord(BaseModel):
    """One evaluated stack (``spec.techniques == []`` is the baseline) and everything measured."""

    model_config = ConfigDict(extra="forbid")

    run_id: int | None = None
    bench_id: int | None = None
    key: str = Field("", description="identity of the measurement, used to skip stored runs")
    spec: StackSpec
    model: str
    suite: str
    status: Literal["ok", "failed", "skipped"] = "ok"
    error: str | None = None
    started: str = ""
    seconds: float = 0.0
    metrics: dict[str, Metric] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
    environment: dict[str, Any] = Field(default_factory=dict)
    #: the baseline this run is compared with (same bench); ``None`` for the baseline itself
    baseline: RunRecord | None = None
    #: loaded from the store instead of measured now
    from_store: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def is_baseline(self) -> bool:
        return self.spec.is_baseline

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def value(self, name: str, default: float | None = None) -> float | None:
        """The value of metric ``name``, or ``default`` when it was not measured."""
        metric = self.metrics.get(name)
        return metric.value if metric is not None else default

    def delta(self, name: str) -> float | None:
        """This run's value minus the baseline's, when both exist."""
        if self.baseline is None:
            return None
        mine, base = self.value(name), self.baseline.value(name)
        return None if mine is None or base is None else mine - base

    def ratio(self, name: str) -> float | None:
        """This run's value divided by the baseline's, when both exist.

        For speed prefer the side-by-side ratios (``speed.<cell>.decode_ratio``,
        ``generation.decode_ratio``): measured next to the baseline, round by round, whereas
        this divides by the baseline's own measurement, taken earlier in the bench."""
        if self.baseline is None:
            return None
        mine, base = self.value(name), self.baseline.value(name)
        return None if mine is None or not base else mine / base

    def add(self, name: str, value: float, **fields: Any) -> Metric:
        """Record metric ``name`` (keyword ``fields`` as in :class:`Metric`)."""
        metric = Metric(value=float(value), **fields)
        self.metrics[name] = metric
        return metric
