"""Disaggregated prefill/decode workers vs co-located continuous batching, on the same Poisson traces.

    /work/notes/cpu-exclusive timeout 600 .venv/bin/python benchmarks/serving_disaggregated.py   # SmolLM2 fp32
    .venv/bin/python benchmarks/serving_disaggregated.py --quick                                 # tiny model, seconds

One trace per arrival rate (``--rates``, ``--requests`` each, seeded; the trace helper of
``benchmarks/serving.py``: effinfer's prompt set, output lengths ``max_new_tokens × --output-scale``,
EOS ignored), replayed in real time on

- ``colocated_tN``: :class:`ContinuousBatchingEngine` in this process (paged KV, chunked prefill
  mixed with decodes, FCFS) with ``N`` torch threads (``--colocated-threads``; 2 = the whole of
  this 2-core machine);
- ``disaggregated``: :class:`DisaggregatedServer`, a prefill worker and a decode worker, each its
  own engine and model copy, as Ray actors with ``--worker-threads`` CPU(s) and torch threads each
  (DistServe / Splitwise style), the prompt's KV sent from one to the other through Ray's object
  store (in process, one after the other, when Ray is not installed: the row says which).

Reports throughput, TTFT / TPOT p50 and p99, goodput under the SLOs (DistServe's metric), and for
the disaggregated rows the KV handed over per request and the handoff time (prefill worker sent →
written into the decode worker's pool, which includes waiting for the decode worker's current
iteration). Prefix caches are cleared between runs. Writes ``artifacts/serving_disaggregated.json``
and ``benchmarks/results/system.serving.distributed/serving.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from effinfer.core.models import DEFAULT_MODEL
from effinfer.evaluation.environment import cpu_model
from effinfer.evaluation.loadtest import store_load_rows
from effinfer.plugins.system.serving.disaggregated import DisaggregatedConfig, DisaggregatedServer, ray_available
from effinfer.plugins.system.serving.engine import ContinuousBatchingEngine, EngineConfig
from effinfer.plugins.system.serving.loadtest import (LOADTEST_COLUMNS, display_rows, make_trace, markdown_table,
                                                      percentile, replay_engine, summarize)

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "benchmarks" / "results" / "system.serving.distributed" / "serving.md"


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.machine()}"


def handoff_stats(records: list) -> dict:
    moved = [r for r in records if r.kv_bytes]
    ms = lambda values: [v * 1000 for v in values if v is not None]  # noqa: E731
    return {"handoffs": len(moved),
            "kv_mb_per_request": sum(r.kv_bytes for r in moved) / len(moved) / 2**20 if moved else None,
            "kv_kb_per_prompt_token": sum(r.kv_bytes for r in moved) / sum(r.prompt_tokens for r in moved) / 1024
            if moved else None,
            "handoff_p50_ms": percentile(ms(r.handoff_s for r in moved), 50),
            "handoff_p99_ms": percentile(ms(r.handoff_s for r in moved), 99),
            "transfer_p50_ms": percentile(ms(r.transfer_s for r in moved), 50),
            "extract_p50_ms": percentile(ms(r.extract_s for r in moved), 50),
            "decode_preemptions": sum(r.preemptions for r in records)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="0.5,1,2")
    parser.add_argument("--requests", type=int, default=12, help="per rate (12 = benchmarks/serving.py's traces)")
    parser.add_argument("--output-scale", type=float, default=0.25)
    parser.add_argument("--max-chars", type=int, default=900)
    parser.add_argument("--slo-ttft", type=float, default=5.0)
    parser.add_argument("--slo-tpot", type=float, default=0.5)
    parser.add_argument("--drain", type=float, default=60.0,
                        help="seconds after the trace's last arrival before what is left is aborted")
    parser.add_argument("--colocated-threads", default="2", help="torch threads of the co-located engine(s)")
    parser.add_argument("--worker-threads", type=int, default=1, help="CPUs (and torch threads) per Ray worker")
    parser.add_argument("--runner", choices=["auto", "ray", "local"], default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny random model, 2 rates, no table")
    parser.add_argument("--no-table", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "serving_disaggregated.json")
    args = parser.parse_args()
    if args.quick:
        from effinfer.core.testing import tiny_model

        source = functools.partial(tiny_model, "llama", layers=2)
        args.rates, args.requests, args.no_table, args.drain = "2,8", 8, True, 20.0
        args.out = ROOT / "artifacts" / "quick" / "serving_disaggregated.json"
        model_name = "tiny random llama"
    else:
        from effinfer.core.models import load_model

        source = functools.partial(load_model, DEFAULT_MODEL)
        model_name = "SmolLM2-135M-Instruct fp32"
    model, tokenizer = source()
    rates = [float(r) for r in args.rates.split(",")]
    colocated_threads = [int(t) for t in args.colocated_threads.split(",")]
    engine_config = EngineConfig(max_num_seqs=32, max_batched_tokens=256, block_size=16, kv_cache_mb=512)
    config = DisaggregatedConfig(prefill=engine_config.model_copy(update={"max_num_seqs": 8, "kv_cache_mb": 128}),
                                 decode=engine_config, runner=args.runner, threads=args.worker_threads)
    traces = {rate: make_trace(rate, args.requests, 0, args.output_scale, args.max_chars) for rate in rates}
    # every request gets the trace's span plus --drain: a system that falls behind shows it in its TTFT
    limits = {rate: trace[-1].arrival + args.drain for rate, trace in traces.items()}
    # co-located first, then the workers (so Ray's processes are not even idle during the co-located runs)
    rows = []
    for threads in colocated_threads:
        torch.set_num_threads(threads)
        replay_engine(ContinuousBatchingEngine(model, engine_config), traces[rates[0]][:2], tokenizer)  # warm-up
        for rate in rates:
            outcomes, makespan = replay_engine(ContinuousBatchingEngine(model, engine_config), traces[rate], tokenizer,
                                               time_limit=limits[rate])
            rows.append({"system": f"colocated_t{threads}", "rate": rate}
                        | summarize(outcomes, makespan, args.slo_ttft, args.slo_tpot))
            print_row(rows[-1])
    torch.set_num_threads(args.worker_threads)  # the in-process runner computes here; Ray workers set their own
    started = time.perf_counter()
    server = DisaggregatedServer(source if ray_available() and args.runner != "local" else model, config)
    print(f"disaggregated workers ({server.runner}) up in {time.perf_counter() - started:.1f} s", flush=True)
    server.replay(traces[rates[0]][:2], tokenizer)  # warm-up
    name = "disaggregated" if server.runner == "ray" else "disaggregated (in process)"
    for rate in rates:
        server.blocks(clear_prefix_cache=True)
        outcomes, makespan, records = server.replay(traces[rate], tokenizer, time_limit=limits[rate])
        leak = server.blocks(clear_prefix_cache=True)
        rows.append({"system": name, "rate": rate} | summarize(outcomes, makespan, args.slo_ttft, args.slo_tpot)
                    | handoff_stats(records) | {"blocks_after": leak})
        print_row(rows[-1])
    server.close()
    rows.sort(key=lambda r: (r["rate"], r["system"]))
    report = {"model": model_name, "machine": machine(), "torch": torch.__version__, "runner": server.runner,
              "worker_threads": args.worker_threads, "colocated_threads": colocated_threads,
              "command": "python benchmarks/serving_disaggregated.py " + " ".join(sys.argv[1:]),
              "drain_s": args.drain, "slo_ttft_s": args.slo_ttft, "slo_tpot_s": args.slo_tpot,
              "requests": args.requests, "output_scale": args.output_scale, "engine": engine_config.model_dump(),
              "prefill_engine": config.prefill.model_dump(), "rows": rows,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    if not args.quick:
        bench_id = store_load_rows(rows, DEFAULT_MODEL, report["command"], suite="serving-disaggregated")
        print(f"stored as bench {bench_id} of the results store (effinfer results show {bench_id})")
    text = markdown(report)
    if not args.no_table:
        TABLE.parent.mkdir(parents=True, exist_ok=True)
        TABLE.write_text(text)
        print("wrote", TABLE)
    print(text)


def print_row(row: dict) -> None:
    extra = ""
    if row.get("handoffs"):
        extra = (f", KV {row['kv_mb_per_request']:.2f} MB/request, handoff p50 {row['handoff_p50_ms']:.0f} ms "
                 f"p99 {row['handoff_p99_ms']:.0f} ms")
    tpot = row["tpot_p99_s"]
    ttft = row["ttft_p99_s"] or float("nan")
    print(f"  {row['system']:>26}: {row['throughput_tok_s']:6.1f} tok/s, TTFT p99 {ttft:6.2f}"
          f" s, TPOT p99 {(tpot or float('nan')) * 1000:5.0f} ms, done {row['completed']}/{row['requests']}{extra}",
          flush=True)


HANDOFF_COLUMNS = [("system", "system", ""), ("rate", "rate (req/s)", ".2f"), ("handoffs", "handoffs", ""),
                   ("kv_mb_per_request", "KV / request (MB)", ".2f"),
                   ("kv_kb_per_prompt_token", "KV / prompt token (KB)", ".1f"),
                   ("extract_p50_ms", "copy out p50 (ms)", ".1f"),
                   ("transfer_p50_ms", "sent→received p50 (ms)", ".0f"),
                   ("handoff_p50_ms", "handoff p50 (ms)", ".0f"), ("handoff_p99_ms", "handoff p99 (ms)", ".0f"),
                   ("decode_preemptions", "preemptions", "")]


def markdown(report: dict) -> str:
    workers = ("Ray actors, " if report["runner"] == "ray" else "in process (no Ray), ") + \
        f"{report['worker_threads']} CPU + torch thread(s) each"
    return "\n".join([
        "## Disaggregated prefill/decode vs co-located continuous batching, under load", "",
        f"- command: `{report['command']}`", f"- date: {report['date']}", f"- machine: {report['machine']}",
        f"- torch {report['torch']}; model {report['model']}",
        f"- co-located: one engine, torch threads {report['colocated_threads']}; disaggregated: a prefill and a "
        f"decode worker, {workers}",
        f"- trace: {report['requests']} Poisson arrivals per rate, prompts of effinfer's prompt set, output lengths = "
        f"max_new_tokens × {report['output_scale']} (EOS ignored); SLO: TTFT ≤ {report['slo_ttft_s']} s, TPOT ≤ "
        f"{report['slo_tpot_s']} s (goodput counts requests meeting both)", "",
        markdown_table(display_rows(report["rows"]), LOADTEST_COLUMNS), "",
        "KV handoff (disaggregated rows): bytes of the prompt's K/V per handed-off request; copy out of the prefill "
        "pool; sent → received by the decode worker (Ray's object store; it receives on a second thread while it "
        "steps); sent → written into the decode pool (also waits for the decode worker's current iteration and for "
        "free blocks).", "",
        markdown_table([r for r in report["rows"] if r.get("handoffs")], HANDOFF_COLUMNS), ""])


if __name__ == "__main__":
    main()
