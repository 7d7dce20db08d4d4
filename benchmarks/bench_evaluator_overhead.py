"""Evaluator overhead: decode tokens/s measured through the evaluator vs a bare decode loop.

Both paths run the same model in the same process, interleaved round by round so that
machine load affects both alike:

- **bare**: the composition's default decoding strategy called directly on pre-encoded
  ids, timed with ``perf_counter`` around nothing but ``strategy.generate``;
- **evaluator**: ``Evaluator.evaluate([])`` with a speed-only suite (same prompt length and
  token count), i.e. a model reload, the composed model's ``generate`` (data stage,
  encoding), the cache recorder and the timing harness.

Run::

    .venv/bin/python benchmarks/bench_evaluator_overhead.py --rounds 3 --new-tokens 64

Prints the medians, the ratio evaluator ÷ bare as the median of per-round ratios (each
round's bare median next to that round's evaluator measurement, the order alternating
round by round) with its min–max, and the load average before and after (the machine may
be shared; compare the ratio, not the absolute numbers). ``--quick`` (2 rounds of 2 runs,
16 tokens) checks the script in a minute.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from effinfer.core.compose import ComposedModel
from effinfer.core.generation import GenerationConfig, encode_prompts, stop_token_ids
from effinfer.core.models import DEFAULT_MODEL, load_model
from effinfer.evaluation import Evaluator, get_suite
from effinfer.evaluation.metrics.timing import load_average, paired_ratios
from effinfer.evaluation.phases import speed_prompts


def speed_only_suite(prompt_tokens: int, new_tokens: int, repeats: int):
    return get_suite("quick").with_changes(
        name="overhead", perplexity=None, fidelity=None, tasks=None, generation=None, roofline=None, memory=None,
        speed={"prompt_lengths": [prompt_tokens], "batch_sizes": [1], "new_tokens": new_tokens, "warmup": 1,
               "repeats": repeats},
    )


def bare_rates(model, tokenizer, prompt: str, new_tokens: int, repeats: int) -> list[float]:
    """Decode tokens/s of the default strategy called directly (one warm-up run first)."""
    strategy = ComposedModel(model, tokenizer).strategy
    config = GenerationConfig(max_new_tokens=new_tokens, chat_template=False)
    ids, mask = encode_prompts(tokenizer, [prompt], chat_template=False)
    stops = stop_token_ids(tokenizer, model, config)
    rates = []
    for run in range(repeats + 1):
        result = strategy.generate(model, ids, mask, config, stops)
        if run:  # the first run is the warm-up
            rates.append((result.new_tokens - 1) / result.decode_seconds)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="check the script: 2 rounds of 2 runs, 16 new tokens")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.repeats, args.new_tokens = 2, 2, 16
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model)
    suite = speed_only_suite(args.prompt_tokens, args.new_tokens, args.repeats)
    cell = f"speed.p{args.prompt_tokens}_b1.decode_tok_s"
    bare: list[float] = []  # one median per round
    through: list[float] = []
    started, load_before = time.perf_counter(), load_average()
    with Evaluator((model, tokenizer), suite=suite, store=False, model_name=args.model) as evaluator:
        ids = evaluator.corpus_ids("wikipedia", tokenizer, args.prompt_tokens)
        prompt = speed_prompts(ids, tokenizer, args.prompt_tokens, 1)[0]

        def via_evaluator() -> float:
            evaluator.baseline_record = None  # measure the baseline again this round
            record = evaluator.baseline()
            if not record.ok:
                raise SystemExit(f"the evaluator failed: {record.error}")
            return record.metrics[cell].value

        for index in range(args.rounds):  # the order alternates, so a drift hits both sides alike
            if index % 2:
                through.append(via_evaluator())
            bare.append(statistics.median(bare_rates(model, tokenizer, prompt, args.new_tokens, args.repeats)))
            if not index % 2:
                through.append(via_evaluator())
    ratio = paired_ratios(through, bare)
    print(f"model {args.model}; prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, batch 1; "
          f"torch threads {torch.get_num_threads()}; load average before {load_before}, after {load_average()} "
          f"(all three: {os.getloadavg()})")
    print(f"bare loop : median {statistics.median(bare):.2f} tok/s over {len(bare)} rounds of {args.repeats} runs "
          f"(min {min(bare):.2f}, max {max(bare):.2f})")
    print(f"evaluator : median {statistics.median(through):.2f} tok/s over {len(through)} medians of {args.repeats} "
          f"runs (min {min(through):.2f}, max {max(through):.2f})")
    print(f"ratio evaluator / bare = {ratio.median:.3f} [{ratio.low:.3f}–{ratio.high:.3f}] (median of {ratio.n} "
          f"per-round ratios) ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
