"""Efficient-structure conversions on SmolLM2-135M against the original, in one process (issue 15).

    # part ffn_kv: MoEfication and GQA/MQA conversion, quality untimed on a shared CPU:
    /work/notes/cpu-shared timeout 600 .venv/bin/python benchmarks/structure.py --part ffn_kv --no-timing
    # the same with decode ratios (the CPU to itself):
    /work/notes/cpu-exclusive timeout 600 .venv/bin/python benchmarks/structure.py --part ffn_kv
    # one variant, e.g. a longer repair:
    .venv/bin/python benchmarks/structure.py --part ffn_kv --variants "moefication:repair_steps=120"

Each variant (``technique:key=value,…``, the technique's own config) converts a *copy* of the
model through the technique's stage hook (calibration from the corpus's calibration split), and
is measured next to the untouched original in this process:

- quality: perplexity on ``--windows`` held-out 256-token windows of the wikipedia *test* split,
  KL(original ‖ converted) of the next-token distributions and top-1 agreement;
- structure: FFN multiply-accumulates per token as a fraction of the dense FFN (MoEfication,
  router included), KV-cache bytes per token of context (GQA), parameters;
- speed (unless ``--no-timing``): after a prompt of each ``--contexts`` length, ``--steps``
  single-token decode forwards (HF forward over a ``DynamicCache``, the same path for both), the
  original and the converted model alternating for ``--rounds`` rounds; the table gives the
  median decode tok/s of each and their ratio (never an absolute time alone).

The table goes to ``benchmarks/results/<node>/ffn_kv.md`` of each technique's node; rows are
saved one JSON per variant under ``artifacts/structure_ffn_kv/`` and the tables rebuilt from all
saved rows, so runs add up. ``--time-budget`` stops starting new variants.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import ARTIFACTS, TABLES, machine_load, table_header, write_table  # noqa: E402
from structure_alternates import quality  # noqa: E402  (perplexity, KL and top-1 vs the original)

ROWS_DIR = ARTIFACTS / "structure_ffn_kv"
DEFAULT_VARIANTS = [
    "moefication:experts=32,top_k=15",
    "moefication:experts=32,top_k=15,repair_steps=60",
    "moefication:experts=16,top_k=4",
    "gqa_convert:kv_heads=1",
    "gqa_convert:kv_heads=1,repair_steps=60,repair_lr=3e-4",
]


@torch.inference_mode()
def decode_rate(model, text, context, steps):
    """tok/s of ``steps`` one-token forwards after a ``context``-token prompt, and the cache's KV bytes."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for start in range(0, context, 512):
        model(input_ids=text[None, start:min(start + 512, context)], past_key_values=cache, use_cache=True)
    kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
             if isinstance(t, torch.Tensor))
    model(input_ids=text[None, context:context + 1], past_key_values=cache, use_cache=True)  # warm-up
    started = time.perf_counter()
    for i in range(steps):
        model(input_ids=text[None, context + 1 + i:context + 2 + i], past_key_values=cache, use_cache=True)
    return steps / (time.perf_counter() - started), kv


def convert(model, tokenizer, spec):
    from effinfer.core.calibration import calibration_source
    from effinfer.core.experiment import parse_technique
    from effinfer.core.registry import get_registry
    from effinfer.core.stages import ModelStage, ModulePatcher

    parsed = parse_technique(spec)
    technique = get_registry().get(parsed.name)(parsed.config)
    stage = ModelStage(copy.deepcopy(model), tokenizer, ModulePatcher(keep_originals=False),
                       calibration=calibration_source(tokenizer, 0))
    technique.effinfer_transform_model(stage)
    stage.model.eval()
    return technique, stage.model


