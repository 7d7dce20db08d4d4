"""Data level on SmolLM2-135M: prompt compression, retrieval and Skeleton-of-Thought, in one run.

    flock -x /tmp/effinfer-cpu.lock .venv/bin/python benchmarks/data_level.py          # the tables
    .venv/bin/python benchmarks/data_level.py --quick                                  # a smoke check

1. **Long-context QA** (:mod:`effinfer.evaluation.tasks_data_level`, ``--examples`` questions,
   5 real Wikipedia passages each, one gold): for every method, exact match and F1, the
   compression ratio of the rendered prompt, and the end-to-end latency (the data stage —
   compression, retrieval, summarisation — plus prefill and decode), with the uncompressed
   prompt timed on the same model right next to each example (order alternating) for the
   latency ratio. Every method goes through the composed model's own path
   (``ComposedModel.generate``: data stage, then the static engine's greedy decode).
2. **Peer** — Microsoft's ``llmlingua`` package (``data-peers`` extra), its ``PromptCompressor``
   pointed at the same local SmolLM2 folder, LLMLingua and LongLLMLingua settings, same inputs,
   same rate; its compressed prompt is answered by the same model. (Its tiktoken token counter,
   which would download an OpenAI vocabulary, is replaced by the SmolLM2 tokenizer.)
3. **Accuracy vs compression** for the question-aware and question-agnostic methods at several
   rates (plot ``accuracy_vs_compression.png``).
4. **Skeleton-of-Thought** on open-ended questions: wall-clock latency vs normal decoding (same
   token cap), on the questions its router accepts, adjacent pairs; answer quality as the mean
   per-token log-likelihood of each answer under the model (given the question).

Tables: ``benchmarks/results/data.input_compression/long_context_qa.md``,
``benchmarks/results/data.input_compression.prompt_pruning/llmlingua_peer.md``,
``benchmarks/results/data.output_organization/skeleton_of_thought.md``; raw numbers in
``artifacts/data_level_benchmark.json``. Timing needs the CPU alone: run under ``flock -x``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import ARTIFACTS, TABLES, machine_load, table_header, write_table  # noqa: E402

from effinfer.core.compose import compose_stack  # noqa: E402
from effinfer.core.generation import GenerationConfig, encode_prompts  # noqa: E402
from effinfer.core.models import BUILTIN_ALIASES, DEFAULT_MODEL, load_model  # noqa: E402
from effinfer.core.stages import Request  # noqa: E402
from effinfer.evaluation.tasks_data_level import (DataTasksSpec, build_examples, prompt_tokens,  # noqa: E402
                                                  qa_scores, run_example)

METHODS: list[tuple[str, list[str]]] = [
    ("uncompressed", []),
    ("rag bm25 (rate 0.25)", ["rag:rate=0.25,retriever=bm25"]),
    ("rag dense (rate 0.25)", ["rag:rate=0.25,retriever=dense"]),
    ("rag hybrid + LM rerank (rate 0.25)", ["rag:rate=0.25,retriever=hybrid,rerank=6"]),
    ("longllmlingua (rate 0.25)", ["longllmlingua:rate=0.25"]),
    ("llmlingua (rate 0.33)", ["llmlingua:rate=0.33"]),
    ("llmlingua2 (rate 0.33)", ["llmlingua2:rate=0.33"]),
    ("extractive_summary (rate 0.33)", ["extractive_summary:rate=0.33"]),
    ("abstractive_summary (rate 0.33)", ["abstractive_summary:rate=0.33"]),
    ("soft_prompt (k=16 per 128 tokens, 60 steps)", ["soft_prompt:soft_tokens=16,segment_tokens=128,steps=60,batch_size=1"]),
    ("selective_context (remove 0.67)", ["selective_context:ratio=0.67"]),
    ("rag bm25 + rtn int4 + prompt_lookup", ["rag:rate=0.25", "rtn:bits=4,group_size=32", "prompt_lookup"]),
]
SWEEP = {"rag bm25": "rag:rate={r}", "longllmlingua": "longllmlingua:rate={r}", "llmlingua": "llmlingua:rate={r}"}
SWEEP_RATES = [0.5, 0.33, 0.2]
PEERS = (("llmlingua package (LLMLingua, rate 0.33)", False, 0.33),
         ("llmlingua package (LongLLMLingua, rate 0.25)", True, 0.25))
SOT_QUESTIONS = [
    "What are some tips for staying productive while working from home?",
    "How can I improve my time management skills?",
    "What are the main benefits of regular exercise?",
    "What are some ways to reduce stress at work?",
    "Explain the advantages of learning a second language.",
    "What are the steps to start a small vegetable garden?",
    "Who was the first person to walk on the Moon?",
    "Write a Python function that reverses a string.",
]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def run_method(model: Any, tokenizer: Any, stack: list[str], examples: list[Any], spec: DataTasksSpec,
               base_seconds: list[float] | None) -> dict[str, Any]:
    """One method on every example; latency ratios against the uncompressed run's time on the same example."""
    composed = compose_stack(model, tokenizer, stack)
    composed.apply()
    rows, ratios, recall = [], [], []
    try:
        run_example(composed, examples[0], spec, time.perf_counter)  # warm-up (caches, MiniLM, a trained head)
        for index, example in enumerate(examples):
            outcome = run_example(composed, example, spec, time.perf_counter)
            if base_seconds is not None:
                ratios.append(outcome.seconds / base_seconds[index])
            rows.append(outcome)
            transformed = composed.transform_request(example.request) if stack and stack[0].startswith("rag") else None
            if transformed is not None and "retrieved" in transformed.metadata:
                recall.append(float(example.gold_document in transformed.metadata["retrieved"]))
        notes = composed.report.entries[-3:]
    finally:
        composed.restore()
    n = len(rows)
    return {"accuracy": sum(r.score["accuracy"] for r in rows) / n, "f1": sum(r.score["f1"] for r in rows) / n,
            "ratio": sum(r.tokens_before for r in rows) / sum(r.tokens_after for r in rows),
            "latency_s": median([r.seconds for r in rows]), "latency_ratio": median(ratios),
            "latency_ratio_range": [min(ratios), max(ratios)] if ratios else None,
            "recall": sum(recall) / len(recall) if recall else None, "n": n, "notes": [str(x) for x in notes],
            "seconds": [r.seconds for r in rows], "per_example": [r.score["accuracy"] for r in rows],
            "tokens": [(r.tokens_before, r.tokens_after) for r in rows]}


