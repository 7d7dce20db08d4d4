"""The ``effinfer`` command line (Typer + Rich)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from effinfer.core.errors import EffinferError
from effinfer.core.registry import get_registry

app = typer.Typer(help="effinfer: efficient LLM inference techniques as plugins, one shared evaluator.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
plugins_app = typer.Typer(help="List installed techniques (built-in and third-party).")
app.add_typer(plugins_app, name="plugins")
console = Console()


def _fail(error: Exception | str) -> None:
    """Print ``error: <message>`` on stderr (literally: a message may quote user text) and exit 2."""
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(error))}", highlight=False)
    raise typer.Exit(2)


@app.command()
def taxonomy(
    as_json: Annotated[bool, typer.Option("--json", help="print the tree as JSON")] = False,
    view: Annotated[str | None, typer.Option(help="a second view, e.g. 2408.03130")] = None,
) -> None:
    """Show the taxonomy tree with the number of techniques at each node."""
    from effinfer.taxonomy import load_taxonomy, load_view

    tree, registry = load_taxonomy(), get_registry()
    counts = {n.id: len(registry.at_node(n.id, include_descendants=True)) for n in tree.walk()}
    if view:
        try:
            chosen = load_view(view)
        except (KeyError, ValueError) as error:
            _fail(error)
        data = chosen.model_dump(mode="json")
        if as_json:
            print(json.dumps(data, indent=2))
            return
        table = Table("category", "maps to (2404.14294 nodes)", "techniques", title=escape(chosen.title))
        for category in chosen.categories:
            names = sorted({e.technique.name for node in category.maps_to for e in registry.at_node(node)})
            table.add_row(Text(category.title), Text("\n".join(category.maps_to)), Text(", ".join(names) or "—"))
        console.print(table)
        return
    if as_json:
        def with_counts(node: dict[str, Any]) -> dict[str, Any]:
            node["techniques"] = [e.technique.name for e in registry.at_node(node["id"])]
            node["technique_count"] = counts[node["id"]]
            node["children"] = [with_counts(child) for child in node.get("children", [])]
            return node

        print(json.dumps([with_counts(root) for root in tree.to_dict()["nodes"]], indent=2))
        return
    rich_tree = Tree("[bold]efficient LLM inference[/] (arXiv 2404.14294)")

    def add(parent: Tree, node_id: str) -> None:
        node = tree.get(node_id)
        names = [e.technique.name for e in registry.at_node(node_id)]
        label = f"{escape(node.title)} [dim]{escape(node.id)}[/] [cyan]({counts[node_id]})[/]"
        if names:
            label += " [green]" + escape(", ".join(names)) + "[/]"
        branch = parent.add(label)
        for child in node.children:
            add(branch, child)

    for root in tree.roots():
        add(rich_tree, root.id)
    console.print(rich_tree)


@plugins_app.callback(invoke_without_command=True)
def plugins(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="print techniques and broken plugins as JSON")] = False,
) -> None:
    """List every registered technique and every plugin that failed to load."""
    if ctx.invoked_subcommand:
        return
    registry = get_registry()
    if as_json:
        print(json.dumps({
            "techniques": [entry.technique.describe() | {"plugin": entry.plugin, "distribution": entry.distribution}
                           for entry in registry.techniques.values()],
            "broken": [{"plugin": b.plugin, "distribution": b.distribution, "error": b.error} for b in registry.broken],
        }, indent=2))
        return
    table = Table("technique", "level", "taxonomy node", "lossless", "paper", "distribution")
    for name in registry.names():
        entry = registry.techniques[name]
        cls = entry.technique
        paper = (f"arXiv:{cls.paper.arxiv}" if cls.paper.arxiv else cls.paper.link or "") if cls.paper else ""
        table.add_row(*(Text(str(cell)) for cell in (name, "/".join(cls.levels()), cls.node,
                                                      "yes" if cls.lossless else "no", paper, entry.distribution)))
    console.print(table)
    for broken in registry.broken:
        console.print(f"[red]broken plugin[/] {escape(f'{broken.plugin} ({broken.distribution}): {broken.error}')}",
                      highlight=False)


@plugins_app.command("show")
def plugins_show(name: str) -> None:
    """Show one technique: node, paper, requirements and its config schema."""
    registry = get_registry()
    try:
        cls = registry.get(name)
    except EffinferError as error:
        _fail(error)
    from effinfer.core.experiment import allowed_range

    info = cls.describe()
    console.print(f"[bold]{escape(cls.name)}[/] — {escape(cls.node)}\n{escape(cls.summary)}", highlight=False)
    if cls.paper:
        console.print(Text(f"paper: {cls.paper.cite()} {cls.paper.link or ''}"), highlight=False)
    console.print(Text(f"lossless: {cls.lossless}; levels: {', '.join(cls.levels())}; "
                       f"requires: {', '.join(info['requires']) or 'nothing'}"), highlight=False)
    table = Table("field", "type", "default", "allowed", "description", title="config")
    for field_name, field in cls.Config.model_fields.items():
        prop = info["config_schema"].get("properties", {}).get(field_name, {})
        default = field.default_factory() if field.default_factory else field.default
        table.add_row(*(Text(cell) for cell in (field_name, str(field.annotation).replace("typing.", ""),
                                                 repr(default), allowed_range(prop), field.description or "")))
    console.print(table)


@app.command()
def run(experiment_file: Path) -> None:
    """Run an experiment YAML file and print what each stage did and the outputs."""
    from effinfer.core.experiment import Experiment

    try:
        experiment = Experiment.from_yaml(experiment_file)
    except EffinferError as error:
        _fail(error)
    _run_and_print(experiment)


@app.command()
def generate(
    prompt: str,
    model: Annotated[str, typer.Option(help="alias, .gguf file, folder or hub id")] = "smollm2-135m-instruct",
    technique: Annotated[list[str], typer.Option(
        "--technique", "-t", help="NAME[:key=value,...]; repeat to compose")] = [],  # noqa: B006
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    document: Annotated[list[str], typer.Option(help="a context passage; repeatable")] = [],  # noqa: B006
) -> None:
    """Generate from one prompt with a technique stack."""
    from effinfer.core.experiment import Experiment

    try:
        experiment = Experiment.checked(model=model, techniques=technique, prompts=[prompt], documents=document,
                                        generation={"max_new_tokens": max_new_tokens})
    except (EffinferError, ValueError) as error:  # ValueError: a malformed --technique string
        _fail(error)
    _run_and_print(experiment)


@app.command()
def demo(
    model: Annotated[str, typer.Option(help="model source")] = "smollm2-135m-instruct",
) -> None:
    """Compose a data-, a model- and a system-level technique on the embedded model."""
    from effinfer.core.demo import demo_runs

    from effinfer.core.failures import failure_message
    from effinfer.core.steplog import StepLog

    log, started = StepLog(console), time.perf_counter()
    try:
        for heading, result in demo_runs(model):
            if log.enabled:  # not a terminal: say when each run finished and how long it took
                log.line(f"{heading}: done ({time.perf_counter() - started:.1f} s)")
            console.rule(f"[bold]{escape(heading)}[/]")
            print_run(result, console)
            started = time.perf_counter()
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as error:  # loading said why, or a technique (plugin hook) raised: name it, no traceback
        _fail(failure_message(error, get_registry(), "running the demo"))


def _run_and_print(experiment: Any) -> None:
    """Check everything that can be checked before loading, load (one line per step when the
    output is not a terminal), run, print. A user's mistake ends in ``error: …``, never a traceback."""
    from effinfer.core.failures import failure_message
    from effinfer.core import runner
    from effinfer.core.generation import adopt_context_limit
    from effinfer.core.models import load_model
    from effinfer.core.steplog import StepLog

    registry = get_registry()
    try:
        experiment.preflight(registry)
    except EffinferError as error:
        _fail(error)
    log = StepLog(console)
    if log.enabled:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a redrawn bar is noise in a log file
    try:
        check_layout = getattr(runner, "check_source_layout", None)  # the techniques' supported layouts
        if check_layout is not None:
            check_layout(experiment.build_stack(registry), experiment.model)
        started = time.perf_counter()
        with log.step(f"model {experiment.model} loaded", f"loading model {experiment.model}"):
            model, tokenizer = load_model(experiment.model, experiment.runtime.dtype, experiment.runtime.device)
        adopt_context_limit(tokenizer, model)  # a prompt longer than the model's context is refused
        load_seconds = time.perf_counter() - started
        stack = " → ".join(t.name for t in experiment.techniques) or "no technique"
        with log.step(f"{stack} applied and {len(experiment.prompts)} prompt(s) generated"):
            result = runner.run_experiment(experiment, registry, model=model, tokenizer=tokenizer)
        result.load_seconds = load_seconds
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as error:  # loading said why, or a technique (plugin hook) raised: name it, no traceback
        _fail(failure_message(error, registry, "applying the stack or generating"))
    print_run(result, console)


