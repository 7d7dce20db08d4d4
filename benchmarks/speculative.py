"""Speculative decoding on SmolLM2-135M: every strategy and its peers, in one run.

    .venv/bin/python benchmarks/speculative.py                    # 2 prompts per category
    .venv/bin/python benchmarks/speculative.py --per-category 1 --max-new-tokens 64 --no-compile

Same prompts (the versioned prompt set: summarize, qa, code_edit, story, chat), greedy, in
one process, on 2 threads:

- the engine's plain greedy decoding (compiled) — the baseline of every speed-up;
- each speculative strategy on the same engine (compiled decode and verification steps);
- transformers ``generate``: plain, with ``prompt_lookup_num_tokens`` and with
  ``assistant_model`` (the same draft the ``draft_model`` strategy uses);
- llama.cpp (``llama-cpp-python``, the ``bench-peers`` extra) on the Q4_1 GGUF, if installed.

Speed-ups are measured side by side: for every method, the engine's plain greedy decoding
runs again on each prompt right next to it (the order alternating prompt by prompt), and the
speed-up is the method's decode tok/s ÷ that adjacent baseline's, with the min–max of the
per-prompt ratios; a row whose adjacent baseline moved more than ``--drift-tolerance`` from
the first baseline measurement is flagged ⚠ (machine load changed: re-run it with ``--only``).
``--quick`` (one prompt per category, 16 tokens, eager, prompt_lookup and HF generate only,
no table) checks the script in a few minutes.

**A real draft/target pair** (``--target`` / ``--draft``, model aliases)::

    .venv/bin/python benchmarks/speculative.py --target qwen2.5-coder-1.5b-instruct \
        --draft qwen2.5-coder-0.5b-instruct

runs the pair's rows (:func:`pair_strategies`: ``draft_model`` with the draft as its
``source``, in float32 and in rtn int8 on the native packed matmul, prompt_lookup with 7 drafted
tokens (one native chain verification), self_speculative, lookahead, rest, eagle; ``--with-medusa`` adds
Medusa, left out by default for its head-training cost on a 1.5B model), the HF peers
(``assistant_model`` = the draft) and llama.cpp on the target's own GGUF, plain and with its
prompt-lookup drafting (``LlamaPromptLookupDecoding``), into ``table5_qwen.md``. Its defaults
keep a 2-core run near 25 minutes: one prompt per category, 64 new tokens, warm-ups of 8 tokens,
and the plain baseline measured first and last instead of beside every row (``--paired``
restores the side-by-side measurement).

Per method: decode tok/s over all prompts and per category, speed-up over the engine's plain
greedy, mean accepted tokens per verification step, acceptance rate, drafting overhead,
set-up cost (draft construction, datastore, head training), and whether its greedy output
is identical to plain greedy's. Writes ``artifacts/speculative_benchmark.json`` and the
survey's Table 5 redone, ``benchmarks/results/system.inference_engine.speculative_decoding/table5.md``
(shown on that node's docs page). Timing runs share the CPU with nobody: run it as
``flock -x /tmp/effinfer-cpu.lock …``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import ARTIFACTS, agreement, machine, machine_load, table_header, time_llama_cpp, write_table  # noqa: E402

from effinfer.core.generation import GenerationConfig, GenerationResult, encode_prompts, stop_token_ids  # noqa: E402
from effinfer.core.models import BUILTIN_ALIASES, DEFAULT_MODEL, load_model  # noqa: E402
from effinfer.core.registry import get_registry  # noqa: E402
from effinfer.core.stages import SystemStage  # noqa: E402
from effinfer.data import PROMPT_CATEGORIES, load_prompts  # noqa: E402
from effinfer.plugins.system.engine import StaticDecoding, StaticEngine, shared_engine  # noqa: E402
from effinfer.evaluation.metrics.timing import load_average, paired_ratios  # noqa: E402

OnePrompt = Callable[[int], GenerationResult]  # prompt index -> its result

#: (row name, technique, config) — the strategies measured, with their settings
STRATEGIES: list[tuple[str, str, dict[str, Any]]] = [
    ("prompt_lookup", "prompt_lookup", {"num_draft_tokens": 10}),
    ("draft_model (drop 22 of 30 layers)", "draft_model", {"techniques": ["drop_layers:drop=22"],
                                                             "num_draft_tokens": 4}),
    ("draft_model (int8 rtn copy)", "draft_model", {"techniques": ["rtn:bits=8"], "num_draft_tokens": 4}),
    ("self_speculative", "self_speculative", {"skip_ratio": 0.4, "num_draft_tokens": 4}),
    ("self_speculative (skip 20%, stop below p=0.6)", "self_speculative",
     {"skip_ratio": 0.2, "num_draft_tokens": 4, "confidence_threshold": 0.6}),
    ("lookahead", "lookahead", {}),
    ("rest", "rest", {}),
    # Medusa.bench_config's heads (16 self-generated answers × 96 tokens, 2 epochs; cached once trained)
    ("medusa", "medusa", {"train_prompts": 16, "train_new_tokens": 96, "epochs": 2}),
    # EAGLE's head (48 self-generated answers × 128 tokens, 8 epochs; cached once trained)
    ("eagle", "eagle", {"train_prompts": 48, "train_new_tokens": 128, "epochs": 8}),
]

#: the pair run's quantized draft: rtn int8 (groups of 64, zero points, output head too) on the native kernels
INT8_DRAFT = "rtn:bits=8,group_size=64,symmetric=false,execution=native,skip_modules=[]"
#: prompt lookup's drafted tokens on a real target: its verification (7 + 1 tokens) is one native chain step
PAIR_LOOKUP_DRAFTS = 7
#: EAGLE's head on a larger target (fewer, shorter self-generated answers: set-up stays minutes)
PAIR_EAGLE = {"train_prompts": 16, "train_new_tokens": 64, "epochs": 6}
#: what ``--quick`` trains instead (checks the path, not the head)
QUICK_EAGLE = {"train_prompts": 2, "train_new_tokens": 16, "epochs": 1}


def pair_strategies(draft: str | None, with_medusa: bool, eagle: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """The rows of a real target (and draft model): the SmolLM2 rows' settings, the draft as a model source."""
    rows: list[tuple[str, str, dict[str, Any]]] = []
    if draft is not None:
        rows.append((f"draft_model ({draft})", "draft_model", {"source": draft, "num_draft_tokens": 4}))
        # the same draft with its weights in int8 read by the native packed matmul: a cheaper draft step
        rows.append((f"draft_model ({draft}, int8 native)", "draft_model",
                     {"source": draft, "techniques": [INT8_DRAFT], "num_draft_tokens": 4}))
    # 7 drafted tokens: the chain plus the target's own token fit one native chain step (up to 8 tokens)
    rows.append(("prompt_lookup", "prompt_lookup", {"num_draft_tokens": PAIR_LOOKUP_DRAFTS}))
    rows += [row for row in STRATEGIES if row[1] in ("lookahead", "rest")]
    rows.append(("self_speculative", "self_speculative", {"skip_ratio": 0.4, "num_draft_tokens": 4}))
    if with_medusa:
        rows.append(("medusa", "medusa", {"train_prompts": 16, "train_new_tokens": 96, "epochs": 2}))
    rows.append(("eagle", "eagle", eagle))
    return rows