class _Tiktoken:
    """What llmlingua calls on its tiktoken encoder, answered by the local tokenizer (no download)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str, **_: Any) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


class _LegacyKVModel:
    """llmlingua 0.2.2 passes and slices ``past_key_values`` as a list of ``[k, v]`` per layer (the format
    transformers dropped in 5.x, where iterating a ``Cache`` no longer yields pairs): convert both ways."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, *args: Any, past_key_values: Any = None, **kwargs: Any) -> Any:
        from transformers import DynamicCache

        if isinstance(past_key_values, (list, tuple)):
            cache = DynamicCache()
            for index, (key, value) in enumerate(past_key_values):
                cache.update(key, value, index)
            past_key_values = cache
        out = self.model(*args, past_key_values=past_key_values, **kwargs)
        if getattr(out, "past_key_values", None) is not None and hasattr(out.past_key_values, "layers"):
            out.past_key_values = [[layer.keys, layer.values] for layer in out.past_key_values.layers]
        return out


def run_peer(model: Any, tokenizer: Any, examples: list[Any], spec: DataTasksSpec, base: Any, rate: float,
             long: bool) -> dict[str, Any] | None:
    """The llmlingua package's PromptCompressor on the same model folder and inputs."""
    try:
        import tiktoken
        from llmlingua import PromptCompressor
    except ImportError:
        return None
    tiktoken.encoding_for_model = lambda name: _Tiktoken(tokenizer)
    import llmlingua.prompt_compressor as pc

    pc.tiktoken.encoding_for_model = tiktoken.encoding_for_model
    started = time.perf_counter()
    compressor = PromptCompressor(model_name=str(BUILTIN_ALIASES[DEFAULT_MODEL].folder), device_map="cpu")
    compressor.model = _LegacyKVModel(compressor.model)
    setup = time.perf_counter() - started
    options = dict(rank_method="longllmlingua", condition_in_question="after_condition", reorder_context="sort",
                   dynamic_context_compression_ratio=0.3, condition_compare=True) if long else {}
    rows = []
    for example in examples:
        question = example.request.metadata["question"]
        started = time.perf_counter()
        out = compressor.compress_prompt(list(example.request.documents), question=question if long else "",
                                         rate=rate, **options)
        compressed = out["compressed_prompt"]
        if long and compressed.endswith(question):
            compressed = compressed[: -len(question)].rstrip()
        request = Request([dict(m) for m in example.request.messages], [compressed], dict(example.request.metadata))
        completions, _ = base.generate([request], GenerationConfig(max_new_tokens=spec.max_new_tokens,
                                                                   chat_template=False))
        seconds = time.perf_counter() - started
        em, f1 = qa_scores(completions[0].text, example.answers)
        rows.append((em, f1, seconds, prompt_tokens(tokenizer, example.request, False),
                     prompt_tokens(tokenizer, request, False)))
    del compressor
    return {"accuracy": sum(r[0] for r in rows) / len(rows), "f1": sum(r[1] for r in rows) / len(rows),
            "latency_s": median([r[2] for r in rows]), "ratio": sum(r[3] for r in rows) / sum(r[4] for r in rows),
            "setup_s": setup, "n": len(rows)}


