"""Weight offloading on SmolLM2-135M: peak resident memory vs decode speed, Accelerate's disk offload beside it.

    flock -x /tmp/effinfer-cpu.lock .venv/bin/python benchmarks/offloading.py

Each method runs in its own process (so resident memory is its own): load the model, apply the
method, reset the peak-RSS counter (``/proc/self/clear_refs``: the load itself materializes every
weight once), then prefill a ``--prompt``-token text and decode ``--tokens`` greedy tokens (HF
forward, dynamic cache). Reported: decode tok/s and its ratio to the in-memory model measured in
the same run, peak RSS after the load (VmHWM) against the model's weight bytes, and whether the
greedy tokens equal the in-memory model's. Methods: in memory; ``offload_weights`` with and
without prefetch (layers streamed from files into three RAM slots); Accelerate ``disk_offload``
(``execution_device=cpu``: weights as memory-mapped .npy files, loaded per module). The table goes
to ``benchmarks/results/system.inference_engine.offloading/offloading.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import machine_load, table_header, write_table  # noqa: E402

NODE = "system.inference_engine.offloading"
METHODS = ["in_memory", "offload_weights", "offload_weights_no_prefetch", "accelerate_disk_offload"]


def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(method: str, prompt: int, tokens: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    from effinfer.core.models import load_model
    from effinfer.evaluation.metrics.memory import release_memory, weight_bytes
    from effinfer.evaluation.tasks_long_context import long_document

    before_load = status("VmRSS")
    model, tokenizer = load_model("smollm2-135m-instruct")
    weights = weight_bytes(model)
    ids = torch.tensor([long_document(tokenizer, prompt)[:prompt]])
    folder = tempfile.mkdtemp(prefix="effinfer-offload-bench-")
    if method.startswith("offload_weights"):
        from effinfer.plugins.system.offloading import LayerStreamer

        LayerStreamer(model, folder, prefetch=method == "offload_weights")
    elif method == "accelerate_disk_offload":
        from accelerate import disk_offload

        disk_offload(model, folder, execution_device=torch.device("cpu"))
    release_memory()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak from here on
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = []
    with torch.inference_mode():
        started = time.perf_counter()
        logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(tokens):
            token = int(logits.argmax())
            out.append(token)
            logits = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True).logits[0, -1]
        decode = time.perf_counter() - started
    return {"method": method, "weights": weights, "peak_rss": status("VmHWM"), "before_load": before_load, "rss": status("VmRSS"),
            "prefill_s": prefill, "tok_s": tokens / decode, "tokens": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=METHODS)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-tables", action="store_true")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.prompt, args.tokens, args.threads)), flush=True)
        return
    rows = []
    for method in METHODS:
        done = subprocess.run([sys.executable, __file__, "--child", method, "--prompt", str(args.prompt),
                               "--tokens", str(args.tokens), "--threads", str(args.threads)],
                              capture_output=True, text=True)
        line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(f"{method} failed:\n{done.stderr[-2000:]}", flush=True)
            continue
        rows.append(json.loads(line[7:]))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "tokens"}), flush=True)
    if args.no_tables or not rows or rows[0]["method"] != "in_memory":
        return
    base = rows[0]
    lines = table_header(f"Weight offloading (SmolLM2-135M fp32, {args.prompt}-token prompt, {args.tokens} tokens)",
                         "flock -x /tmp/effinfer-cpu.lock .venv/bin/python benchmarks/offloading.py", args.threads,
                         f"; load before: {machine_load()}")
    lines += [f"Each method in its own process; peak RSS = VmHWM after the load (reset with /proc/self/clear_refs), "
              f"the model's weights are {base['weights'] / 2**20:.0f} MiB. Decode speed ÷ the in-memory model in the "
              f"same run. The tied embedding / LM head (108 MiB) stays resident in every method; the interpreter, torch "
              f"and transformers take the RSS before loading (the checkpoint is memory-mapped, so RSS grows as "
              f"the weights are touched).", "",
              "| method | decode tok/s (×in-memory) | prefill s | peak RSS MiB | peak RSS − RSS before loading, MiB (÷ weights) "
              "| same tokens |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['tok_s']:.1f} ({r['tok_s'] / base['tok_s']:.2f}×) | {r['prefill_s']:.2f} | "
                     f"{r['peak_rss'] / 2**20:.0f} | {(r['peak_rss'] - r['before_load']) / 2**20:.0f} "
                     f"({(r['peak_rss'] - r['before_load']) / base['weights']:.2f}) | "
                     f"{'✓' if r['tokens'] == base['tokens'] else '✗'} |")
    lines += ["", "KV offloading beyond a budget and the CUDA (RAM ↔ GPU) path are not implemented yet.", ""]
    print(write_table(NODE, "offloading", "\n".join(lines)))


if __name__ == "__main__":
    main()
