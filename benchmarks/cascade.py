"""Sample-level dynamic inference on SmolLM2-135M: the cascade's escalation curve on BIG-bench, one run.

    /work/notes/cpu-exclusive .venv/bin/python benchmarks/cascade.py
    .venv/bin/python benchmarks/cascade.py --limit 4 --cheap layer_drop:drop=6,n_samples=8,seq_len=256    # a quick trial

A request is one multiple-choice question of the project's BIG-bench tasks (``--limit``
examples of each of the five tasks a 135M model solves above chance), answered zero-shot as
the evaluator does (each choice scored as a continuation of ``Q: …\\nA:``, the most likely
one is the answer). The cheap model is built from a copy of the full model by the
``--cheap`` techniques through the ``cascade`` technique's own path
(:func:`~effinfer.plugins.model.dynamic_inference.cascade.build_cheap`); its confidence in
its answer is the ``cascade`` technique's signal, the answer's mean token log-probability
under the cheap model, and a request escalates when it is below the threshold
(:meth:`CascadeDecoding.escalate`).

Both models answer every request and each answer is timed (wall clock per request,
alternating cheap and full so both see the same machine state); the cascade at threshold
``t`` then costs, per request, the cheap model's time plus, when escalated, the full model's
time, and answers with the full model's answer when escalated. Rows: the full model alone, the
cheap model alone, and the cascade at each threshold: fraction escalated, accuracy, mean
latency per request and its ratio to the full model's. Writes
``benchmarks/results/model.compression.dynamic_inference.sample_level/cascade.md``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.progress import track

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import machine_load, table_header, write_table  # noqa: E402

from effinfer.core.models import DEFAULT_MODEL, load_model  # noqa: E402
from effinfer.data.bigbench import task_examples  # noqa: E402
from effinfer.evaluation.metrics.multiple_choice import (TARGET_DELIMITER, choice_log_likelihoods,  # noqa: E402
                                                         context_text, encode_pair)
from effinfer.plugins.model.dynamic_inference.cascade import CascadeDecoding, build_cheap  # noqa: E402

TASKS = ("general_knowledge", "phrase_relatedness", "social_iqa", "goal_step_wikihow", "emoji_movie")
#: spans the cheap model's confidence quartiles (-9.0 / -7.5 / -5.9 in the 2026-12-02 run) and above
THRESHOLDS = (-3.0, -5.0, -6.0, -7.0, -8.0, -9.0, -10.0)


def answer(model: Any, tokenizer: Any, example: dict[str, Any]) -> tuple[int, float, float]:
    """The model's choice, its mean token log-probability, and the seconds the answer took."""
    context = context_text(example["question"])
    started = time.perf_counter()
    scores = choice_log_likelihoods(model, tokenizer, context, list(example["choices"]))
    seconds = time.perf_counter() - started
    choice = max(range(len(scores)), key=lambda i: scores[i])
    length = len(encode_pair(tokenizer, context, TARGET_DELIMITER + example["choices"][choice])[1])
    return choice, scores[choice] / max(length, 1), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cheap", nargs="+", default=["layer_drop:drop=8,n_samples=8,seq_len=256"],
                        help="techniques that make the cheap model (as the cascade's `cheap` option)")
    parser.add_argument("--limit", type=int, default=12, help="examples per task")
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--thresholds", type=float, nargs="*", default=list(THRESHOLDS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = machine_load()
    model, tokenizer = load_model(DEFAULT_MODEL)
    started = time.perf_counter()
    cheap, notes = build_cheap(model, tokenizer, args.cheap)
    built = time.perf_counter() - started
    print(f"cheap model built in {built:.1f} s: {notes}", flush=True)
    examples = [(task, e) for task in args.tasks for e in task_examples(task, limit=args.limit)]
    answer(model, tokenizer, examples[0][1])  # warm-up of both models
    answer(cheap, tokenizer, examples[0][1])
    records = []
    for index, (task, example) in enumerate(track(examples, description="requests (cheap and full)")):
        pair = [(cheap, "cheap"), (model, "full")]
        results = {}
        for m, name in pair if index % 2 == 0 else pair[::-1]:  # alternate the order
            results[name] = answer(m, tokenizer, example)
        correct = set(example["correct"]) or {example["gold"]}
        records.append({"task": task, "cheap_ok": results["cheap"][0] in correct, "cheap_conf": results["cheap"][1],
                        "cheap_s": results["cheap"][2], "full_ok": results["full"][0] in correct,
                        "full_s": results["full"][2], "agree": results["cheap"][0] == results["full"][0]})
    n = len(records)
    full_s = sum(r["full_s"] for r in records) / n
    cheap_s = sum(r["cheap_s"] for r in records) / n

    def stderr(p: float) -> float:
        return math.sqrt(p * (1 - p) / n)

    rows = [("full model alone", None, sum(r["full_ok"] for r in records) / n, full_s),
            ("cheap model alone", None, sum(r["cheap_ok"] for r in records) / n, cheap_s)]
    for threshold in args.thresholds:
        rule = CascadeDecoding(cheap, None, "log_prob", threshold)
        escalated = [rule.escalate(r["cheap_conf"], 0.0) for r in records]
        accuracy = sum(r["full_ok"] if e else r["cheap_ok"] for r, e in zip(records, escalated)) / n
        latency = sum(r["cheap_s"] + (r["full_s"] if e else 0.0) for r, e in zip(records, escalated)) / n
        rows.append((f"cascade, escalate when mean log-prob < {threshold:g}", sum(escalated) / n, accuracy, latency))
    command = "python benchmarks/cascade.py " + " ".join(sys.argv[1:])
    lines = table_header("Model cascade on SmolLM2-135M-Instruct (BIG-bench multiple choice)", command, args.threads,
                         f"; machine load (`uptime`) before `{load_before}`, after `{machine_load()}`")
    agree = sum(r["agree"] for r in records) / n
    confidences = sorted(r["cheap_conf"] for r in records)
    quartiles = ", ".join(f"{confidences[min(n - 1, int(q * n))]:.2f}" for q in (0.25, 0.5, 0.75))
    lines += [f"{n} requests: {args.limit} examples of each of {', '.join(args.tasks)} (zero-shot, the most likely "
              f"choice is the answer). Cheap model: `{' '.join(args.cheap)}` ({'; '.join(notes)}; built in "
              f"{built:.0f} s); it picks the full model's answer on {agree:.0%} of the requests; the quartiles of its "
              f"confidence (mean token log-prob of its answer) are {quartiles}. Both models answer "
              "every request, timed in this run (batch 1, eager, the order alternating); a cascade row's latency is "
              "the cheap model's time plus the full model's on the escalated requests, which take the full model's "
              f"answer. Accuracy ± its binomial standard error (±{stderr(0.5):.3f} at 50 %).", "",
              "| model | escalated | accuracy | mean latency / request | vs full model |", "|---|---|---|---|---|"]
    for name, escalated, accuracy, latency in rows:
        cell = "—" if escalated is None else f"{escalated:.0%}"
        lines.append(f"| {name} | {cell} | {accuracy:.3f} ± {stderr(accuracy):.3f} | {latency * 1000:.0f} ms | "
                     f"{latency / full_s:.2f}× |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_table("model.compression.dynamic_inference.sample_level", "cascade", text)


if __name__ == "__main__":
    main()
