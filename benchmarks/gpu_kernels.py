"""GPU benchmark of effinfer.kernels: each Triton kernel vs torch fp16 (cuBLAS / SDPA) and torch.compile, and
the engine's decode and prefill (fp16, W8A16, W4A16 through the Triton kernels) vs HF ``generate``.

    .venv/bin/python benchmarks/gpu_kernels.py              # on a CUDA GPU, ≤ 10 minutes
    .venv/bin/python benchmarks/gpu_kernels.py --dry-run    # CPU, Triton interpreter, tiny sizes (CI)

Kernels, at batch (tokens) 1, 2, 4, 8, 16 — each checked against the plain-torch reference first:

- ``dequant_matmul`` W4A16 (group 128) and W8A16 (per channel) on a 4096 × 4096 and an 11008 × 4096
  weight: vs ``x @ W.T`` in fp16 (cuBLAS) and vs ``torch.compile`` of dequantize-then-matmul;
- ``decode_attention`` (split-K flash-decoding, 32 query / 8 KV heads, head 128, context 4096): vs SDPA
  (fp16, GQA) and its compiled form;
- ``add_rmsnorm`` (hidden 4096) and ``rotary_kv_write`` (32/8 heads, head 128): vs the eager torch ops and
  their compiled form.

Engine: SmolLM2-135M's architecture in fp16 (its weights when the model cache is there, random weights
of the same shapes otherwise: speed does not depend on the values), 128-token prompt, 64 new tokens,
batch 1: HF ``generate`` and the static engine's decoding (``StaticDecoding``, the public API) for fp16,
W8A16 and W4A16 (every linear layer replaced by the Triton dequant-matmul); vLLM when it imports.

Writes ``artifacts/gpu_kernels.json`` and
``benchmarks/results/system.inference_engine.graph_operator.linear_operator/gpu_kernels.md``
(``--dry-run``: ``artifacts/gpu_kernels_dry_run.{json,md}``, no table under benchmarks/results).

``--cpu`` times the CPU implementations instead (a timing run: ``flock -x /tmp/effinfer-cpu.lock``):
flash-decoding split-KV attention vs SDPA at 512 / 2k / 8k context (SmolLM2's 9/3 heads of 64), and the
blocked dequant-matmul vs the dense float32 GEMV and PyTorch's packed int4 kernel; table in
``benchmarks/results/system.inference_engine.graph_operator.attention_operator/cpu_kernels.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "benchmarks/results/system.inference_engine.graph_operator.linear_operator/gpu_kernels.md"
ARTIFACTS = ROOT / "artifacts"
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
               rms_norm_eps=1e-5, tie_word_embeddings=True)


def timer(device: torch.device, dry_run: bool) -> Callable[[Callable[[], object]], float]:
    """Median seconds of a call: CUDA-synchronized on a GPU; one call (after a warm-up) in a dry run."""
    def measure(call: Callable[[], object]) -> float:
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        repeats = 1 if dry_run else 20
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - started)
        return statistics.median(samples)
    return measure


def compiled(fn: Callable, dry_run: bool) -> Callable:
    # a dry run exercises the torch.compile path without paying Inductor's C++ build on CPU
    return torch.compile(fn, backend="eager" if dry_run else "inductor", dynamic=False)


def kernel_rows(device: torch.device, dtype: torch.dtype, batches: list[int], dry_run: bool) -> list[dict]:
    from effinfer import kernels
    from effinfer.kernels import reference
    from effinfer.plugins.model.quantization.packing import quantize

    measure = timer(device, dry_run)
    rows: list[dict] = []

    def record(kernel: str, shape: str, batch: int, error: float, times: dict[str, float]) -> None:
        row = {"kernel": kernel, "shape": shape, "batch": batch, "max_rel_error": error,
               **{f"{name}_s": t for name, t in times.items()}}
        base = times.get("torch_fp16") or times.get("torch_eager")
        row.update({f"{name}_speedup": base / t for name, t in times.items() if t})
        rows.append(row)
        print(f"{kernel:<16} {shape:<22} B={batch:<3} err {error:.1e}  " +
              "  ".join(f"{n} {t * 1e6:8.1f} µs" for n, t in times.items()), flush=True)

    def error(out: torch.Tensor, ref: torch.Tensor) -> float:
        return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-6))

    generator = torch.Generator().manual_seed(0)
    sizes = [(64, 64), (96, 64)] if dry_run else [(4096, 4096), (11008, 4096)]
    for n_out, n_in in sizes:
        weight = torch.randn(n_out, n_in, generator=generator) / n_in**0.5
        for label, bits, group in (("W4A16 g128", 4, 32 if dry_run else 128), ("W8A16", 8, None)):
            qt = quantize(weight, bits, group, bits == 8)
            packed = kernels.PackedWeight.from_quantized(qt).to(device)
            dense = qt.dequantize().to(device=device, dtype=dtype)
            fused = compiled(lambda x, p=packed: reference.dequant_matmul(x, p), dry_run)
            for batch in batches:
                x = torch.randn(batch, n_in, generator=generator).to(device=device, dtype=dtype)
                out = kernels.dequant_matmul(x, packed, backend="triton")
                times = {"triton": measure(lambda: kernels.dequant_matmul(x, packed, backend="triton")),
                         "torch_fp16": measure(lambda: x @ dense.t()),
                         "compiled_dequant": measure(lambda: fused(x))}
                record(f"dequant_matmul {label}", f"{n_out}×{n_in}", batch, error(out, x.float() @ dense.float().t()),
                       times)

    heads, kv_heads, dim, context = (4, 2, 16, 64) if dry_run else (32, 8, 128, 4096)

    def sdpa(q, k, v):
        groups = q.shape[1] // k.shape[1]
        return torch.nn.functional.scaled_dot_product_attention(
            q.unsqueeze(2), k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)).squeeze(2)

    sdpa_compiled = compiled(sdpa, dry_run)
    for batch in batches:
        q = torch.randn(batch, heads, dim, generator=generator).to(device=device, dtype=dtype)
        k = torch.randn(batch, kv_heads, context, dim, generator=generator).to(device=device, dtype=dtype)
        v = torch.randn(batch, kv_heads, context, dim, generator=generator).to(device=device, dtype=dtype)
        lengths = torch.full((batch,), context, device=device)
        out = kernels.decode_attention(q, k, v, lengths, backend="triton")
        times = {"triton": measure(lambda: kernels.decode_attention(q, k, v, lengths, backend="triton")),
                 "torch_fp16": measure(lambda: sdpa(q, k, v)), "compiled": measure(lambda: sdpa_compiled(q, k, v))}
        record("decode_attention", f"H{heads}/{kv_heads} D{dim} T{context}", batch, error(out, sdpa(q, k, v)), times)

    hidden = 64 if dry_run else 4096
    norm_weight = torch.randn(hidden, generator=generator).to(device=device, dtype=dtype)
    norm_compiled = compiled(lambda x, r: reference.add_rmsnorm(x, r, norm_weight), dry_run)
    for batch in batches:
        x = torch.randn(batch, hidden, generator=generator).to(device=device, dtype=dtype)
        r = torch.randn(batch, hidden, generator=generator).to(device=device, dtype=dtype)
        out, _ = kernels.add_rmsnorm(x, r, norm_weight, backend="triton")
        times = {"triton": measure(lambda: kernels.add_rmsnorm(x, r, norm_weight, backend="triton")),
                 "torch_eager": measure(lambda: reference.add_rmsnorm(x, r, norm_weight)),
                 "compiled": measure(lambda: norm_compiled(x, r))}
        record("add_rmsnorm", f"hidden {hidden}", batch, error(out, reference.add_rmsnorm(x, r, norm_weight)[0]), times)

    rot_heads, rot_kv, rot_dim, capacity = (4, 2, 16, 32) if dry_run else (32, 8, 128, 4096)
    for batch in batches:
        q = torch.randn(batch, rot_heads, 1, rot_dim, generator=generator).to(device=device, dtype=dtype)
        k = torch.randn(batch, rot_kv, 1, rot_dim, generator=generator).to(device=device, dtype=dtype)
        v = torch.randn(batch, rot_kv, 1, rot_dim, generator=generator).to(device=device, dtype=dtype)
        cos = torch.randn(batch, 1, rot_dim, generator=generator).to(device=device, dtype=dtype)
        sin = torch.randn(batch, 1, rot_dim, generator=generator).to(device=device, dtype=dtype)
        k_cache = torch.zeros(batch, rot_kv, capacity, rot_dim, device=device, dtype=dtype)
        v_cache = torch.zeros_like(k_cache)
        position = torch.tensor([capacity // 2], device=device)
        rotary_compiled = compiled(reference.rotary_kv_write, dry_run)
        ref = reference.rotary_kv_write(q, k, v, cos, sin, k_cache.clone(), v_cache.clone(), position)
        out = kernels.rotary_kv_write(q, k, v, cos, sin, k_cache, v_cache, position, backend="triton")
        times = {"triton": measure(lambda: kernels.rotary_kv_write(q, k, v, cos, sin, k_cache, v_cache, position,
                                                                   backend="triton")),
                 "torch_eager": measure(lambda: reference.rotary_kv_write(q, k, v, cos, sin, k_cache, v_cache,
                                                                          position)),
                 "compiled": measure(lambda: rotary_compiled(q, k, v, cos, sin, k_cache, v_cache, position))}
        record("rotary_kv_write", f"H{rot_heads}/{rot_kv} D{rot_dim}", batch, error(out, ref), times)
    return rows


class TritonQuantLinear(torch.nn.Module):
    """A linear layer whose packed weight runs through effinfer.kernels.dequant_matmul (Triton on CUDA)."""

    def __init__(self, linear: torch.nn.Linear, bits: int, group: int | None):
        super().__init__()
        from effinfer import kernels
        from effinfer.plugins.model.quantization.packing import quantize

        qt = quantize(linear.weight.detach().float().cpu(), bits, group, bits == 8)
        self.packed = kernels.PackedWeight.from_quantized(qt).to(linear.weight.device)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from effinfer import kernels

        out = kernels.dequant_matmul(x, self.packed)
        return out if self.bias is None else out + self.bias


def quantized_copy(model: torch.nn.Module, bits: int, group: int | None) -> torch.nn.Module:
    import copy

    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child.in_features % (group or child.in_features) == 0:
                setattr(module, child_name, TritonQuantLinear(child, bits, group))
    return model


def engine_rows(device: torch.device, dtype: torch.dtype, dry_run: bool) -> tuple[list[dict], str]:
    from effinfer.core.generation import GenerationConfig
    from effinfer.plugins.system.engine import StaticDecoding

    prompt, new_tokens, rounds = (8, 4, 1) if dry_run else (128, 64, 3)
    if dry_run:
        from effinfer.core.testing import tiny_llama

        model, _ = tiny_llama(layers=2, seed=0)
        source = "tiny_llama (random weights)"
    else:
        try:
            from effinfer.core.models import DEFAULT_MODEL, load_model

            model, _ = load_model(DEFAULT_MODEL)
            source = f"{DEFAULT_MODEL} (its weights)"
        except Exception as problem:  # noqa: BLE001 - no model cache on this machine: same shapes, random weights
            from transformers import LlamaConfig, LlamaForCausalLM

            model = LlamaForCausalLM(LlamaConfig(**SMOLLM2))
            source = f"SmolLM2-135M architecture, random weights ({type(problem).__name__})"
    model = model.to(device=device, dtype=dtype).eval()
    group = 32 if dry_run else 64
    models = {"fp16": model, "W8A16": quantized_copy(model, 8, None), "W4A16": quantized_copy(model, 4, group)}
    ids = torch.randint(100, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    ids, mask = ids.to(device), torch.ones(1, prompt, dtype=torch.long, device=device)
    config = GenerationConfig(max_new_tokens=new_tokens)
    rows = []
    for name, m in models.items():
        def hf(n: int, m=m) -> float:
            started = time.perf_counter()
            with torch.inference_mode():
                m.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - started

        hf(new_tokens)
        hf_prefill = statistics.median(hf(1) for _ in range(rounds))
        hf_total = statistics.median(hf(new_tokens) for _ in range(rounds))
        row = {"model": name, "hf_prefill_s": hf_prefill,
               "hf_decode_tok_s": (new_tokens - 1) / max(hf_total - hf_prefill, 1e-9)}
        try:
            strategy = StaticDecoding()
            strategy.generate(m, ids, mask, config, set())
            runs = [strategy.generate(m, ids, mask, config, set()) for _ in range(rounds)]
            row["engine_prefill_s"] = statistics.median(r.prefill_seconds for r in runs)
            row["engine_decode_tok_s"] = statistics.median((r.new_tokens - 1) / r.decode_seconds for r in runs)
            row["engine_vs_hf"] = row["engine_decode_tok_s"] / row["hf_decode_tok_s"]
        except Exception as problem:  # noqa: BLE001 - recorded in the table, the rest of the run goes on
            row["engine_error"] = f"{type(problem).__name__}: {problem}"[:300]
        rows.append(row)
        print(f"engine {name}: {row}", flush=True)
    if not dry_run:
        rows.append(vllm_row(prompt, new_tokens, rounds))
    return rows, source


def vllm_row(prompt: int, new_tokens: int, rounds: int) -> dict:
    """vLLM on the same model (the converted safetensors folder in the effinfer cache), fp16, greedy, EOS ignored:
    decode tok/s = (n − 1) ÷ (time of n tokens − time of 1 token), as for HF generate."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        return {"model": "vLLM", "note": "not installed (pip install vllm where a wheel matches the GPU's CUDA)"}
    try:
        from effinfer.core.models import BUILTIN_ALIASES, DEFAULT_MODEL

        folder = BUILTIN_ALIASES[DEFAULT_MODEL].folder
        llm = LLM(model=str(folder), dtype="float16", gpu_memory_utilization=0.3, enforce_eager=False, seed=0)
        ids = torch.randint(100, 49000, (prompt,), generator=torch.Generator().manual_seed(0)).tolist()

        def run(n: int) -> float:
            params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)
            started = time.perf_counter()
            llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
            return time.perf_counter() - started

        run(new_tokens)
        first = statistics.median(run(1) for _ in range(rounds))
        total = statistics.median(run(new_tokens) for _ in range(rounds))
        return {"model": "vLLM fp16 (in the engine columns)", "engine_prefill_s": first,
                "engine_decode_tok_s": (new_tokens - 1) / (total - first),
                "note": f"vllm {getattr(__import__('vllm'), '__version__', '?')}, its own CUDA graphs and kernels"}
    except Exception as problem:  # noqa: BLE001 - a peer that fails leaves a note, the table stays
        return {"model": "vLLM", "note": f"failed: {type(problem).__name__}: {problem}"[:300]}


