"""``effinfer bench`` and ``effinfer results``: the evaluator's commands, added through the public hook.

This module is an ordinary plugin of the ``effinfer`` entry-point group
(``evaluation = "effinfer.evaluation.cli"``); it only implements
``effinfer_register_commands``.
"""

from __future__ import annotations

import csv
import inspect
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
from rich.errors import MarkupError
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from effinfer.core import hookimpl
from effinfer.core.errors import EffinferError, ExperimentError
from effinfer.core.experiment import Runtime, TechniqueSpec, format_validation_errors, parse_technique
from effinfer.core.preflight import read_yaml_mapping, writable_problem
from effinfer.core.steplog import LineProgress, escape_name
from effinfer.core.models import DEFAULT_MODEL
from effinfer.core.registry import Registry, get_registry
from effinfer.core.technique import Requirement
from effinfer.evaluation.records import RunRecord

console = Console(width=None if Console().is_terminal else 220)  # files and pipes get the whole table
BUILTIN_DISTRIBUTION = "effinfer"
#: cross-level compositions benched by default, when all their techniques are registered. They use
#: the quantizers that need no long calibration: GPTQ and AWQ (about 2 and 3 minutes of set-up on a
#: 2-core AMD EPYC) are benched alone, and composing them again would push `make bench` past its
#: 20-minute budget; `effinfer bench -c gptq+prompt_lookup` measures such a stack on demand.
#: smoothquant+self_speculative (88 s) is benched with its family (``--node``), as one of
#: self_speculative's ``bench_compositions``.
DEFAULT_COMPOSITIONS = (
    "rtn+prompt_lookup",
    "selective_context+rtn+prompt_lookup",
)

#: the main job (``effinfer bench`` with no selection, ``make bench``): the quantization, speculative
#: and selective-context techniques, within 20 minutes on a 2-core CPU. Every other family is benched
#: by its taxonomy node (``effinfer bench --node model.compression.sparsification``), everything by
#: ``--all``.
MAIN_BENCH = (
    "rtn", "gptq", "awq", "smoothquant", "llm_int8", "qat",
    "prompt_lookup", "draft_model", "self_speculative", "lookahead", "rest", "medusa",
    "selective_context",
)

results_app = typer.Typer(help="Browse, compare and export stored evaluation runs.", no_args_is_help=True)


def _fail(message: Any) -> None:
    """Print ``error: <message>`` on stderr (literally: messages quote user text) and exit 2."""
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(message))}", highlight=False)
    raise typer.Exit(2)


# --------------------------------------------------------------------------- stacks


def parse_composition(text: str) -> list[TechniqueSpec]:
    """``"selective_context+rtn:bits=4+prompt_lookup"`` → three technique specs, in order."""
    parts = [p.strip() for p in text.split("+")]
    if not all(parts):
        raise ValueError(f"composition {text!r} has an empty part; write it like 'a+b:k=v+c'")
    return [parse_technique(p) for p in parts]


def bench_config(cls: type, name: str = "") -> dict[str, Any]:
    """The config a default bench uses: the technique class's ``bench_config``, else its defaults."""
    config = getattr(cls, "bench_config", None)
    return dict(config) if isinstance(config, dict) else {}


def default_stacks(registry: Registry, runtime: Runtime, nodes: list[str] | None = None,
                   everything: bool = False) -> tuple[list[list[TechniqueSpec]], list[str]]:
    """The stacks of a bench without ``-t``/``-c``, and what was left out, with why.

    No ``nodes``: the main job (:data:`MAIN_BENCH` alone plus :data:`DEFAULT_COMPOSITIONS`).
    ``nodes``: every registered technique under those taxonomy nodes alone, plus the
    ``bench_compositions`` they declare. ``everything``: every built-in technique and every
    composition, the main job's and the families'.
    """
    skipped: list[str] = []
    usable: dict[str, TechniqueSpec] = {}
    for name in _selected(registry, nodes, everything):
        entry = registry.techniques[name]
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
    compositions = [] if nodes else list(DEFAULT_COMPOSITIONS)
    if nodes or everything:
        compositions += [c for name in usable for c in registry.techniques[name].technique.bench_compositions]
    for composition in dict.fromkeys(compositions):
        parts = parse_composition(composition)
        if all(p.name in registry.techniques for p in parts):
            stacks.append([with_bench_config(p, registry) for p in parts])
        else:
            missing = [p.name for p in parts if p.name not in registry.techniques]
            skipped.append(f"{composition} (not registered: {', '.join(missing)})")
    return stacks, skipped


