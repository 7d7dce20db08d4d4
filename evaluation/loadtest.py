"""``effinfer loadtest``: serving measurements under load, kept in the results store.

The load generator itself (Poisson traces, HTTP and in-process replay, the metrics) is the
serving plugin's :mod:`~effinfer.plugins.system.serving.loadtest`; this module is the
evaluator's side of it: the command, the latency–throughput plot, and
:func:`store_load_rows`, which files every (system, rate) row as a run of one bench (suite
``loadtest``) so load tests sit in the same store as every other measurement
(``effinfer results list`` / ``show`` / ``export``). ``benchmarks/serving.py`` stores its
in-process rows the same way.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from effinfer.evaluation.environment import collect_environment
from effinfer.evaluation.records import RunRecord, StackSpec
from effinfer.evaluation.store import ResultsStore, now

console = Console(stderr=True)

#: row key → (metric name, unit, higher is better)
LOAD_METRICS: dict[str, tuple[str, str, bool]] = {
    "throughput_tok_s": ("serving.throughput", "tok/s", True),
    "request_rate": ("serving.request_rate", "req/s", True),
    "goodput_req_s": ("serving.goodput", "req/s", True),
    "ttft_p50_s": ("serving.ttft_p50", "s", False),
    "ttft_p99_s": ("serving.ttft_p99", "s", False),
    "tpot_p50_s": ("serving.tpot_p50", "s", False),
    "tpot_p99_s": ("serving.tpot_p99", "s", False),
    "queueing_p99_s": ("serving.queueing_p99", "s", False),
    "completed": ("serving.completed", "requests", True),
}


def add_metrics(record: RunRecord, row: dict[str, Any], table: dict[str, tuple[str, str, bool]], suffix: str = "",
                **fields: Any) -> None:
    """Copy ``row``'s measured fields into ``record`` as metrics named by ``table`` (+ ``suffix``)."""
    for key, (name, unit, higher) in table.items():
        if row.get(key) is not None:
            record.add(name + suffix, row[key], unit=unit, higher_is_better=higher, **fields)


def load_record(row: dict[str, Any], model: str, *, bench_id: int | None, suite: str = "loadtest",
                techniques: list[dict[str, Any]] | None = None) -> RunRecord:
    """One load-test row (``system``, ``rate`` and :func:`summarize`'s fields) as a run record."""
    system, rate = str(row["system"]), float(row["rate"])
    record = RunRecord(bench_id=bench_id, key=f"{suite}:{model}:{system}:{rate:g}:{now()}",
                       spec=StackSpec(name=system, techniques=techniques or []), model=model, suite=suite,
                       status="ok" if row.get("completed") else "failed",
                       error=None if row.get("completed") else row.get("first_error", "no request completed"),
                       started=now(), seconds=float(row.get("makespan_s") or 0.0))
    params = {"rate": rate, "slo_ttft_s": row.get("slo_ttft_s"), "slo_tpot_s": row.get("slo_tpot_s"),
              "requests": row.get("requests")}
    add_metrics(record, row, LOAD_METRICS, f"@{rate:g}", n=row.get("completed"), params=params)
    if row.get("first_error"):
        record.notes.append(f"first error: {row['first_error']}")
    return record


def store_load_rows(rows: list[dict[str, Any]], model: str, command: str, store: ResultsStore | str | Path | None = None,
                    suite: str = "loadtest", techniques: dict[str, list[dict[str, Any]]] | None = None) -> int:
    """File ``rows`` as one bench of the results store (one run per row); returns the bench id.

    ``techniques`` maps a system name to its stack entries (``[{name, config}]``) where known."""
    results = ResultsStore.open(store)
    try:
        bench_id = results.start_bench(suite, model, command, collect_environment())
        for row in rows:
            results.save_run(load_record(row, model, bench_id=bench_id, suite=suite,
                                         techniques=(techniques or {}).get(str(row["system"]))))
        results.finish_bench(bench_id, "finished")
        return bench_id
    finally:
        if not isinstance(store, ResultsStore):
            results.close()


