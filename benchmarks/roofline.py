"""The analytical roofline model (system › hardware accelerator) checked against measured CPU decoding.

    flock -x /tmp/effinfer-cpu.lock .venv/bin/python benchmarks/roofline.py      # ~3 min
    .venv/bin/python benchmarks/roofline.py --quick                              # tiny model, seconds

1. Probes this CPU (``plugins/system/hardware/probe.py``): streaming read bandwidth, float32/bf16 GEMM
   FLOP/s, the cost of one dispatched op, and the effective bandwidth of each decode matmul kernel on
   SmolLM2's own matrix shapes (fp32: ``F.linear``; W8A16: ``aten._weight_int8pack_mm``; W4A16 g32:
   ``aten._weight_int4pack_mm_for_cpu``).
2. Measures greedy decoding of SmolLM2-135M fp32, rtn int8 and rtn int4 g32 (the packed kernels,
   bf16 around them, as ``benchmarks/quantization_speed.py`` builds them), interleaved round by round,
   and counts the aten ops one decode step dispatches.
3. Predicts the same decode step with the roofline model twice: *ideal* (bytes ÷ stream bandwidth,
   FLOPs ÷ GEMM peak) and *probed* (each matmul at its kernel's probed bandwidth + the counted ops ×
   the per-op cost), and reports predicted ÷ measured.
4. Tabulates predicted decode and prefill on the hardware catalogue (this CPU, A100, H100, H200, the
   survey's FPGA designs) for SmolLM2-135M, Qwen2.5-Coder-1.5B and Llama-2-7B under several stacks.

Writes ``artifacts/roofline.json`` and ``benchmarks/results/system.hardware_accelerator/roofline.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import statistics
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

from effinfer.core.compose import ComposedModel
from effinfer.core.experiment import Experiment
from effinfer.core.models import DEFAULT_MODEL, load_model
from effinfer.kernels import packed_cpu
from effinfer.plugins.model.quantization.packing import quantize
from effinfer.plugins.system.hardware import probe
from effinfer.plugins.system.hardware.roofline import (CATALOGUE, GB, STACKS, TFLOP, Hardware, ModelShape, decode,
                                                       prefill)

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "benchmarks/results/system.hardware_accelerator/roofline.md"
ARTIFACT = ROOT / "artifacts/roofline.json"
FORMATS = {  # stack name → rtn spec (None: the model as loaded)
    "fp32": None,
    "w8a16": "rtn:bits=8,group_size=null,symmetric=true,execution=kernel,skip_modules=[]",
    "w4a16_g32": "rtn:bits=4,group_size=32,symmetric=false,execution=kernel,skip_modules=[]",
}
#: model shapes for the catalogue table (Llama-2-7B: Touvron et al., arXiv:2307.09288, its config.json)
LLAMA2_7B = ModelShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, head_dim=128, vocab=32000,
                       tied_embeddings=False)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def probe_cpu(shape: ModelShape, quick: bool) -> tuple[Hardware, dict]:
    """This CPU as a catalogue entry: stream bandwidth, GEMM peaks, op cost, and per-kernel GEMV bandwidth."""
    torch.manual_seed(0)
    mib = 8 if quick else 256
    figures = {"read_bandwidth": probe.read_bandwidth(mib), "fp32_gemm_flops": probe.gemm_flops(128 if quick else 1024),
               "bf16_gemm_flops": probe.gemm_flops(128 if quick else 1024, torch.bfloat16),
               "op_overhead_s": probe.op_overhead(200 if quick else 2000)}
    # one layer's projections, and the output head, timed separately and weighted as the model has them
    layer = list(shape.matrices().values())
    head = [(shape.hidden, shape.vocab)]
    gemv = {}
    for stack_name in ("fp32",) if quick else ("fp32", "w8a16", "w4a16_g32"):
        total_bytes = total_seconds = 0.0
        for matrices, repeat in ((layer, shape.layers), (head, 1)):
            call = _matmul_set(matrices, stack_name)
            nbytes = sum(STACKS[stack_name].weight_bytes(i, o) for i, o in matrices)
            total_seconds += repeat * nbytes / probe.matmul_bandwidth(call, nbytes)
            total_bytes += repeat * nbytes
        gemv[stack_name] = total_bytes / total_seconds
    figures["gemv_bandwidth"] = gemv
    flops = {"fp32": figures["fp32_gemm_flops"], "bf16": figures["bf16_gemm_flops"], "int8": figures["bf16_gemm_flops"]}
    name = f"{cpu_name()}, {torch.get_num_threads()} threads"
    measured = Hardware(f"this CPU (probed kernels): {name}", figures["read_bandwidth"], flops,
                        "probed in this run: benchmarks/roofline.py", "measured", gemv, figures["op_overhead_s"])
    return measured, figures


def _matmul_set(matrices: list[tuple[int, int]], stack_name: str):
    """A call running one-token matmuls of the given ``(in, out)`` shapes through ``stack_name``'s kernel."""
    weights = [torch.randn(n_out, n_in) / n_in**0.5 for n_in, n_out in matrices]
    inputs = [torch.randn(1, n_in) for n_in, _ in matrices]
    if stack_name == "fp32":
        return lambda: [torch.nn.functional.linear(x, w) for x, w in zip(inputs, weights)]
    if stack_name == "w8a16":
        packed = [packed_cpu.int8_kernel_weight(quantize(w, 8, None, True)) for w in weights]
        return lambda: [packed_cpu.int8_weight_only_mm(x, q, s) for x, (q, s) in zip(inputs, packed)]
    packed = [packed_cpu.int4_kernel_weight(quantize(w, 4, 32, False)) for w in weights]
    return lambda: [packed_cpu.int4_weight_only_mm(x, p, 32, sz) for x, (p, sz) in zip(inputs, packed)]


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def decode_run(model, ids: torch.Tensor, steps: int) -> float:
    """Seconds per greedy decode step after a prefill of ``ids`` (the HF forward loop on a DynamicCache)."""
    cache = DynamicCache()
    token = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1, True)
    started = time.perf_counter()
    for _ in range(steps):
        token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    return (time.perf_counter() - started) / steps