def _selected(registry: Registry, nodes: list[str] | None, everything: bool) -> list[str]:
    """Technique names a bench selects: under ``nodes``, every built-in, or the main job's."""
    if nodes:
        return [n for n in registry.names() if any(_under(registry.techniques[n].technique.node, node)
                                                   for node in nodes)]
    if everything:
        return [n for n in registry.names() if registry.techniques[n].distribution == BUILTIN_DISTRIBUTION]
    return [n for n in MAIN_BENCH if n in registry.techniques
            and registry.techniques[n].distribution == BUILTIN_DISTRIBUTION]


def _under(node: str, prefix: str) -> bool:
    return node == prefix or node.startswith(prefix + ".")


def check_nodes(nodes: list[str], registry: Registry) -> None:
    """Each ``--node`` must be a taxonomy node with at least one registered technique under it."""
    from effinfer.taxonomy import load_taxonomy

    taxonomy = load_taxonomy()
    problems = []
    for node in nodes:
        if node not in taxonomy:
            close = taxonomy.closest(node)
            problems.append(f"--node {node!r} is not a taxonomy node"
                            + (f"; did you mean {', '.join(close)}?" if close else "; see `effinfer taxonomy`"))
        elif not any(_under(entry.technique.node, node) for entry in registry.techniques.values()):
            with_techniques = sorted({e.technique.node for e in registry.techniques.values()})
            problems.append(f"no technique is registered under --node {node!r}; nodes with techniques: "
                            f"{', '.join(with_techniques)}")
    if problems:
        raise ValueError("; ".join(problems))