@torch.inference_mode()
def answer_loglik(model: Any, tokenizer: Any, question: str, answer_ids: list[int]) -> float:
    """Mean per-token log-likelihood of an answer given the question (chat template)."""
    if not answer_ids:
        return math.nan
    prompt, _ = encode_prompts(tokenizer, [question], True, "cpu")
    ids = torch.cat([prompt[0], torch.tensor(answer_ids)])[None]
    logits = model(input_ids=ids).logits[0, prompt.shape[1] - 1:-1].float()
    return float(logits.log_softmax(-1).gather(-1, ids[0, prompt.shape[1]:, None]).mean())


def run_sot(model: Any, tokenizer: Any, base: Any, max_new_tokens: int) -> dict[str, Any]:
    from effinfer.plugins.data.output_organization.skeleton_of_thought import route

    composed = compose_stack(model, tokenizer, ["skeleton_of_thought"])
    composed.apply()
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    rows = []
    try:
        composed.generate([Request.from_text(SOT_QUESTIONS[0])], GenerationConfig(max_new_tokens=8))  # warm-up
        for index, question in enumerate(SOT_QUESTIONS):
            request = Request.from_text(question)
            timings = {}
            for who in (["sot", "plain"] if index % 2 == 0 else ["plain", "sot"]):
                runner = composed if who == "sot" else base
                started = time.perf_counter()
                completions, result = runner.generate([request], config)
                timings[who] = (time.perf_counter() - started, completions[0], result)
            decision = composed.techniques[0].decisions[-1] if composed.techniques[0].decisions else ""
            rows.append({"question": question, "routed": route(question), "decision": decision,
                         "sot_s": timings["sot"][0], "plain_s": timings["plain"][0],
                         "sot_tokens": len(timings["sot"][1].tokens), "plain_tokens": len(timings["plain"][1].tokens),
                         "sot_loglik": answer_loglik(base.model, tokenizer, question, timings["sot"][1].tokens),
                         "plain_loglik": answer_loglik(base.model, tokenizer, question, timings["plain"][1].tokens),
                         "sot_text": timings["sot"][1].text[:300]})
    finally:
        composed.restore()
    return {"rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sot-tokens", type=int, default=96)
    parser.add_argument("--sweep-until-s", type=float, default=300,
                        help="skip the rest of the accuracy-vs-compression sweep after this many seconds "
                             "(one run stays within 8 minutes)")
    parser.add_argument("--peer-examples", type=int, default=4,
                        help="questions the llmlingua package compresses (the first ones; ours are compared on them)")
    parser.add_argument("--quick", action="store_true", help="3 examples, 3 methods, no tables")
    parser.add_argument("--peers-only", action="store_true",
                        help="run only the llmlingua package peers and merge them into the saved results")
    parser.add_argument("--sweep-only", action="store_true",
                        help="run only the accuracy-vs-compression sweep (no time cap) and merge it into the saved "
                             "results of the last full run (its uncompressed baseline and tables)")
    args = parser.parse_args()
    if args.sweep_only or args.peers_only:
        return partial_run(args)
    torch.set_num_threads(args.threads)
    command = "flock -x /tmp/effinfer-cpu.lock .venv/bin/python benchmarks/data_level.py " + " ".join(sys.argv[1:])
    load_before = machine_load()
    run_started = time.perf_counter()
    model, tokenizer = load_model(DEFAULT_MODEL)
    spec = DataTasksSpec(n_examples=2 if args.quick else args.examples, passages=5)
    examples = build_examples(spec, "long_context_qa")
    base = compose_stack(model, tokenizer, [])
    base.apply()
    methods = METHODS[:3] if args.quick else METHODS
    results: dict[str, Any] = {"methods": {}, "peers": {}, "sweep": {}}
    base_seconds = None
    for name, stack in methods:
        started = time.perf_counter()
        results["methods"][name] = run_method(model, tokenizer, stack, examples, spec, base_seconds)
        if not stack:
            base_seconds = results["methods"][name]["seconds"]
        print(f"{name}: {results['methods'][name]} ({time.perf_counter() - started:.0f} s)", flush=True)
    run_peers(results, model, tokenizer, examples[:args.peer_examples], spec, base)
    if not args.quick:
        run_sweep(results, model, tokenizer, examples, spec, base_seconds, deadline=run_started + args.sweep_until_s)
    try:
        results["sot"] = run_sot(model, tokenizer, base, 16 if args.quick else args.sot_tokens)
    except Exception as error:  # keep the other tables
        results["sot"] = {"rows": [], "error": f"{type(error).__name__}: {error}"}
        print(f"skeleton_of_thought failed: {results['sot']['error']}", flush=True)
    for row in results["sot"]["rows"]:
        print({k: v for k, v in row.items() if k != "sot_text"}, flush=True)
    base.restore()
    results["load_before"], results["load_after"] = load_before, machine_load()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "data_level_benchmark.json").write_text(json.dumps(results, indent=1, default=str))
    if not args.quick:
        write_tables(results, command, args)


