"""Serving under load: continuous batching + paged KV vs HF static batching, and the schedulers.

    flock -x /tmp/effinfer-cpu.lock .venv/bin/python benchmarks/serving.py     # SmolLM2-135M fp32, 2 threads
    .venv/bin/python benchmarks/serving.py --quick                             # a tiny random model, seconds

One Poisson trace per arrival rate (``--rates``, ``--requests`` each, seeded), prompts and
output lengths from effinfer's prompt set (each category's ``max_new_tokens`` × ``--output-scale``;
``ignore_eos`` so every system produces the same tokens), replayed in real time in this
process on each system in turn (no HTTP in the way; ``effinfer loadtest`` does the same over
HTTP against ``effinfer serve``):

- ``continuous+paged``: :class:`ContinuousBatchingEngine` (paged KV, chunked prefill, FCFS);
- ``hf_static_bN``: :class:`StaticBatchingEngine`, Hugging Face forward over a ``DynamicCache``
  on left-padded batches of ``N`` formed when the previous batch is done (the peer).

Headline: for each system the highest throughput among the rates whose p99 TTFT meets the
SLO (``--slo-ttft``), and the ratio continuous / best static. Then a scheduler comparison at
the highest rate (FCFS, SJF with the learned length predictor, priority with preemption
on a trace with two priority classes). Also reports peak KV waste (allocated − used tokens)
of the paged cache against a contiguous per-request reservation (prompt + max_tokens).

Writes ``artifacts/serving_benchmark.json`` and the tables
``benchmarks/results/system.serving.continuous_batching/serving.md``,
``benchmarks/results/system.serving.scheduling/serving.md`` and
``benchmarks/results/system.serving.memory_management/serving.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from effinfer.evaluation.environment import cpu_model
from effinfer.evaluation.loadtest import store_load_rows
from effinfer.plugins.system.serving.engine import ContinuousBatchingEngine, EngineConfig, StaticBatchingEngine
from effinfer.plugins.system.serving.loadtest import (display_rows, make_trace, markdown_table, replay_engine,
                                                      summarize)
from effinfer.plugins.system.serving.scheduling import FCFS, PriorityPreemptive, ShortestJobFirst

ROOT = Path(__file__).resolve().parent.parent
TABLES = ROOT / "benchmarks" / "results"


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.machine()}"


STARTED = time.perf_counter()


def run(name: str, engine: Any, trace: list, tokenizer: Any, rate: float, args: argparse.Namespace) -> dict | None:
    if time.perf_counter() - STARTED > args.budget:
        print(f"  {name} rate {rate}: skipped (over the --budget of {args.budget:.0f} s)", flush=True)
        return None
    started = time.perf_counter()
    # every request gets the trace's span plus --drain to finish: a system that falls behind shows it in its
    # TTFT, not in requests cut off (cut requests would leave its p99 over the lucky ones)
    limit = trace[-1].arrival + args.drain
    outcomes, makespan = replay_engine(engine, trace, tokenizer, time_limit=limit)
    row = {"system": name, "rate": rate} | summarize(outcomes, makespan, args.slo_ttft, args.slo_tpot)
    if isinstance(engine, ContinuousBatchingEngine):
        row["kv_peak"] = dict(engine.peak_waste)
        row["preemptions"] = sum(r.preemptions for r in engine.finished)
    row["wall_s"] = time.perf_counter() - started
    print(f"  {name:>18} rate {rate:5.2f}: {row['throughput_tok_s']:6.1f} tok/s, TTFT p99 "
          f"{row['ttft_p99_s'] or float('nan'):6.2f} s, done {row['completed']}/{row['requests']} "
          f"({row['wall_s']:.0f} s)", flush=True)
    return row


def stacks(config: EngineConfig, static_sizes: list[int], scheduling_seqs: int) -> dict[str, list[dict]]:
    """The technique stack behind each system name (what the results store records)."""
    def paged(seqs: int) -> list[dict]:
        return [{"name": "paged_kv", "config": {"block_size": config.block_size, "kv_cache_mb": config.kv_cache_mb}},
                {"name": "continuous_batching", "config": {"max_num_seqs": seqs,
                                                           "max_batched_tokens": config.max_batched_tokens}}]
    named = {"continuous+paged": paged(config.max_num_seqs) + [{"name": "fcfs", "config": {}}]}
    named |= {f"continuous+{s}": paged(scheduling_seqs) + [{"name": s, "config": {}}] for s in ("fcfs", "sjf", "priority")}
    named |= {f"hf_static_b{n}": [{"name": "static_batching", "config": {"batch_size": n}}] for n in static_sizes}
    return named


def best_under_slo(rows: list[dict], slo: float) -> dict | None:
    ok = [r for r in rows if r["errors"] == 0 and r["ttft_p99_s"] is not None and r["ttft_p99_s"] <= slo]
    return max(ok, key=lambda r: r["throughput_tok_s"], default=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="0.15,0.3,0.5,1,2",
                        help="arrival rates, low enough that static batching meets the SLO at some of them")
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--output-scale", type=float, default=0.25)
    parser.add_argument("--max-chars", type=int, default=900)
    parser.add_argument("--static-batch", default="8")
    parser.add_argument("--slo-ttft", type=float, default=5.0)
    parser.add_argument("--slo-tpot", type=float, default=0.5)
    parser.add_argument("--drain", type=float, default=90.0,
                        help="seconds after the last arrival before what is left of a replay is aborted")
    parser.add_argument("--budget", type=float, default=900.0, help="skip the remaining replays after this many seconds")
    parser.add_argument("--no-store", action="store_true", help="do not file the rows in the results store")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny random model, 2 rates, no tables")
    parser.add_argument("--no-table", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "serving_benchmark.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        from effinfer.core.testing import tiny_model

        model, tokenizer = tiny_model("llama", layers=2)
        args.rates, args.requests, args.no_table, args.drain, args.no_store = "2,8", 8, True, 20.0, True
        args.out = ROOT / "artifacts" / "quick" / "serving_benchmark.json"
        model_name = model_key = "tiny random llama"
    else:
        from effinfer.core.models import DEFAULT_MODEL, load_model

        model, tokenizer = load_model(DEFAULT_MODEL)
        model_key = DEFAULT_MODEL
        model_name = "SmolLM2-135M-Instruct fp32"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rates = [float(r) for r in args.rates.split(",")]
    static_sizes = [int(b) for b in args.static_batch.split(",")]
    config = EngineConfig(max_num_seqs=32, max_batched_tokens=256, block_size=16, kv_cache_mb=512)
    traces = {rate: make_trace(rate, args.requests, 0, args.output_scale, args.max_chars) for rate in rates}
    # warm-up (first-call allocations) on both engine types
    replay_engine(ContinuousBatchingEngine(model, config), traces[rates[0]][:2], tokenizer)
    replay_engine(StaticBatchingEngine(model, config, pad_id=pad), traces[rates[0]][:2], tokenizer)

    load_rows: list[dict] = []
    for rate in rates:
        print(f"rate {rate}/s", flush=True)
        load_rows.append(run("continuous+paged", ContinuousBatchingEngine(model, config, FCFS()), traces[rate],
                             tokenizer, rate, args))
        if load_rows[-1] is None:
            load_rows.pop()
        for size in static_sizes:
            engine = StaticBatchingEngine(model, config.model_copy(update={"static_batch_size": size}), FCFS(),
                                          pad_id=pad)
            row = run(f"hf_static_b{size}", engine, traces[rate], tokenizer, rate, args)
            if row is not None:
                load_rows.append(row)

    high = rates[-1]
    print(f"schedulers at {high}/s (two priority classes)", flush=True)
    trace = make_trace(high, args.requests, 1, args.output_scale, args.max_chars, priorities=2)
    sched_rows = []
    small = config.model_copy(update={"max_num_seqs": 8})  # a full batch, so ordering matters
    for name, scheduler in [("fcfs", FCFS()), ("sjf", ShortestJobFirst()), ("priority", PriorityPreemptive())]:
        if name == "sjf":  # train the length predictor on one pass of completed requests first
            warm = ContinuousBatchingEngine(model, small, scheduler)
            replay_engine(warm, make_trace(high * 4, args.requests, 2, args.output_scale, args.max_chars), tokenizer,
                          time_limit=args.drain)
        row = run(name, ContinuousBatchingEngine(model, small, scheduler), trace, tokenizer, high, args)
        if row is not None:
            sched_rows.append(row)

    systems = sorted({r["system"] for r in load_rows})
    best = {s: best_under_slo([r for r in load_rows if r["system"] == s], args.slo_ttft) for s in systems}
    statics = [b for s, b in best.items() if s.startswith("hf_static") and b is not None]
    top_static = max(statics, key=lambda r: r["throughput_tok_s"], default=None)
    cont = best.get("continuous+paged")
    ratio = (cont["throughput_tok_s"] / top_static["throughput_tok_s"]) if cont and top_static else None
    ratios = {}
    for slo in (2.0, 5.0, 10.0):
        by = {s: best_under_slo([r for r in load_rows if r["system"] == s], slo) for s in systems}
        st = max((b for s, b in by.items() if s.startswith("hf_static") and b), key=lambda r: r["throughput_tok_s"],
                 default=None)
        c = by.get("continuous+paged")
        ratios[str(slo)] = {"continuous_tok_s": c and c["throughput_tok_s"], "static_tok_s": st and st["throughput_tok_s"],
                            "ratio": c["throughput_tok_s"] / st["throughput_tok_s"] if c and st else None}
    report = {"model": model_name, "threads": args.threads, "machine": machine(), "torch": torch.__version__,
              "command": "python benchmarks/serving.py " + " ".join(sys.argv[1:]), "slo_ttft_s": args.slo_ttft,
              "slo_tpot_s": args.slo_tpot, "requests": args.requests, "output_scale": args.output_scale,
              "load": load_rows, "schedulers": sched_rows, "best_under_slo": best, "ratio": ratio, "ratios_by_slo": ratios,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    if not args.no_store:
        bench_id = store_load_rows(load_rows + [r | {"system": f"continuous+{r['system']}"} for r in sched_rows],
                                   model_key, report["command"], suite="serving-benchmark",
                                   techniques=stacks(config, static_sizes, small.max_num_seqs))
        print(f"stored as bench {bench_id} of the results store (effinfer results show {bench_id})")
    tables = markdown(report)
    for node, text in tables.items():
        if not args.no_table:
            path = TABLES / node / "serving.md"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print("wrote", path)
        print(text)
    print(f"continuous+paged / best HF static at p99 TTFT ≤ {args.slo_ttft} s: "
          f"{'–' if ratio is None else f'{ratio:.2f}×'}")


COLUMNS = [("system", "system", ""), ("rate", "rate (req/s)", ".2f"), ("completed", "done", ""),
           ("throughput_tok_s", "throughput (tok/s)", ".1f"), ("ttft_p50_s", "TTFT p50 (s)", ".2f"),
           ("ttft_p99_s", "TTFT p99 (s)", ".2f"), ("tpot_p50_s", "TPOT p50 (ms)", ""),
           ("tpot_p99_s", "TPOT p99 (ms)", ""), ("queueing_p99_s", "queue p99 (s)", ".2f"),
           ("goodput_req_s", "goodput (req/s)", ".2f")]


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def markdown(report: dict) -> dict[str, str]:
    head = [f"- command: `{report['command']}`", f"- date: {report['date']}", f"- machine: {report['machine']}",
            f"- threads: {report['threads']} (torch intra-op); torch {report['torch']}; model {report['model']}",
            f"- trace: {report['requests']} Poisson arrivals per rate, prompts of effinfer's prompt set, output "
            f"lengths = max_new_tokens × {report['output_scale']} (EOS ignored); SLO: TTFT ≤ {report['slo_ttft_s']} s,"
            f" TPOT ≤ {report['slo_tpot_s']} s (goodput counts requests meeting both)", ""]
    best = report["best_under_slo"]
    lines = [f"- {s}: " + (f"{b['throughput_tok_s']:.1f} tok/s at {b['rate']:.2f} req/s" if b else "no rate meets it")
             for s, b in best.items()]
    ratio = report["ratio"]
    batching = "\n".join(["## Continuous batching + paged KV vs HF static batching, under load", "", *head,
                          f"Highest throughput with p99 TTFT ≤ {report['slo_ttft_s']} s:", "", *lines, "",
                          f"**continuous+paged / best HF static: {'–' if ratio is None else f'{ratio:.2f}×'}**", "",
                          "Same comparison at other p99 TTFT SLOs (tok/s continuous / static → ratio): " + "; ".join(
                              f"{slo} s: {fmt(v['continuous_tok_s'])} / {fmt(v['static_tok_s'])} → "
                              f"{'–' if v['ratio'] is None else format(v['ratio'], '.2f') + '×'}"
                              for slo, v in report["ratios_by_slo"].items()), "",
                          markdown_table(display_rows(report["load"]), COLUMNS), ""])
    sched_cols = COLUMNS + [("ttft_p99_prio0_s", "TTFT p99 prio 0 (s)", ".2f"),
                            ("ttft_p99_prio1_s", "TTFT p99 prio 1 (s)", ".2f"), ("preemptions", "preemptions", "")]
    scheduling = "\n".join(["## Schedulers at high load (continuous batching, max 8 running)", "", *head,
                            "Same trace for each (two priority classes, 0 = urgent); SJF's length predictor was "
                            "trained on one earlier pass of completed requests.", "",
                            markdown_table(display_rows(report["schedulers"]), sched_cols), ""])
    mem_rows = []
    for row in report["load"]:
        if "kv_peak" in row:
            peak = row["kv_peak"]
            mem_rows.append({"rate": row["rate"], "used": peak["used_tokens"], "allocated": peak["allocated_tokens"],
                             "waste": peak["waste_tokens"], "contiguous": peak["contiguous_reserved_tokens"],
                             "contiguous_waste": peak["contiguous_reserved_tokens"] - peak["used_tokens"]})
    memory = "\n".join(["## Paged KV: memory waste at the peak of each run", "", *head,
                        "At the step with the most allocated KV: tokens held by running requests (used), "
                        "allocated in 16-token blocks (paged), and what a contiguous cache reserving prompt + "
                        "max_tokens per request would hold.", "",
                        markdown_table(mem_rows, [("rate", "rate (req/s)", ".2f"), ("used", "used tokens", ""),
                                                  ("allocated", "paged allocated", ""),
                                                  ("waste", "paged waste", ""),
                                                  ("contiguous", "contiguous reserved", ""),
                                                  ("contiguous_waste", "contiguous waste", "")]), ""])
    return {"system.serving.continuous_batching": batching, "system.serving.scheduling": scheduling,
            "system.serving.memory_management": memory}


if __name__ == "__main__":
    main()