#: Table 5 columns that describe a method (the measured ones come from the run)
DESCRIPTIONS: dict[str, tuple[str, str, str]] = {
    # technique: (draft, draft construction, verifier)
    "prompt_lookup": ("n-gram match in prompt + output", "none (lookup)", "greedy chain / speculative sampling"),
    "draft_model": ("smaller model", "compress a copy of the target with a registered technique",
                    "chain, speculative sampling (min(1, p/q))"),
    "self_speculative": ("target with layers skipped", "none (layer subset, shared KV cache)",
                         "chain, speculative sampling"),
    "lookahead": ("n-grams from Jacobi trajectories", "none (online pool)", "token tree (+ Jacobi chain)"),
    "rest": ("retrieved continuations", "suffix array over a corpus", "token tree"),
    "medusa": ("extra heads on the last hidden state", "heads trained on self-generated text", "token tree"),
    "eagle": ("one-layer head autoregressing on the target's features", "head trained on self-generated text",
              "chain, speculative sampling"),
}


def strategy_for(technique_name: str, config: dict[str, Any], model: Any, tokenizer: Any, compile: bool
                 ) -> tuple[Any, Any, float]:
    """The technique's decoding strategy, as the composition would build it; set-up seconds."""
    technique = get_registry().get(technique_name)(config)
    stage = SystemStage(model, tokenizer, engine=StaticEngine(compile=compile))
    started = time.perf_counter()
    strategy = technique.effinfer_decoding_strategy(stage=stage)
    return technique, strategy, time.perf_counter() - started