def run_peers(results: dict[str, Any], model: Any, tokenizer: Any, examples: list[Any], spec: DataTasksSpec,
              base: Any) -> None:
    """Every llmlingua package peer on ``examples``; one that fails reports why and the others still run."""
    for name, long, rate in PEERS:
        try:
            results["peers"][name] = run_peer(model, tokenizer, examples, spec, base, rate, long)
        except Exception as error:  # the peer is optional: report why it did not run
            results["peers"][name] = {"error": f"{type(error).__name__}: {error}"[:300]}
        print(f"{name}: {results['peers'][name]}", flush=True)


def run_sweep(results: dict[str, Any], model: Any, tokenizer: Any, examples: list[Any], spec: DataTasksSpec,
              base_seconds: list[float] | None, deadline: float = math.inf) -> None:
    """The accuracy-vs-compression sweep; points not started before ``deadline`` (perf_counter) are skipped."""
    for label, template in SWEEP.items():
        for rate in SWEEP_RATES:
            if time.perf_counter() > deadline:
                print(f"sweep {label}@{rate} skipped: past --sweep-until-s", flush=True)
                continue
            stack = [template.format(r=rate)]
            results["sweep"][f"{label}@{rate}"] = run_method(model, tokenizer, stack, examples, spec, base_seconds)
            print(f"sweep {label}@{rate}: {results['sweep'][f'{label}@{rate}']}", flush=True)