def measure(args) -> None:
    from effinfer.core.calibration import corpus_tokens
    from effinfer.core.models import load_model
    from effinfer.plugins.model.distillation.common import held_out_windows

    torch.manual_seed(0)
    began = time.perf_counter()
    timing = not args.no_timing
    model, tokenizer = load_model()
    model.eval()
    windows = held_out_windows(tokenizer, args.windows, 256)
    with torch.inference_mode():
        reference = [model(input_ids=row[None], use_cache=False).logits[0, :-1].float() for row in windows]
    text = corpus_tokens(tokenizer, "wikipedia", "test")
    need = max(args.contexts) + args.steps + 2
    text = text.repeat(need // len(text) + 1)[:need] if len(text) < need else text[:need]
    original = quality(model, windows, reference)
    command = "python benchmarks/structure.py " + " ".join(sys.argv[1:])
    ROWS_DIR.mkdir(parents=True, exist_ok=True)
    for spec in args.variants:
        if time.perf_counter() - began > args.time_budget:
            print(f"time budget spent: {spec} not started", flush=True)
            continue
        started = time.perf_counter()
        technique, converted = convert(model, tokenizer, spec)
        setup = time.perf_counter() - started
        row = {"variant": spec, "technique": technique.name, "node": technique.node, "command": command,
               "threads": torch.get_num_threads(), "timed": timing, "setup_s": setup, "notes": technique.notes,
               "original": original, **{k: v for k, v in quality(converted, windows, reference).items()},
               "ffn_fraction": getattr(technique, "ffn_fraction", None),
               "kv_fraction": getattr(technique, "kv_fraction", None),
               "parameters": sum(p.numel() for p in {id(p): p for p in converted.parameters()}.values()),
               "parameters_original": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
               "windows": args.windows, "load": machine_load(), "contexts": {}}
        for context in args.contexts:
            entry = {}
            if timing:
                rates = {"original": [], "converted": []}
                for _ in range(args.rounds):
                    for name, m in (("original", model), ("converted", converted)):
                        rate, kv = decode_rate(m, text, context, args.steps)
                        rates[name].append(rate)
                        entry[f"kv_{name}"] = kv
                entry |= {f"tok_s_{n}": statistics.median(r) for n, r in rates.items()}
                entry["ratio"] = entry["tok_s_converted"] / entry["tok_s_original"]
            else:
                for name, m in (("original", model), ("converted", converted)):
                    entry[f"kv_{name}"] = decode_rate(m, text, context, 1)[1]
            row["contexts"][str(context)] = entry
        name = spec.replace(":", "-").replace(",", "-").replace("=", "")
        (ROWS_DIR / f"{name}.json").write_text(json.dumps(row, indent=1))
        print(f"{spec}: ppl {row['ppl']:.2f} (original {original['ppl']:.2f}), KL {row['kl']:.3f}, "
              f"setup {setup:.0f} s, {row['contexts']}", flush=True)
        del converted


def write_tables() -> None:
    rows = [json.loads(p.read_text()) for p in sorted(ROWS_DIR.glob("*.json"))] if ROWS_DIR.is_dir() else []
    for node in sorted({r["node"] for r in rows}):
        chosen = [r for r in rows if r["node"] == node]
        contexts = sorted({int(c) for r in chosen for c in r["contexts"]})
        first = chosen[0]
        lines = table_header(f"{first['technique']} on SmolLM2-135M (fp32) vs the original, same process",
                             "` and `".join(sorted({r["command"] for r in chosen})), first["threads"],
                             f"\n- quality: {first['windows']} held-out wikipedia test windows of 256 tokens; decode: "
                             "HF forward over a DynamicCache after a prompt of the context length, original and "
                             "converted alternating, median of rounds")
        header = ["variant", "ppl (orig)", "KL", "top-1", "FFN MACs", "KV B/token", "params", "setup s"]
        header += [f"decode @{c} (ratio)" for c in contexts]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in sorted(chosen, key=lambda r: r["variant"]):
            kv = [r["contexts"][str(c)] for c in contexts if str(c) in r["contexts"]]
            per_token = f"{kv[0]['kv_converted'] / contexts[0]:,.0f} / {kv[0]['kv_original'] / contexts[0]:,.0f}" \
                if kv else "–"
            cells = [f"`{r['variant']}`", f"{r['ppl']:.2f} ({r['original']['ppl']:.2f})", f"{r['kl']:.3f}",
                     f"{r['top1']:.3f}", f"{r['ffn_fraction']:.1%}" if r["ffn_fraction"] is not None else "100%",
                     per_token, f"{r['parameters'] / 1e6:.1f} M", f"{r['setup_s']:.0f}"]
            for c in contexts:
                e = r["contexts"].get(str(c), {})
                cells.append(f"{e['tok_s_converted']:.1f} vs {e['tok_s_original']:.1f} ({e['ratio']:.2f}x)"
                             if "ratio" in e else "untimed")
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Notes of each run (the technique's run record):", ""]
        lines += [f"- `{r['variant']}`: " + "; ".join(r["notes"]) for r in chosen]
        print(write_table(node, "ffn_kv", "\n".join(lines) + "\n"))
        plot_memory(node, chosen, contexts)


def plot_memory(node: str, rows: list[dict], contexts: list[int]) -> None:
    """KV-cache MiB against context, the original and each variant (read from the HF cache after the prompt)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 3.5))
    first = rows[0]["contexts"]
    axis.plot(contexts, [first[str(c)]["kv_original"] / 2**20 for c in contexts], "k--o", label="original")
    for r in sorted(rows, key=lambda r: r["variant"]):
        axis.plot(contexts, [r["contexts"][str(c)]["kv_converted"] / 2**20 for c in contexts], "o-",
                  label=r["variant"].split(":", 1)[1])
    axis.set_xlabel("context (tokens)")
    axis.set_ylabel("KV cache (MiB)")
    axis.set_title(f"{rows[0]['technique']}: memory vs context (SmolLM2-135M fp32)", fontsize=9)
    axis.legend(fontsize=7)
    figure.tight_layout()
    path = TABLES / node / "memory_vs_context.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    print(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["ffn_kv"], default="ffn_kv")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    parser.add_argument("--contexts", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--no-tables", action="store_true")
    parser.add_argument("--tables-only", action="store_true")
    parser.add_argument("--time-budget", type=float, default=480)
    args = parser.parse_args()
    if not args.tables_only:
        measure(args)
    if not args.no_tables:
        write_tables()


if __name__ == "__main__":
    main()
