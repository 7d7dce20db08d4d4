"""Pruning and low-rank factorization on SmolLM2: quality, bytes and decode speed vs the dense model.

Part ``quality`` (one evaluator sweep, every row next to the fp32 baseline of the same run):

- unstructured 30/50/70% and 2:4 for ``magnitude``, ``wanda``, ``sparsegpt``: perplexity on the
  Wikipedia test split (``perplexity.wikipedia.token``), KL / top-1 agreement vs fp32, zero-shot
  BIG-bench accuracy, the stored-format bytes the technique's note reports (bitmask + values,
  CSR) next to dense, decode and prefill speed vs dense, calibration + pruning seconds;
- structured (``layer_drop``, ``width_prune``) and low rank (``svd``, ``asvd``, ``svd_llm``):
  parameters kept (``memory.weight_bytes`` ÷ the baseline's, every tensor fp32) vs perplexity
  vs measured decode speed-up (``speed.p128_b1.decode_ratio``: alternating rounds with the
  baseline, median of adjacent ratios).

Part ``execution`` (sparse execution measured honestly): SmolLM2 pruned by magnitude to 50%
unstructured and to 2:4, each stored three ways — dense float with zeros, bitmask + values
(dense rebuilt per call) and CSR (``torch.sparse`` CSR × dense matmul) — decoded greedily
(batch 1, KV cache) in alternating rounds with the dense model; decode tokens/s ratio and the
weight bytes of the pruned layers in each format.

Part ``nas``: ``nas_evolution`` under a 70% bytes budget against uniform magnitude pruning and
layer dropping at about the same bytes, perplexity on held-out test tokens (no timing, so it may
share the CPU).

Run (as the tables were made; alone on the CPU)::

    flock -x /tmp/effinfer-cpu.lock .venv/bin/python benchmarks/pruning.py --part quality
    flock -x /tmp/effinfer-cpu.lock .venv/bin/python benchmarks/pruning.py --part execution

Writes ``benchmarks/results/<node>/pruning.md`` for the unstructured, structured and low-rank
nodes, ``.../unstructured/sparse_execution.md``, and every record to ``artifacts/pruning.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

from effinfer.core.models import DEFAULT_MODEL

CALIBRATION = "n_samples=16,seq_len=256"
UNSTRUCTURED = "model.compression.sparsification.weight_pruning.unstructured"
STRUCTURED = "model.compression.sparsification.weight_pruning.structured"
LOW_RANK = "model.compression.structure_optimization.low_rank"
NAS = "model.compression.structure_optimization.nas"
#: (label, stack spec): the search and the hand-made candidates at about the same stored decoder bytes (70%)
NAS_GRID = [
    ("nas_evolution, 70% bytes budget, 48 evaluations",
     "nas_evolution:bytes_budget=0.7,evaluations=48,population=8,eval_samples=4,seq_len=128"),
    ("magnitude 34% uniform, bitmask (≈ 69% bytes)", "magnitude:sparsity=0.34,execution=bitmask"),
    ("layer_drop 9 of 30 layers (70% bytes)", f"layer_drop:drop=9,{CALIBRATION}"),
]
#: (node, label, stack spec)
GRID = [
    *[(UNSTRUCTURED, f"{method} {label}", f"{method}:{setting}{'' if method == 'magnitude' else ',' + CALIBRATION}")
      for label, setting in (("30%", "sparsity=0.3"), ("50%", "sparsity=0.5"), ("70%", "sparsity=0.7"),
                             ("2:4", "pattern='2:4'"))
      for method in ("magnitude", "wanda", "sparsegpt")],
    (UNSTRUCTURED, "sparsegpt 2:4 + int4 joint (g64)", f"sparsegpt:pattern='2:4',bits=4,{CALIBRATION}"),
    (UNSTRUCTURED, "wanda 2:4 → gptq int4 (g64)", f"wanda:pattern='2:4',{CALIBRATION}+gptq:bits=4,group_size=64,"
                                                   f"{CALIBRATION}"),
    (STRUCTURED, "layer_drop 8 of 30 layers", f"layer_drop:drop=8,{CALIBRATION}"),
    (STRUCTURED, "width_prune heads 9→6, FFN −25%", f"width_prune:attn_ratio=0.34,ffn_ratio=0.25,{CALIBRATION}"),
    (LOW_RANK, "svd param_ratio 0.8", "svd:param_ratio=0.8"),
    (LOW_RANK, "asvd param_ratio 0.8", f"asvd:param_ratio=0.8,{CALIBRATION}"),
    (LOW_RANK, "svd_llm param_ratio 0.8", f"svd_llm:param_ratio=0.8,{CALIBRATION}"),
]
TITLES = {
    UNSTRUCTURED: "Unstructured and N:M pruning on SmolLM2-135M: magnitude vs Wanda vs SparseGPT",
    STRUCTURED: "Structured pruning on SmolLM2-135M: parameters kept vs perplexity vs decode speed",
    LOW_RANK: "Low-rank factorization on SmolLM2-135M: parameters kept vs perplexity vs decode speed",
}
ARTIFACT = Path("artifacts/pruning.json")
STORE = Path("artifacts/pruning.db")


def quality_suite(windows: int, speed: bool = True, tasks: bool = True):
    from effinfer.evaluation.suites import get_suite

    quick = get_suite("quick")
    return quick.with_changes(
        name=f"pruning-w{windows}" + ("" if speed else "-nospeed") + ("" if tasks else "-notasks"),
        tasks={"names": ["general_knowledge", "phrase_relatedness"], "limit": 24} if tasks else None,
        generation=None, roofline=None,
        perplexity={"window": 512, "max_windows": windows},
        fidelity={"max_positions": 512 * windows},
        speed={"prompt_lengths": [128], "batch_sizes": [1], "new_tokens": 32, "warmup": 1, "repeats": 3,
               "drift_tolerance": 0.25} if speed else None,
    )


def formats(record) -> str:
    notes = " ".join(record.notes)
    found = re.search(r"dense ([\d.]+) MiB → bitmask\+values ([\d.]+) MiB, CSR ([\d.]+) MiB", notes)
    text = f"{found[1]} / {found[2]} / {found[3]}" if found else "—"
    packed = (re.search(r"stored quantized and packed: ([\d.]+) MiB", notes)
              or re.search(r"GPTQ int\d[^:]*: [\d.]+ MiB → ([\d.]+) MiB", notes))
    return text + (f"; int4 packed {packed[1]}" if packed else "")


def ratio_text(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def quality_row(label: str, record, baseline, node: str) -> list[str]:
    if not record.ok:
        return [label, "failed: " + (record.error or "").splitlines()[0][:80]] + [""] * 8
    value = record.value
    kl, top1, accuracy = value("fidelity.kl_mean"), value("fidelity.top1_agreement"), value("accuracy.mean.acc")
    ttft = value("speed.p128_b1.ttft_ratio")  # new/baseline time to first token: its inverse is the prefill speed-up
    kept = value("memory.weight_bytes") / baseline.value("memory.weight_bytes")
    middle = formats(record) if node == UNSTRUCTURED else f"{kept:.1%}"
    return [label, f"{value('perplexity.wikipedia.token'):.2f}", "—" if kl is None else f"{kl:.3f}",
            "—" if top1 is None else f"{top1:.1%}", "—" if accuracy is None else f"{accuracy:.3f}", middle,
            ratio_text(value("speed.p128_b1.decode_ratio")), ratio_text(1 / ttft if ttft else None),
            "—" if record.is_baseline else f"{value('setup.apply_s', 0):.1f}"]


def run_quality(args, meta) -> None:
    from rich.console import Console

    from effinfer.core.steplog import LineProgress
    from effinfer.evaluation import bench

    grid = [g for g in GRID if (not args.only or any(o in g[1] for o in args.only))
            and (not args.nodes or g[0].rsplit(".", 1)[-1] in args.nodes)]
    suite = quality_suite(args.windows, not args.no_speed, not args.no_tasks)
    meta["suite"] = suite.name
    args.store.parent.mkdir(parents=True, exist_ok=True)
    result = bench([spec.split("+") for _, _, spec in grid], suite=suite, model=args.model, store=args.store,
                   command=meta["command"], redo=True, progress=LineProgress(Console(stderr=True)))
    records = dict(zip([label for _, label, _ in grid], result.runs))
    env = result.baseline.environment
    artifact = {"meta": meta, "baseline": result.baseline.model_dump(mode="json", exclude={"baseline"}),
                "runs": {label: {"node": node, "spec": spec,
                                 **records[label].model_dump(mode="json", exclude={"baseline", "environment"})}
                         for node, label, spec in grid}}
    args.artifact.parent.mkdir(parents=True, exist_ok=True)
    args.artifact.write_text(json.dumps(artifact, indent=2))
    meta["seconds"] = time.perf_counter() - meta["started"]
    for node in dict.fromkeys(node for node, _, _ in grid):
        middle = "dense / bitmask+values / CSR MiB (pruned layers)" if node == UNSTRUCTURED else "params kept"
        header = ["method", "ppl (wiki)", "KL vs fp32", "top-1 agree", "BIG-bench acc", middle, "decode vs dense",
                  "prefill vs dense", "setup s"]
        rows = [quality_row("fp32 dense (baseline)", result.baseline, result.baseline, node)]
        rows += [quality_row(label, records[label], result.baseline, node) for n, label, _ in grid if n == node]
        text = [f"## {TITLES[node]}", "",
                f"Every row next to the fp32 baseline measured in the same run by effinfer's evaluator (suite "
                f"`{suite.name}`: perplexity on {args.windows} × 512 Wikipedia test tokens, KL and top-1 agreement vs "
                f"fp32 on the same positions; BIG-bench = mean zero-shot accuracy on general_knowledge and "
                f"phrase_relatedness, 24 examples each"
                f"{'' if not args.no_tasks else ' (not measured in this run: —)'}; decode = batch 1, 128-token "
                f"prompt, 32 new tokens, 3 rounds alternating with the baseline, median ratio of adjacent rounds; "
                f"prefill = the inverse of the time-to-first-token ratio on the same prompts"
                f"{'' if not args.no_speed else ': not measured in this run (—)'}). Calibration: {CALIBRATION} "
                "windows of the Wikipedia calibration split. *setup s* = calibration + pruning time"
                + (" (this run shared the CPU with other work: indicative only)." if args.no_speed else "."),
                ""]
        if node == UNSTRUCTURED:
            text += ["Pruned weights are kept dense with zeros here (`execution=dense`, the default): the "
                     "whole-model bytes do not change, the column gives what the 210 pruned linear layers take in "
                     "each stored format (fp32 values; `execution=bitmask` or `csr` stores them so). See "
                     "`sparse_execution.md` for the speed of each format. The two *int4* rows prune to 2:4 and "
                     "quantize to 4 bits (asymmetric, integer zero point, groups of 64): SparseGPT's joint mode in "
                     "one pass, and Wanda then GPTQ (which keeps the pruned zeros); their layers are stored packed "
                     "(*int4 packed* MiB, zeros included), so their decode column is the packed int4 kernel's speed."
                     " The dense-with-zeros rows run exactly the dense model's GEMMs, so their decode and prefill ratios differ from 1.00× only by run-to-run noise (about ±10% for decode and ±30% for the 128-token prefill on this 2-core VM at these short timings): unstructured sparsity saves no time here.",
                     ""]
        text += [f"- command: `{meta['command']}`",
                 f"- date: {meta['date']}; machine: {env.get('cpu')} ({env.get('cores')} cores), {meta['threads']} "
                 f"threads; {meta['seconds'] / 60:.1f} min for the whole run", "",
                 "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        text += ["| " + " | ".join(r) + " |" for r in rows]
        path = args.tables / node / "pruning.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(text) + "\n")
        print(path.read_text())


# --------------------------------------------------------------------------- NAS


def decoder_share(record, baseline) -> str:
    """The stored decoder bytes of a record as a fraction of the dense model's (from the whole-model bytes)."""
    found = re.search(r"— ([\d.]+)% of the bytes", " ".join(record.notes))
    if found:
        return f"{float(found[1]):.1f}% (decoder)"
    return f"{record.value('memory.weight_bytes') / baseline.value('memory.weight_bytes'):.1%} (model)"


