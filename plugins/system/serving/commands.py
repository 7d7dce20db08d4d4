"""``effinfer serve`` and ``effinfer loadtest``, added through ``effinfer_register_commands``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(stderr=True)


def _experiment(experiment: Path | None, model: str | None, techniques: list[str] | None, device: str | None,
                dtype: str | None):
    from effinfer.core.errors import ExperimentError
    from effinfer.core.experiment import Experiment

    try:
        if experiment is not None:
            exp = Experiment.from_yaml(experiment)
            if model or techniques or device or dtype:
                data = exp.model_dump()
                data["model"] = model or data["model"]
                data["techniques"] = techniques if techniques else data["techniques"]
                data["runtime"] |= {k: v for k, v in {"device": device, "dtype": dtype}.items() if v}
                exp = Experiment.checked(**data)
            return exp
        fields: dict = {"techniques": techniques or []}
        if model:
            fields["model"] = model
        runtime = {k: v for k, v in {"device": device, "dtype": dtype}.items() if v}
        if runtime:
            fields["runtime"] = runtime
        return Experiment.checked(**fields)
    except ExperimentError as error:
        for problem in error.problems:
            console.print(f"[red]error:[/] {problem}", highlight=False, markup=False)
        raise typer.Exit(2) from None


def serve_command(
    experiment: Annotated[Path | None, typer.Argument(help="experiment YAML (model, techniques, runtime)")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="model alias, folder or .gguf")] = None,
    technique: Annotated[list[str] | None, typer.Option(
        "--technique", "-t", help="stack entry, repeatable: rtn:bits=4, paged_kv:block_size=16, "
                                  "continuous_batching, sjf, priority, static_batching")] = None,
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port")] = 8000,
    device: Annotated[str | None, typer.Option(help="cpu or cuda[:N]")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="max_tokens when a request gives none")] = 16,
) -> None:
    """Serve a model + technique stack over an OpenAI-compatible HTTP API (/v1/completions,
    /v1/chat/completions, SSE streaming). Ctrl-C or SIGTERM shuts down gracefully."""
    from effinfer.core.errors import EffinferError

    try:
        from effinfer.plugins.system.serving.server import ServingApp, serve
    except ImportError as error:
        console.print(f"[red]error:[/] effinfer serve needs FastAPI and uvicorn ({error}); install them with "
                      "pip install -e '.[serve]'", highlight=False, markup=False)
        raise typer.Exit(2) from None
    from effinfer.plugins.system.serving.stack import build_served

    exp = _experiment(experiment, model, technique, device, dtype)
    try:
        served = build_served(exp)
    except (EffinferError, ValueError) as error:
        console.print(f"[red]error:[/] {error}", highlight=False, markup=False)
        raise typer.Exit(2) from None
    console.print(f"serving {served.description} on http://{host}:{port}/v1", highlight=False, markup=False)
    serve(ServingApp(served.engine, served.tokenizer, served.model_name, max_tokens), host, port)


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
    label: Annotated[str, typer.Option(help="system name in the table")] = "server",
    out: Annotated[Path | None, typer.Option(help="write JSON here and a markdown table next to it (.md)")] = None,
    plot: Annotated[Path | None, typer.Option(help="latency-throughput plot (PNG, needs matplotlib)")] = None,
) -> None:
    """Replay Poisson arrivals at several rates (prompts from effinfer.data) against an
    OpenAI-compatible endpoint; report throughput, TTFT/TPOT p50/p99 and goodput."""
    from effinfer.plugins.system.serving.loadtest import (LOADTEST_COLUMNS, display_rows, http_client_module,
                                                          make_trace, markdown_table, replay_http, summarize)

    httpx = http_client_module()

    try:
        rate_list = [float(r) for r in rates.split(",") if r.strip()]
        if not rate_list or any(r <= 0 for r in rate_list):
            raise ValueError
    except ValueError:
        console.print(f"[red]error:[/] --rates must be positive numbers separated by commas (got {rates!r})")
        raise typer.Exit(2) from None
    base = url.rstrip("/")
    try:
        listed = httpx.get(f"{base}/v1/models", timeout=10).json()
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


def sweep_command(
    sweep_file: Annotated[Path, typer.Argument(help="sweep YAML: models, stacks, grid, base")],
    out: Annotated[Path | None, typer.Option(help="results folder (default: <file>.results next to the file)")] = None,
    runner: Annotated[str, typer.Option(help="auto (Ray when installed), ray or local (in this process)")] = "auto",
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: a local Ray)")] = None,
    retry_failed: Annotated[bool, typer.Option(help="run again the experiments stored as failed")] = False,
    dry_run: Annotated[bool, typer.Option(help="list the experiments and exit")] = False,
) -> None:
    """Run a grid of experiments (models × stacks × config values); each result is stored as it
    finishes in <out>/results.jsonl, and a sweep started again skips what is already stored."""
    from effinfer.core.errors import ExperimentError
    from effinfer.plugins.system.serving.sweep import (Ledger, expand, iter_summary, load_sweep, pending,
                                                       ray_available, run_in_process, run_key, run_on_ray)

    if runner not in ("auto", "ray", "local"):
        console.print(f"[red]error:[/] --runner must be auto, ray or local (got {runner!r})")
        raise typer.Exit(2)
    try:
        experiments = expand(load_sweep(sweep_file))
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

    with Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        bar = progress.add_task("runs", total=len(todo))

        def on_result(record: dict) -> None:
            ledger.append(record)
            progress.advance(bar)
            console.print(next(iter_summary([record])), highlight=False, markup=False)

        if use_ray:
            run_on_ray(todo, on_result, address)
        else:
            run_in_process(todo, on_result)
    records = ledger.records()
    failed = sum(1 for r in records if r.get("status") != "ok")
    console.print(f"done: {len(records)} stored, {failed} failed", highlight=False)
