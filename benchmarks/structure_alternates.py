"""Attention replacements with a recurrent state on SmolLM2-135M, against the original, one method per run.

    # untimed rows (quality + memory), one method per run, on a shared CPU:
    /work/notes/cpu-shared timeout 600 .venv/bin/python benchmarks/structure_alternates.py --methods original --no-timing
    /work/notes/cpu-shared timeout 600 .venv/bin/python benchmarks/structure_alternates.py --methods hedgehog --counts 2 4 --no-timing
    /work/notes/cpu-shared timeout 600 .venv/bin/python benchmarks/structure_alternates.py --methods hedgehog --counts all --no-timing
    # timed rows (decode tok/s next to the original measured in the same process), the CPU to itself:
    /work/notes/cpu-exclusive timeout 600 .venv/bin/python benchmarks/structure_alternates.py --methods mamba_convert --counts 4 all
    # rewrite the tables and the plot from every row measured so far (no model loaded):
    .venv/bin/python benchmarks/structure_alternates.py
    .venv/bin/python benchmarks/structure_alternates.py --methods hedgehog --quick --no-timing --no-tables  # a check

For each method of ``--methods`` (``hedgehog``: kernel-based linear attention with an exact
sliding window of ``--window`` keys; ``mamba_convert``: selective scan; ``retention_convert``:
RetNet retention; ``linformer``: Linformer-style low-rank attention, ``--slots`` learned slots per KV head
after an exact window of ``--window`` keys; ``linformer_pooled``: the same with the pooled projection,
``--pool-block`` positions per slot) and each replaced-layer count of ``--counts`` (``all``: every decoder layer,
layer 0 included, so the model holds no per-token KV at all), the conversion runs through the
technique's own stage hook (layer-wise fit ``--fit-steps`` per layer, then ``--repair-steps`` of
end-to-end KD, both through the shared repair service), then is measured in this process:

- quality: perplexity on ``--windows`` held-out 256-token windows of the wikipedia *test* split, KL
  to the original's next-token distribution and top-1 agreement with it (the original's logits are
  computed in the same process);
- parameters of the converted model;
- long-range quality: the perplexity of the ``--contexts`` prompt itself, read in 512-token pieces
  each with the cache of all tokens before it;
- memory: the bytes the HF cache really holds after a ``--contexts`` prompt (softmax layers' KV
  plus the replaced layers' constant states), total and per token of context, and the bytes each
  further token of context adds (first to last context);
- speed (unless ``--no-timing``): ``--steps`` single-token decode forwards after that prompt, tok/s
  and the ratio to the original timed in the same process (HF forward over a ``DynamicCache`` for
  both: the static engine runs only stock attention and hands these models to the HF path).

Every row is saved as it is measured, one JSON per (method, count) under
``artifacts/structure_alternates/`` (the original's row: ``original.json``; a method run with
``--no-timing`` measures the original's memory and long-range perplexity only when that file lacks
a context). The tables
(``benchmarks/results/<node>/alternates.md`` of the three nodes) and the memory-vs-context plot
(``memory_vs_context.png`` next to each node's table, and
``docs/guides/structure-memory-vs-context.png`` for the guide) are rebuilt from *all* saved rows
after each run, so runs of different methods add up. ``--time-budget`` stops starting new
conversions so one run stays inside a 10-minute lock.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import ARTIFACTS, TABLES, machine_load, table_header, write_table  # noqa: E402

NODES = {"hedgehog": "model.structure.efficient_attention.low_complexity.kernel_based",
         "mamba_convert": "model.structure.transformer_alternates.ssm",
         "retention_convert": "model.structure.transformer_alternates.other",
         "linformer": "model.structure.efficient_attention.low_complexity.low_rank",
         "linformer_pooled": "model.structure.efficient_attention.low_complexity.low_rank"}
ROWS_DIR = ARTIFACTS / "structure_alternates"
#: the plot goes next to each node's table (node pages show their folder's PNGs) and into the guide
PLOTS = [TABLES / node / "memory_vs_context.png" for node in dict.fromkeys(NODES.values())]
GUIDE_PLOT = Path(__file__).resolve().parent.parent / "docs" / "guides" / "structure-memory-vs-context.png"


def technique_classes():
    from effinfer.plugins.model.structure.hedgehog import Hedgehog
    from effinfer.plugins.model.structure.linformer import Linformer
    from effinfer.plugins.model.structure.mamba import MambaConvert
    from effinfer.plugins.model.structure.retention import RetentionConvert

    return {"hedgehog": Hedgehog, "mamba_convert": MambaConvert, "retention_convert": RetentionConvert,
            "linformer": Linformer, "linformer_pooled": Linformer}


def row_path(method: str, count: int) -> Path:
    return ROWS_DIR / ("original.json" if method == "original" else f"{method}-x{count}.json")


def save_row(row: dict) -> None:
    ROWS_DIR.mkdir(parents=True, exist_ok=True)
    row_path(row["method"], row["count"]).write_text(json.dumps(row, indent=1))


def load_rows() -> list[dict]:
    rows = [json.loads(p.read_text()) for p in sorted(ROWS_DIR.glob("*.json"))] if ROWS_DIR.is_dir() else []
    for row in rows:  # JSON keys are strings
        row["contexts"] = {int(c): v for c, v in row["contexts"].items()}
    return rows


def merge_saved_contexts(row: dict) -> None:
    """Keep the contexts a saved row of the same method, count, config and timing has and ``row`` lacks
    (``--merge-contexts``: one row measured over several runs, each inside a 10-minute lock)."""
    path = row_path(row["method"], row["count"])
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    if saved.get("config") != row["config"] or saved.get("timed") != row["timed"]:
        print(f"{path.name}: saved row has another config or timing; not merged", flush=True)
        return
    contexts = {int(c): v for c, v in saved["contexts"].items()}
    contexts.update(row["contexts"])
    row["contexts"] = dict(sorted(contexts.items()))
    row["command"] = "; ".join(dict.fromkeys([saved["command"], row["command"]]))
    if saved.get("baseline_tok_s") and row.get("baseline_tok_s") is not None:
        row["baseline_tok_s"] = {**saved["baseline_tok_s"], **{str(c): v for c, v in row["baseline_tok_s"].items()}}


def parameters(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


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
    """Per context: cache bytes (KV + recurrent state), the perplexity of the prompt's tokens (each read with
    the cache of all before it: long-range quality) and decode tok/s after the prompt."""
    from transformers import DynamicCache

    from effinfer.plugins.model.structure.recurrent import state_bytes

    rows = {}
    for context in contexts:
        cache = DynamicCache(config=model.config)
        began = time.perf_counter()
        nll = 0.0
        for start in range(0, context, 512):  # prefill in 512-token pieces (bounded memory for every model)
            end = min(start + 512, context)
            logits = model(input_ids=text_ids[None, start:end], cache=cache, use_cache=True).logits[0].float()
            targets = text_ids[start + 1:min(end + 1, context)]  # the piece's last token predicts the next piece's first
            nll += float(F.cross_entropy(logits[:len(targets)], targets, reduction="sum"))
            del logits
        held = state_bytes(cache)
        row = {"kv_bytes": held["kv"], "state_bytes": held["state"],
               "bytes_per_token": (held["kv"] + held["state"]) / context,
               "ppl": float(torch.tensor(nll / (context - 1)).exp()),
               "prefill_s": time.perf_counter() - began}
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
    parser.add_argument("--methods", nargs="+", choices=["original", *NODES],
                        help="measure these (the original is measured too when needed); without it, only rewrite "
                             "the tables and the plot from the rows saved so far")
    parser.add_argument("--counts", nargs="+", default=["2", "4"],
                        help="replaced-layer counts (integers, or 'all' for every decoder layer)")
    parser.add_argument("--contexts", nargs="+", type=int, default=[512, 2048, 8192])
    parser.add_argument("--window", type=int, default=64, help="hedgehog's and linformer's exact sliding window")
    parser.add_argument("--slots", type=int, default=64, help="linformer's compressed rows per KV head")
    parser.add_argument("--pool-block", type=int, default=128, help="linformer_pooled's positions per slot")
    parser.add_argument("--sinks", type=int, default=1, help="linformer's slots kept for the first tokens alone")
    parser.add_argument("--fit-steps", type=int, default=60)
    parser.add_argument("--fit-samples", type=int, default=8)
    parser.add_argument("--repair-steps", type=int, default=20)
    parser.add_argument("--windows", type=int, default=4, help="held-out windows (256 tokens) for quality")
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per context")
    parser.add_argument("--no-timing", action="store_true", help="skip decode timing (a shared CPU)")
    parser.add_argument("--time-budget", type=float, default=480,
                        help="seconds after which no new conversion starts")
    parser.add_argument("--no-tables", action="store_true")
    parser.add_argument("--merge-contexts", action="store_true",
                        help="keep the other contexts of a saved row of the same method, count and config (one "
                             "row measured over several runs)")
    parser.add_argument("--quick", action="store_true", help="count 2, context 512, 8 fit steps, no repair, no "
                        "tables (rows under artifacts/structure_alternates_quick/)")
    args = parser.parse_args()
    if args.quick:  # its rows go elsewhere: they never mix into the tables
        global ROWS_DIR
        args.counts, args.contexts, args.fit_steps, args.repair_steps, args.windows = ["2"], [512], 8, 0, 2
        ROWS_DIR, args.no_tables = ROWS_DIR.with_name("structure_alternates_quick"), True
    if args.methods:
        measure(args)
    if not args.no_tables:
        write_tables()


def measure(args) -> None:
    from effinfer.core.calibration import calibration_source, corpus_tokens
    from effinfer.core.compose import ComposedModel
    from effinfer.core.models import load_model
    from effinfer.plugins.model.distillation.common import held_out_windows
    from effinfer.plugins.model.quantization.layerwise import decoder_layers

    torch.manual_seed(0)
    started = time.perf_counter()
    timing = not args.no_timing
    command = "python benchmarks/structure_alternates.py " + " ".join(sys.argv[1:])
    model, tokenizer = load_model()
    model.eval()
    total_layers = len(decoder_layers(model)[1])
    counts = sorted({total_layers if c == "all" else int(c) for c in args.counts})
    windows = held_out_windows(tokenizer, args.windows, 256)
    with torch.inference_mode():
        reference = [model(input_ids=row[None], use_cache=False).logits[0, :-1].float() for row in windows]
    text = corpus_tokens(tokenizer, "wikipedia", "test")
    need = max(args.contexts) + args.steps + 2
    if len(text) < need:
        text = text.repeat(need // len(text) + 1)
    text = text[:need]
    common = {"threads": torch.get_num_threads(), "command": command, "timed": timing, "windows": args.windows,
              "total_layers": total_layers}
    # the original: its quality is cheap; its memory pass (and, timed, its speed) only when needed
    stored = row_path("original", 0)
    old = json.loads(stored.read_text()) if stored.exists() else None
    missing = [c for c in args.contexts if old is None or "ppl" not in old["contexts"].get(str(c), {})]
    baseline = None
    if timing or "original" in args.methods or missing:
        contexts = args.contexts if (timing or "original" in args.methods) else missing
        measured = memory_and_speed(model, text, contexts, args.steps, timing)
        merged = {} if old is None else {int(c): v for c, v in old["contexts"].items()}
        merged.update(measured)
        original = {"method": "original", "count": 0, "parameters": parameters(model),
                    "quality": quality(model, windows, reference), "contexts": merged, "load": machine_load(),
                    **common}
        save_row(original)
        baseline = measured if timing else None
        print(f"original: {original['quality']} {measured}", flush=True)
    calibration = calibration_source(tokenizer, 0)
    classes = technique_classes()
    for method in [m for m in args.methods if m != "original"]:
        for count in counts:
            if time.perf_counter() - started > args.time_budget:
                print(f"time budget reached: {method} x{count} not run", flush=True)
                continue
            config = {"count": count, "fit_steps": args.fit_steps, "fit_samples": args.fit_samples,
                      "repair_steps": args.repair_steps, "repair_eval_windows": 0}
            if method == "hedgehog":
                config["window"] = args.window
            if method.startswith("linformer"):  # linformer_pooled: the same technique, pooled projection
                config.update(window=args.window, slots=args.slots, sinks=args.sinks)
                if method == "linformer_pooled":
                    config.update(projection="pooled", pool_block=args.pool_block)
            technique = classes[method](config)
            began = time.perf_counter()
            with ComposedModel(model, tokenizer, [technique], calibration=calibration, engine="hf") as composed:
                setup = time.perf_counter() - began
                composed.model.eval()
                row = {"method": method, "count": count, "config": config, "setup_s": setup,
                       "parameters": parameters(composed.model),
                       "quality": quality(composed.model, windows, reference),
                       "contexts": memory_and_speed(composed.model, text, args.contexts, args.steps, timing),
                       "notes": [note for _, _, note in composed.report.entries], "load": machine_load(), **common}
            if baseline is not None:
                row["baseline_tok_s"] = {c: baseline[c]["tok_s"] for c in args.contexts}
            if args.merge_contexts:
                merge_saved_contexts(row)
            save_row(row)
            print(f"{method} x{count}: {row['quality']} {row['contexts']} setup {setup:.0f}s", flush=True)
    print(f"rows: {ROWS_DIR} ({time.perf_counter() - started:.0f} s)")


def fmt_ppl(value: float) -> str:
    return f"{value:.2f}" if value < 1e4 else f"{value:.2e}"


def method_label(row: dict) -> str:
    """The method, and for linformer its sink slots (rows measured before the option had none)."""
    if row["method"].startswith("linformer"):
        return f"{row['method']} (sinks {row.get('config', {}).get('sinks', 0)})"
    return row["method"]


def fmt_count(row: dict) -> str:
    if row["method"] == "original":
        return "0"
    return f"{row['count']} (all)" if row["count"] == row.get("total_layers") else str(row["count"])


def added_per_token(row: dict) -> str:
    """Bytes each further token of context adds, between the first and the last context measured."""
    contexts = sorted(row["contexts"])
    if len(contexts) < 2:
        return "–"
    first, last = row["contexts"][contexts[0]], row["contexts"][contexts[-1]]
    held = lambda h: h["kv_bytes"] + h["state_bytes"]  # noqa: E731
    return f"{(held(last) - held(first)) / (contexts[-1] - contexts[0]):,.0f}"


def write_tables() -> None:
    rows = load_rows()
    original = next((r for r in rows if r["method"] == "original"), None)
    if original is None:
        print(f"no original row in {ROWS_DIR}: run with --methods original first")
        return
    contexts = sorted(original["contexts"])
    for node in dict.fromkeys(NODES.values()):  # one table per node, every method of it (linformer: two)
        methods = [m for m, n in NODES.items() if n == node]
        chosen = sorted((r for r in rows if r["method"] in methods), key=lambda r: (methods.index(r["method"]),
                                                                                     r["count"]))
        if not chosen:
            continue
        timed = [r for r in chosen if r.get("baseline_tok_s")]
        header = ("| method | layers replaced | fit / repair steps | params (M) | ppl | KL to original | top-1 | "
                  "setup s | " + " | ".join(f"cache MiB @{c}" for c in contexts) + " | "
                  + " | ".join(f"B/token @{c}" for c in contexts) + " | B added per token | "
                  + " | ".join(f"ppl of {c} tokens" for c in contexts) + " |"
                  + "".join(f" decode @{c} (×orig) |" for c in contexts if timed))
        lines = [header, "|---" * (header.count("|") - 1) + "|"]

        def line(row: dict) -> str:
            q, ctx = row["quality"], row["contexts"]
            steps = (f"{row['config']['fit_steps']} / {row['config']['repair_steps']}" if "config" in row else "–")
            cells = [method_label(row), fmt_count(row), steps, f"{row['parameters'] / 1e6:.2f}", fmt_ppl(q["ppl"]),
                     f"{q['kl']:.3f}", f"{q['top1']:.3f}", f"{row['setup_s']:.0f}" if "setup_s" in row else "–"]
            cells += [f"{(ctx[c]['kv_bytes'] + ctx[c]['state_bytes']) / 2**20:.1f}" if c in ctx else "–"
                      for c in contexts]
            cells += [f"{ctx[c]['bytes_per_token']:,.0f}" if c in ctx else "–" for c in contexts]
            cells.append(added_per_token(row))
            cells += [fmt_ppl(ctx[c]["ppl"]) if "ppl" in ctx.get(c, {}) else "–" for c in contexts]
            if timed:
                base = row.get("baseline_tok_s") or {}
                cells += [f"{ctx[c]['tok_s']:.1f} ({ctx[c]['tok_s'] / base[str(c)]:.2f}×)"
                          if "tok_s" in ctx.get(c, {}) and str(c) in base else "–" for c in contexts]
            return "| " + " | ".join(cells) + " |"

        commands = sorted({r["command"] for r in chosen})
        text = table_header(f"{' / '.join(methods)} on SmolLM2-135M vs the original", "`; `".join(commands),
                            original["threads"],
                            f"\n- the original's row: `{original['command']}`"
                            + "".join(f"\n- load ({r['method']} ×{r['count']}): {r['load']}" for r in chosen))
        text += lines + [line(original)] + [line(r) for r in chosen]
        text += ["", "Quality: perplexity on held-out 256-token windows of the wikipedia test split, KL(original ‖ "
                 "converted) per token and top-1 agreement with the original's next token. Cache: the bytes the HF "
                 "cache holds after a prompt of that many tokens (the softmax layers' fp32 KV + the replaced layers' "
                 "constant states); B/token = that ÷ the context; B added per token = (cache at the longest context "
                 "− cache at the shortest) ÷ the tokens between them: 0 when every layer is replaced (the cache no "
                 "longer grows with the context). ppl of N tokens: perplexity of the first N tokens of the "
                 "wikipedia test split read in 512-token pieces, each with the cache of all tokens before it (the "
                 "long-range quality a 256-token window cannot show; hedgehog's exact window covers a quarter of "
                 "one). "
                 + ("Decode: single-token HF forwards after the prompt, the original timed in the same process."
                    if timed else "Not timed (these runs shared the CPU); see docs/guides/structure.md for the "
                                  "timed command."), ""]
        text += [f"- {r['method']} ×{r['count']}: " + "; ".join(r["notes"]) for r in chosen]
        print(write_table(node, "alternates", "\n".join(text) + "\n"))
    plot(rows, contexts)


def plot(rows: list[dict], contexts: list[int]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (total, per_token) = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in sorted(rows, key=lambda r: (r["method"] != "original", r["method"], r["count"])):
        label = "original" if row["method"] == "original" else f"{row['method']} ×{fmt_count(row)}"
        xs = [c for c in contexts if c in row["contexts"]]
        held = [row["contexts"][c]["kv_bytes"] + row["contexts"][c]["state_bytes"] for c in xs]
        style = "k-o" if row["method"] == "original" else ("s--" if row["count"] == row.get("total_layers") else "o-")
        total.plot(xs, [h / 2**20 for h in held], style, label=label)
        per_token.plot(xs, [h / c for h, c in zip(held, xs)], style, label=label)
    for axis in (total, per_token):
        axis.set_xscale("log", base=2)
        axis.set_xticks(contexts, [str(c) for c in contexts])
        axis.set_xlabel("context (tokens)")
        axis.legend(fontsize=7)
    total.set_yscale("log")
    total.set_ylabel("cache MiB (KV + recurrent states)")
    total.set_title("SmolLM2-135M: cache held after the prompt")
    per_token.set_yscale("log")
    per_token.set_ylabel("cache bytes ÷ context tokens")
    per_token.set_title("bytes per token of context")
    figure.tight_layout()
    for path in PLOTS:
        path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(PLOTS[0], dpi=110)
    for path in [*PLOTS[1:], GUIDE_PLOT]:
        shutil.copyfile(PLOTS[0], path)
    print(*PLOTS, GUIDE_PLOT)


if __name__ == "__main__":
    main()