def chosen_stacks(techniques: list[str], compositions: list[str], registry: Registry,
                  runtime: Runtime, nodes: list[str] | None = None,
                  everything: bool = False) -> tuple[list[list[TechniqueSpec]], list[str]]:
    if nodes:
        check_nodes(nodes, registry)
    if nodes or everything or not (techniques or compositions):
        stacks, skipped = default_stacks(registry, runtime, nodes, everything)
        if not (techniques or compositions):
            return stacks, skipped
    else:
        stacks, skipped = [], []
    given = [[parse_technique(t)] for t in techniques] + [parse_composition(c) for c in compositions]
    return stacks + [[with_bench_config(spec, registry) for spec in stack] for stack in given], skipped


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
    node: Annotated[list[str], typer.Option(
        "--node", "-n", help="a taxonomy node: every technique under it alone, plus the compositions its "
                             "techniques declare (e.g. model.compression.sparsification); repeatable")] = [],  # noqa: B006
    everything: Annotated[bool, typer.Option(
        "--all", help="every built-in technique and every declared composition (hours on a 2-core CPU)")] = False,
    suite: Annotated[str, typer.Option(help="quick, standard, full, or a suite YAML file")] = "quick",
    model: Annotated[str, typer.Option(help="alias, .gguf file, folder or hub id")] = DEFAULT_MODEL,
    store: Annotated[Path | None, typer.Option(help="results database (default: $EFFINFER_RESULTS or the cache)")] = None,
    out: Annotated[Path | None, typer.Option(help="new folder for report.md and plots (default: ./results/bench-<id>, "
                                                  "or bench-<id>-<store id> when that is taken)")] = None,
    redo: Annotated[bool, typer.Option("--redo", help="measure again stacks already stored")] = False,
    redo_drifted: Annotated[bool, typer.Option(
        "--redo-drifted", help="measure again stored stacks whose baseline drifted during their speed "
                               "measurement (flagged in the report)")] = False,
    baseline_only: Annotated[bool, typer.Option("--baseline-only", help="measure only the baseline")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda[:N]")] = "cpu",
    threads: Annotated[int | None, typer.Option(min=1, help="torch threads (default: torch's choice)")] = None,
) -> None:
    """Benchmark technique stacks against the baseline: accuracy, fidelity, speed, memory.

    Default (the main job, `make bench`): the baseline, the quantization, speculative-decoding and
    selective-context techniques alone and a few cross-level compositions. `--node` benches a family
    by its taxonomy node, `--all` every built-in; `-t`/`-c` add stacks to either.
    Every stack is validated before anything is measured. Prints the table and writes the
    store, a markdown report and plots; exits 1 when a stack failed. An interrupted bench is
    recorded as interrupted; rerunning the same command resumes it (stored stacks are kept).
    """
    registry = get_registry()
    runtime, chosen_suite = _runtime_and_suite(device, threads, suite)
    try:
        stacks, skipped = ([], []) if baseline_only else chosen_stacks(technique, compose, registry, runtime, node, everything)
        check_stacks(stacks, model, runtime, registry)  # all of them, before the baseline is measured
    except (EffinferError, ValueError) as error:
        _fail(error)
    results_store = _writable_outputs(out, store)
    for line in skipped:
        console.print(f"[yellow]skipped[/] {escape(line)}", highlight=False)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one reload per stack; the bench has its own progress bars
    command = "effinfer " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    console.print(f"benching {len(stacks)} stack(s) + baseline on {model}, suite {chosen_suite.name}; "
                  f"store {results_store.path}", highlight=False, markup=False)
    started = time.perf_counter()
    try:
        with _progress() as progress:
            result = _run_bench(stacks, chosen_suite, model, results_store, runtime, progress, command,
                                redo=redo, redo_drifted=redo_drifted)
    except KeyboardInterrupt:
        _interrupted(results_store)
    except EffinferError as error:  # e.g. the model cannot be loaded: the bench is closed as interrupted
        results_store.close()
        _fail(error)
    seconds = time.perf_counter() - started
    try:
        _print_and_write(result, results_store, out, chosen_suite.name, model, command, seconds)
    finally:
        results_store.close()
    if result.failed:
        raise typer.Exit(1)


def _runtime_and_suite(device: str, threads: int | None, suite: str) -> tuple[Runtime, Any]:
    """The runtime and the suite of a bench, or ``error:`` with the fix."""
    from effinfer.evaluation.suites import Suite, get_suite

    try:
        runtime = Runtime.model_validate({"device": device, "threads": threads})
    except ValidationError as error:
        _fail(ExperimentError(format_validation_errors(error, Runtime, prefix="runtime: ")))
    try:
        return runtime, get_suite(_suite_source(suite))
    except ValidationError as error:
        _fail("the suite is not valid:\n" + "\n".join(
            f"  - {line}" for line in format_validation_errors(error, Suite, prefix=f"{suite}: ")))
    except (EffinferError, ValueError) as error:
        _fail(error)
    except OSError as error:  # a suite file that cannot be read
        _fail(f"cannot read {error.filename or suite}: {error.strerror or error}")
    raise AssertionError("unreachable")


def _writable_outputs(out: Path | None, store: Path | None) -> Any:
    """Check the report folder and open the results database before any measurement."""
    from effinfer.evaluation.store import ResultsStore, StoreError

    if out is not None and (problem := out_problem(out)):
        _fail(problem)
    if out is None and (problem := writable_problem(REPORTS_DIR, "the reports folder")):
        _fail(f"{problem} (or pass --out)")
    try:
        return ResultsStore(store)
    except StoreError as error:
        _fail(error)


