"""``effinfer bench`` and ``effinfer results``: the evaluator's commands, added through the public hook.

This module is an ordinary plugin of the ``effinfer`` entry-point group
(``evaluation = "effinfer.evaluation.cli"``); it only implements
``effinfer_register_commands``.
"""

from __future__ import annotations

import csv
import io
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from effinfer.core import hookimpl
from effinfer.core.errors import EffinferError
from effinfer.core.experiment import Runtime, TechniqueSpec, parse_technique
from effinfer.core.models import DEFAULT_MODEL
from effinfer.core.registry import Registry, get_registry
from effinfer.core.technique import Requirement
from effinfer.evaluation.records import RunRecord

console = Console(width=None if Console().is_terminal else 220)  # files and pipes get the whole table
BUILTIN_DISTRIBUTION = "effinfer"
#: cross-level compositions benched by default, when all their techniques are registered
DEFAULT_COMPOSITIONS = (
    "rtn+prompt_lookup",
    "selective_context+rtn+prompt_lookup",
    "gptq+prompt_lookup",
    "awq+self_speculative",
)

#: configs for built-ins whose defaults cannot run alone (a technique class may instead set
#: a ``bench_config`` dict attribute, which takes precedence)
FALLBACK_CONFIGS: dict[str, dict[str, Any]] = {
    "draft_model": {"techniques": ["rtn:bits=4"]},  # its default draft would be the target itself
}

results_app = typer.Typer(help="Browse, compare and export stored evaluation runs.", no_args_is_help=True)


def _fail(message: Any) -> None:
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


# --------------------------------------------------------------------------- stacks


def parse_composition(text: str) -> list[TechniqueSpec]:
    """``"selective_context+rtn:bits=4+prompt_lookup"`` → three technique specs, in order."""
    parts = [p.strip() for p in text.split("+")]
    if not all(parts):
        raise ValueError(f"composition {text!r} has an empty part; write it like 'a+b:k=v+c'")
    return [parse_technique(p) for p in parts]


def bench_config(cls: type, name: str) -> dict[str, Any]:
    """The config a default bench uses: ``cls.bench_config``, a fallback above, or the defaults."""
    config = getattr(cls, "bench_config", None)
    return dict(config) if isinstance(config, dict) else dict(FALLBACK_CONFIGS.get(name, {}))


def default_stacks(registry: Registry, runtime: Runtime) -> tuple[list[list[TechniqueSpec]], list[str]]:
    """Every built-in technique alone plus the default compositions; and what was left out, with why."""
    skipped: list[str] = []
    usable: dict[str, TechniqueSpec] = {}
    for name in registry.names():
        entry = registry.techniques[name]
        if entry.distribution != BUILTIN_DISTRIBUTION:
            continue
        if Requirement.CUDA in entry.technique.requires and not runtime.device.startswith("cuda"):
            skipped.append(f"{name} (requires CUDA; run with --device cuda)")
            continue
        config = bench_config(entry.technique, name)
        try:
            entry.technique.Config.model_validate(config)
        except ValidationError as error:
            skipped.append(f"{name} (its default config cannot run: {error.errors()[0]['msg']}; "
                           f"bench it with -t {name}:key=value,...)")
            continue
        usable[name] = TechniqueSpec(name=name, config=config)
    stacks = [[spec] for spec in usable.values()]
    for composition in DEFAULT_COMPOSITIONS:
        parts = parse_composition(composition)
        if all(p.name in usable for p in parts):
            stacks.append([usable[p.name] if not p.config else p for p in parts])
    return stacks, skipped


def chosen_stacks(techniques: list[str], compositions: list[str], registry: Registry,
                  runtime: Runtime) -> tuple[list[list[TechniqueSpec]], list[str]]:
    if not techniques and not compositions:
        return default_stacks(registry, runtime)
    stacks = [[parse_technique(t)] for t in techniques] + [parse_composition(c) for c in compositions]
    return [[with_bench_config(spec, registry) for spec in stack] for stack in stacks], []


def with_bench_config(spec: TechniqueSpec, registry: Registry) -> TechniqueSpec:
    """A technique named without options gets the config a default bench would use for it
    (so ``-t qat`` is as cheap as ``effinfer bench``'s own qat row); given options are kept as written."""
    entry = registry.techniques.get(spec.name)
    if spec.config or entry is None:
        return spec
    config = bench_config(entry.technique, spec.name)
    return TechniqueSpec(name=spec.name, config=config) if config else spec