@torch.no_grad()
def count_ops(model, ids: torch.Tensor) -> int:
    cache = DynamicCache()
    token = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1, True)
    with OpCounter() as counter:
        model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    return sum(counter.ops.values())


def build(source: str, stack: ExitStack) -> tuple[dict, ModelShape]:
    model, tokenizer = load_model(source)
    model.eval()
    shape = ModelShape.from_config(model.config)
    models = {}
    for name, spec in FORMATS.items():
        if spec is None:
            models[name] = model
            continue
        techniques = Experiment(techniques=[spec]).build_stack()
        composed = stack.enter_context(ComposedModel(copy.deepcopy(model), tokenizer, techniques))
        models[name] = composed.model.to(torch.bfloat16)
    return models, shape


def validate(models: dict, shape: ModelShape, hardware: Hardware, prompt: int, steps: int, rounds: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, shape.vocab, (1, prompt), generator=generator)
    ops = {name: count_ops(model, ids) for name, model in models.items()}
    for model in models.values():
        decode_run(model, ids, 2)
    samples: dict[str, list[float]] = {name: [] for name in models}
    order = list(models)
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            samples[name].append(decode_run(models[name], ids, steps))
    ideal_cpu = replace(hardware, name="this CPU (ideal roofline)", matmul_bandwidth={}, op_overhead=0.0)
    rows = []
    context = prompt + steps // 2
    for name in models:
        measured = statistics.median(samples[name])
        ideal = decode(shape, STACKS[name], ideal_cpu, context)
        probed = decode(shape, STACKS[name], hardware, context, dispatched_ops=ops[name])
        rows.append({"stack": name, "measured_s": measured, "measured_tok_s": 1 / measured, "samples_s": samples[name],
                     "ideal_s": ideal.seconds, "probed_s": probed.seconds, "probed_breakdown_s": probed.by_kind,
                     "dispatched_ops": ops[name], "ideal_ratio": ideal.seconds / measured,
                     "probed_ratio": probed.seconds / measured})
        print(f"{name}: measured {measured * 1e3:.1f} ms/token; ideal roofline {ideal.seconds * 1e3:.1f} ms "
              f"({ideal.seconds / measured:.2f}×); probed model {probed.seconds * 1e3:.1f} ms "
              f"({probed.seconds / measured:.2f}×), {ops[name]} ops/step", flush=True)
    return rows


def catalogue_rows(cpu: Hardware, shapes: dict[str, ModelShape], context: int) -> list[dict]:
    ideal_cpu = replace(cpu, name=cpu.name.replace("(probed kernels)", "(ideal roofline)"), matmul_bandwidth={},
                        op_overhead=0.0)
    rows = []
    for hardware in [ideal_cpu, cpu] + CATALOGUE:
        for model_name, shape in shapes.items():
            for stack_name in ("fp32", "bf16", "w8a16", "w4a16_g128", "w4a16_g128_50%sparse", "w4a16_g128_kv4"):
                stack = STACKS[stack_name]
                if hardware is cpu and stack_name not in cpu.matmul_bandwidth:
                    continue
                d = decode(shape, stack, hardware, context)
                p = prefill(shape, stack, hardware, context)
                rows.append({"hardware": hardware.name, "model": model_name, "stack": stack_name,
                             "decode_tok_s": d.tokens_per_s, "decode_bound": d.bound, "prefill_s": p.seconds,
                             "prefill_bound": p.bound})
    return rows


