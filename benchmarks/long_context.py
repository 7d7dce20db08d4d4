"""Long context on SmolLM2-135M: KV-cache policies at 8k tokens against the full cache, in one run.

    flock -x /tmp/effinfer-cpu.lock .venv/bin/python benchmarks/long_context.py            # 8k, budget 1024
    .venv/bin/python benchmarks/long_context.py --context 1024 --budget 128 --no-tables    # a quick check

Each method makes one pass (``effinfer.evaluation.tasks_long_context.one_pass``) over the same
haystack: a Shakespeare play's first ``--context`` tokens with a needle (a 6-digit passcode) at
half depth and a question at the end. Per method: token perplexity of the text up to 2k, 4k
and ~8k, decode tok/s at those contexts (16 single-token forwards timed at each mark), the
bytes the cache really holds per token, and whether the greedy answer is the passcode. The
methods run one after another in one process, on 2 threads; a ``--time-budget`` stops adding
methods (the essential ones come first). Speed-ups divide by the full cache measured in the
same run. Tables go to ``benchmarks/results/<node>/long_context.md`` of the three nodes
(sparse attention static / dynamic, KV-cache quantization). Timing runs share the CPU with
nobody: run it as ``flock -x /tmp/effinfer-cpu.lock …``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import ARTIFACTS, machine_load, table_header, write_table  # noqa: E402

from effinfer.core.kv_cache import policy_cache  # noqa: E402
from effinfer.core.models import load_model  # noqa: E402
from effinfer.evaluation.tasks_long_context import long_document, one_pass  # noqa: E402
from effinfer.plugins.model.kv_cache import KiviPolicy, PerTokenQuantPolicy  # noqa: E402
from effinfer.plugins.model.sparse_attention import (HeavyHitterPolicy, LastQueryPolicy,  # noqa: E402
                                                     ObservationPolicy, RecentPolicy, SinkWindowPolicy)

STATIC = "model.compression.sparsification.sparse_attention.static"
DYNAMIC = "model.compression.sparsification.sparse_attention.dynamic"
KV = "model.compression.quantization.ptq.kv_cache"


def methods(budget: int):
    """(row, node, policy factory or None) — essential rows first."""
    return [
        ("full cache (fp32)", None, None),
        (f"streaming_llm budget={budget} sinks=4", STATIC, lambda: SinkWindowPolicy(budget, 4)),
        (f"snapkv budget={budget} obs=32", DYNAMIC, lambda: ObservationPolicy(budget, 32, 7)),
        ("kivi 2-bit group=32", KV, lambda: KiviPolicy(2, 32)),
        (f"h2o budget={budget} recent={budget // 2}", DYNAMIC, lambda: HeavyHitterPolicy(budget, budget // 2)),
        (f"tova budget={budget}", DYNAMIC, lambda: LastQueryPolicy(budget, 0)),
        (f"sliding_window budget={budget}", STATIC, lambda: RecentPolicy(budget)),
        ("kv_int4 per token", KV, lambda: PerTokenQuantPolicy(4)),
        ("kivi 4-bit group=32", KV, lambda: KiviPolicy(4, 32)),
        ("kv_int8 per token", KV, lambda: PerTokenQuantPolicy(8)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--time-budget", type=float, default=330, help="seconds after which no new method starts")
    parser.add_argument("--no-tables", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m-instruct")
    document = long_document(tokenizer, args.context)
    marks = [m for m in (2048, 4096) if m < args.context - 64] + [args.context - 32]
    rows = []
    for name, node, make in methods(args.budget):
        if time.perf_counter() - began > args.time_budget:
            print(f"time budget reached: {name} not run", flush=True)
            continue
        factory = None if make is None else policy_cache(lambda i, c, make=make: make(), name)
        result = one_pass(model, tokenizer, args.context, 0.5, factory, marks, document=document)
        row = {"method": name, "node": node, "needle": result.correct, "answer": result.answer.strip(),
               "ppl": {m: float(torch.tensor(result.nll[m] / result.scored[m]).exp()) for m in result.nll},
               "tok_s": result.tok_s, "kv_bytes_per_token": {m: result.kv_bytes[m] / (m + 16) for m in result.kv_bytes},
               "seconds": result.seconds}
        rows.append(row)
        print(json.dumps(row), flush=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "long_context_benchmark.json").write_text(json.dumps(rows, indent=1))
    if not args.no_tables:
        write_tables(rows, marks, args)


def write_tables(rows, marks, args) -> None:
    full = rows[0]
    last = marks[-1]
    command = (f"flock -x /tmp/effinfer-cpu.lock .venv/bin/python benchmarks/long_context.py --context {args.context} "
               f"--budget {args.budget}")
    for node, title in ((STATIC, "Static sparse attention at long context"),
                        (DYNAMIC, "Dynamic sparse attention at long context"),
                        (KV, "KV-cache quantization at long context")):
        chosen = [full] + [r for r in rows if r["node"] == node]
        if len(chosen) == 1:
            continue
        lines = table_header(f"{title} (SmolLM2-135M, {args.context} tokens)", command, args.threads,
                             f"; load before: {machine_load()}")
        lines += [f"One pass per method over the same haystack (a Shakespeare play, a 6-digit needle at half depth, "
                  f"the question at the end); KV bytes read after the 16 timed decode steps at each context; decode tok/s = 16 single-token forwards timed at each context; "
                  f"speed-up ÷ the full cache in the same run; KV bytes = what the cache object really holds "
                  f"(packed codes, scales, kept entries, index buffers) ÷ tokens.", "",
                  "| method | needle | ppl " + " | ppl ".join(f"{m}" for m in marks) + " | "
                  + " | ".join(f"tok/s {m} (×full)" for m in marks) + f" | KV bytes/token @{last} (÷fp32) |",
                  "|---" * (3 + 2 * len(marks)) + "|"]
        for r in chosen:
            ppl = " | ".join(f"{r['ppl'][m]:.2f}" for m in marks)
            speed = " | ".join(f"{r['tok_s'][m]:.1f} ({r['tok_s'][m] / full['tok_s'][m]:.2f}×)" for m in marks)
            kv = r["kv_bytes_per_token"][last]
            lines.append(f"| {r['method']} | {'✓' if r['needle'] else '✗'} `{r['answer'][:12].replace(chr(10), '⏎').replace('|', '¦')}` | {ppl} | {speed} | "
                         f"{kv:,.0f} (1/{full['kv_bytes_per_token'][last] / kv:.1f}) |")
        lines += ["", "Peers: transformers' `QuantizedCache` needs `optimum-quanto` or `hqq` (not installed here) and "
                      "`OffloadedCache` offloads to CPU from an accelerator (this machine has none); kvpress is not "
                      "installed. Not run.", ""]
        print(write_table(node, "long_context", "\n".join(lines)))


if __name__ == "__main__":
    main()