# --------------------------------------------------------------------------- bench


def bench_command(
    technique: Annotated[list[str], typer.Option(
        "--technique", "-t", help="NAME[:key=value,...] benched alone (a bare NAME takes the technique's "
                                 "bench config); repeatable")] = [],  # noqa: B006
    compose: Annotated[list[str], typer.Option(
        "--compose", "-c", help="a stack such as 'selective_context+rtn+prompt_lookup'; repeatable")] = [],  # noqa: B006
    suite: Annotated[str, typer.Option(help="quick, standard, full, or a suite YAML file")] = "quick",
    model: Annotated[str, typer.Option(help="alias, .gguf file, folder or hub id")] = DEFAULT_MODEL,
    store: Annotated[Path | None, typer.Option(help="results database (default: $EFFINFER_RESULTS or the cache)")] = None,
    out: Annotated[Path | None, typer.Option(help="folder for report.md and plots (default: ./results/bench-<id>)")] = None,
    redo: Annotated[bool, typer.Option("--redo", help="measure again stacks already stored")] = False,
    baseline_only: Annotated[bool, typer.Option("--baseline-only", help="measure only the baseline")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda[:N]")] = "cpu",
    threads: Annotated[int | None, typer.Option(min=1, help="torch threads (default: torch's choice)")] = None,
) -> None:
    """Benchmark technique stacks against the baseline: accuracy, fidelity, speed, memory.

    Default: the baseline, every built-in technique alone and a few cross-level compositions.
    Prints the table and writes the store, a markdown report and plots.
    """
    from effinfer.evaluation.api import bench
    from effinfer.evaluation.store import ResultsStore
    from effinfer.evaluation.suites import get_suite

    try:
        runtime = Runtime(device=device, threads=threads)
        chosen_suite = get_suite(suite)
        stacks, skipped = ([], []) if baseline_only else chosen_stacks(technique, compose, get_registry(), runtime)
    except (EffinferError, ValueError) as error:
        _fail(error)
    for line in skipped:
        console.print(f"[yellow]skipped[/] {line}", highlight=False)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one reload per stack; the bench has its own progress bars
    results_store = ResultsStore(store)
    command = "effinfer " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    console.print(f"benching {len(stacks)} stack(s) + baseline on {model}, suite {chosen_suite.name}; "
                  f"store {results_store.path}", highlight=False)
    started = time.perf_counter()
    with _progress() as progress:
        result = bench([[], *stacks], suite=chosen_suite, model=model, store=results_store, redo=redo,
                       runtime=runtime, progress=progress, command=command)
    seconds = time.perf_counter() - started
    _print_and_write(result, results_store, out, chosen_suite.name, model, command, seconds)
    results_store.close()


def _progress() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


def _print_and_write(result: Any, store: Any, out: Path | None, suite: str, model: str, command: str,
                     seconds: float) -> None:
    from effinfer.evaluation.report import rich_table

    title = f"effinfer bench — {model}, suite {suite}"
    console.print(rich_table(result.records, title=title))
    bench_id = result.bench_id if result.bench_id is not None else "none"
    folder = out or Path("results") / f"bench-{bench_id}"
    written = write_report(result.records, result.environment, folder, title=title, command=command)
    for record in result.failed:
        console.print(f"[red]failed[/] {escape(record.name)}: {escape((record.error or '').splitlines()[0])}",
                      highlight=False)
    console.print(f"took {seconds / 60:.1f} min; store {store.path} (bench {bench_id}); "
                  + ", ".join(str(p) for p in written), highlight=False)


def write_report(records: list[RunRecord], environment: dict[str, Any], folder: Path, *, title: str,
                 command: str = "") -> list[Path]:
    """Write ``report.md``, ``pareto.png`` and ``bars.png`` into ``folder``; return their paths."""
    from effinfer.evaluation.plots import bars_plot, pareto_plot
    from effinfer.evaluation.report import markdown_report

    folder.mkdir(parents=True, exist_ok=True)
    pareto = pareto_plot(records, folder / "pareto.png", title=title)
    bars = bars_plot(records, folder / "bars.png", title=title)
    report = folder / "report.md"
    report.write_text(markdown_report(records, environment, title=title, command=command,
                                      plots=[pareto.name, bars.name]))
    return [report, pareto, bars]


# --------------------------------------------------------------------------- results


StoreOption = Annotated[Path | None, typer.Option("--store", help="results database (default: the usual one)")]


def _open(store: Path | None) -> Any:
    from effinfer.evaluation.store import ResultsStore, default_store_path

    path = store or default_store_path()
    if not Path(path).exists():
        _fail(f"no results database at {path}; run `effinfer bench` first or pass --store")
    return ResultsStore(path)


@results_app.command("list")
def results_list(
    bench: Annotated[int | None, typer.Option(help="list the runs of this bench")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 20,
    store: StoreOption = None,
) -> None:
    """List benches (newest first), or the runs of one bench."""
    from rich.table import Table

    with _open(store) as db:
        if bench is None:
            table = Table("bench", "started", "finished", "suite", "model", "runs", "failed", "command")
            for row in db.benches(limit=limit):
                table.add_row(str(row["id"]), row["started"], row["finished"] or "—", row["suite"], row["model"],
                              str(row["runs"]), str(row["failed"]), escape(row["command"] or ""))
        else:
            table = Table("run", "stack", "status", "seconds", "metrics", "started")
            for record in db.bench_runs(bench):
                table.add_row(str(record.run_id), escape(record.name), record.status, f"{record.seconds:.1f}",
                              str(len(record.metrics)), record.started)
        console.print(table)


@results_app.command("show")
def results_show(
    run: Annotated[int | None, typer.Argument(help="a run id (see `results list --bench N`)")] = None,
    bench: Annotated[int | None, typer.Option(help="show the summary table of this bench (default: the latest)")] = None,
    store: StoreOption = None,
) -> None:
    """Show one run with every metric, or the summary table of a bench."""
    from effinfer.evaluation.report import details, rich_table
    from effinfer.evaluation.store import StoreError

    with _open(store) as db:
        try:
            if run is not None:
                console.print("\n".join(details(db.run(run))), highlight=False, markup=False)
                return
            bench_id = bench if bench is not None else db.latest_bench_id()
            if bench_id is None:
                _fail("the results database holds no bench yet")
            console.print(rich_table(db.bench_runs(bench_id), title=f"bench {bench_id}"))
        except StoreError as error:
            _fail(error)


@results_app.command("compare")
def results_compare(
    runs: Annotated[list[int], typer.Argument(help="run ids; the first is the reference")],
    store: StoreOption = None,
) -> None:
    """Compare runs side by side (any benches); deltas are against the first run given."""
    from effinfer.evaluation.report import rich_table
    from effinfer.evaluation.store import StoreError

    if len(runs) < 2:
        _fail("give at least two run ids to compare")
    with _open(store) as db:
        try:
            records = [db.run(r) for r in runs]
        except StoreError as error:
            _fail(error)
    for record in records[1:]:
        record.baseline = records[0]
    console.print(rich_table(records, title=f"runs {', '.join(map(str, runs))} (deltas vs run {runs[0]})",
                             keep_order=True))


@results_app.command("export")
def results_export(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="file to write (default: stdout)")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="csv or json")] = "csv",
    bench: Annotated[int | None, typer.Option(help="only this bench")] = None,
    store: StoreOption = None,
) -> None:
    """Export runs and metrics: CSV (one row per metric) or JSON (one object per run)."""
    if fmt not in ("csv", "json"):
        _fail(f"unknown format {fmt!r}; use csv or json")
    with _open(store) as db:
        records = db.runs(bench_id=bench)
    text = export_csv(records) if fmt == "csv" else export_json(records)
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)
        console.print(f"wrote {len(records)} runs to {output}")


EXPORT_COLUMNS = ("run_id", "bench_id", "stack", "status", "model", "suite", "started", "metric", "value",
                  "stderr", "low", "high", "n", "unit", "inherited")


def export_csv(records: list[RunRecord]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(EXPORT_COLUMNS)
    for r in records:
        base = [r.run_id, r.bench_id, r.name, r.status, r.model, r.suite, r.started]
        if not r.metrics:
            writer.writerow(base + [""] * 8)
        for name, m in sorted(r.metrics.items()):
            writer.writerow(base + [name, m.value, m.stderr, m.low, m.high, m.n, m.unit, int(m.inherited)])
    return buffer.getvalue()


def export_json(records: list[RunRecord]) -> str:
    return json.dumps([r.model_dump(mode="json", exclude={"baseline"}) for r in records], indent=2) + "\n"


# --------------------------------------------------------------------------- registration


@hookimpl
def effinfer_register_commands(app: typer.Typer) -> None:
    app.command("bench")(bench_command)
    app.add_typer(results_app, name="results")