def markdown(meta: dict, cpu: Hardware, figures: dict, validation: list[dict], catalogue: list[dict]) -> str:
    lines = [
        "## Roofline model: predicted vs measured CPU decode, and predictions on a hardware catalogue", "",
        "Analytical roofline model (`effinfer.plugins.system.hardware.roofline`, after LLM-Viewer, arXiv:2402.16363): "
        "FLOPs and bytes of every projection, attention, norm and element-wise op of a pass, given the stack's weight "
        "bits (with their group scales), sparsity and KV bytes; time = Σ max(FLOPs ÷ peak, bytes ÷ bandwidth). "
        "*Ideal* uses the CPU's stream bandwidth and GEMM peak; *probed* uses each matmul kernel's bandwidth probed "
        "on the model's own matrix shapes and adds the counted aten ops of one decode step × the cost of one op.", "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; machine: {meta['cpu']}, torch {torch.__version__}, {meta['threads']} threads",
        f"- probes: read bandwidth {figures['read_bandwidth'] / GB:.1f} GB/s; GEMM {figures['fp32_gemm_flops'] / 1e9:.0f} "
        f"GFLOP/s fp32, {figures['bf16_gemm_flops'] / 1e9:.0f} GFLOP/s bf16; one dispatched op "
        f"{figures['op_overhead_s'] * 1e6:.1f} µs; one-token matmul bandwidth: " + ", ".join(
            f"{k} {v / GB:.1f} GB/s" for k, v in figures["gemv_bandwidth"].items())
        + f" (one layer's projections × {meta['layers']} + the output head)",
        f"- decode: {meta['model']}, prompt {meta['prompt']} random tokens, {meta['steps']} greedy steps (HF forward "
        f"loop on a DynamicCache), median of {meta['rounds']} interleaved rounds", "",
        "### Validation on this CPU (decode, batch 1)", "",
        "| stack | measured ms/token | tok/s | ideal roofline ms | ideal ÷ measured | probed model ms | "
        "probed ÷ measured | ops/step | probed breakdown (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in validation:
        breakdown = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in row["probed_breakdown_s"].items())
        lines.append(f"| {row['stack']} | {row['measured_s'] * 1e3:.1f} | {row['measured_tok_s']:.1f} | "
                     f"{row['ideal_s'] * 1e3:.1f} | {row['ideal_ratio']:.2f} | {row['probed_s'] * 1e3:.1f} | "
                     f"**{row['probed_ratio']:.2f}** | {row['dispatched_ops']} | {breakdown} |")
    lines += ["", "Within ±30% means probed ÷ measured in 0.70–1.30. The ideal roofline is the floor the hardware "
              "allows; the gap between it and the measurement is the kernels' bandwidth shortfall plus dispatch.", "",
              markdown_catalogue(catalogue, meta["context"])]
    return "\n".join(lines)


def catalogue_only(args: argparse.Namespace) -> None:
    """The published hardware's predictions alone; the CPU validation section says how to produce it."""
    shapes = {args.model: ModelShape.from_config(json.loads(
        (Path.home() / f".cache/effinfer/models/{args.model}/config.json").read_text()))}
    qwen = Path.home() / ".cache/effinfer/models/qwen2.5-coder-1.5b-instruct/config.json"
    if qwen.exists():
        shapes["Qwen2.5-Coder-1.5B"] = ModelShape.from_config(json.loads(qwen.read_text()))
    shapes["Llama-2-7B"] = LLAMA2_7B
    rows = []
    for hardware in CATALOGUE:
        for model_name, shape in shapes.items():
            for stack_name in ("fp32", "bf16", "w8a16", "w4a16_g128", "w4a16_g128_50%sparse", "w4a16_g128_kv4"):
                d = decode(shape, STACKS[stack_name], hardware, args.context)
                p = prefill(shape, STACKS[stack_name], hardware, args.context)
                rows.append({"hardware": hardware.name, "model": model_name, "stack": stack_name,
                             "decode_tok_s": d.tokens_per_s, "decode_bound": d.bound, "prefill_s": p.seconds,
                             "prefill_bound": p.bound})
    text = markdown_catalogue(rows, args.context)
    header = ["## Roofline model: predictions on a hardware catalogue", "",
              "Analytical roofline model (`effinfer.plugins.system.hardware.roofline`, after LLM-Viewer, "
              "arXiv:2402.16363): FLOPs and bytes of every projection, attention, norm and element-wise op of a pass, "
              "given the stack's weight bits (with their group scales), sparsity and KV bytes; time = Σ max(FLOPs ÷ "
              "peak, bytes ÷ bandwidth).", "",
              "- command: `python benchmarks/roofline.py --catalogue-only` (no timing)",
              f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
              "- **CPU validation not in this table**: the exclusive timing run "
              "(`flock -x /tmp/effinfer-cpu.lock python benchmarks/roofline.py`, ~3 min) did not get the CPU to "
              "itself in this session; it adds this CPU's probed entry and the predicted ÷ measured decode of "
              "SmolLM2 fp32 / rtn int8 / rtn int4 g32.", ""]
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text("\n".join(header) + "\n" + text)
    print("\n".join(header) + "\n" + text)


