"""``effinfer sweep``: a grid of experiments run as Ray tasks (or in process), every result kept
twice — in the sweep's ledger and in the results store.

The mechanics (grid expansion, the SIGKILL-safe ``results.jsonl`` ledger, the Ray and in-process
runners) are :mod:`effinfer.plugins.system.serving.sweep`. The ledger decides what is left to
run; the results store gets one run per ledger line (suite ``sweep:<name>``, key
``sweep:<experiment hash>``), so sweeps sit beside every other measurement (``effinfer results
list`` / ``show`` / ``export``). A sweep started again first files the ledger lines the store
does not have yet (a kill between the two writes), then only new results: each result is in
the store exactly once.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from effinfer.evaluation.environment import collect_environment
from effinfer.evaluation.loadtest import add_metrics
from effinfer.evaluation.records import RunRecord, StackSpec
from effinfer.evaluation.store import ResultsStore, now

console = Console(stderr=True)

#: ledger field → (metric name, unit, higher is better)
SWEEP_METRICS: dict[str, tuple[str, str, bool]] = {
    "decode_tok_s": ("generation.decode_tok_s", "tok/s", True),
    "decode_s": ("generation.decode_s", "s", False),
    "prefill_s": ("generation.prefill_s", "s", False),
    "new_tokens": ("generation.new_tokens", "tokens", True),
    "load_s": ("setup.load_s", "s", False),
    "setup_s": ("setup.techniques_s", "s", False),
}


def store_key(record: dict[str, Any]) -> str:
    return f"sweep:{record['key']}"


def sweep_record(record: dict[str, Any], suite: str, bench_id: int | None) -> RunRecord:
    """One ledger line as a run record of the results store."""
    run = RunRecord(bench_id=bench_id, key=store_key(record),
                    spec=StackSpec(name=str(record.get("name") or record["key"]),
                                   techniques=list(record.get("techniques") or [])),
                    model=str(record.get("model") or "?"), suite=suite,
                    status="ok" if record.get("status") == "ok" else "failed", error=record.get("error"),
                    started=now(), seconds=float(record.get("seconds") or 0.0))
    add_metrics(run, record, SWEEP_METRICS)
    if record.get("outputs"):
        run.notes.append(f"first output: {str(record['outputs'][0])[:200]!r}")
    return run


class StoreMirror:
    """Files ledger lines into one bench of the results store, each key once."""

    def __init__(self, store: ResultsStore, suite: str, models: str, command: str) -> None:
        self.store, self.suite = store, suite
        self.known = {run.key for run in store.runs() if run.suite == suite}
        self.bench_id = store.start_bench(suite, models, command, collect_environment())

    def add(self, record: dict[str, Any]) -> bool:
        key = store_key(record)
        if key in self.known:
            return False
        self.store.save_run(sweep_record(record, self.suite, self.bench_id))
        self.known.add(key)
        return True

    def catch_up(self, records: list[dict[str, Any]]) -> int:
        """File the ledger lines the store misses; how many."""
        return sum(self.add(record) for record in records)


def sweep_command(
    sweep_file: Annotated[Path, typer.Argument(help="sweep YAML: models, stacks, grid, base")],
    out: Annotated[Path | None, typer.Option(help="results folder (default: <file>.results next to the file)")] = None,
    runner: Annotated[str, typer.Option(help="auto (Ray when installed), ray or local (in this process)")] = "auto",
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: a local Ray)")] = None,
    retry_failed: Annotated[bool, typer.Option(help="run again the experiments stored as failed")] = False,
    dry_run: Annotated[bool, typer.Option(help="list the experiments and exit")] = False,
    store: Annotated[Path | None, typer.Option(help="results database (default: $EFFINFER_RESULTS or the cache)")] = None,
) -> None:
    """Run a grid of experiments (models × stacks × config values); each result is stored as it
    finishes in <out>/results.jsonl and in the results store (suite sweep:<name>), and a sweep
    started again skips what is already stored."""
    from effinfer.core.errors import ExperimentError
    from effinfer.plugins.system.serving.sweep import (Ledger, expand, iter_summary, load_sweep, pending,
                                                       ray_available, run_in_process, run_key, run_on_ray)

    if runner not in ("auto", "ray", "local"):
        console.print(f"[red]error:[/] --runner must be auto, ray or local (got {runner!r})")
        raise typer.Exit(2)
    try:
        sweep = load_sweep(sweep_file)
        experiments = expand(sweep)
    except ExperimentError as error:
        for problem in error.problems:
            console.print(f"[red]error:[/] {problem}", highlight=False, markup=False)
        raise typer.Exit(2) from None
    use_ray = runner == "ray" or (runner == "auto" and ray_available())
    if runner == "ray" and not ray_available():
        console.print("[red]error:[/] Ray is not installed; pip install -e '.[ray]' or use --runner local")
        raise typer.Exit(2)
    ledger = Ledger((out or sweep_file.with_suffix(".results")) / "results.jsonl")
    todo = pending(experiments, ledger, retry_failed)
    console.print(f"{len(experiments)} experiments, {len(experiments) - len(todo)} already stored, {len(todo)} to run "
                  f"({'Ray' if use_ray else 'in process'}); results in {ledger.path}", highlight=False)
    if dry_run:
        for experiment in experiments:
            print(run_key(experiment), experiment.name)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    command = "effinfer " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with ResultsStore.open(store) as results:
        mirror = StoreMirror(results, f"sweep:{sweep.name}", ",".join(sweep.models), command)
        caught_up = mirror.catch_up(ledger.records())
        if caught_up:
            console.print(f"filed {caught_up} ledger results the results store did not have yet", highlight=False)
        with Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                      transient=True) as progress:
            bar = progress.add_task("runs", total=len(todo))

            def on_result(record: dict) -> None:
                ledger.append(record)
                mirror.add(record)
                progress.advance(bar)
                console.print(next(iter_summary([record])), highlight=False, markup=False)

            if use_ray:
                run_on_ray(todo, on_result, address)
            else:
                run_in_process(todo, on_result)
        results.finish_bench(mirror.bench_id)
    records = ledger.records()
    failed = sum(1 for r in records if r.get("status") != "ok")
    console.print(f"done: {len(records)} stored, {failed} failed (results store: bench {mirror.bench_id}, suite "
                  f"sweep:{sweep.name})", highlight=False)
