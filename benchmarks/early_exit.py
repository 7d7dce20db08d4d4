"""Token-level early exit on SmolLM2-135M: the CALM threshold curve and LayerSkip, in one run.

    .venv/bin/python benchmarks/early_exit.py --train-only        # train the exits once (cached), no timing
    /work/notes/cpu-exclusive .venv/bin/python benchmarks/early_exit.py
    .venv/bin/python benchmarks/early_exit.py --per-category 1 --max-new-tokens 64

Greedy decoding of the versioned prompt set (``--per-category`` prompts of each of the five
categories), batch 1, in one process. The exits (a tuned-lens translator, a trained copy of the
final norm and a linear early-exit classifier after every 3rd block from 40% of the depth;
LayerSkip drafts through one of them) are trained on self-generated text with the
``bench_config`` options of the two techniques, so ``--train-only`` (no timing, may share the
CPU) fills the cache that the timed run and ``effinfer bench`` read back; their cost is
reported. The table is rewritten after every method, so a time limit never loses a finished row.

Per method: decode tok/s and the speed-up over the static engine's plain greedy decoding
(eager), which runs on each prompt right before the method (so both see the same machine
load); mean decoder blocks executed per generated token; quality cost: the perplexity of the
method's output under the full model (the full model's own greedy output is the reference)
and the mean length of the prefix identical to plain greedy's; LayerSkip: mean accepted
tokens per step and acceptance rate, and whether the output equals plain greedy's. Writes
``benchmarks/results/model.compression.dynamic_inference.token_level/early_exit.md``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import machine_load, table_header, write_table  # noqa: E402

from effinfer.core.generation import GenerationConfig, encode_prompts, stop_token_ids  # noqa: E402
from effinfer.core.models import DEFAULT_MODEL, load_model  # noqa: E402
from effinfer.core.stages import SystemStage  # noqa: E402
from effinfer.data import load_prompts  # noqa: E402
from effinfer.plugins.model.dynamic_inference.early_exit import EarlyExit  # noqa: E402
from effinfer.plugins.model.dynamic_inference.layerskip import LayerSkip  # noqa: E402
from effinfer.plugins.system.engine import StaticEngine  # noqa: E402

THRESHOLDS = (1.0, 0.9, 0.8, 0.7, 0.5, 0.3, 0.2)


@torch.inference_mode()
def output_nll(model: Any, prompt: torch.Tensor, tokens: list[int]) -> tuple[float, int]:
    ids = torch.cat([prompt[0], torch.tensor(tokens)])[None]
    logits = model(input_ids=ids, use_cache=False).logits[0, prompt.shape[1] - 1:-1].float()
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(tokens), reduction="sum")), len(tokens)


def prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def plot_curve(rows: list[dict[str, Any]], reference_ppl: float, path: Path) -> None:
    """Quality vs speed: each early-exit threshold's speed-up against its output perplexity (LayerSkip too)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    curve = [r for r in rows if r["name"].startswith("early_exit")]
    ax.plot([r["speedup"] for r in curve], [r["ppl"] for r in curve], "o-", label="early_exit (threshold)")
    for r in curve:
        ax.annotate(r["name"].rsplit(" ", 1)[-1], (r["speedup"], r["ppl"]), textcoords="offset points", xytext=(4, 4))
    for r in rows:
        if r["name"].startswith("layerskip"):
            ax.plot([r["speedup"]], [r["ppl"]], "s", label="layerskip (lossless)")
    ax.axhline(reference_ppl, color="grey", linestyle=":", label="full model's own output")
    ax.set_xlabel("decode speed-up vs plain greedy (same prompts, adjacent)")
    ax.set_ylabel("output perplexity under the full model")
    ax.set_yscale("log")
    ax.set_title("Token-level early exit on SmolLM2-135M: quality vs speed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-category", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--thresholds", type=float, nargs="*", default=list(THRESHOLDS))
    parser.add_argument("--no-layerskip", action="store_true")
    parser.add_argument("--prompts", type=int, default=None, help="only the first N prompts (a quick trial)")
    parser.add_argument("--table", default="early_exit", help="name of the table file on the node's page")
    parser.add_argument("--train-only", action="store_true", help="train (or read back) the exits, then stop")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = machine_load()
    model, tokenizer = load_model(DEFAULT_MODEL)
    layers = model.config.num_hidden_layers
    engine = StaticEngine()
    config = GenerationConfig(max_new_tokens=args.max_new_tokens)
    stops = stop_token_ids(tokenizer, model, config)
    prompts = [encode_prompts(tokenizer, [p.messages], True) for p in load_prompts(n_per_category=args.per_category)][:args.prompts]
    plain = engine.decoding()
    exit_options = {k: v for k, v in EarlyExit.bench_config.items() if k != "threshold"}
    skip_options = dict(LayerSkip.bench_config)

    def stage() -> SystemStage:
        return SystemStage(model, tokenizer, engine=engine)

    methods: list[tuple[str, Any, Any]] = []
    for threshold in args.thresholds:
        technique = EarlyExit(exit_options | {"threshold": threshold})
        methods.append((f"early_exit, threshold {threshold:g}", technique, technique.effinfer_decoding_strategy(stage())))
        print(technique.report.describe(), flush=True)
    if not args.no_layerskip:
        skip = LayerSkip(skip_options)
        methods.insert(min(1, len(methods)), (f"layerskip (lossless), draft {skip.draft_layers(layers)} layers, "
                                              f"≤ {skip.config.num_draft_tokens} tokens, stop below "
                                              f"p={skip.config.confidence_threshold:g}", skip,
                                              skip.effinfer_decoding_strategy(stage())))
        print(skip.report.describe(), flush=True)
    if args.train_only:
        return

    def timed(strategy: Any, ids: torch.Tensor, mask: torch.Tensor) -> Any:
        return strategy.generate(model, ids, mask, config, stops)

    reference = [timed(plain, ids, mask).sequences[0] for ids, mask in prompts]  # also warms up
    ref_nll = sum(output_nll(model, ids, ref)[0] for (ids, _), ref in zip(prompts, reference))
    ref_ppl = math.exp(ref_nll / sum(len(r) for r in reference))
    command = "python benchmarks/early_exit.py " + " ".join(sys.argv[1:])
    rows: list[dict[str, Any]] = []

    def write() -> None:
        lines = table_header("Token-level early exit on SmolLM2-135M-Instruct (CALM threshold curve, LayerSkip)",
                             command, args.threads, f"; machine load (`uptime`) before `{load_before}`, after "
                                                    f"`{machine_load()}`")
        early = next((r for r in rows if r["name"].startswith("early_exit")), None)
        lossless = next((r for r in rows if r["name"].startswith("layerskip")), None)
        lines += [f"Greedy decoding of {len(prompts)} prompts of the versioned prompt set (one per category), "
                  f"{args.max_new_tokens} new tokens, batch 1, eager, all rows in one process. Speed-up = decode "
                  "tok/s ÷ the static engine's plain greedy decode tok/s (the full model), measured on each prompt "
                  "right before the method. Blocks/token: decoder blocks executed per generated token (of "
                  f"{layers}). Quality cost: perplexity of the output under the full model (the full model's own "
                  f"greedy output: {ref_ppl:.3f}) and the mean number of leading tokens identical to plain greedy's."
                  + (f" Exit set-up: {early['setup']}." if early else "")
                  + (f" LayerSkip set-up: {lossless['setup']}." if lossless else ""), "",
                  "| method | blocks/token | decode tok/s | plain tok/s (adjacent) | speed-up | output ppl under full "
                  "model | identical prefix (tokens) | identical outputs | mean accepted / step | acceptance rate |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            layers_cell = f"{r['layers']:.1f}" if r["layers"] is not None else "—"
            acc = f"{r['accepted']:.2f}" if r["accepted"] is not None else "—"
            rate = f"{r['acceptance']:.2f}" if r["acceptance"] is not None else "—"
            lines.append(f"| {r['name']} | {layers_cell} | {r['tok_s']:.1f} | {r['base_tok_s']:.1f} | "
                         f"{r['speedup']:.2f}× | {r['ppl']:.3f} | {r['prefix']:.1f} | {r['identical']}/{len(prompts)} | "
                         f"{acc} | {rate} |")
        text = "\n".join(lines) + "\n"
        print(text, flush=True)
        table = write_table("model.compression.dynamic_inference.token_level", args.table, text)
        plot_curve(rows, ref_ppl, table.with_name(f"{args.table}_curve.png"))

    for name, technique, strategy in methods:
        base_time = method_time = 0.0
        base_tokens = method_tokens = 0
        nll = count = matched = identical = 0
        layers_used: list[int] = []
        accepted = drafted = steps = 0
        for (ids, mask), ref in zip(prompts, reference):
            base = timed(plain, ids, mask)
            out = timed(strategy, ids, mask)
            base_time += base.decode_seconds
            base_tokens += max(len(base.sequences[0]) - 1, 0)
            method_time += out.decode_seconds
            method_tokens += max(len(out.sequences[0]) - 1, 0)
            tokens = out.sequences[0]
            n, c = output_nll(model, ids, tokens)
            nll, count = nll + n, count + c
            matched += prefix(tokens, ref)
            identical += tokens == ref
            layers_used += getattr(strategy, "layers_per_token", [])
            accepted += sum(out.accepted_per_step)
            drafted += sum(out.drafted_per_step)
            steps += len(out.accepted_per_step)
        base_rate, rate = base_tokens / base_time, method_tokens / method_time
        rows.append({"name": name, "tok_s": rate, "base_tok_s": base_rate, "speedup": rate / base_rate,
                     "layers": sum(layers_used) / len(layers_used) if layers_used else None,
                     "ppl": math.exp(nll / count), "prefix": matched / len(prompts),
                     "identical": identical, "accepted": accepted / steps if steps else None,
                     "acceptance": accepted / drafted if drafted else None,
                     "setup": technique.report.describe()})
        print(rows[-1], flush=True)
        write()


if __name__ == "__main__":
    main()