def latency_throughput_plot(series: dict[str, list[dict]], path: Path) -> None:
    """p99 TTFT against throughput, one line per system."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("matplotlib is not installed (pip install -e '.[eval]'); no plot written")
        return
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for name, rows in series.items():
        axis.plot([r["throughput_tok_s"] for r in rows], [r["ttft_p99_s"] or float("nan") for r in rows], "o-",
                  label=name)
    axis.set_xlabel("throughput (output tokens/s)")
    axis.set_ylabel("TTFT p99 (s)")
    axis.set_yscale("log")
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_rates(rates: str) -> list[float]:
    """``"0.5,1,2"`` → ``[0.5, 1.0, 2.0]``; a clear error for anything else."""
    try:
        rate_list = [float(r) for r in rates.split(",") if r.strip()]
    except ValueError:
        rate_list = []
    if not rate_list or any(r <= 0 for r in rate_list):
        raise ValueError(f"--rates must be positive numbers separated by commas (got {rates!r})")
    return rate_list


def loadtest_command(
    url: Annotated[str, typer.Option(help="base URL of an OpenAI-compatible server")] = "http://127.0.0.1:8000",
    model: Annotated[str | None, typer.Option(help="model name sent in requests (default: the server's first)")] = None,
    rates: Annotated[str, typer.Option(help="comma-separated arrival rates, requests/s")] = "0.5,1,2",
    requests: Annotated[int, typer.Option(min=1, help="requests per rate")] = 24,
    output_scale: Annotated[float, typer.Option(min=0.01, help="scale of the prompt set's output lengths")] = 0.25,
    max_chars: Annotated[int, typer.Option(min=700, help="prompt passage length cap (characters)")] = 900,
    slo_ttft: Annotated[float, typer.Option(min=0, help="TTFT SLO for goodput (s)")] = 5.0,
    slo_tpot: Annotated[float, typer.Option(min=0, help="TPOT SLO for goodput (s)")] = 0.5,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    label: Annotated[str, typer.Option(help="system name in the table and the store")] = "server",
    out: Annotated[Path | None, typer.Option(help="write JSON here and a markdown table next to it (.md)")] = None,
    plot: Annotated[Path | None, typer.Option(help="latency-throughput plot (PNG, needs matplotlib)")] = None,
    store: Annotated[Path | None, typer.Option(help="results database (default: $EFFINFER_RESULTS or the cache)")] = None,
    save: Annotated[bool, typer.Option("--save/--no-save", help="file the rows in the results store")] = True,
) -> None:
    """Replay Poisson arrivals at several rates (prompts from effinfer.data) against an
    OpenAI-compatible endpoint; report throughput, TTFT/TPOT p50/p99 and goodput, and file
    them in the results store (suite ``loadtest``)."""
    from effinfer.plugins.system.serving.loadtest import (LOADTEST_COLUMNS, display_rows, http_client_module,
                                                          make_trace, markdown_table, replay_http, summarize)

    try:
        rate_list = parse_rates(rates)
    except ValueError as error:
        console.print(f"[red]error:[/] {error}", highlight=False)
        raise typer.Exit(2) from None
    base = url.rstrip("/")
    try:
        listed = http_client_module().get(f"{base}/v1/models", timeout=10).json()
        model = model or listed["data"][0]["id"]
    except Exception as error:
        console.print(f"[red]error:[/] no OpenAI-compatible server answers at {base}/v1/models ({error}); start one "
                      "with `effinfer serve`", highlight=False, markup=False)
        raise typer.Exit(2) from None
    rows = []
    for rate in rate_list:
        trace = make_trace(rate, requests, seed, output_scale, max_chars)
        console.print(f"rate {rate}/s: {requests} requests …", highlight=False)
        outcomes, makespan = replay_http(base, model, trace)
        row = {"system": label, "rate": rate} | summarize(outcomes, makespan, slo_ttft, slo_tpot)
        errors = [o.error for o in outcomes if o.error]
        if errors:
            row["first_error"] = errors[0]
        rows.append(row)
    table = markdown_table(display_rows(rows), LOADTEST_COLUMNS)
    print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2) + "\n")
        out.with_suffix(".md").write_text(table + "\n")
        console.print(f"wrote {out} and {out.with_suffix('.md')}", highlight=False)
    if plot is not None:
        latency_throughput_plot({label: rows}, plot)
    if save:
        command = "effinfer " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        bench_id = store_load_rows(rows, model, command, store)
        console.print(f"stored as bench {bench_id} (effinfer results show {bench_id})", highlight=False)