def markdown(meta: dict, kernel_table: list[dict], engine_table: list[dict]) -> str:
    lines = [f"## Triton kernels and the engine on {meta['device']}", "",
             f"- command: `{meta['command']}`", f"- date: {meta['date']}; torch {meta['torch']}, triton {meta['triton']}",
             f"- dtype {meta['dtype']}; each time the median of {meta['repeats']} CUDA-synchronized calls after a "
             "warm-up; speed-up = baseline (torch fp16 cuBLAS/SDPA, or eager torch) time ÷ the method's time", "",
             "| kernel | shape | batch | max rel. error | Triton µs | torch µs | compiled µs | Triton speed-up |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in kernel_table:
        base = row.get("torch_fp16_s", row.get("torch_eager_s"))
        comp = row.get("compiled_dequant_s", row.get("compiled_s"))
        lines.append(f"| {row['kernel']} | {row['shape']} | {row['batch']} | {row['max_rel_error']:.1e} | "
                     f"{row['triton_s'] * 1e6:.1f} | {base * 1e6:.1f} | {comp * 1e6:.1f} | "
                     f"{row['triton_speedup']:.2f}× |")
    lines += ["", f"### Engine decode and prefill ({meta['engine_source']}, batch 1)", "",
              "| model | HF generate tok/s | engine tok/s | engine ÷ HF | HF prefill ms | engine prefill ms | note |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for row in engine_table:
        if "hf_decode_tok_s" not in row:
            peer, peer_prefill = row.get("engine_decode_tok_s"), row.get("engine_prefill_s")
            rate = "—" if peer is None else f"{peer:.1f}"
            prefill = "—" if peer_prefill is None else f"{peer_prefill * 1e3:.1f}"
            lines.append(f"| {row['model']} | — | {rate} | — | — | {prefill} | {row.get('note', '')} |")
            continue
        engine = row.get("engine_decode_tok_s")
        lines.append(f"| {row['model']} | {row['hf_decode_tok_s']:.1f} | {engine or 0:.1f} | "
                     f"{row.get('engine_vs_hf', 0):.2f} | {row['hf_prefill_s'] * 1e3:.1f} | "
                     f"{row.get('engine_prefill_s', 0) * 1e3:.1f} | {row.get('engine_error', '')} |")
    return "\n".join(lines) + "\n"


CPU_TABLE = ROOT / "benchmarks/results/system.inference_engine.graph_operator.attention_operator/cpu_kernels.md"
CPU_MATMUL_TABLE = ROOT / "benchmarks/results/system.inference_engine.graph_operator.linear_operator/cpu_kernels.md"


def cpu_rows(quick: bool) -> list[dict]:
    """CPU implementations vs torch at batch 1 (median of 20 calls each, interleaved)."""
    from effinfer import kernels
    from effinfer.kernels import native, packed_cpu
    from effinfer.plugins.model.quantization.packing import quantize

    generator = torch.Generator().manual_seed(0)
    rows = []

    def timed(calls: dict[str, Callable[[], object]]) -> dict[str, float]:
        for call in calls.values():
            call()
        samples: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(3 if quick else 20):
            for name, call in calls.items():
                started = time.perf_counter()
                call()
                samples[name].append(time.perf_counter() - started)
        return {name: statistics.median(v) for name, v in samples.items()}

    heads, kv_heads, dim = 9, 3, 64
    for context in ([64] if quick else [512, 2048, 8192]):
        q = torch.randn(1, heads, dim, generator=generator)
        k = torch.randn(1, kv_heads, context, dim, generator=generator)
        v = torch.randn(1, kv_heads, context, dim, generator=generator)
        lengths = torch.tensor([context])
        kr, vr = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
        calls = {
            "split_kv": lambda: kernels.decode_attention(q, k, v, lengths, backend="cpu"),
            "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), kr, vr),
            "sdpa_gqa": lambda: torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True),
        }
        if native.problem() is None:
            new_k, new_v, angle = torch.randn(1, kv_heads, dim), torch.randn(1, kv_heads, dim), torch.zeros(1, dim)
            first = torch.zeros(1, dtype=torch.long)
            calls["native (rotary + KV write + attention)"] = lambda: native.decode_attention(
                q.clone(), new_k.clone(), new_v, angle.cos(), angle.sin(), k, v, context - 1, first, dim**-0.5)
        times = timed(calls)
        rows.append({"op": "decode_attention", "shape": f"H{heads}/{kv_heads} D{dim} T{context}", **times})
    n_out, n_in = (64, 64) if quick else (1536, 576)
    weight = torch.randn(n_out, n_in, generator=generator)
    x = torch.randn(1, n_in, generator=generator)
    qt = quantize(weight, 4, 32, False)
    packed = kernels.PackedWeight.from_quantized(qt)
    calls = {"dense_fp32 (MKL)": lambda: x @ weight.t(),
             "blocked_dequant": lambda: kernels.cpu._dequantize_rows(packed, slice(None), torch.float32) @ x.t()}
    if native.problem() is None:
        calls["native W4 g32"] = lambda: native.dequant_matmul(x, packed)
        calls["native dense_fp32"] = lambda: native.linear(x, weight)
    if packed_cpu.int4_kernel_problem(qt) is None:
        int4, pairs = packed_cpu.int4_kernel_weight(qt)
        calls["aten_int4"] = lambda: packed_cpu.int4_weight_only_mm(x, int4, 32, pairs)
    rows.append({"op": "dequant_matmul W4 g32", "shape": f"{n_out}×{n_in}, 1 token", **timed(calls)})
    for row in rows:
        print(row, flush=True)
    return rows


def cpu_markdown(rows: list[dict], command: str) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    title = ("decode attention: split-KV, SDPA and the native kernel" if rows and rows[0]["op"] == "decode_attention"
             else "one-token matmuls: MKL, torch dequantize-and-multiply and the native kernels")
    lines = [f"## CPU kernels, {title}", "",
             f"- command: `{command}`",
             f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; machine: {cpu}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}",
             "- batch 1, one query token; median of 20 interleaved calls; times in µs", "",
             "| operator | shape | implementation | µs | × first |", "|---|---|---|---:|---:|"]
    for row in rows:
        names = [k for k in row if k not in ("op", "shape")]
        for name in names:
            lines.append(f"| {row['op']} | {row['shape']} | {name} | {row[name] * 1e6:.1f} | "
                         f"{row[names[0]] / row[name]:.2f} |")
    lines += ["", "split_kv = `effinfer.kernels.cpu.decode_attention` (splits of 512 positions merged by log-sum-exp); "
              "sdpa = `scaled_dot_product_attention` on the KV heads repeated to the query heads; sdpa_gqa = SDPA with "
              "`enable_gqa=True`; native = `effinfer.kernels.native.decode_attention` (rotates q and k, writes k/v at the "
              "slot, then attends over the valid columns, parallel over query heads: the engine's native step calls "
              "it). Matmul rows: the weight is 1536×576 (one of SmolLM2's gate/up projections), cache-resident at "
              "this size, so the rows compare compute paths, not memory streaming (the engine benchmark's breakdown "
              "times the streaming case); blocked_dequant = dequantize then multiply in torch ops; native W4 g32 = "
              "`effinfer.kernels.native.dequant_matmul` on the packed codes. × first = the first row's time ÷ this "
              "row's (> 1: faster than the first).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny sizes")
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--no-engine", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cpu", action="store_true", help="time the CPU implementations (flock -x)")
    parser.add_argument("--quick", action="store_true", help="with --cpu: tiny sizes, no table")
    args = parser.parse_args(argv)
    if args.cpu:
        rows = cpu_rows(args.quick)
        command = "flock -x /tmp/effinfer-cpu.lock python benchmarks/gpu_kernels.py --cpu"
        tables = {CPU_TABLE: [r for r in rows if r["op"] == "decode_attention"],
                  CPU_MATMUL_TABLE: [r for r in rows if r["op"] != "decode_attention"]}
        for path, part in tables.items():
            text = cpu_markdown(part, command)
            if not args.quick:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
            print(text)
        return
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        device, dtype, batches = torch.device("cpu"), torch.float32, [1]
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device here: run with --dry-run, or on a GPU machine")
        device, dtype, batches = torch.device("cuda"), torch.float16, [int(b) for b in args.batches.split(",")]
    from effinfer.kernels.dispatch import triton_problem

    if triton_problem():
        parser.error(triton_problem())
    import triton

    started = time.perf_counter()
    kernel_table = kernel_rows(device, dtype, batches, args.dry_run)
    engine_table, source = ([], "skipped") if args.no_engine else engine_rows(device, dtype, args.dry_run)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter, dry run)",
            "command": "python benchmarks/gpu_kernels.py" + (" --dry-run" if args.dry_run else ""),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
            "triton": triton.__version__, "dtype": str(dtype).replace("torch.", ""), "repeats": 1 if args.dry_run else 20,
            "engine_source": source, "wall_s": time.perf_counter() - started}
    name = "gpu_kernels_dry_run" if args.dry_run else "gpu_kernels"
    out = args.out or ARTIFACTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "kernels": kernel_table, "engine": engine_table}, indent=1))
    text = markdown(meta, kernel_table, engine_table)
    table = out.with_suffix(".md") if args.dry_run or args.out else TABLE
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(text)
    print(text)
    print(f"wrote {out} and {table} in {meta['wall_s']:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        raise SystemExit(1)