def _suite_source(suite: str) -> Any:
    """A suite name as given; a suite file read (refusing a folder, a binary, an empty or a
    duplicated-key file with the fix) into its fields, named after the file."""
    from effinfer.evaluation.suites import SUITES, Suite

    path = Path(suite)
    if suite in SUITES or not (path.exists() or path.suffix in {".yaml", ".yml"}):
        return suite
    data = read_yaml_mapping(path, "suite", Suite.model_fields)
    return {"name": path.stem} | data


def check_stacks(stacks: list[list[TechniqueSpec]], model: str, runtime: Runtime, registry: Registry) -> None:
    """Everything ``effinfer run`` checks before loading, for every stack of a bench, all problems
    together (each prefixed with its stack): names, configs, conflicts, the runtime, the model
    source, each technique against the model's config, output folders."""
    from effinfer.core.experiment import Experiment
    from effinfer.evaluation.evaluator import stack_spec

    problems: list[str] = []
    for stack in [[], *stacks]:
        experiment = Experiment(model=model, techniques=stack, runtime=runtime)
        try:
            _check_layout(experiment.preflight(registry), model)
        except ExperimentError as error:
            own = [p for p in error.problems if p not in problems]  # the model's and runtime's are said once
            problems += [f"{stack_spec(stack).name}: {p}" for p in own] if stack else own
    if problems:
        raise ExperimentError(problems)


def _check_layout(techniques: list[Any], model: str) -> None:
    from effinfer.core import runner

    check = getattr(runner, "check_source_layout", None)  # techniques refusing the model's layout
    if check is not None:
        check(techniques, model)


def _run_bench(stacks: list[list[TechniqueSpec]], suite: Any, model: str, store: Any, runtime: Runtime,
               progress: Any, command: str, *, redo: bool, redo_drifted: bool) -> Any:
    from effinfer.evaluation.api import bench

    return bench([[], *stacks], suite=suite, model=model, store=store, redo=redo, redo_drifted=redo_drifted,
                 runtime=runtime, progress=progress, command=command)


def _interrupted(store: Any) -> None:
    """Ctrl-C: the bench is closed as interrupted; say how to resume and exit 130."""
    bench_id = store.opened[-1] if store.opened else None
    stored = len(store.runs(bench_id=bench_id)) if bench_id is not None else 0
    what = (f"bench {bench_id} recorded as interrupted with {stored} run(s) stored" if bench_id is not None
            else "interrupted before any run was stored")
    Console(stderr=True, soft_wrap=True).print(
        f"[yellow]interrupted:[/] {escape(what)}; rerun the same command to resume (stored stacks are not "
        "measured again)", highlight=False)
    store.close()
    raise typer.Exit(130)


class _LiteralText(TextColumn):
    """A description column that shows text that is not valid markup literally instead of crashing."""

    def render(self, task: Any) -> Any:
        try:
            return super().render(task)
        except MarkupError:
            return Text(task.description)


class _NamedProgress(Progress):
    """Progress bars whose task names (stack names, user text) print literally; the markup the
    evaluator appends after a name (``[green]ok[/]``) still renders."""

    def add_task(self, description: str, *args: Any, **kwargs: Any) -> Any:
        task_id = super().add_task(escape(description), *args, **kwargs)
        self._names = {**getattr(self, "_names", {}), task_id: description}
        return task_id

    def update(self, task_id: Any, *, description: str | None = None, **kwargs: Any) -> None:
        if description is not None:
            description = escape_name(description, getattr(self, "_names", {}).get(task_id, ""))
        super().update(task_id, description=description, **kwargs)