def partial_run(args: Any) -> None:
    """The sweep or the peers of a saved full run, measured now, merged into its saved results and tables."""
    saved = ARTIFACTS / "data_level_benchmark.json"
    if not saved.is_file():
        raise SystemExit(f"no saved full run at {saved}: run benchmarks/data_level.py first")
    results = json.loads(saved.read_text())
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(DEFAULT_MODEL)
    spec = DataTasksSpec(n_examples=results["methods"]["uncompressed"]["n"], passages=5)
    examples = build_examples(spec, "long_context_qa")
    if args.peers_only:
        base = compose_stack(model, tokenizer, [])
        base.apply()
        run_peers(results, model, tokenizer, examples[:args.peer_examples], spec, base)
        base.restore()
    if args.sweep_only:
        base_seconds = run_method(model, tokenizer, [], examples, spec, None)["seconds"]
        run_sweep(results, model, tokenizer, examples, spec, base_seconds)
    saved.write_text(json.dumps(results, indent=1, default=str))
    parts = " ".join(flag for flag, on in (("--peers-only", args.peers_only), ("--sweep-only", args.sweep_only)) if on)
    write_tables(results, f"flock -x /tmp/effinfer-cpu.lock .venv/bin/python benchmarks/data_level.py, then {parts}",
                 args)


