"""Quantization quality on SmolLM2: method × bits × group size against the fp32 model.

Every row is one technique stack scored by effinfer's shared evaluator
(:func:`effinfer.evaluation.bench`) next to the fp32 baseline measured in the same run:

- perplexity on the Wikipedia test split (``perplexity.wikipedia.token``);
- fidelity to fp32: mean KL divergence of the next-token distributions and top-1
  agreement (``fidelity.kl_mean``, ``fidelity.top1_agreement``);
- BIG-bench zero-shot accuracy (``accuracy.mean.acc`` over the suite's tasks);
- stored weight bytes of the whole model (``memory.weight_bytes``: packed codes, scales,
  zero points, plus the float embeddings and norms);
- calibration (+ quantization) time: ``setup.apply_s``, the time the technique took to
  transform the model (for QAT: data, training and packing);
- the execution mode the technique's notes report: ``kernel`` (PyTorch's packed int8/int4
  CPU kernels, or ``torch._int_mm`` for W8A8), ``packed`` (real low-bit storage,
  dequantized per call: no kernel for that format) or ``fake`` (fake quantization).

SmolLM2-135M's hidden size is 576, which 128 does not divide: groups of 64 are the
largest power-of-two group that fits every layer (``g64``); ``per-ch`` = one scale per
output channel. ``lm_head`` (tied to the embeddings) stays in float everywhere.

Run (as the numbers in the docs were made; it records calibration times, so alone on the CPU)::

    flock -x /tmp/effinfer-cpu.lock .venv/bin/python benchmarks/quantization_quality.py

Writes ``artifacts/quantization_quality.json`` (every record), the runs into
``artifacts/quantization_quality.db`` (a results store), and one markdown table per
taxonomy node to ``benchmarks/results/<node>/quantization_quality.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shlex
import sys
import time
from pathlib import Path

from effinfer.core.models import DEFAULT_MODEL
from effinfer.evaluation import bench
from effinfer.evaluation.records import RunRecord
from effinfer.evaluation.suites import get_suite

CALIBRATION = "n_samples=16,seq_len=256"
#: (node, label, stack spec)
GRID = [
    ("weight_only", "rtn w8 per-ch", "rtn:bits=8"),
    ("weight_only", "rtn w4 g64", "rtn:bits=4,group_size=64,symmetric=false"),
    ("weight_only", "rtn w4 per-ch", "rtn:bits=4,group_size=null,symmetric=false"),
    ("weight_only", "rtn w3 g64", "rtn:bits=3,group_size=64,symmetric=false"),
    ("weight_only", "gptq w8 per-ch", f"gptq:bits=8,group_size=null,symmetric=true,{CALIBRATION}"),
    ("weight_only", "gptq w4 g64", f"gptq:bits=4,group_size=64,{CALIBRATION}"),
    ("weight_only", "gptq w4 per-ch", f"gptq:bits=4,group_size=null,{CALIBRATION}"),
    ("weight_only", "gptq w3 g64", f"gptq:bits=3,group_size=64,{CALIBRATION}"),
    ("weight_only", "awq w4 g64", f"awq:bits=4,group_size=64,{CALIBRATION}"),
    ("weight_only", "awq w4 per-ch", f"awq:bits=4,group_size=null,{CALIBRATION}"),
    ("weight_only", "awq w3 g64", f"awq:bits=3,group_size=64,{CALIBRATION}"),
    ("weight_activation", "smoothquant W8A8 α=0.5", f"smoothquant:alpha=0.5,{CALIBRATION}"),
    ("weight_activation", "llm_int8 (threshold 6)", f"llm_int8:threshold=6.0,{CALIBRATION}"),
    ("qat", "qat w4 g64 (12 steps, KD)",
     "qat:bits=4,group_size=64,steps=12,batch_size=2,seq_len=128,n_samples=24,lr=1e-5"),
    ("qat", "qat w4 g64 (12 steps, KD, self-generated data)",
     "qat:bits=4,group_size=64,steps=12,batch_size=2,seq_len=128,n_samples=24,lr=1e-5,data=self_generated"),
]
NODES = {
    "weight_only": "model.compression.quantization.ptq.weight_only",
    "weight_activation": "model.compression.quantization.ptq.weight_activation",
    "qat": "model.compression.quantization.qat",
}
TITLES = {
    "weight_only": "Weight-only PTQ on SmolLM2-135M: RTN vs GPTQ vs AWQ",
    "weight_activation": "Weight-activation PTQ on SmolLM2-135M: SmoothQuant W8A8 and LLM.int8()",
    "qat": "Quantization-aware training on SmolLM2-135M (LLM-QAT style, weight-only)",
}
ARTIFACT = Path("artifacts/quantization_quality.json")
STORE = Path("artifacts/quantization_quality.db")


def suite(windows: int, limit: int):
    """The quick suite without the speed sections: quality numbers only."""
    quick = get_suite("quick")
    return quick.model_copy(update={
        "name": f"quant-quality-w{windows}-l{limit}", "speed": None, "roofline": None, "generation": None,
        "perplexity": quick.perplexity.model_copy(update={"window": 512, "max_windows": windows}),
        "fidelity": quick.fidelity.model_copy(update={"max_positions": 512 * windows}),
        "tasks": quick.tasks.model_copy(update={"limit": limit}),
    })


def mode(record: RunRecord) -> str:
    """kernel / packed / fake, from the execution paths the technique's notes name."""
    notes = " ".join(record.notes)
    found = set()
    if re.search(r"packed kernel|torch\._int_mm|int8×int8 GEMM", notes):
        found.add("kernel")
    if "dequantize-per-call" in notes:
        found.add("packed")
    if "fake-quant" in notes:
        found.add("fake")
    return "+".join(sorted(found)) or "float"