def print_run(result: Any, out: Console) -> None:
    """What each stage did, the completions and the timings; model output and notes print literally."""
    for level, technique, note in result.report.entries:
        out.print(f"[magenta]{level:>6}[/] [bold]{escape(str(technique))}[/]: {escape(str(note))}", highlight=False)
    generation = result.generation
    for completion in result.completions:
        out.print(f"[dim]prompt ({completion.prompt_tokens} tokens)[/] → [green]{escape(completion.text)}[/]",
                  highlight=False)
    rate = generation.new_tokens / generation.decode_seconds if generation.decode_seconds else float("nan")
    out.print(f"[dim]load {result.load_seconds:.1f} s, set-up {result.setup_seconds:.1f} s, "
              f"prefill {generation.prefill_seconds:.2f} s, {generation.new_tokens} tokens at {rate:.1f} tok/s[/]")
    if generation.drafted_per_step:
        mean = sum(generation.accepted_per_step) / len(generation.accepted_per_step)
        out.print(f"[dim]speculative: {mean:.2f} accepted tokens per verification step "
                  f"({sum(generation.accepted_per_step)}/{sum(generation.drafted_per_step)} drafted accepted)[/]")


def main() -> None:
    try:
        get_registry().register_commands(app)  # plugins (the evaluator, docs, third parties) add commands
        app()
    except KeyboardInterrupt:  # Ctrl-C while starting up (commands handle their own)
        Console(stderr=True).print("[yellow]interrupted[/]", highlight=False)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