def _progress() -> Any:
    """Rich progress bars on a terminal; one line per finished step otherwise (logs, nohup, pipes)."""
    if not console.is_terminal:
        return LineProgress(console)
    return _NamedProgress(SpinnerColumn(), _LiteralText("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=console, transient=False)


#: where reports go by default: ``results/bench-<id>`` (``-<store id>`` added when that is taken)
REPORTS_DIR = Path("results")
#: the last line of every report.md: which store and bench it was written from (an HTML comment)
REPORT_MARKER = "<!-- effinfer-report "


def out_problem(folder: Path) -> str | None:
    """Why ``--out`` cannot take this bench's report (checked before the bench), or ``None``."""
    if (folder / "report.md").exists():
        owner = _report_owner(folder)
        whose = f" (bench {owner.get('bench_id')} of {owner.get('store')})" if owner else ""
        return (f"--out {folder} already holds a report{whose}; reports are never overwritten: choose a new "
                "folder or delete that one")
    return writable_problem(folder, "--out")


def _report_owner(folder: Path) -> dict[str, Any]:
    """The store and bench a report was written from (the marker comment ending its report.md)."""
    try:
        last = (folder / "report.md").read_text().rstrip().rsplit("\n", 1)[-1]
    except OSError:
        return {}
    if not (last.startswith(REPORT_MARKER) and last.endswith("-->")):
        return {}
    try:
        return dict(json.loads(last.removeprefix(REPORT_MARKER).removesuffix("-->")))
    except (ValueError, TypeError):
        return {}


def report_folder(store: Any, bench_id: int | None, out: Path | None) -> Path:
    """``out``, or ``results/bench-<id>``; when that holds another store's (or bench's) report,
    ``results/bench-<id>-<store id>`` so benches of two stores in one folder keep both reports."""
    if out is not None:
        return out
    if bench_id is None:  # every stack came from the store: a new report of stored runs
        return _unused(REPORTS_DIR / f"stored-{store.store_id}-{time.strftime('%Y%m%d-%H%M%S')}")
    for folder in (REPORTS_DIR / f"bench-{bench_id}", REPORTS_DIR / f"bench-{bench_id}-{store.store_id}"):
        owner = _report_owner(folder)
        if not folder.exists() or (owner.get("store_id") == store.store_id and owner.get("bench_id") == bench_id):
            return folder
    return _unused(REPORTS_DIR / f"bench-{bench_id}-{store.store_id}")


def _unused(folder: Path) -> Path:
    """``folder``, or ``folder-2``, ``folder-3`` … whichever does not exist yet."""
    candidate, number = folder, 1
    while candidate.exists():
        number += 1
        candidate = folder.with_name(f"{folder.name}-{number}")
    return candidate


def _print_and_write(result: Any, store: Any, out: Path | None, suite: str, model: str, command: str,
                     seconds: float) -> None:
    from effinfer.evaluation.report import rich_table

    title = f"effinfer bench — {model}, suite {suite}"
    console.print(rich_table(result.records, title=escape(title)))
    bench_id = result.bench_id
    folder = report_folder(store, bench_id, out)
    written = write_report(result.records, result.environment, folder, title=title, command=command,
                           owner={"store": str(store.path), "store_id": store.store_id, "bench_id": bench_id})
    for record in result.failed:
        culprit = failed_technique(record, get_registry())
        console.print(f"[red]failed[/] {escape(record.name)}{escape(culprit)}: "
                      f"{escape((record.error or '').splitlines()[0])}", highlight=False)
    console.print(f"took {seconds / 60:.1f} min; store {store.path} (bench {bench_id if bench_id is not None else 'none: all stored'}); "
                  + ", ".join(str(p) for p in written), highlight=False, markup=False)


def failed_technique(record: RunRecord, registry: Registry) -> str:
    """`` (technique X, plugin 'p', distribution d)`` for the technique of a failed stack whose code
    raised (the last of the stack's plugin modules named in the stored traceback), or ``""``."""
    error, found, at = record.error or "", None, -1
    for item in record.spec.techniques:
        entry = registry.techniques.get(item["name"])
        if entry is None:
            continue
        try:
            where = error.rfind(inspect.getfile(entry.technique))
        except (TypeError, OSError):
            continue
        if where > at:
            found, at = entry, where
    if found is None:
        return ""
    return f" (technique {found.technique.name}, plugin {found.plugin!r}, distribution {found.distribution})"


def write_report(records: list[RunRecord], environment: dict[str, Any], folder: Path, *, title: str,
                 command: str = "", owner: dict[str, Any] | None = None) -> list[Path]:
    """Write ``report.md``, ``pareto.png`` and ``bars.png`` into ``folder``; return their paths.

    ``owner`` (store path, store id, bench id) is recorded in a comment on report.md's last
    line, so a later bench never takes this folder for its own report."""
    from effinfer.evaluation.plots import bars_plot, pareto_plot
    from effinfer.evaluation.report import markdown_report

    folder.mkdir(parents=True, exist_ok=True)
    pareto = pareto_plot(records, folder / "pareto.png", title=title)
    bars = bars_plot(records, folder / "bars.png", title=title)
    report = folder / "report.md"
    text = markdown_report(records, environment, title=title, command=command, plots=[pareto.name, bars.name])
    if owner is not None:
        text = text.rstrip("\n") + f"\n\n{REPORT_MARKER}{json.dumps(owner)} -->\n"
    report.write_text(text)
    return [report, pareto, bars]


# --------------------------------------------------------------------------- results


StoreOption = Annotated[Path | None, typer.Option("--store", help="results database (default: the usual one)")]


def _open(store: Path | None) -> Any:
    """The results database, to read (read-only when it cannot be written); errors name the fix."""
    from effinfer.evaluation.store import ResultsStore, StoreError, default_store_path

    path = store or default_store_path()
    if not Path(path).exists():
        _fail(f"no results database at {path}; run `effinfer bench` first or pass --store")
    try:
        return ResultsStore.for_reading(path)
    except StoreError as error:
        _fail(error)


@results_app.command("list")
def results_list(
    bench: Annotated[int | None, typer.Option(help="list the runs of this bench")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 20,
    store: StoreOption = None,
) -> None:
    """List benches (newest first), or the runs of one bench."""
    from rich.table import Table

    with _open(store) as db:
        if bench is not None and db.bench_status(bench) is None:
            _fail(f"no bench {bench} in {db.path} (see `effinfer results list`)")
        if bench is None:
            table = Table("bench", "started", "ended", "status", "suite", "model", "runs", "failed", "command")
            for row in db.benches(limit=limit):
                table.add_row(*(Text(str(cell)) for cell in (
                    row["id"], row["started"], row["finished"] or "—", row.get("status", ""), row["suite"],
                    row["model"], row["runs"], row["failed"], row["command"] or "")))
        else:
            table = Table("run", "stack", "status", "seconds", "metrics", "started")
            for record in db.bench_runs(bench):
                table.add_row(*(Text(str(cell)) for cell in (record.run_id, record.name, record.status,
                                                              f"{record.seconds:.1f}", len(record.metrics),
                                                              record.started)))
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
            if db.bench_status(bench_id) is None:
                _fail(f"no bench {bench_id} in {db.path} (see `effinfer results list`)")
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
    if output is not None and (problem := _output_file_problem(output)):
        _fail(problem)
    with _open(store) as db:
        records = db.runs(bench_id=bench)
    text = export_csv(records) if fmt == "csv" else export_json(records)
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)
        console.print(f"wrote {len(records)} runs to {output}", markup=False, highlight=False)


def _output_file_problem(output: Path) -> str | None:
    if output.is_dir():
        return f"--output {output} is a folder; give a file path, e.g. {output / 'runs.csv'}"
    return writable_problem(output.parent, f"the folder of --output {output}")


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
    from effinfer.evaluation.loadtest import loadtest_command
    from effinfer.evaluation.sweeps import sweep_command

    app.command("bench")(bench_command)
    app.command("loadtest")(loadtest_command)
    app.command("sweep")(sweep_command)
    app.add_typer(results_app, name="results")