def ours(strategy: Any, model: Any, encoded: list[Any], stops: set[int]) -> OnePrompt:
    def one(index: int) -> GenerationResult:
        ids, mask, n = encoded[index]
        return strategy.generate(model, ids, mask, GenerationConfig(max_new_tokens=n), stops)
    return one


def hf(model: Any, encoded: list[Any], stops: set[int], **kwargs: Any) -> OnePrompt:
    """``generate`` on one prompt; decode time = total − the time of a 1-token call."""
    def one(index: int) -> GenerationResult:
        ids, mask, n = encoded[index]

        def call(tokens: int) -> tuple[float, torch.Tensor]:
            started = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=mask, max_new_tokens=tokens, do_sample=False,
                                     pad_token_id=model.generation_config.eos_token_id, **kwargs)
            return time.perf_counter() - started, out

        first, _ = call(1)
        seconds, out = call(n)
        # a 1-token answer (or timer noise) leaves no decode time to subtract from: count the whole call
        decode = seconds - first if seconds > first else seconds
        return GenerationResult([out[0, ids.shape[1]:].tolist()], first, decode, 0)
    return one


def llama(encoded: list[Any], threads: int) -> OnePrompt | None:
    """llama.cpp on one prompt (``None`` when ``llama-cpp-python`` is not installed)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None

    def one(index: int) -> GenerationResult:
        ids, _, n = encoded[index]
        row = time_llama_cpp(ids, n, 1, threads)
        decode = (n - 1) / row["decode_tok_s"]
        return GenerationResult([row["tokens"]], row["prefill_s"], decode, 0)
    return one


def llama_pair(gguf: Path, encoded: list[Any], threads: int, lookup: int = 0) -> OnePrompt | None:
    """llama.cpp on ``gguf``, greedy, optionally with its prompt-lookup drafting (``lookup`` tokens);
    ``None`` when ``llama-cpp-python`` is not installed."""
    try:
        import llama_cpp.llama as llama_module
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    except ImportError:
        return None
    defaults = llama_module.llama_cpp.llama_model_default_params

    def without_repacking() -> Any:  # the AMX/repack weight buffers crash here (benchmarks/engine.py)
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = without_repacking
    drafter = LlamaPromptLookupDecoding(num_pred_tokens=lookup) if lookup else None
    llm = Llama(model_path=str(gguf), n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False,
                seed=0, draft_model=drafter)

    def one(index: int) -> GenerationResult:
        ids, _, n = encoded[index]
        llm.reset()
        started = time.perf_counter()
        tokens: list[int] = []
        for token in llm.generate(ids[0].tolist(), top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if not tokens:
                prefilled = time.perf_counter()
            tokens.append(token)
            if len(tokens) == n:
                break
        return GenerationResult([tokens], prefilled - started, time.perf_counter() - prefilled, 0)
    return one


def beside(method: OnePrompt, baseline: OnePrompt, count: int
           ) -> tuple[list[GenerationResult], list[GenerationResult]]:
    """Each prompt run by the method and by the baseline right next to it, the order alternating."""
    mine, base = [], []
    for index in range(count):
        if index % 2:
            base.append(baseline(index))
            mine.append(method(index))
        else:
            mine.append(method(index))
            base.append(baseline(index))
    return mine, base


def rate(rows: list[GenerationResult]) -> float:
    tokens = sum(r.new_tokens - len(r.sequences) for r in rows)
    seconds = sum(r.decode_seconds for r in rows)
    return tokens / seconds if seconds > 0 else float("nan")


def paired_speedup(results: list[GenerationResult], base: list[GenerationResult], reference: float | None,
                   tolerance: float) -> dict[str, Any]:
    """Speed-up over the baseline run next to it; per-prompt spread; drift of that baseline."""
    mine, theirs = [rate([r]) for r in results], [rate([b]) for b in base]
    per_prompt = paired_ratios(mine, theirs)
    adjacent = rate(base)
    out = {"speedup_vs_engine_plain": rate(results) / adjacent, "speedup_spread": [per_prompt.low, per_prompt.high],
           "speedup_spread_kind": per_prompt.spread, "per_prompt_speedups": [m / t for m, t in zip(mine, theirs)],
           "baseline_decode_tok_s": adjacent}
    if reference and abs(adjacent / reference - 1) > tolerance:
        out["drift"] = f"adjacent baseline {adjacent:.1f} vs first {reference:.1f} tok/s ({adjacent / reference - 1:+.0%})"
    return out


def summarize(results: list[GenerationResult], categories: list[str], reference: list[list[int]] | None
              ) -> dict[str, Any]:
    per_category = defaultdict(list)
    for category, result in zip(categories, results):
        per_category[category].append(result)
    accepted = [a for r in results for a in r.accepted_per_step]
    drafted = [d for r in results for d in r.drafted_per_step]
    steps = sum(r.forward_steps for r in results)
    summary = {
        "decode_tok_s": rate(results),
        "per_category_tok_s": {c: rate(rows) for c, rows in per_category.items()},
        "new_tokens": sum(r.new_tokens for r in results),
        "decode_seconds": sum(r.decode_seconds for r in results),
        "draft_seconds": sum(r.draft_seconds for r in results),
    }
    if drafted:
        summary |= {"mean_accepted": sum(accepted) / len(accepted), "acceptance_rate": sum(accepted) / sum(drafted),
                    "tokens_per_step": sum(r.new_tokens - 1 for r in results) / max(steps, 1),
                    "drafted_per_step": sum(drafted) / len(drafted)}
        per_cat_acc = defaultdict(list)
        for category, result in zip(categories, results):
            per_cat_acc[category] += result.accepted_per_step
        summary["per_category_mean_accepted"] = {c: sum(a) / len(a) if a else 0.0 for c, a in per_cat_acc.items()}
    if reference is not None:
        outputs = [r.sequences[0] for r in results]
        summary["identical_to_plain_greedy"] = sum(o == ref for o, ref in zip(outputs, reference))
        summary["common_prefix_tokens"] = sum(agreement(o, ref) for o, ref in zip(outputs, reference))
        summary["prompts"] = len(outputs)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=DEFAULT_MODEL, help="target model source (alias, folder, .gguf)")
    parser.add_argument("--draft", default=None, help="draft model source for draft_model and HF assistant_model "
                                                      "(a pair run: see the module docstring)")
    parser.add_argument("--with-medusa", action="store_true", help="a pair run also trains and runs Medusa")
    parser.add_argument("--paired", action="store_true",
                        help="a pair run measures the plain baseline beside every row (default: first and last)")
    parser.add_argument("--per-category", type=int, default=None, help="prompts per category (2; a pair run: 1)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="tokens per answer (128; a pair run: 64)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--only", nargs="*", help="row names (substring) to run besides the baseline")
    parser.add_argument("--out", type=Path, default=ARTIFACTS / "speculative_benchmark.json")
    parser.add_argument("--no-table", action="store_true", help="do not write benchmarks/results/…/table5.md")
    parser.add_argument("--drift-tolerance", type=float, default=0.10,
                        help="flag a row whose adjacent baseline moved more than this from the first one")
    parser.add_argument("--quick", action="store_true",
                        help="check the script: 1 prompt per category, 16 tokens, eager, prompt_lookup and hf "
                             "generate only, no table, artifacts/quick/speculative_benchmark.json")
    args = parser.parse_args()
    pair = args.target != DEFAULT_MODEL or args.draft is not None
    args.per_category = args.per_category or (1 if pair else 2)
    args.max_new_tokens = args.max_new_tokens or (64 if pair else 128)
    if args.quick:
        args.per_category, args.max_new_tokens, args.no_compile, args.no_llama_cpp = 1, 16, True, True
        args.only, args.no_table = args.only or ["prompt_lookup", "hf generate"], True
        args.out = ARTIFACTS / "quick" / "speculative_benchmark.json"
    paired = not pair or args.paired
    strategies = (pair_strategies(args.draft, args.with_medusa, QUICK_EAGLE if args.quick else PAIR_EAGLE) if pair
                  else STRATEGIES)
    torch.set_num_threads(args.threads)
    compile = not args.no_compile
    report: dict[str, Any] = {"load_before": machine_load(), "threads": args.threads, "compile": compile,
                              "drift_tolerance": args.drift_tolerance,
                              "command": "python benchmarks/speculative.py " + " ".join(sys.argv[1:]),
                              "torch": torch.__version__, "machine": machine(), "rows": {}, "paired": paired,
                              "target": args.target, "draft": args.draft}
    started = time.perf_counter()
    model, tokenizer = load_model(args.target)
    report["load_s"] = time.perf_counter() - started
    prompts = [p for c in PROMPT_CATEGORIES for p in load_prompts(c, n_per_category=args.per_category)]
    categories = [p.category for p in prompts]
    encoded = [(*encode_prompts(tokenizer, [p.messages], chat_template=True), min(p.max_new_tokens, args.max_new_tokens))
               for p in prompts]
    stops = stop_token_ids(tokenizer, model, GenerationConfig())
    longest = max(ids.shape[1] + n for ids, _, n in encoded) + 64
    engine = shared_engine(model, compile)
    for name in ("plain", "target"):  # one capacity for every prompt: compiled shapes are reused
        engine.cache_for(1, longest, name)

    def measure(row: str, run: OnePrompt, extra: dict[str, Any]) -> None:
        """Run ``run`` on every prompt next to the plain baseline; record the row."""
        first = report["rows"].get("engine plain greedy", {})
        load = load_average()
        if first and paired:
            results, base = beside(run, plain_one, len(prompts))
            extra = extra | paired_speedup(results, base, first["decode_tok_s"], args.drift_tolerance)
        elif first:
            results = [run(i) for i in range(len(prompts))]
            extra = extra | {"speedup_vs_engine_plain": rate(results) / first["decode_tok_s"]}
        else:
            results = [run(i) for i in range(len(prompts))]
        extra["load_before_after"] = [load, load_average()]
        summary = summarize(results, categories, first.get("outputs")) | extra
        summary["outputs"] = [r.sequences[0] for r in results]
        report["rows"][row] = summary
        accepted = summary.get("mean_accepted")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".partial.json").write_text(json.dumps(report, indent=1, default=str))
        print(f"{row}: {summary['decode_tok_s']:.1f} tok/s"
              + ("" if accepted is None else f", mean accepted {accepted:.2f}"), flush=True)

    plain = StaticDecoding(StaticEngine(compile=compile))
    plain_one = ours(plain, model, encoded, stops)
    # a pair run warms up on 8 tokens of the first prompt (a full answer of a 1.5B model costs ~20 s a row)
    warm_encoded = [(ids, mask, min(n, 8)) for ids, mask, n in encoded[:1]] if pair else encoded
    started = time.perf_counter()
    ours(plain, model, warm_encoded, stops)(0)  # compile + warm-up
    warmup = time.perf_counter() - started
    measure("engine plain greedy", plain_one, {"warmup_s": warmup, "compile": engine.compile_report()})
    wanted = lambda row: not args.only or any(o in row for o in args.only)  # noqa: E731
    drafts: dict[str, Any] = {}
    for row, technique_name, config in strategies:
        if not wanted(row):
            continue
        try:
            technique, strategy, setup = strategy_for(technique_name, config, model, tokenizer, compile)
        except Exception as error:  # noqa: BLE001 - a row fails, the benchmark goes on
            report["rows"][row] = {"error": f"{type(error).__name__}: {error}"}
            print(f"{row}: FAILED {error}", flush=True)
            continue
        if technique_name == "draft_model":
            drafts[row] = strategy.draft
            shared_engine(strategy.draft, compile).cache_for(1, longest, "draft")
        started = time.perf_counter()
        ours(strategy, model, warm_encoded, stops)(0)
        warmup = time.perf_counter() - started
        extra = {"technique": technique_name, "config": config, "setup_s": setup, "warmup_s": warmup,
                 "notes": list(technique.notes)}
        report_obj = getattr(technique, "training_report", None)
        if report_obj is not None:
            extra["training"] = vars(report_obj) | {"total_seconds": report_obj.total_seconds}
        measure(row, ours(strategy, model, encoded, stops), extra)

    def peer(row: str, run: OnePrompt | None) -> None:
        if run is None:
            return
        try:
            measure(row, run, {})
        except Exception as error:  # noqa: BLE001 - a peer fails, the benchmark goes on
            report["rows"][row] = {"error": f"{type(error).__name__}: {error}"}
            print(f"{row}: FAILED {error}", flush=True)

    if wanted("hf generate"):
        peer("hf generate", hf(model, encoded, stops))
        peer("hf generate + prompt_lookup_num_tokens=10", hf(model, encoded, stops, prompt_lookup_num_tokens=10))
        draft_row = next((r for r in drafts if "drop" in r), next(iter(drafts), None))
        if draft_row is not None:
            peer(f"hf generate + assistant_model ({draft_row.split('(')[1].rstrip(')')})",
                 hf(model, encoded, stops, assistant_model=drafts[draft_row]))
    if not args.no_llama_cpp and wanted("llama.cpp") and not pair:
        peer("llama.cpp Q4_1 (llama-cpp-python)", llama(encoded, args.threads))
    elif not args.no_llama_cpp and wanted("llama.cpp") and hasattr(BUILTIN_ALIASES.get(args.target), "gguf_file"):
        gguf = BUILTIN_ALIASES[args.target].gguf_file()
        report["gguf"] = str(gguf)
        peer("llama.cpp GGUF (llama-cpp-python)", llama_pair(gguf, encoded, args.threads))
        peer("llama.cpp GGUF + prompt lookup (LlamaPromptLookupDecoding, 10)",
             llama_pair(gguf, encoded, args.threads, lookup=10))
    if not paired:  # the baseline again, last: how far the machine drifted over the run
        report["plain_last"] = summarize([plain_one(i) for i in range(len(prompts))], categories, None)
    report["rows"]["engine plain greedy"]["speedup_vs_engine_plain"] = 1.0
    report["load_after"] = machine_load()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    table = table5(report)
    if not args.no_table:
        name = "table5" if not pair else "table5_qwen" if args.target.startswith("qwen") else "table5_pair"
        print("wrote", write_table("system.inference_engine.speculative_decoding", name, table))
    print(table)


def table5(report: dict[str, Any]) -> str:
    """The survey's Table 5 redone from this run, plus the peers, as markdown."""
    rows = report["rows"]
    base = rows["engine plain greedy"]
    target, draft = report.get("target", DEFAULT_MODEL), report.get("draft")
    title = ("Speculative decoding on SmolLM2-135M-Instruct (survey Table 5, redone)" if target == DEFAULT_MODEL
             and draft is None else f"Speculative decoding on {target} with {draft or 'no'} draft model "
             "(survey Table 5, redone on a real draft/target pair)")
    lines = table_header(
        title, report["command"],
        report["threads"], f"; torch {report['torch']}; compiled decode and verification steps: {report['compile']}; "
        f"machine load (`uptime`) before `{report['load_before']}`, after `{report['load_after']}` (a shared CPU: "
        "compare ratios within this table, not across runs)")
    lines += [
        f"Greedy decoding of {base.get('prompts', len(base['outputs']))} prompts of the versioned prompt set "
        "(summarize, qa, code_edit, story, chat), batch 1, all methods in one process on the same prompts. Speed-up = "
        + ("decode tok/s ÷ the engine's plain greedy decode tok/s measured right next to it (prompt by prompt, the "
           "order alternating) [inter-quartile range of the per-prompt ratios; min–max under 4 prompts]; ⚠ = that "
           "adjacent baseline moved more than "
           f"{report.get('drift_tolerance', 0.1):.0%} from the first one ({base['decode_tok_s']:.1f} tok/s): the "
           "machine's load changed, re-run the row with `--only`. "
           if any("speedup_spread" in r for r in rows.values()) else
           f"decode tok/s ÷ the engine's plain greedy decode tok/s ({base['decode_tok_s']:.1f}, measured first"
           + (f"; measured again last: {report['plain_last']['decode_tok_s']:.1f}, a drift of "
              f"{report['plain_last']['decode_tok_s'] / base['decode_tok_s'] - 1:+.0%}" if "plain_last" in report
              else "") + "). ")
        + "Mean accepted = drafted "
        "tokens accepted per verification step (τ − 1 in Spec-Bench's terms; each step also emits the target's own "
        "token); acceptance rate = accepted ÷ drafted tokens (every tree node counts as drafted). Drafting overhead = "
        "share of decode time spent proposing. Set-up = draft construction / datastore / head training (a cached "
        "artefact shows what it cost when it was made). Lossless = prompts whose greedy output is identical to plain "
        "greedy's. HF rows: transformers `generate` (its own decode loop, not the engine) with "
        "`prompt_lookup_num_tokens` / `assistant_model` — peers, with their speed-up also relative to the engine."
        + (f" llama.cpp rows run the target's own quantized GGUF (`{Path(report['gguf']).name}`), not the float32 "
           "weights the engine decodes: their tokens differ from plain greedy's by quantization, not by drafting."
           if "gguf" in report else "")
        + (" Medusa is left out of this pair run: its heads train on self-generated text through the target's "
           "LM head (16 answers × 96 tokens), minutes more set-up on a 1.5B model on 2 cores; `--with-medusa` adds "
           "it (its SmolLM2 row is in table5.md)." if draft is not None and "medusa" not in rows else ""),
        "",
        "| method | draft | draft construction | verifier | set-up cost | drafting overhead | mean accepted "
        "| acceptance rate | decode tok/s | speed-up | lossless (identical greedy) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | | | | | | | | failed: {row['error'][:80]} | | |")
            continue
        draft, construction, verifier = DESCRIPTIONS.get(row.get("technique", ""), ("—", "—", "—"))
        if name == "engine plain greedy":
            draft, construction, verifier = "—", "—", "—"
        if row.get("technique") == "draft_model" and "source" in row.get("config", {}):
            construction = f"none: an existing smaller model of the family ({row['config']['source']})"
        setup = f"{row['setup_s']:.1f} s" if "setup_s" in row else "—"
        if "training" in row:
            training = row["training"]
            setup = (f"{training['total_seconds']:.0f} s training ({training['generated_tokens']} self-generated "
                     f"tokens){' (cached)' if training.get('cached') else ''}")
        overhead = (f"{row['draft_seconds'] / row['decode_seconds']:.0%} of decode" if row.get("draft_seconds")
                    else "—")
        identical = (f"{row['identical_to_plain_greedy']}/{row['prompts']}" if "identical_to_plain_greedy" in row
                     else "reference")
        accepted = (f"{row['mean_accepted']:.2f} | {row['acceptance_rate']:.2f}" if "mean_accepted" in row
                    else "— | —")
        speedup = f"{row['speedup_vs_engine_plain']:.2f}×"
        if spread := row.get("speedup_spread"):
            speedup += f" [{spread[0]:.2f}–{spread[1]:.2f}]"
        if row.get("drift"):
            speedup += " ⚠"
        lines.append(f"| {name} | {draft} | {construction} | {verifier} | {setup} | {overhead} | {accepted} | "
                     f"{row['decode_tok_s']:.1f} | {speedup} | {identical} |")
    lines += ["", "Per prompt category — decode tok/s (mean accepted tokens):", "",
              "| method | " + " | ".join(PROMPT_CATEGORIES) + " |", "|---|" + "---|" * len(PROMPT_CATEGORIES)]
    for name, row in rows.items():
        if "per_category_tok_s" not in row:
            continue
        cells = []
        for category in PROMPT_CATEGORIES:
            cell = f"{row['per_category_tok_s'].get(category, float('nan')):.1f}"
            if "per_category_mean_accepted" in row:
                cell += f" ({row['per_category_mean_accepted'].get(category, 0.0):.2f})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
