"""Offloading: peak resident memory vs decode speed — weights (Qwen2.5-Coder-1.5B) and KV (SmolLM2 at 8k).

    /work/notes/cpu-exclusive timeout 600 .venv/bin/python benchmarks/offloading.py
    .venv/bin/python benchmarks/offloading.py --prompt 64 --tokens 4 --no-tables      # a quick check

Each method runs in its own process (so resident memory is its own): load the model, apply the
method, reset the peak-RSS counter (``/proc/self/clear_refs``: the load itself materializes every
weight once), then prefill the prompt (a Shakespeare play, in 512-token chunks) and decode greedy
tokens (HF forward). Reported: decode tok/s and its ratio to the first method measured in the same
run, peak RSS after the setup (VmHWM) against the model's weight bytes, and whether the greedy
tokens equal the first method's.

- weights, on Qwen2.5-Coder-1.5B-Instruct in bfloat16 (3.1 GiB of weights, large enough that
  streaming is visible beside the ~0.5 GiB the interpreter and libraries take): in memory;
  ``offload_weights`` (decoder layers streamed from files into three RAM slots with prefetch;
  ``--child offload_weights_no_prefetch`` runs it without); Accelerate ``disk_offload`` (``execution_device=cpu``: weights as memory-mapped .npy
  files, loaded per module) as the peer;
- KV, on SmolLM2-135M fp32 with an 8160-token prompt (its KV cache, 46 KB per token, is then
  ~360 MiB, two thirds of the weights): the full dynamic cache; ``offload_kv`` (the newest 1024
  entries per layer in RAM, older blocks on disk, read back exactly every step).

The table goes to ``benchmarks/results/system.inference_engine.offloading/offloading.md``.
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
#: (set, model alias, dtype, prompt tokens, decoded tokens, methods)
SETS = {
    "weights": ("qwen2.5-coder-1.5b-instruct", "bfloat16", 128, 16,
                ["in_memory", "offload_weights", "accelerate_disk_offload"]),
    "kv": ("smollm2-135m-instruct", "float32", 8160, 16, ["full_cache", "offload_kv"]),
}
METHODS = sorted({m for *_, methods in SETS.values() for m in methods} | {"offload_weights_no_prefetch"})
#: prompt tokens per forward (so an 8k prompt's activations stay small)
CHUNK = 512
KV_BUDGET, KV_BLOCK = 1024, 256


def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(method: str, alias: str, dtype: str, prompt: int, tokens: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    from effinfer.core.kv_cache import policy_cache
    from effinfer.core.models import load_model
    from effinfer.evaluation.metrics.memory import release_memory, weight_bytes
    from effinfer.evaluation.tasks_long_context import long_document

    before_load = status("VmRSS")
    model, tokenizer = load_model(alias, dtype=dtype)
    weights = weight_bytes(model)
    ids = torch.tensor([long_document(tokenizer, prompt)[:prompt]])
    folder = tempfile.mkdtemp(prefix="effinfer-offload-bench-")
    started = time.perf_counter()
    if method.startswith("offload_weights"):
        from effinfer.plugins.system.offloading import layer_streamer

        layer_streamer(model, folder, prefetch=method == "offload_weights")
    elif method == "accelerate_disk_offload":
        from accelerate import disk_offload

        disk_offload(model, folder, execution_device=torch.device("cpu"))
    setup = time.perf_counter() - started
    release_memory()
    load_peak = status("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak from here on
    from transformers import DynamicCache

    if method == "offload_kv":
        from effinfer.plugins.system.offloading import offloaded_kv_factory

        cache = policy_cache(offloaded_kv_factory(KV_BUDGET, KV_BLOCK, folder), "offload_kv")(model)
    else:
        cache = DynamicCache(config=model.config)
    out = []
    with torch.inference_mode():
        started = time.perf_counter()
        for start in range(0, prompt, CHUNK):
            piece = ids[:, start:start + CHUNK]
            logits = model(input_ids=piece, position_ids=torch.arange(start, start + piece.shape[1])[None],
                           cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        for step in range(tokens):
            token = int(logits.argmax())
            out.append(token)
            logits = model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[prompt + step]]),
                           cache=cache, use_cache=True).logits[0, -1]
        decode = time.perf_counter() - started
    return {"method": method, "model": alias, "dtype": dtype, "weights": weights, "peak_rss": status("VmHWM"),
            "load_peak": load_peak, "before_load": before_load, "rss": status("VmRSS"), "setup_s": setup,
            "prefill_s": prefill, "tok_s": tokens / decode, "tokens": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=METHODS)
    parser.add_argument("--model", default="")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--sets", nargs="+", choices=sorted(SETS), default=sorted(SETS))
    parser.add_argument("--prompt", type=int, default=0, help="override every set's prompt length (a quick check)")
    parser.add_argument("--tokens", type=int, default=0, help="override every set's decoded tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-tables", action="store_true")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.model, args.dtype, args.prompt, args.tokens,
                                           args.threads)), flush=True)
        return
    results = {}
    for name in args.sets:
        alias, dtype, prompt, tokens, methods = SETS[name]
        prompt, tokens = args.prompt or prompt, args.tokens or tokens
        rows = []
        for method in methods:
            done = subprocess.run([sys.executable, __file__, "--child", method, "--model", alias, "--dtype", dtype,
                                   "--prompt", str(prompt), "--tokens", str(tokens), "--threads", str(args.threads)],
                                  capture_output=True, text=True)
            line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                print(f"{method} failed:\n{done.stderr[-2000:]}", flush=True)
                continue
            rows.append(json.loads(line[7:]))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "tokens"}), flush=True)
        results[name] = (rows, prompt, tokens)
    if args.no_tables or any(not rows for rows, *_ in results.values()):
        return
    lines = table_header("Offloading: peak resident memory vs decode speed",
                         "/work/notes/cpu-exclusive timeout 600 .venv/bin/python benchmarks/offloading.py",
                         args.threads, f"; load before: {machine_load()}")
    lines += ["Each method in its own process. Peak RSS = VmHWM from the end of the setup (load + offload, then "
              "reset with /proc/self/clear_refs) to the end of decoding; the setup's own peak beside it (loading "
              "materializes every weight once). Decode speed ÷ the first row of the same table, measured in the "
              "same run; prompt fed in 512-token chunks; greedy tokens compared with the first row's.", ""]
    for name, (rows, prompt, tokens) in results.items():
        base = rows[0]
        what = ("weights" if name == "weights" else "KV cache")
        lines += [f"### {what}: {base['model']} {base['dtype']}, {prompt}-token prompt, {tokens} tokens", "",
                  f"Model weights: {base['weights'] / 2**20:,.0f} MiB; RSS of the process before loading: "
                  f"{base['before_load'] / 2**20:,.0f} MiB (interpreter, torch, transformers)."
                  + (f" offload_kv keeps the newest {KV_BUDGET} (+ up to {KV_BLOCK}) entries per layer in RAM, the "
                     "rest on disk, read back every step (exact)." if name == "kv" else ""), "",
                  "| method | decode tok/s (×first) | prefill s | peak RSS MiB | peak RSS − RSS before loading, MiB "
                  "(÷ weights) | setup peak MiB | same tokens |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            above = r["peak_rss"] - r["before_load"]
            lines.append(f"| {r['method']} | {r['tok_s']:.2f} ({r['tok_s'] / base['tok_s']:.2f}×) | "
                         f"{r['prefill_s']:.1f} | {r['peak_rss'] / 2**20:,.0f} | {above / 2**20:,.0f} "
                         f"({above / base['weights']:.2f}) | {r['load_peak'] / 2**20:,.0f} | "
                         f"{'✓' if r['tokens'] == base['tokens'] else '✗'} |")
        lines.append("")
    lines += ["Setup peak: `load_model` reads the checkpoint in fp32 (Qwen's converted checkpoint is fp32, 7.1 GB) "
              "and casts it, so every method's setup peaks far above its decode peak; the offloading methods could "
              "avoid it by writing their files from the checkpoint tensor by tensor (not done).",
              "The CUDA (RAM ↔ GPU) path is not implemented: no accelerator was lent to this project.", ""]
    print(write_table(NODE, "offloading", "\n".join(lines)))


if __name__ == "__main__":
    main()
