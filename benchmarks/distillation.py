"""Knowledge distillation on SmolLM2-135M: a layer-dropped student before and after KD, one run.

    .venv/bin/python benchmarks/distillation.py                   # drop 6 of 30 layers, 40 steps each
    .venv/bin/python benchmarks/distillation.py --drop 6 --steps 40 --windows 8

The student is the model without ``--drop`` blocks (ShortGPT Block Influence on calibration
text). Rows: the teacher; the student untrained ("before KD"); the student after white-box KD
with forward KL, with forward + reverse KL + hidden MSE; and after black-box KD (CE on teacher
samples) — every trained row with the same step budget (steps × batch × seq_len tokens).
Quality: token perplexity on the wikipedia *test* split (``--windows`` windows of 512 tokens,
never trained on) and the student's forward KL to the teacher and top-1 agreement on the same
tokens; cost: training seconds and tokens (black-box also its teacher generation). Writes
``benchmarks/results/model.compression.distillation.white_box/kd.md`` and the black-box
table next to it. Training runs under ``flock -s``; the numbers are quality, not timing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import machine_load, prompt_ids, side_by_side, strategy_method, table_header, write_table  # noqa: E402

from effinfer.core.calibration import corpus_tokens  # noqa: E402
from effinfer.core.generation import PlainDecoding  # noqa: E402
from effinfer.core.models import DEFAULT_MODEL, load_model  # noqa: E402
from effinfer.core.stages import ModelStage, ModulePatcher  # noqa: E402
from effinfer.plugins.model.distillation.black_box import BlackBoxDistillation  # noqa: E402
from effinfer.plugins.model.distillation.white_box import WhiteBoxDistillation  # noqa: E402


@torch.inference_mode()
def quality(model: Any, teacher: Any, ids: torch.Tensor, windows: int, width: int = 512) -> dict[str, float]:
    nll, kl, top1, count = 0.0, 0.0, 0, 0
    for w in range(windows):
        chunk = ids[w * width:(w + 1) * width][None]
        logits = model(input_ids=chunk, use_cache=False).logits[0, :-1].float()
        reference = teacher(input_ids=chunk, use_cache=False).logits[0, :-1].float()
        log_q, log_p = logits.log_softmax(-1), reference.log_softmax(-1)
        nll += float(F.nll_loss(log_q, chunk[0, 1:], reduction="sum"))
        kl += float((log_p.exp() * (log_p - log_q)).sum())
        top1 += int((logits.argmax(-1) == reference.argmax(-1)).sum())
        count += chunk.shape[1] - 1
    return {"ppl": float(torch.tensor(nll / count).exp()), "kl": kl / count, "top1": top1 / count}


def decode_speed(model: Any, teacher: Any, tokenizer: Any, rounds: int, new_tokens: int) -> dict[str, float]:
    """``model``'s greedy decode tok/s and its ratio to the teacher's, timed round-robin in the same rounds."""
    if rounds == 0:
        return {}
    ids, mask = prompt_ids(tokenizer)
    methods = {"teacher": strategy_method(PlainDecoding(), teacher, ids, mask, new_tokens),
               "model": strategy_method(PlainDecoding(), model, ids, mask, new_tokens)}
    timed = side_by_side(methods, rounds, baseline="teacher")["model"]
    return {"tok_s": timed["decode_tok_s"], "ratio": timed["speedup_vs_hf_generate"],
            "low": timed["speedup_spread"][0], "high": timed["speedup_spread"][1]}


def speed_cell(speed: dict[str, float]) -> str:
    if not speed:
        return "—"
    return f"{speed['tok_s']:.1f} tok/s ({speed['ratio']:.2f}× [{speed['low']:.2f}–{speed['high']:.2f}])"


def run(technique: Any, model: Any, tokenizer: Any) -> tuple[Any, float]:
    stage = ModelStage(model, tokenizer, ModulePatcher())
    started = time.perf_counter()
    technique.effinfer_transform_model(stage)
    return stage.model, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drop", type=int, default=6)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--prompts", type=int, default=32, help="black-box: prompts the teacher answers")
    parser.add_argument("--new-tokens", type=int, default=96, help="black-box: tokens per teacher answer")
    parser.add_argument("--variants", nargs="*", default=["fkl", "mix", "black"],
                        help="fkl: white-box forward KL; mix: forward + reverse KL + hidden MSE; black: black-box")
    parser.add_argument("--rounds", type=int, default=4,
                        help="decode-speed rounds per row, each model against the teacher (0: no speed column)")
    parser.add_argument("--speed-tokens", type=int, default=32, help="new tokens per timed decode")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(DEFAULT_MODEL)
    ids = corpus_tokens(tokenizer, "wikipedia", "test")
    common = {"drop": args.drop, "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "lr": args.lr, "checkpoint": False, "eval_windows": 0}
    def measured(student: Any) -> dict[str, Any]:
        speed = decode_speed(student, model, tokenizer, args.rounds, args.speed_tokens)
        return quality(student, model, ids, args.windows) | {"speed": speed}

    rows = [("teacher (full model)", "—", "—", measured(model), None, 0.0, "")]
    student, _ = run(WhiteBoxDistillation(common | {"steps": 0}), model, tokenizer)
    rows.append(("student, before KD", "—", "0", measured(student), None, 0.0, ""))
    del student
    variants = {"fkl": ("white-box", WhiteBoxDistillation(common | {"forward_kl": 1.0})),
                "mix": ("white-box", WhiteBoxDistillation(common | {"forward_kl": 0.5, "reverse_kl": 0.5,
                                                                    "hidden_mse": 0.1})),
                "black": ("black-box", BlackBoxDistillation(common | {"num_prompts": args.prompts,
                                                                      "new_tokens": args.new_tokens}))}
    command = "python benchmarks/distillation.py " + " ".join(sys.argv[1:])
    layers = model.config.num_hidden_layers
    load_before = machine_load()

    def write(rows: list[Any]) -> None:
        """Both node tables from the rows so far (after every row: a timeout never loses finished rows)."""
        lines = table_header(f"Knowledge distillation of a layer-dropped SmolLM2-135M-Instruct ({layers - args.drop} "
                             f"of {layers} layers)", command, args.threads,
                             f"; machine load (`uptime`) before `{load_before}`, after `{machine_load()}` (seconds "
                             "and speed ratios are the CPU's own only when the load stays near 2)")
        lines += [f"Student: the teacher without {args.drop} blocks (lowest ShortGPT Block Influence on calibration "
                  f"text). Every trained row: {args.steps} AdamW steps (peak lr {args.lr:g}, warm-up then cosine) of "
                  f"{args.batch_size}×{args.seq_len} tokens (decoder blocks and norms trained, embeddings and LM head "
                  "frozen); white-box on windows of the calibration split, black-box on the teacher's sampled "
                  f"answers to {args.prompts} calibration prompts ({args.new_tokens} new tokens each). "
                  f"Quality on {args.windows} windows of 512 tokens of the wikipedia test split (never trained on): "
                  "token perplexity, the forward KL from the teacher and top-1 agreement with the teacher. Decode: "
                  f"greedy decoding (the core's reference loop: transformers forward over a dynamic cache, decode steps "
                  f"timed apart from the prefill), batch 1, {args.speed_tokens} new tokens after a chat prompt, "
                  f"each row's model and the teacher timed round-robin in the same {args.rounds} rounds (median "
                  "ratio [min–max]); the CPU to itself while timing only if the run held the exclusive lock. The "
                  "teacher's own row times the teacher against itself: its distance from 1.00× is the noise of "
                  "the method.", "",
                  "| model | objective | steps | perplexity | KL(teacher ‖ model) | top-1 = teacher | decode vs teacher "
                  "| training cost | set-up total |", "|---|---|---|---|---|---|---|---|---|"]
        for name, objective, steps, q, cost, seconds, extra in rows:
            spent = f"{cost.seconds:.0f} s, {cost.tokens} tokens" if cost else "—"
            spent += f"; {extra}" if extra else ""
            first = (f"| {name} | {objective} | {steps} | {q['ppl']:.2f} | {q['kl']:.3f} | {q['top1']:.3f} | "
                     f"{speed_cell(q['speed'])} |")
            lines.append(f"{first} {spent} | {seconds:.0f} s |" if cost else f"{first} — | — |")
        print("\n".join(lines), flush=True)
        white = [r for r in rows if "black-box" not in r[0]]
        black = [r for r in rows if "white-box" not in r[0]]
        for node, subset in (("white_box", white), ("black_box", black)):
            keep = [line for line in lines if not line.startswith("| student") or any(
                line.startswith(f"| {r[0]} | {r[1]} ") for r in subset)]
            if any(r[4] is not None for r in subset):  # a node's page gets a table once it has a trained row
                write_table(f"model.compression.distillation.{node}", "kd", "\n".join(keep) + "\n")

    for kind, technique in (variants[v] for v in args.variants):
        student, seconds = run(technique, model, tokenizer)
        objective = technique.objective() if kind == "white-box" else "CE on teacher samples"
        extra = next((n for n in technique.notes if n.startswith("teacher wrote")), "")
        rows.append((f"student, {kind} KD", objective, str(args.steps), measured(student),
                     technique.cost, seconds, extra))
        print(rows[-1], flush=True)
        del student
        write(rows)


if __name__ == "__main__":
    main()