def markdown_catalogue(catalogue: list[dict], context: int) -> str:
    lines = [f"### Predicted decode (tok/s, batch 1, context {context}) and prefill ({context} tokens)", "",
             "Hardware figures (published, dense):", ""]
    for hardware in CATALOGUE:
        lines.append(f"- **{hardware.name}**: {hardware.source}")
    lines.append("")
    for model_name in dict.fromkeys(r["model"] for r in catalogue):
        rows = [r for r in catalogue if r["model"] == model_name]
        stacks = list(dict.fromkeys(r["stack"] for r in rows))
        lines += [f"#### {model_name}", "", "| hardware | " + " | ".join(stacks) + " |",
                  "|---|" + "---:|" * len(stacks)]
        for hardware in dict.fromkeys(r["hardware"] for r in rows):
            cells = {r["stack"]: r for r in rows if r["hardware"] == hardware}
            lines.append(f"| {hardware} | " + " | ".join(
                (f"{cells[s]['decode_tok_s']:,.0f} tok/s · {cells[s]['prefill_s'] * 1e3:,.1f} ms"
                 if s in cells else "—") for s in stacks) + " |")
        lines.append("")
    lines += ["Each cell: decode tok/s · prefill ms. At batch 1 every decode is memory bound and every prefill of "
              "this length compute bound on the GPUs; sparsity counts as an ideal sparse kernel (weights and FLOPs × "
              "the kept fraction); kv4 = 4-bit KV cache.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--context", type=int, default=1024, help="context of the catalogue's predictions")
    parser.add_argument("--quick", action="store_true", help="tiny model, 4 steps: checks the script (no table)")
    parser.add_argument("--catalogue-only", action="store_true",
                        help="only the published hardware's predictions (no probe, no timing, no lock needed)")
    parser.add_argument("--out", type=Path, default=ARTIFACT)
    parser.add_argument("--table", type=Path, default=TABLE)
    args = parser.parse_args(argv)
    if args.catalogue_only:
        catalogue_only(args)
        return
    with ExitStack() as stack:
        if args.quick:
            from effinfer.core.testing import tiny_llama

            model, tokenizer = tiny_llama(layers=2, seed=0)
            source_shape = ModelShape.from_config(model.config)
            models = {"fp32": model.eval()}
            args.prompt, args.steps, args.rounds = 8, 4, 1
        else:
            models, source_shape = build(args.model, stack)
        cpu, figures = probe_cpu(source_shape, args.quick)
        validation = validate(models, source_shape, cpu, args.prompt, args.steps, args.rounds)
    shapes = {args.model if not args.quick else "tiny": source_shape}
    if not args.quick:
        qwen = Path.home() / ".cache/effinfer/models/qwen2.5-coder-1.5b-instruct/config.json"
        if qwen.exists():
            shapes["Qwen2.5-Coder-1.5B"] = ModelShape.from_config(json.loads(qwen.read_text()))
        shapes["Llama-2-7B"] = LLAMA2_7B
    catalogue = catalogue_rows(cpu, shapes, args.context)
    meta = {"command": "flock -x /tmp/effinfer-cpu.lock python benchmarks/roofline.py", "cpu": cpu_name(),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "threads": torch.get_num_threads(),
            "model": args.model, "prompt": args.prompt, "steps": args.steps, "rounds": args.rounds,
            "context": args.context, "layers": source_shape.layers}
    out = args.out if not args.quick else args.out.with_name("roofline_quick.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "cpu": asdict(cpu), "probes": figures, "validation": validation,
                               "catalogue": catalogue}, indent=1, default=str))
    text = markdown(meta, cpu, figures, validation, catalogue)
    if not args.quick:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