def run_nas(args, meta) -> None:
    from rich.console import Console

    from effinfer.core.steplog import LineProgress
    from effinfer.evaluation import bench

    suite = quality_suite(args.windows, speed=False, tasks=False)
    args.store.parent.mkdir(parents=True, exist_ok=True)
    result = bench([spec.split("+") for _, spec in NAS_GRID], suite=suite, model=args.model, store=args.store,
                   command=meta["command"], redo=True, progress=LineProgress(Console(stderr=True)))
    meta["seconds"] = time.perf_counter() - meta["started"]
    env = result.baseline.environment
    header = ["candidate", "stored bytes", "ppl (wiki)", "KL vs fp32", "top-1 agree", "setup s (search cost)"]
    rows = []
    for (label, _), record in zip(NAS_GRID, result.runs):
        if not record.ok:
            rows.append([label, "failed: " + (record.error or "").splitlines()[0][:80], "", "", "", ""])
            continue
        value = record.value
        rows.append([label, decoder_share(record, result.baseline), f"{value('perplexity.wikipedia.token'):.2f}",
                     f"{value('fidelity.kl_mean'):.3f}", f"{value('fidelity.top1_agreement'):.1%}",
                     f"{value('setup.apply_s', 0):.1f}"])
    nas_notes = [n for n in result.runs[0].notes if "Pareto" in n or "best under" in n or "search cost" in n]
    text = ["## NAS on SmolLM2-135M: evolutionary search vs hand-made candidates at the same bytes", "",
            "`nas_evolution` searches per-layer keep-or-drop and magnitude sparsity (0/30/50/70%, stored as bitmask + "
            "values) for the lowest perplexity on 4 × 128 calibration tokens under a budget of 70% of the dense "
            "decoder's stored bytes; the rows below are then scored by effinfer's evaluator next to the fp32 baseline "
            f"of the same run (suite `{suite.name}`: perplexity on {args.windows} × 512 Wikipedia *test* tokens, "
            "which the search never saw). The hand-made rows spend about the same bytes uniformly.", "",
            f"- command: `{meta['command']}`",
            f"- date: {meta['date']}; machine: {env.get('cpu')} ({env.get('cores')} cores), {meta['threads']} "
            f"threads; {meta['seconds'] / 60:.1f} min for the whole run", "",
            "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1),
            f"| fp32 dense (baseline) | 100% | {result.baseline.value('perplexity.wikipedia.token'):.2f} | — | — | — |"]
    text += ["| " + " | ".join(r) + " |" for r in rows]
    text += ["", "What the search reported:", ""] + [f"- {n}" for n in nas_notes]
    path = args.tables / NAS / "nas.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text) + "\n")
    print(path.read_text())


