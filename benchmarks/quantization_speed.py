"""Table 4 of the survey (arXiv:2404.14294) redone on this CPU: weight-only quantization speed-ups.

The survey's Table 4 reports, for W4A16 (and W8A16) weight-only quantization, the speed-up
of the prefill stage, the decode stage and end to end over batch sizes and input lengths.
This script measures the same grid for SmolLM2-135M on the CPU it runs on:

- **fp32** — the model as loaded: the baseline every ratio divides, measured in the same
  run, cell by cell, interleaved with the other formats (so machine drift hits all alike);
- **bf16** — the whole model cast to bfloat16 (no quantization: the "16-bit" reference);
- **W8A16** — ``rtn`` int8, one scale per output channel, through PyTorch's packed int8
  kernel (``aten._weight_int8pack_mm``);
- **W4A16** — ``rtn`` int4 in groups of 64 with zero points, through the packed int4
  kernel (``aten._weight_int4pack_mm_for_cpu``).

The W*A16 models are the bf16 model with every linear layer (the output head included)
replaced by the packed layer; quantization goes through the ``rtn`` technique of effinfer
(``ComposedModel``), so the benchmarked layers are the ones experiments run.

For each (batch B, input length L) cell: a prefill of B×L random token ids (logits of the
last position only), then ``--decode-tokens`` greedy decode steps on the KV cache.
Prefill = the prefill's time, decode = mean time per decode step, end to end = prefill
plus all decode steps. Speed-up = fp32 time ÷ format time, measured side by side: in each
round every format runs the cell once (the order reversing every round), the speed-up is
the median of the per-round ratios, shown with their min–max. Small cells get a warm-up run
of their own shape and ``--repeats`` rounds; cells with more than ``--big-cell`` prompt
tokens one warm-up-free round (every format ran a warm-up on a small cell first).
``--quick`` (batch 1, 128 tokens, 4 decode steps, 2 rounds; table and JSON under
``artifacts/quick/``) checks the script in a minute.

Run (as the numbers in the docs were made; a timing run, so alone on the CPU)::

    flock -x /tmp/effinfer-cpu.lock .venv/bin/python benchmarks/quantization_speed.py

Writes ``artifacts/quantization_speed.json`` and the markdown table to
``benchmarks/results/model.compression.quantization/quantization_speed.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import shlex
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from transformers import DynamicCache

from effinfer.core.compose import ComposedModel
from effinfer.core.experiment import Experiment
from effinfer.core.models import DEFAULT_MODEL, load_model
from effinfer.evaluation.environment import collect_environment
from effinfer.evaluation.metrics.timing import paired_ratios, round_robin

FORMATS = {
    "W8A16": "rtn:bits=8,group_size=null,symmetric=true,execution=kernel,skip_modules=[]",
    "W4A16": "rtn:bits=4,group_size=64,symmetric=false,execution=kernel,skip_modules=[]",
}
STAGES = ("prefill", "decode", "e2e")
STAGE_NAMES = {"prefill": "Prefill", "decode": "Decode", "e2e": "End-to-end"}
TABLE = Path("benchmarks/results/model.compression.quantization/quantization_speed.md")
ARTIFACT = Path("artifacts/quantization_speed.json")


def build_models(model: torch.nn.Module, tokenizer, stack: ExitStack) -> dict[str, torch.nn.Module]:
    """fp32, bf16 and the packed W8A16 / W4A16 models (the quantized ones stay composed in ``stack``)."""
    models = {"fp32": model, "bf16": copy.deepcopy(model).to(torch.bfloat16)}
    for name, spec in FORMATS.items():
        techniques = Experiment(techniques=[spec]).build_stack()
        composed = stack.enter_context(ComposedModel(copy.deepcopy(model), tokenizer, techniques))
        notes = "; ".join(note for _, _, note in composed.report.entries)
        print(f"{name}: {notes}", flush=True)
        models[name] = composed.model.to(torch.bfloat16)  # A16: everything around the packed layers in bf16
    return models


@torch.no_grad()
def run_once(model: torch.nn.Module, ids: torch.Tensor, decode_tokens: int) -> dict[str, float]:
    """One prefill plus ``decode_tokens`` greedy steps: seconds of each stage."""
    cache = DynamicCache()
    started = time.perf_counter()
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    token = logits[:, -1].argmax(-1, keepdim=True)
    prefilled = time.perf_counter()
    for _ in range(decode_tokens):
        logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
    finished = time.perf_counter()
    prefill, decode = prefilled - started, finished - prefilled
    return {"prefill": prefill, "decode": decode / decode_tokens, "e2e": prefill + decode}


def measure(models: dict[str, torch.nn.Module], batches: list[int], lengths: list[int], decode_tokens: int,
            repeats: int, big_cell: int, vocab: int, budget: float
            ) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, dict[str, dict[str, list[float]]]]]:
    """``{format: {"B×L": {stage: median seconds}}}`` and ``{format: {"B×L": {stage: [low, median, high]}}}``
    of the per-round speed-ups over fp32; formats interleaved round by round, cell by cell.

    After ``budget`` seconds every remaining cell runs once, without a warm-up of its own.
    """
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    for name, model in models.items():  # one warm-up per format on a small cell
        run_once(model, torch.randint(100, vocab, (1, 64), generator=generator), 2)
    times: dict[str, dict[str, dict[str, float]]] = {name: {} for name in models}
    speedups: dict[str, dict[str, dict[str, list[float]]]] = {name: {} for name in models if name != "fp32"}
    for length in lengths:
        for batch in batches:
            ids = torch.randint(100, vocab, (batch, length), generator=generator)
            small = batch * length <= big_cell and time.perf_counter() - started < budget
            for name, model in models.items():
                if small:
                    run_once(model, ids, 2)
            runs = round_robin({name: (lambda model=model: run_once(model, ids, decode_tokens))
                                for name, model in models.items()}, repeats if small else 1)
            cell = f"{batch}x{length}"
            for name in models:
                times[name][cell] = {s: statistics.median(r[s] for r in runs[name]) for s in STAGES}
                if name != "fp32":  # fp32 time ÷ format time, round by round
                    ratios = {s: paired_ratios([r[s] for r in runs["fp32"]], [r[s] for r in runs[name]])
                              for s in STAGES}
                    speedups[name][cell] = {s: [r.low, r.median, r.high] for s, r in ratios.items()}
            base = times["fp32"][cell]
            print(f"B={batch:>2} L={length:>4}: fp32 prefill {base['prefill']:.3f} s, decode "
                  f"{base['decode'] * 1e3:.1f} ms/token; " + ", ".join(
                      f"{n} ×{speedups[n][cell]['prefill'][1]:.2f}/×{speedups[n][cell]['decode'][1]:.2f}"
                      for n in models if n != "fp32"), flush=True)
    return times, speedups


def speedup_text(times: dict, speedups: dict | None, name: str, cell: str, stage: str) -> str:
    """``1.23× [1.10–1.31]`` from per-round ratios; ``1.23×`` from medians (runs before side-by-side ratios)."""
    if speedups and cell in speedups.get(name, {}):
        low, median, high = speedups[name][cell][stage]
        return f"{median:.2f}×" + (f" [{low:.2f}–{high:.2f}]" if high > low else "")
    return f"{times['fp32'][cell][stage] / times[name][cell][stage]:.2f}×"


def markdown(times: dict, batches: list[int], lengths: list[int], meta: dict, speedups: dict | None = None) -> str:
    env = meta["environment"]
    lines = [
        "## Weight-only quantization speed-up on CPU (the survey's Table 4, redone)",
        "",
        f"SmolLM2-135M-Instruct, speed-up over **fp32 measured in the same run** (fp32 time ÷ format time; "
        f"> 1 is faster{'; side by side: median of per-round ratios [min–max], every format running once per round' if speedups else ''}). Prefill = B×L prompt tokens in one forward pass; decode = mean time per token of "
        f"{meta['decode_tokens']} greedy decode steps on the KV cache; end-to-end = prefill + those steps. "
        "W8A16 = int8 weights (per output channel) through `aten._weight_int8pack_mm`; W4A16 = int4 weights "
        "(group 64, zero points) through `aten._weight_int4pack_mm_for_cpu`; both with every linear layer "
        "packed (output head included) and everything else in bf16. bf16 = the whole model cast to "
        "bfloat16, no quantization.",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; machine: {env.get('cpu')} ({env.get('cores')} cores), torch "
        f"{env.get('packages', {}).get('torch', torch.__version__)} ({meta['cpu_capability']}), "
        f"**{meta['threads']} threads**; load average "
        f"before/after: {meta['load_before']} / {meta['load_after']}",
        f"- repeats: median of {meta['repeats']} runs (after a warm-up of the same shape) for cells of ≤ "
        f"{meta['big_cell']} prompt tokens, 1 run for bigger cells (and for every cell after "
        f"{meta['budget_min']:g} min of measuring); total wall time {meta['seconds'] / 60:.1f} min",
        "",
    ]
    for length in lengths:
        lines += [f"### Input length {length}", "",
                  "| format | stage | " + " | ".join(f"B={b}" for b in batches) + " |",
                  "|---|---|" + "---:|" * len(batches)]
        for name in times:
            for stage in STAGES:
                if name == "fp32":
                    cells = [(f"{times[name][f'{b}x{length}'][stage] * 1e3:.1f} ms") for b in batches]
                else:
                    cells = [speedup_text(times, speedups, name, f"{b}x{length}", stage) for b in batches]
                label = "fp32 (time)" if name == "fp32" else name
                lines.append(f"| {label} | {STAGE_NAMES[stage]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--big-cell", type=int, default=2048, help="cells with more prompt tokens run once")
    parser.add_argument("--budget-min", type=float, default=14.0,
                        help="after this many minutes of measuring, remaining cells run once")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--table", type=Path, default=TABLE)
    parser.add_argument("--artifact", type=Path, default=ARTIFACT)
    parser.add_argument("--quick", action="store_true",
                        help="check the script: B=1, L=128, 4 decode steps, 2 rounds; writes under artifacts/quick/")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.lengths, args.decode_tokens, args.repeats = [1], [128], 4, 2
        args.table = Path("artifacts/quick") / TABLE.name
        args.artifact = Path("artifacts/quick") / ARTIFACT.name
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = collect_environment()["load_average"]
    model, tokenizer = load_model(args.model)
    with ExitStack() as stack:
        models = build_models(model, tokenizer, stack)
        times, speedups = measure(models, args.batches, args.lengths, args.decode_tokens, args.repeats,
                                  args.big_cell, model.config.vocab_size, args.budget_min * 60)
    environment = collect_environment()
    meta = {"command": " ".join(["python", *map(shlex.quote, sys.argv)]), "date": dt.datetime.now(dt.UTC).isoformat(
        timespec="minutes"), "threads": torch.get_num_threads(), "decode_tokens": args.decode_tokens,
        "repeats": args.repeats, "big_cell": args.big_cell, "seconds": time.perf_counter() - started,
        "load_before": load_before, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "budget_min": args.budget_min, "load_after": environment["load_average"], "environment": environment,
        "formats": {"fp32": "as loaded", "bf16": "model.to(bfloat16)", **FORMATS}, "model": args.model}
    args.artifact.parent.mkdir(parents=True, exist_ok=True)
    args.artifact.write_text(json.dumps({"meta": meta, "seconds": times, "speedups": speedups}, indent=2))
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(markdown(times, args.batches, args.lengths, meta, speedups) + "\n")
    print(args.table.read_text())


if __name__ == "__main__":
    main()