def quantized_mib(record: RunRecord) -> str:
    """``before → after`` MiB of the layers the technique replaced, from its notes."""
    found = re.search(r"([\d.]+) MiB → ([\d.]+) MiB in (\d+) layers", " ".join(record.notes))
    return f"{float(found[1]):.0f} → {float(found[2]):.1f}" if found else "—"


def row(label: str, record: RunRecord) -> list[str]:
    if not record.ok:
        return [label, "failed: " + (record.error or "").splitlines()[0][:80]] + [""] * (len(HEADER) - 2)
    value = record.value
    accuracy = value("accuracy.mean.acc")
    kl = value("fidelity.kl_mean")
    top1 = value("fidelity.top1_agreement")
    return [
        label,
        f"{value('perplexity.wikipedia.token'):.2f}",
        "—" if kl is None else f"{kl:.4f}",
        "—" if top1 is None else f"{top1:.1%}",
        "—" if accuracy is None else f"{accuracy:.1%}",
        f"{value('memory.weight_bytes') / 2**20:.1f}",
        "—" if record.is_baseline else quantized_mib(record),
        "—" if record.is_baseline else f"{value('setup.apply_s', 0.0):.1f}",
        "fp32" if record.is_baseline else mode(record),
    ]


HEADER = ["method", "ppl (wiki)", "KL vs fp32", "top-1 agree", "BIG-bench acc", "weights MiB", "quantized layers MiB",
          "calib. s", "mode"]


def markdown(node: str, rows: list[list[str]], meta: dict) -> str:
    env = meta["environment"]
    lines = [
        f"## {TITLES[node]}",
        "",
        f"Each row next to the fp32 baseline measured in the same run by effinfer's evaluator (suite "
        f"`{meta['suite']}`: perplexity on {meta['windows']} × 512 Wikipedia test tokens, KL and top-1 agreement "
        f"on the same positions, BIG-bench {', '.join(meta['tasks'])} with {meta['limit']} examples each). "
        "*weights MiB* = every stored parameter and buffer (packed codes, scales, zero points, float embeddings "
        "and norms); *quantized layers MiB* = the replaced linear layers before → after. *calib. s* = time to transform the model (calibration, search/training, packing). *mode*: "
        "`kernel` = packed int8/int4 CPU kernels or the int8×int8 GEMM; `packed` = real low-bit storage "
        "dequantized per call (no kernel for that format); `fake` = fake quantization. "
        "g64 = groups of 64 input columns (128 does not divide SmolLM2's hidden size 576); per-ch = one scale per "
        f"output channel. Calibration: {meta['calibration']} windows of the Wikipedia calibration split.",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; machine: {env.get('cpu')} ({env.get('cores')} cores), {meta['threads']} threads; "
        f"load average before/after: {meta['load_before']} / {meta['load_after']}; {meta['seconds'] / 60:.0f} min",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|---|" + "---:|" * (len(HEADER) - 2) + "---|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=8, help="512-token perplexity windows")
    parser.add_argument("--limit", type=int, default=32, help="examples per BIG-bench task")
    parser.add_argument("--only", nargs="*", default=None, help="labels (substrings) to run")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--store", type=Path, default=STORE)
    parser.add_argument("--artifact", type=Path, default=ARTIFACT)
    parser.add_argument("--tables", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    import torch

    from effinfer.evaluation.environment import load_average

    grid = [g for g in GRID if not args.only or any(o in g[1] for o in args.only)]
    chosen = suite(args.windows, args.limit)
    command = " ".join(["python", *map(shlex.quote, sys.argv)])
    load_before = load_average()
    started = time.perf_counter()
    args.store.parent.mkdir(parents=True, exist_ok=True)
    result = bench([[spec] for _, _, spec in grid], suite=chosen, model=args.model, store=args.store,
                   command=command)
    meta = {"command": command, "date": dt.datetime.now(dt.UTC).isoformat(timespec="minutes"),
            "threads": torch.get_num_threads(), "suite": chosen.name, "windows": args.windows, "limit": args.limit,
            "tasks": chosen.tasks.names, "calibration": CALIBRATION, "load_before": load_before,
            "environment": result.baseline.environment, "seconds": time.perf_counter() - started,
            "load_after": load_average()}
    records = dict(zip([label for _, label, _ in grid], result.runs))
    args.artifact.parent.mkdir(parents=True, exist_ok=True)
    args.artifact.write_text(json.dumps({
        "meta": meta, "baseline": result.baseline.model_dump(mode="json", exclude={"baseline"}),
        "runs": {label: {"node": node, "spec": spec,
                         **records[label].model_dump(mode="json", exclude={"baseline", "environment"})}
                 for node, label, spec in grid}}, indent=2))
    for node in dict.fromkeys(node for node, _, _ in grid):
        rows = [row("fp32 (baseline)", result.baseline)]
        rows += [row(label, records[label]) for n, label, _ in grid if n == node]
        path = args.tables / NODES[node] / "quantization_quality.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(markdown(node, rows, meta))
        print(path.read_text())
    print(f"took {meta['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
