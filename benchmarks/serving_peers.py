"""The same Poisson traces over HTTP: ``effinfer serve`` (continuous + paged, and static batching)
against ``llama-cpp-python``'s OpenAI-compatible server on the same GGUF file.

    /work/notes/cpu-exclusive .venv/bin/python benchmarks/serving_peers.py          # ≈ 16 min on 2 cores
    .venv/bin/python benchmarks/serving_peers.py --systems effinfer_continuous --rates 1 --requests 4

Each system is started as its own server process on a free port (2 threads each, one at a time,
so they never share the CPU; a fresh process per rate, so no prefix or prompt cache carries over
from the previous rate's requests), answered by the same streaming ``/v1/completions`` client as
``effinfer loadtest`` (:func:`~effinfer.plugins.system.serving.loadtest.replay_http`), then
stopped. SmolLM2-135M's weights come from one Q4_1 GGUF: effinfer dequantizes it to fp32 at load,
llama.cpp runs its Q4_1 kernels (``llama-cpp-python[server]``, the ``bench-peers`` extra). Requests
ask for ``ignore_eos``; llama-cpp-python's server has no such field, so its end-of-text tokens
are banned through ``logit_bias``, and it runs with ``--interrupt_requests False`` (by default a
new request interrupts the one being streamed). Throughput counts the tokens each server really
streamed (one per chunk when a server sends no usage). Rows go to the results store (suite ``serving-peers``) and to
``benchmarks/results/system.serving.continuous_batching/serving_peers.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import gguf_path  # noqa: E402  (the default model's GGUF, extracted from its wheel)

from effinfer.core.models import DEFAULT_MODEL  # noqa: E402
from effinfer.evaluation.environment import cpu_model  # noqa: E402
from effinfer.evaluation.loadtest import latency_throughput_plot, store_load_rows  # noqa: E402
from effinfer.plugins.system.serving.loadtest import (LOADTEST_COLUMNS, TraceItem, display_rows,  # noqa: E402
                                                      http_client_module, make_trace, markdown_table, replay_http,
                                                      summarize)

ROOT = Path(__file__).resolve().parent.parent
NODE = ROOT / "benchmarks" / "results" / "system.serving.continuous_batching"
VENV_BIN = Path(sys.executable).parent

SYSTEMS = {
    "effinfer_continuous": lambda port, threads: [
        str(VENV_BIN / "effinfer"), "serve", "-m", DEFAULT_MODEL, "-t", "paged_kv", "-t", "continuous_batching",
        "-t", "fcfs", "--port", str(port)],
    "effinfer_static_b8": lambda port, threads: [
        str(VENV_BIN / "effinfer"), "serve", "-m", DEFAULT_MODEL, "-t", "static_batching:batch_size=8",
        "--port", str(port)],
    "llama_cpp_server": lambda port, threads: [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path()), "--n_threads", str(threads),
        "--n_threads_batch", str(threads), "--n_ctx", "4096", "--port", str(port), "--model_alias", DEFAULT_MODEL,
        # by default a new request interrupts the one being streamed; here every request runs to its length
        "--interrupt_requests", "False"],
}
#: extra request fields per system: llama-cpp-python has no ignore_eos, so its end-of-text tokens are banned
#: (SmolLM2's <|endoftext|> = 0 and <|im_end|> = 2) to make it produce the planned lengths too
EXTRA = {"llama_cpp_server": {"logit_bias": {"0": -100.0, "2": -100.0}}}
STACKS = {"effinfer_continuous": [{"name": "paged_kv", "config": {}}, {"name": "continuous_batching", "config": {}},
                                  {"name": "fcfs", "config": {}}],
          "effinfer_static_b8": [{"name": "static_batching", "config": {"batch_size": 8}}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name: str, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    process = subprocess.Popen(SYSTEMS[name](port, threads), env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    httpx = http_client_module()
    deadline = time.time() + 300
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} before answering; see {log}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return process, url
        except Exception:  # not listening yet
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"{name} did not answer on {url} within 300 s; see {log}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--rates", default="0.15,0.5,1,2")
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--output-scale", type=float, default=0.25)
    parser.add_argument("--max-chars", type=int, default=900)
    parser.add_argument("--slo-ttft", type=float, default=5.0)
    parser.add_argument("--slo-tpot", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0, help="per request (s)")
    parser.add_argument("--no-table", action="store_true")
    parser.add_argument("--no-store", action="store_true")
    parser.add_argument("--keep-others", action="store_true",
                        help="keep the previous report's rows of the systems not in --systems (table and plot)")
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "serving_peers")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    traces = {rate: make_trace(rate, args.requests, 0, args.output_scale, args.max_chars) for rate in rates}
    args.out.mkdir(parents=True, exist_ok=True)
    rows, failures = [], {}
    kept_from = ""
    if args.keep_others and (args.out / "report.json").exists():  # rows of the systems not measured again
        previous = json.loads((args.out / "report.json").read_text())
        rows = [r for r in previous["rows"] if r["system"] not in args.systems]
        kept_from = f" (rows of the other systems: `{previous['command']}`, {previous['date']})"
    for name in args.systems:
        for rate in rates:
            # a fresh server per rate: the rates' traces share prompts, and a warm prefix cache (effinfer) or
            # prompt cache (llama.cpp) from the previous rate would skip their prefills
            try:
                process, url = start(name, args.threads, args.out / f"{name}-{rate:g}.log")
            except (RuntimeError, OSError) as error:  # one system that cannot start never loses the others
                failures[name] = str(error)
                print(f"{name}: {error}", flush=True)
                break
            try:
                extra = EXTRA.get(name)
                replay_http(url, DEFAULT_MODEL, [TraceItem(0.0, "Warm-up.", 2)], args.timeout, extra)
                outcomes, makespan = replay_http(url, DEFAULT_MODEL, traces[rate], args.timeout, extra)
                row = {"system": name, "rate": rate} | summarize(outcomes, makespan, args.slo_ttft, args.slo_tpot)
                errors = [o.error for o in outcomes if o.error]
                if errors:
                    row["first_error"] = errors[0]
                row["mean_output_tokens"] = sum(o.output_tokens for o in outcomes) / len(outcomes)
                rows.append(row)
                print(f"  {name:>20} rate {rate:5.2f}: {row['throughput_tok_s']:6.1f} tok/s, TTFT p99 "
                      f"{row['ttft_p99_s'] or float('nan'):6.2f} s, done {row['completed']}/{row['requests']}, "
                      f"{row['mean_output_tokens']:.1f} tokens/request", flush=True)
            finally:
                stop(process)
    command = "python benchmarks/serving_peers.py " + " ".join(sys.argv[1:])
    report = {"command": command + "`" + kept_from + "`" if kept_from else command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.machine()}",
              "threads": args.threads, "gguf": gguf_path().name, "rows": rows, "failures": failures,
              "requests": args.requests, "output_scale": args.output_scale, "slo_ttft_s": args.slo_ttft}
    (args.out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    if not args.no_store and rows:
        fresh = [r for r in rows if r["system"] in args.systems]
        bench_id = store_load_rows(fresh, DEFAULT_MODEL, command, suite="serving-peers", techniques=STACKS)
        print(f"stored as bench {bench_id} of the results store (effinfer results show {bench_id})")
    text = markdown(report)
    print(text)
    systems = list(dict.fromkeys(r["system"] for r in rows))
    if not args.no_table:
        NODE.mkdir(parents=True, exist_ok=True)
        (NODE / "serving_peers.md").write_text(text)
        latency_throughput_plot({s: [r for r in rows if r["system"] == s] for s in systems}, NODE / "serving_peers.png")


def markdown(report: dict) -> str:
    columns = LOADTEST_COLUMNS + [("mean_output_tokens", "tokens/request", ".1f")]
    lines = ["## Over HTTP: effinfer serve vs llama-cpp-python's server, same trace, same GGUF", "",
             f"- command: `{report['command']}`", f"- date: {report['date']}", f"- machine: {report['machine']}",
             f"- each server alone on the CPU with {report['threads']} threads; weights from `{report['gguf']}` "
             "(effinfer: dequantized to fp32 at load; llama.cpp: its Q4_1 kernels)",
             f"- trace: {report['requests']} Poisson arrivals per rate, effinfer's prompt set, output lengths = "
             f"max_new_tokens × {report['output_scale']}; effinfer honours `ignore_eos`, llama-cpp-python's server gets "
             "its end-of-text tokens banned through `logit_bias` instead and runs with `--interrupt_requests False` "
             "(tokens/request: what each really streamed); TTFT SLO for goodput "
             f"{report['slo_ttft_s']} s", ""]
    for name, error in report["failures"].items():
        lines += [f"- {name} did not run: {error}"]
    lines += ["", markdown_table(display_rows(report["rows"]), columns), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