# --------------------------------------------------------------------------- sparse execution


def decode_seconds(model, prompt, new_tokens: int) -> float:
    """Greedy decode of ``new_tokens`` after ``prompt`` (batch 1, KV cache); seconds of the decode steps."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        started = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return time.perf_counter() - started


def run_execution(args, meta) -> None:
    import copy

    import torch

    from effinfer.core.calibration import calibration_source
    from effinfer.core.compose import ComposedModel
    from effinfer.core.experiment import Experiment
    from effinfer.core.models import load_model
    from effinfer.evaluation.metrics.memory import weight_bytes

    model, tokenizer = load_model(args.model)
    prompt = calibration_source(tokenizer, seed=0)(1, 128)
    rows = []
    base_bytes = weight_bytes(model)
    for pattern in ("sparsity=0.5", "pattern='2:4'"):
        for execution in ("dense", "bitmask", "csr"):
            spec = f"magnitude:{pattern},execution={execution}"
            dense = model
            pruned = copy.deepcopy(model)
            with ComposedModel(pruned, tokenizer, Experiment(techniques=[spec]).build_stack()) as composed:
                decode_seconds(composed.model, prompt, 4)  # warm-up
                ratios, speeds = [], []
                for round_ in range(args.rounds):
                    order = [dense, composed.model] if round_ % 2 == 0 else [composed.model, dense]
                    times = {id(m): decode_seconds(m, prompt, args.new_tokens) for m in order}
                    ratios.append(times[id(dense)] / times[id(composed.model)])
                    speeds.append((args.new_tokens - 1) / times[id(composed.model)])
                stored = weight_bytes(composed.model)
                note = " ".join(n for _, _, n in composed.report.entries)
            found = re.search(r"dense ([\d.]+) MiB → bitmask\+values ([\d.]+) MiB, CSR ([\d.]+) MiB", note)
            layer_mib = {"dense": found[1], "bitmask": found[2], "csr": found[3]}[execution] if found else "?"
            rows.append([pattern.replace("sparsity=0.5", "50% unstructured").replace("pattern='2:4'", "2:4"),
                         execution, f"{statistics.median(speeds):.1f}", f"{statistics.median(ratios):.2f}×",
                         layer_mib, f"{stored / 2**20:.0f} / {base_bytes / 2**20:.0f}"])
            print(rows[-1], flush=True)
            del pruned
    meta["seconds"] = time.perf_counter() - meta["started"]
    from effinfer.evaluation.environment import cpu_model

    import os

    env = {"cpu": cpu_model(), "cores": os.cpu_count()}
    header = ["pattern", "stored as", "decode tok/s", "decode vs dense", "pruned layers MiB",
              "model MiB (pruned / dense)"]
    text = ["## Sparse execution on CPU: does magnitude-pruned SmolLM2-135M decode faster?", "",
            f"SmolLM2-135M (fp32) pruned by `magnitude` (50% unstructured, and 2:4), each stored three ways, decoded "
            f"greedily (batch 1, KV cache, 128-token prompt, {args.new_tokens} new tokens) in {args.rounds} rounds "
            "alternating with the dense model; *decode vs dense* = median ratio of adjacent rounds. *dense* = float "
            "weights with zeros in `nn.Linear` (no bytes saved); *bitmask* = 1 bit per position + the non-zero values, "
            "dense weight rebuilt on every call; *csr* = values + int32 column indices + row pointers through "
            "`torch.sparse` CSR × dense matmul. PyTorch has no CPU kernel for a packed 2:4 format "
            "(`to_sparse_semi_structured` is CUDA-only), so 2:4 runs through the same three paths.", "",
            f"- command: `{meta['command']}`",
            f"- date: {meta['date']}; machine: {env.get('cpu')} ({env.get('cores')} cores), {meta['threads']} threads; "
            f"torch {torch.__version__}; {meta['seconds'] / 60:.1f} min", "",
            "| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    text += ["| " + " | ".join(r) + " |" for r in rows]
    path = args.tables / UNSTRUCTURED / "sparse_execution.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text) + "\n")
    print(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["quality", "execution", "nas"], required=True)
    parser.add_argument("--windows", type=int, default=4, help="512-token perplexity windows")
    parser.add_argument("--only", nargs="*", default=None, help="labels (substrings) to run")
    parser.add_argument("--rounds", type=int, default=4, help="execution part: alternating decode rounds")
    parser.add_argument("--new-tokens", type=int, default=24, help="execution part: tokens decoded per round")
    parser.add_argument("--nodes", nargs="*", choices=["unstructured", "structured", "low_rank"], default=None,
                        help="quality part: only these nodes' rows")
    parser.add_argument("--no-tasks", action="store_true", help="quality part without the BIG-bench accuracy")
    parser.add_argument("--no-speed", action="store_true", help="quality part without the decode timing (it can "
                                                                 "then run next to other work: no timing is reported)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--store", type=Path, default=STORE)
    parser.add_argument("--artifact", type=Path, default=ARTIFACT)
    parser.add_argument("--tables", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    import torch

    meta = {"command": " ".join(["python", *map(shlex.quote, sys.argv)]), "started": time.perf_counter(),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="minutes"), "threads": torch.get_num_threads()}
    {"quality": run_quality, "execution": run_execution, "nas": run_nas}[args.part](args, meta)
    print(f"took {(time.perf_counter() - meta['started']) / 60:.1f} min")


if __name__ == "__main__":
    main()