def write_tables(results: dict[str, Any], command: str, args: Any) -> None:
    extra = f"; load before: {results['load_before']}; after: {results['load_after']}"
    base = results["methods"]["uncompressed"]
    lines = table_header(f"Long-context QA on SmolLM2-135M ({base['n']} questions, 5 Wikipedia passages each)",
                         command, args.threads, extra)
    lines += ["Exact match / F1 of the first answer word; compression = rendered prompt tokens before ÷ after; "
              "latency = data stage + prefill + 8-token greedy decode (median); latency ratio = median over "
              "questions of method ÷ the uncompressed prompt on the same question, same run (min–max); recall = gold "
              "passage among the retrieved chunks. ✓: ≥ 3× compression, ≥ 90% of the uncompressed accuracy "
              "and faster end to end.", "",
              "| method | EM | F1 | EM vs uncompressed | compression | latency (s) | latency ratio | recall |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in results["methods"].items():
        keep = r["accuracy"] / base["accuracy"] if base["accuracy"] else math.nan
        ok = r["ratio"] >= 3 and keep >= 0.9 and (r["latency_ratio"] or 9) < 1
        span = (f" ({r['latency_ratio_range'][0]:.2f}–{r['latency_ratio_range'][1]:.2f})"
                if r["latency_ratio_range"] else "")
        latency = "—" if math.isnan(r["latency_ratio"]) else f"{r['latency_ratio']:.2f}{span}"
        recall = "—" if r["recall"] is None else f"{r['recall']:.2f}"
        lines.append(f"| {name}{' ✓' if ok else ''} | {r['accuracy']:.2f} | {r['f1']:.2f} | {keep:.0%} | "
                     f"{r['ratio']:.2f}× | {r['latency_s']:.2f} | {latency} | {recall} |")
    if results["sweep"]:
        lines += ["", "### Accuracy vs compression", "", "| method @ rate | EM | F1 | compression |", "|---|---|---|---|"]
        for name, r in results["sweep"].items():
            lines.append(f"| {name} | {r['accuracy']:.2f} | {r['f1']:.2f} | {r['ratio']:.2f}× |")
        plot = plot_sweep(results)
        if plot is not None:
            lines += ["", f"Plot: `benchmarks/results/data.input_compression/{plot.name}` (exact match vs compression)."]
    path = write_table("data.input_compression", "long_context_qa", "\n".join(lines) + "\n")
    print(f"wrote {path}")

    ours = {k: v for k, v in results["methods"].items() if k.startswith(("llmlingua (", "longllmlingua ("))}
    lines = table_header("Our LLMLingua / LongLLMLingua vs the llmlingua package (same model, same inputs)",
                         command, args.threads, extra)
    lines += ["The package's `PromptCompressor` loads the same local SmolLM2 folder (fp32, CPU); its compressed "
              "prompt is answered by the same model and engine. Latency = compression + answer (median). "
              f"Both on the first {args.peer_examples} questions of the long-context QA table. llmlingua 0.2.2 "
              "iterates its KV cache as `[k, v]` pairs, which transformers 5's `Cache` no longer yields; the "
              "benchmark wraps the package's model to convert the cache both ways (`_LegacyKVModel`), nothing else.",
              "",
              "| implementation | EM | F1 | compression | latency (s) | set-up (s) |", "|---|---|---|---|---|---|"]
    k = args.peer_examples
    for name, r in ours.items():
        tokens = r["tokens"][:k]
        lines.append(f"| effinfer {name} | {sum(r['per_example'][:k]) / len(tokens):.2f} | — | "
                     f"{sum(t[0] for t in tokens) / sum(t[1] for t in tokens):.2f}× | "
                     f"{median(r['seconds'][:k]):.2f} | — |")
    for name, r in results["peers"].items():
        if r is None or "error" in r:
            lines.append(f"| {name} | not run: {'not installed' if r is None else r['error']} | | | | |")
        else:
            lines.append(f"| {name} | {r['accuracy']:.2f} | {r['f1']:.2f} | {r['ratio']:.2f}× | "
                         f"{r['latency_s']:.2f} | {r['setup_s']:.1f} |")
    path = write_table("data.input_compression.prompt_pruning", "llmlingua_peer", "\n".join(lines) + "\n")
    print(f"wrote {path}")

    rows = results["sot"]["rows"]
    if not rows:
        return
    accepted = [r for r in rows if r["decision"].startswith("skeleton")]
    lines = table_header("Skeleton-of-Thought vs normal decoding on SmolLM2-135M", command, args.threads, extra)
    ratios = [r["sot_s"] / r["plain_s"] for r in accepted]
    lines += [f"Same token cap ({args.sot_tokens}), greedy, adjacent runs (order alternating). Router-accepted "
              f"questions: {len(accepted)}/{len(rows)}; median latency ratio SoT ÷ normal on them: "
              f"**{median(ratios):.2f}×**. Quality: mean per-token log-likelihood of the answer under the model "
              "(higher is better).", "",
              "| question | decision | SoT (s) | normal (s) | ratio | SoT tokens | normal tokens | SoT loglik | "
              "normal loglik |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['question']} | {r['decision']} | {r['sot_s']:.2f} | {r['plain_s']:.2f} | "
                     f"{r['sot_s'] / r['plain_s']:.2f} | {r['sot_tokens']} | {r['plain_tokens']} | "
                     f"{r['sot_loglik']:.2f} | {r['plain_loglik']:.2f} |")
    path = write_table("data.output_organization", "skeleton_of_thought", "\n".join(lines) + "\n")
    print(f"wrote {path}")


def plot_sweep(results: dict[str, Any]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    base = results["methods"]["uncompressed"]["accuracy"]
    for label in SWEEP:
        points = sorted((r["ratio"], r["accuracy"]) for k, r in results["sweep"].items() if k.startswith(label + "@"))
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    axis.axhline(base, color="grey", linestyle="--", label="uncompressed")
    axis.set_xlabel("compression (prompt tokens before ÷ after)")
    axis.set_ylabel("exact match")
    axis.set_title("Long-context QA, SmolLM2-135M")
    axis.legend()
    path = TABLES / "data.input_compression" / "accuracy_vs_compression.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path


if __name__ == "__main__":
    main()
