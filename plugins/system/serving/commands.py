"""``effinfer serve``, added through ``effinfer_register_commands`` (``effinfer loadtest`` and
``effinfer sweep`` are the evaluator's: :mod:`effinfer.evaluation.loadtest`, :mod:`effinfer.evaluation.sweeps`)."""

from __future__ import annotations

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
