"""Attention replacements with a recurrent state on SmolLM2-135M, against the original in the same run.

    /work/notes/cpu-exclusive timeout 600 .venv/bin/python benchmarks/structure_alternates.py        # the tables
    .venv/bin/python benchmarks/structure_alternates.py --quick --no-timing     # a check on a shared CPU

For each of ``hedgehog`` (kernel-based linear attention, sliding window ``--window``),
``mamba_convert`` (selective scan) and ``retention_convert`` (RetNet), and each replaced-layer
count of ``--counts``, the conversion runs through the technique's own stage hook (layer-wise fit
``--fit-steps`` per layer, then ``--repair-steps`` of end-to-end KD, both through the shared
repair service), then is measured next to the original in this process:

- quality: perplexity on ``--windows`` held-out windows of the wikipedia *test* split, KL to the
  original's next-token distribution and top-1 agreement with it;
- memory: the bytes the HF cache really holds after a ``--contexts`` prompt (softmax layers' KV
  plus the replaced layers' constant states), per token of context;
- speed (unless ``--no-timing``): ``--steps`` single-token decode forwards after that prompt,
  tok/s and the ratio to the original at the same context (HF forward over a ``DynamicCache``
  for both: the static engine runs only stock attention).

Tables go to ``benchmarks/results/<node>/alternates.md`` of the three nodes, the rows to
``artifacts/structure_alternates.json`` and the memory-vs-context plot to
``benchmarks/results/model.structure.transformer_alternates/memory_vs_context.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import ARTIFACTS, TABLES, machine_load, table_header, write_table  # noqa: E402

from effinfer.core.calibration import calibration_source  # noqa: E402
from effinfer.core.compose import ComposedModel  # noqa: E402
from effinfer.core.models import load_model  # noqa: E402
from effinfer.plugins.model.distillation.common import held_out_windows  # noqa: E402
from effinfer.plugins.model.structure.hedgehog import Hedgehog  # noqa: E402
from effinfer.plugins.model.structure.mamba import MambaConvert  # noqa: E402
from effinfer.plugins.model.structure.recurrent import state_bytes  # noqa: E402
from effinfer.plugins.model.structure.retention import RetentionConvert  # noqa: E402
from transformers import DynamicCache  # noqa: E402

NODES = {"hedgehog": Hedgehog.node, "mamba_convert": MambaConvert.node, "retention_convert": RetentionConvert.node}
CLASSES = {"hedgehog": Hedgehog, "mamba_convert": MambaConvert, "retention_convert": RetentionConvert}


@torch.inference_mode()
def quality(model, windows, reference):
    """Perplexity, KL(original ‖ model) and top-1 agreement on the held-out windows."""
    nll = kl = agree = count = 0.0
    for row, ref in zip(windows, reference):
        logits = model(input_ids=row[None], use_cache=False).logits[0, :-1].float()
        nll += float(F.cross_entropy(logits, row[1:], reduction="sum"))
        kl += float(F.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="sum"))
        agree += float((logits.argmax(-1) == ref.argmax(-1)).sum())
        count += logits.shape[0]
    return {"ppl": float(torch.tensor(nll / count).exp()), "kl": kl / count, "top1": agree / count}


@torch.inference_mode()
def memory_and_speed(model, text_ids, contexts, steps, timing):
    """Per context: cache bytes (KV + recurrent state) per token and decode tok/s after the prompt."""
    rows = {}
    for context in contexts:
        cache = DynamicCache(config=model.config)
        for start in range(0, context, 512):  # prefill in 512-token pieces (bounded memory for every model)
            model(input_ids=text_ids[None, start:min(start + 512, context)], cache=cache, use_cache=True)
        held = state_bytes(cache)
        row = {"kv_bytes": held["kv"], "state_bytes": held["state"],
               "bytes_per_token": (held["kv"] + held["state"]) / context}
        if timing:
            token = text_ids[None, context:context + 1]
            model(input_ids=token, cache=cache, use_cache=True)  # warm-up
            started = time.perf_counter()
            for i in range(steps):
                model(input_ids=text_ids[None, context + 1 + i:context + 2 + i], cache=cache, use_cache=True)
            row["tok_s"] = steps / (time.perf_counter() - started)
        rows[context] = row
        del cache
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(CLASSES), choices=list(CLASSES))
    parser.add_argument("--counts", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--contexts", nargs="+", type=int, default=[512, 2048, 8192])
    parser.add_argument("--window", type=int, default=64, help="hedgehog's exact sliding window")
    parser.add_argument("--fit-steps", type=int, default=60)
    parser.add_argument("--fit-samples", type=int, default=8)
    parser.add_argument("--repair-steps", type=int, default=20)
    parser.add_argument("--windows", type=int, default=4, help="held-out windows (256 tokens) for quality")
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per context")
    parser.add_argument("--no-timing", action="store_true", help="skip decode timing (a shared CPU)")
    parser.add_argument("--no-tables", action="store_true")
    parser.add_argument("--quick", action="store_true", help="counts 2, context 512, 8 fit steps, no repair")
    args = parser.parse_args()
    if args.quick:
        args.counts, args.contexts, args.fit_steps, args.repair_steps, args.windows = [2], [512], 8, 0, 2
    torch.manual_seed(0)
    started = time.perf_counter()
    model, tokenizer = load_model()
    model.eval()
    windows = held_out_windows(tokenizer, args.windows, 256)
    with torch.inference_mode():
        reference = [model(input_ids=row[None], use_cache=False).logits[0, :-1].float() for row in windows]
    from effinfer.core.calibration import corpus_tokens
    text = corpus_tokens(tokenizer, "wikipedia", "test")
    need = max(args.contexts) + args.steps + 2
    if len(text) < need:
        text = text.repeat(need // len(text) + 1)
    text = text[:need]
    threads = torch.get_num_threads()
    results = [{"method": "original", "count": 0, "quality": quality(model, windows, reference),
                "contexts": memory_and_speed(model, text, args.contexts, args.steps, not args.no_timing),
                "notes": []}]
    print(f"original: {results[0]['quality']} {results[0]['contexts']}", flush=True)
    calibration = calibration_source(tokenizer, 0)
    for method in args.methods:
        for count in args.counts:
            config = {"count": count, "fit_steps": args.fit_steps, "fit_samples": args.fit_samples,
                      "repair_steps": args.repair_steps, "repair_eval_windows": 0}
            if method == "hedgehog":
                config["window"] = args.window
            technique = CLASSES[method](config)
            began = time.perf_counter()
            with ComposedModel(model, tokenizer, [technique], calibration=calibration, engine="hf") as composed:
                setup = time.perf_counter() - began
                composed.model.eval()
                row = {"method": method, "count": count, "config": config, "setup_s": setup,
                       "quality": quality(composed.model, windows, reference),
                       "contexts": memory_and_speed(composed.model, text, args.contexts, args.steps,
                                                    not args.no_timing),
                       "notes": [note for _, _, note in composed.report.entries]}
            results.append(row)
            print(f"{method} x{count}: {row['quality']} {row['contexts']} setup {setup:.0f}s", flush=True)
    out = ARTIFACTS / "structure_alternates.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "threads": threads, "load": machine_load(),
                               "seconds": time.perf_counter() - started, "rows": results}, indent=1))
    print(f"rows: {out} ({time.perf_counter() - started:.0f} s)")
    if not args.no_tables:
        write_tables(results, args, threads)


def write_tables(results, args, threads) -> None:
    command = "python benchmarks/structure_alternates.py " + " ".join(sys.argv[1:])
    base = results[0]
    header = ["| method | layers replaced | ppl | KL to original | top-1 | setup s | "
              + " | ".join(f"B/token @{c}" for c in args.contexts)
              + ("" if args.no_timing else " | " + " | ".join(f"decode @{c} (×orig)" for c in args.contexts)) + " |",
              "|" + "---|" * (6 + len(args.contexts) * (1 if args.no_timing else 2))]

    def line(row):
        q, ctx = row["quality"], row["contexts"]
        cells = [row["method"], str(row["count"]), f"{q['ppl']:.2f}", f"{q['kl']:.3f}", f"{q['top1']:.3f}",
                 f"{row.get('setup_s', 0):.0f}"]
        cells += [f"{ctx[c]['bytes_per_token']:,.0f}" for c in args.contexts]
        if not args.no_timing:
            cells += [f"{ctx[c]['tok_s']:.1f} ({ctx[c]['tok_s'] / base['contexts'][c]['tok_s']:.2f}×)"
                      for c in args.contexts]
        return "| " + " | ".join(cells) + " |"

    for method, node in NODES.items():
        rows = [r for r in results if r["method"] == method]
        if not rows:
            continue
        text = table_header(f"{method} on SmolLM2-135M vs the original (same run)", command, threads,
                            f"\n- load: {machine_load()}") + header + [line(base)] + [line(r) for r in rows]
        text += ["", "Bytes per token: what the HF cache holds after the prompt (softmax layers' KV + the replaced "
                 "layers' constant state) divided by the context; the original holds 30 layers of KV.", ""]
        text += [f"- {r['method']} ×{r['count']}: " + "; ".join(r["notes"]) for r in rows]
        print(write_table(node, "alternates", "\n".join(text) + "\n"))
    plot(results, args)


def plot(results, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (total, per_token) = plt.subplots(1, 2, figsize=(10, 4))
    for row in results:
        label = row["method"] if row["count"] == 0 else f"{row['method']} ×{row['count']}"
        held = [row["contexts"][c] for c in args.contexts]
        total.plot(args.contexts, [(h["kv_bytes"] + h["state_bytes"]) / 2**20 for h in held], "o-", label=label)
        per_token.plot(args.contexts, [h["state_bytes"] / c / 1024 if row["count"] else h["kv_bytes"] / c / 1024 / 30
                                       for h, c in zip(held, args.contexts)], "o-", label=label)
    for axis in (total, per_token):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context (tokens)")
        axis.legend(fontsize=7)
    total.set_ylabel("cache MiB (KV + recurrent states)")
    total.set_title("SmolLM2-135M: cache held after the prompt")
    per_token.set_yscale("log")
    per_token.set_ylabel("KiB per token per layer")
    per_token.set_title("replaced layers' state vs one softmax layer's KV")
    figure.tight_layout()
    path = TABLES / "model.structure.transformer_alternates" / "memory_vs_context.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    print(path)


if __name__ == "__main__":
    main()
