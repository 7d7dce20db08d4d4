"""Reports: the comparison table (terminal and markdown), baseline row first, deltas after.

One list of :class:`Column` definitions feeds both renderers, so the terminal table and the
markdown report always show the same numbers. A value copied from the baseline (the stack
cannot change it) is shown as ``= base``. Speed ratios come from the measurements taken side
by side with the baseline (``*_ratio`` metrics: median of per-round ratios, with their spread);
a stack whose adjacent baseline drifted is marked ``⚠`` with a footnote saying how to
re-measure it. Records stored before side-by-side timing fall back to dividing by the
bench's baseline.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.markup import escape
from rich.table import Table

from effinfer.evaluation.records import Metric, RunRecord

MIB = 2**20


def primary_cell(record: RunRecord) -> str | None:
    """The speed cell the table reports: batch 1 at the longest prompt measured."""
    cells = [re.match(r"speed\.p(\d+)_b1\.decode_tok_s$", name) for name in record.metrics]
    lengths = [int(m.group(1)) for m in cells if m]
    return f"p{max(lengths)}_b1" if lengths else None


def first_corpus(record: RunRecord) -> str | None:
    names = [n.split(".")[1] for n in record.metrics if n.startswith("perplexity.") and n.endswith(".token")]
    return names[0] if names else None


@dataclass(frozen=True)
class Column:
    """A table column: which metric, how to print it, how to compare it with the baseline."""

    header: str
    metric: Callable[[RunRecord], str | None]
    fmt: Callable[[float], str]
    #: "diff" (value − base), "ratio" (value ÷ base), "pct" (relative change) or None
    compare: str | None = None
    spread: bool = False
    #: the metric holding this column's ratio measured side by side with the baseline
    paired: Callable[[RunRecord], str | None] | None = None


def _fixed(digits: int) -> Callable[[float], str]:
    return lambda v: f"{v:.{digits}f}"


def _named(name: str) -> Callable[[RunRecord], str]:
    return lambda record: name


COLUMNS: tuple[Column, ...] = (
    Column("ppl", lambda r: f"perplexity.{c}.token" if (c := first_corpus(r)) else None, _fixed(2), "pct", True),
    Column("acc", _named("accuracy.mean.acc"), _fixed(3), "diff", True),
    Column("KL", _named("fidelity.kl_mean"), lambda v: f"{v:.4f}"),
    Column("top-1", _named("fidelity.top1_agreement"), _fixed(3)),
    Column("greedy =", _named("fidelity.greedy_identical"), _fixed(2)),
    Column("TTFT s", lambda r: f"speed.{c}.ttft_s" if (c := primary_cell(r)) else None, _fixed(3), "ratio",
           paired=lambda r: f"speed.{c}.ttft_ratio" if (c := primary_cell(r)) else None),
    Column("decode tok/s", lambda r: f"speed.{c}.decode_tok_s" if (c := primary_cell(r)) else None,
           _fixed(1), "ratio", True, paired=lambda r: f"speed.{c}.decode_ratio" if (c := primary_cell(r)) else None),
    Column("prompts tok/s", _named("generation.decode_tok_s"), _fixed(1), "ratio",
           paired=_named("generation.decode_ratio")),
    Column("acc/step", _named("speculative.mean_accepted"), _fixed(2)),
    Column("weights MiB", _named("memory.weight_bytes"), lambda v: f"{v / MIB:.0f}", "ratio"),
    Column("KV KiB/tok", _named("memory.kv_bytes_per_token"), lambda v: f"{v / 1024:.1f}"),
    Column("roofline", _named("roofline.fraction"), _fixed(2)),
)


def cell(column: Column, record: RunRecord, baseline: RunRecord | None) -> str:
    """The text of one table cell (value, spread, comparison with the baseline)."""
    name = column.metric(record)
    metric = record.metrics.get(name) if name else None
    if metric is None:
        return "—"
    if metric.inherited:
        return "= base"
    text = column.fmt(metric.value)
    if column.spread and (spread := _spread(metric, column.fmt)):
        text += f" {spread}"
    paired = record.metrics.get(column.paired(record) or "") if column.paired is not None else None
    base = baseline.metrics.get(name) if baseline is not None and baseline is not record else None
    if paired is not None and not record.is_baseline:
        text += f" ({paired_ratio(paired)})"
    elif column.compare and base is not None and not record.is_baseline:
        text += f" ({compare(metric.value, base.value, column.compare)})"
    return text


def paired_ratio(metric: Metric) -> str:
    """``×0.92 [0.87–0.97]``: a side-by-side ratio with the spread of its per-round ratios."""
    text = f"×{metric.value:.2f}"
    if metric.low is not None and metric.high is not None and metric.n and metric.n > 1:
        text += f" [{metric.low:.2f}–{metric.high:.2f}]"
    return text


def drifted(record: RunRecord) -> bool:
    """The baseline timed next to this stack moved beyond the tolerance (``speed.drift``)."""
    return bool(record.value("speed.drift"))


DRIFT_MARK = "⚠"


def drift_footnote(records: Sequence[RunRecord]) -> str | None:
    """What ⚠ means and how to re-measure, when some row is marked."""
    marked = [r for r in records if drifted(r)]
    if not marked:
        return None
    tolerance = marked[0].metrics["speed.drift"].params.get("tolerance")
    limit = f" by more than {tolerance:.0%}" if isinstance(tolerance, (int, float)) else ""
    return (f"{DRIFT_MARK} drifted ({len(marked)} of {len(records)} rows, see the status column): the baseline timed "
            "next to the stack moved"
            f"{limit} from the bench's first baseline measurement or during the stack's rounds (machine load "
            "changed); the ratios still come from adjacent measurements, but re-measure these rows on a quiet "
            "machine: `effinfer bench --redo-drifted` with the same stacks "
            "(Python: `effinfer.evaluation.bench(stacks, redo_drifted=True)`).")


def _spread(metric: Metric, fmt: Callable[[float], str]) -> str:
    if metric.stderr is not None and math.isfinite(metric.stderr):
        return f"±{fmt(metric.stderr)}"
    if metric.low is not None and metric.high is not None:
        return f"[{fmt(metric.low)}–{fmt(metric.high)}]"
    return ""


def compare(value: float, base: float, how: str) -> str:
    if how == "diff":
        return f"{value - base:+.3f}"
    if not base:
        return "n/a"
    if how == "pct":
        return f"{(value / base - 1) * 100:+.1f}%"
    return f"×{value / base:.2f}"


def ordered(records: Sequence[RunRecord]) -> list[RunRecord]:
    """Baseline first, then the rest in the given order (a repeated baseline dropped)."""
    baselines = [r for r in records if r.is_baseline]
    rest = [r for r in records if not r.is_baseline]
    return baselines[:1] + rest


def status_text(record: RunRecord) -> str:
    if record.status == "failed":
        first_line = (record.error or "failed").splitlines()[0]
        return f"FAILED: {first_line[:80]}"
    parts = [f"{record.seconds:.0f} s"]
    if record.from_store:
        parts.append("stored")
    claimed = record.metrics.get("fidelity.greedy_identical")
    if claimed is not None and claimed.params.get("lossless_claimed"):
        parts.append("lossless ✓" if claimed.value == 1.0 else "LOSSLESS ✗")
    if drifted(record):
        parts.append(f"{DRIFT_MARK} drifted")
    return ", ".join(parts)


def rows(records: Sequence[RunRecord], keep_order: bool = False) -> list[list[str]]:
    """Table rows: stack name, one cell per column, status (baseline first unless ``keep_order``)."""
    records = list(records) if keep_order else ordered(records)
    baseline = records[0] if records and records[0].is_baseline else None
    out = []
    for record in records:
        reference = record.baseline or baseline
        out.append([record.name, *(cell(c, record, reference) for c in COLUMNS), status_text(record)])
    return out


def headers() -> list[str]:
    return ["stack", *(c.header for c in COLUMNS), "status"]


def rich_table(records: Sequence[RunRecord], title: str = "", keep_order: bool = False) -> Table:
    """The comparison table for the terminal."""
    footnote = drift_footnote(records)
    table = Table(*headers(), title=title or None, show_lines=False, header_style="bold",
                  caption=escape(footnote) if footnote else None)
    for values in rows(records, keep_order):
        style = "red" if values[-1].startswith("FAILED") else ("bold" if values[0] == "baseline" else None)
        table.add_row(*map(escape, values), style=style)  # stack names may hold [brackets]
    return table


def markdown_table(records: Sequence[RunRecord]) -> str:
    lines = ["| " + " | ".join(headers()) + " |", "|" + "---|" * len(headers())]
    lines += ["| " + " | ".join(v.replace("|", "\\|") for v in values) + " |" for values in rows(records)]
    if footnote := drift_footnote(records):
        lines += ["", footnote]
    return "\n".join(lines)


def environment_lines(environment: dict[str, Any]) -> list[str]:
    packages = environment.get("packages", {})
    git = environment.get("git", {})
    bandwidth = environment.get("memory_bandwidth", {})
    lines = [
        f"- machine: {environment.get('cpu', '?')} ({environment.get('cores', '?')} cores), "
        f"GPU: {environment.get('gpu') or 'none'}, torch threads: {environment.get('threads', '?')}",
        f"- load average at start: {environment.get('load_average')}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in packages.items()),
        f"- git: {git.get('sha', 'unknown')[:12]}{' (uncommitted changes)' if git.get('dirty') else ''}",
    ]
    bench_memory = environment.get("bench_memory") or {}
    if bench_memory.get("peak_rss_bytes"):
        after = [v for v in bench_memory.get("rss_after_release_bytes", {}).values() if v]
        lines.append(f"- bench peak RSS: {bench_memory['peak_rss_bytes'] / MIB:.0f} MiB"
                     + (f"; RSS after each stack's release: {min(after) / MIB:.0f}–{max(after) / MIB:.0f} MiB "
                        f"over {len(after)} runs" if after else ""))
    if bandwidth:
        lines.append(f"- measured memory bandwidth: read {bandwidth['read_bytes_per_s'] / 1e9:.1f} GB/s, "
                     f"copy {bandwidth['copy_bytes_per_s'] / 1e9:.1f} GB/s "
                     f"({bandwidth['buffer_bytes'] / MIB:.0f} MiB buffer, {bandwidth['threads']} threads)")
    return lines


def details(record: RunRecord) -> list[str]:
    """Per-stack section: notes, failure, every metric with its uncertainty."""
    lines = [f"### {record.name}", ""]
    if record.spec.techniques:
        lines.append("stack: " + ", ".join(f"`{t['name']}` {t['config'] or ''}".strip() for t in record.spec.techniques))
    lines.append(f"status: {status_text(record)}; run id {record.run_id}, bench {record.bench_id}")
    if record.error:
        lines += ["", "```", record.error.strip()[:2000], "```"]
    lines += [f"- {note}" for note in record.notes[:20]]
    if drifted(record):
        reasons = record.metrics["speed.drift"].params.get("reasons") or {}
        lines += [f"- {DRIFT_MARK} speed drifted: " + "; ".join(f"{where}: {why}" for where, why in reasons.items())]
    lines += ["", "| metric | value | uncertainty | n | note |", "|---|---|---|---|---|"]
    for name, metric in sorted(record.metrics.items()):
        note = "copied from baseline" if metric.inherited else metric.params.get("scorer", "")
        lines.append(f"| {name} | {metric.value:.6g} {metric.unit} | {metric.spread()} | {metric.n or ''} | {note} |")
    return lines + [""]


def markdown_report(records: Sequence[RunRecord], environment: dict[str, Any], *, title: str,
                    command: str = "", plots: Sequence[str] = ()) -> str:
    """The full markdown report of a bench."""
    records = ordered(records)
    lines = [f"# {title}", ""]
    if command:
        lines += ["Produced by:", "", "```", command, "```", ""]
    lines += environment_lines(environment) + ["", "## Summary", "", markdown_table(records), ""]
    lines += [
        "Columns: perplexity on the first corpus (± standard error over windows; Δ% vs baseline); mean "
        "BIG-bench accuracy (± standard error; Δ vs baseline); mean KL divergence of next-token "
        "distributions to the baseline (nats); top-1 agreement; fraction of greedy outputs identical to the "
        "baseline's; time to first token and decode tokens/s (median [IQR or min–max] of timed runs, "
        "warm-up excluded) at batch 1, longest prompt of the speed grid; decode tokens/s "
        "on the prompt set. Speed ratios (×) are measured side by side: the stack's runs alternate with "
        "the baseline's (A B, B A, …) and the ratio is the median of per-round ratios of adjacent runs, "
        "[min–max or IQR] over rounds (prompts, for the prompt set); the baseline row shows its first "
        "measurement, each stack's details its adjacent baseline (`baseline_*` metrics) and the 1-minute "
        "load average before/after (`machine.load_*`). Accepted draft tokens per verification step; weight bytes as stored; KV-cache "
        "bytes per token slot (of the allocated capacity, for a pre-allocated cache); measured decode speed "
        "as a fraction of the memory roofline. `= base`: the stack "
        "cannot change this number, copied from the baseline.", "",
    ]
    for plot in plots:
        lines += [f"![{plot}]({plot})", ""]
    lines += ["## Details", ""]
    for record in records:
        lines += details(record)
    return "\n".join(lines)
