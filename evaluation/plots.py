"""Plots of a bench (matplotlib, Agg backend: no display needed).

- :func:`pareto_plot`: quality vs decode speed, one point per stack with its error bars,
  the Pareto-optimal stacks joined (panels: mean accuracy, and perplexity);
- :func:`bars_plot`: one bar per stack for speed, perplexity, accuracy and weight memory,
  with error bars (standard errors; inter-quartile range or min–max for timings).

Speed is the decode speed-up over the baseline measured side by side (``decode_ratio``:
median of per-round ratios, error bars their spread; the baseline at 1×) when the records
have it, and decode tokens/s otherwise (records stored before side-by-side timing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from effinfer.evaluation.records import Metric, RunRecord  # noqa: E402
from effinfer.evaluation.report import MIB, first_corpus, ordered, primary_cell  # noqa: E402


def pareto_front(points: Sequence[tuple[float, float]], maximize_y: bool = True) -> list[int]:
    """Indices of the points not dominated by another (higher x and better y), by falling x."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1] if maximize_y else points[i][1]))
    front: list[int] = []
    best = -math.inf
    for i in order:
        y = points[i][1] if maximize_y else -points[i][1]
        if y > best:
            front.append(i)
            best = y
    return front


def _side_by_side(records: Sequence[RunRecord]) -> bool:
    """Every stack has a side-by-side decode ratio: plot speed-ups, not tokens/s."""
    stacks = [r for r in records if not r.is_baseline and primary_cell(r)]
    return bool(stacks) and all(f"speed.{primary_cell(r)}.decode_ratio" in r.metrics for r in stacks)


def _speed_metric(record: RunRecord, ratios: bool = False) -> Metric | None:
    cell = primary_cell(record)
    if not cell:
        return None
    if ratios:
        if record.is_baseline:
            return Metric(value=1.0, unit="×")
        return record.metrics.get(f"speed.{cell}.decode_ratio")
    return record.metrics.get(f"speed.{cell}.decode_tok_s")


def _speed_label(ratios: bool) -> str:
    return ("decode speed-up × baseline (side by side, median of rounds)" if ratios
            else "decode tokens/s (batch 1, median)")


def _errors(metric: Metric) -> tuple[float, float]:
    """(below, above) error-bar lengths of a metric."""
    if metric.stderr is not None and math.isfinite(metric.stderr):
        return metric.stderr, metric.stderr
    if metric.low is not None and metric.high is not None:
        return max(metric.value - metric.low, 0.0), max(metric.high - metric.value, 0.0)
    return 0.0, 0.0


def _quality_panel(ax: plt.Axes, records: list[RunRecord], name_of, label: str, maximize: bool) -> None:
    points, kept = [], []
    ratios = _side_by_side(records)
    for record in records:
        speed, quality = _speed_metric(record, ratios), record.metrics.get(name_of(record) or "")
        if speed is None or quality is None:
            continue
        kept.append((record, speed, quality))
        points.append((speed.value, quality.value))
    for record, speed, quality in kept:
        ax.errorbar(speed.value, quality.value, xerr=[[e] for e in _errors(speed)],
                    yerr=[[e] for e in _errors(quality)], fmt="o", capsize=3,
                    color="black" if record.is_baseline else None)
        ax.annotate(record.name, (speed.value, quality.value), fontsize=7, xytext=(4, 4), textcoords="offset points")
    front = pareto_front(points, maximize_y=maximize)
    if len(front) > 1:
        xs, ys = zip(*sorted(points[i] for i in front))
        ax.plot(xs, ys, "--", color="grey", linewidth=1, label="Pareto front")
        ax.legend(fontsize=7)
    ax.set_xlabel(_speed_label(ratios))
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)


def pareto_plot(records: Sequence[RunRecord], path: Path, title: str = "") -> Path:
    """Accuracy-vs-speed and perplexity-vs-speed scatter with the Pareto fronts."""
    records = [r for r in ordered(records) if r.ok]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    _quality_panel(left, records, lambda r: "accuracy.mean.acc", "mean BIG-bench accuracy (higher is better)", True)
    _quality_panel(right, records, lambda r: f"perplexity.{c}.token" if (c := first_corpus(r)) else None,
                   "perplexity (lower is better)", False)
    fig.suptitle(title or "quality vs decode speed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def bars_plot(records: Sequence[RunRecord], path: Path, title: str = "") -> Path:
    """Per-stack bars with error bars: decode speed, perplexity, accuracy, weight memory."""
    records = [r for r in ordered(records) if r.ok]
    ratios = _side_by_side(records)
    panels = (
        (_speed_label(ratios), lambda r: _speed_metric(r, ratios), 1.0),
        ("perplexity", lambda r: r.metrics.get(f"perplexity.{first_corpus(r)}.token"), 1.0),
        ("mean accuracy", lambda r: r.metrics.get("accuracy.mean.acc"), 1.0),
        ("weights (MiB)", lambda r: r.metrics.get("memory.weight_bytes"), 1 / MIB),
    )
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    names = [r.name for r in records]
    for ax, (label, pick, scale) in zip(axes.flat, panels):
        values, below, above = [], [], []
        for record in records:
            metric = pick(record)
            low, high = _errors(metric) if metric is not None else (0.0, 0.0)
            values.append(metric.value * scale if metric is not None else 0.0)
            below.append(low * scale)
            above.append(high * scale)
        ax.bar(range(len(names)), values, yerr=[below, above], capsize=3,
               color=["black" if r.is_baseline else "tab:blue" for r in records])
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title or "per-stack results (error bars: standard error or timing spread)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
