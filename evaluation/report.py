"""Reports: the comparison table (terminal and markdown), baseline row first, deltas after.

One list of :class:`Column` definitions feeds both renderers, so the terminal table and the
markdown report always show the same numbers. A value copied from the baseline (the stack
cannot change it) is shown as ``= base``.
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
    Column("TTFT s", lambda r: f"speed.{c}.ttft_s" if (c := primary_cell(r)) else None, _fixed(3), "ratio"),
    Column("decode tok/s", lambda r: f"speed.{c}.decode_tok_s" if (c := primary_cell(r)) else None,
           _fixed(1), "ratio", True),
    Column("prompts tok/s", _named("generation.decode_tok_s"), _fixed(1), "ratio"),
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
    base = baseline.metrics.get(name) if baseline is not None and baseline is not record else None
    if column.compare and base is not None and not record.is_baseline:
        text += f" ({compare(metric.value, base.value, column.compare)})"
    return text


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
    table = Table(*headers(), title=title or None, show_lines=False, header_style="bold")
    for values in rows(records, keep_order):
        style = "red" if values[-1].startswith("FAILED") else ("bold" if values[0] == "baseline" else None)
        table.add_row(*map(escape, values), style=style)  # stack names may hold [brackets]
    return table


def markdown_table(records: Sequence[RunRecord]) -> str:
    lines = ["| " + " | ".join(headers()) + " |", "|" + "---|" * len(headers())]
    lines += ["| " + " | ".join(v.replace("|", "\\|") for v in values) + " |" for values in rows(records)]
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
        "warm-up excluded; ×ratio vs baseline) at batch 1, longest prompt of the speed grid; decode tokens/s "
        "on the prompt set; accepted draft tokens per verification step; weight bytes as stored; KV-cache "
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
