"""The analytical roofline model (system › hardware accelerator) checked against measured CPU decoding.

    flock -x /tmp/effinfer-cpu.lock .venv/bin/python benchmarks/roofline.py      # ~2 min
    .venv/bin/python benchmarks/roofline.py --quick                              # tiny model, seconds

1. Probes this CPU (``plugins/system/hardware/probe.py``): streaming read bandwidth, float32/bf16 GEMM
   FLOP/s, the cost of one dispatched op, and the effective bandwidth of each decode matmul kernel on
   SmolLM2's own matrix shapes, through the kernels the engine's native step calls (the float32 path the
   autotune picked; the native packed int8 / int4 matmuls), grouped as the step groups them and, where the
   engine runs them so, as one native decode program call over copies of a layer.
2. Measures greedy decoding of SmolLM2-135M fp32, rtn int8 and rtn int4 g32 (``execution=native``)
   through the static engine's native decode step, interleaved round by round, and counts the native
   calls one decode step makes.
3. Predicts the same decode step with the roofline model twice: *ideal* (bytes ÷ stream bandwidth,
   FLOPs ÷ GEMM peak) and *probed* (each matmul at its kernel's probed bandwidth + the counted calls ×
   the probed cost of one native call), and reports predicted ÷ measured. The read bandwidth and the
   stack's matmul bandwidth are probed again right before every round's decode, and each round is
   predicted from its own readings (this host's bandwidth drifts within minutes): the median ratio over
   the rounds, with their range.
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
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, replace
from pathlib import Path

import torch

from effinfer.core.compose import ComposedModel
from effinfer.core.experiment import Experiment
from effinfer.core.models import DEFAULT_MODEL, load_model
from effinfer.kernels import PackedWeight, autotune, native
from effinfer.kernels.native_program import BlockSpec, DecodeProgram, program_problem
from effinfer.plugins.model.quantization.packing import quantize
from effinfer.plugins.system.engine.static import shared_engine
from effinfer.plugins.system.hardware import probe
from effinfer.plugins.system.hardware.roofline import (CATALOGUE, GB, STACKS, TFLOP, Hardware, ModelShape, decode,
                                                       prefill)

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "benchmarks/results/system.hardware_accelerator/roofline.md"
ARTIFACT = ROOT / "artifacts/roofline.json"
FORMATS = {  # stack name → rtn spec (None: the model as loaded); decoded by the static engine's native step
    "fp32": None,
    "w8a16_native": "rtn:bits=8,group_size=null,symmetric=true,execution=native,skip_modules=[]",
    "w4a16_g32_native": "rtn:bits=4,group_size=32,symmetric=false,execution=native,skip_modules=[]",
}
#: bytes of distinct weights a matmul probe streams (well past the last-level cache, like a real decode step)
PROBE_STREAM_BYTES = 192 * 2**20
#: model shapes for the catalogue table (Llama-2-7B: Touvron et al., arXiv:2307.09288, its config.json)
LLAMA2_7B = ModelShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, head_dim=128, vocab=32000,
                       tied_embeddings=False)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def probe_cpu(shape: ModelShape, quick: bool) -> tuple[Hardware, dict, dict[str, Callable[[], float]]]:
    """This CPU as a catalogue entry (GEMM peaks, op cost, and a first read-bandwidth reading), its figures, and
    the bandwidth probes to repeat beside each validation round (``"read"`` and one per stack), whose readings
    :func:`with_paired_readings` gives the entry afterwards."""
    torch.manual_seed(0)
    repeat = {"read": probe.read_bandwidth_probe(8 if quick else 256, repeats=3)} | gemv_probes(shape, quick)
    figures = {"read_bandwidth": repeat["read"](),
               "fp32_gemm_flops": probe.gemm_flops(128 if quick else 1024),
               "bf16_gemm_flops": probe.gemm_flops(128 if quick else 1024, torch.bfloat16),
               "op_overhead_s": probe.native_call_overhead(200 if quick else 2000),
               "torch_op_overhead_s": probe.op_overhead(200 if quick else 2000)}
    flops = {"fp32": figures["fp32_gemm_flops"], "bf16": figures["bf16_gemm_flops"], "int8": figures["bf16_gemm_flops"]}
    name = f"{cpu_name()}, {torch.get_num_threads()} threads"
    measured = Hardware(f"this CPU (probed kernels): {name}", figures["read_bandwidth"], flops,
                        "probed in this run: benchmarks/roofline.py", "measured", {}, figures["op_overhead_s"])
    return measured, figures, repeat


def gemv_probes(shape: ModelShape, quick: bool) -> dict[str, Callable[[], float]]:
    """Per stack, a call that times its kernel's one-token matmuls on this shape's matrices (one layer's
    projections, grouped as the step groups them, and the output head, weighted as the model has them) and returns
    their effective bytes/s. The weights are built once."""
    head = [(shape.hidden, shape.vocab)]
    layer = shape.matrices()
    layer_groups = [[layer["q_proj"], layer["k_proj"], layer["v_proj"]], [layer["o_proj"]],
                    [layer["gate_proj"], layer["up_proj"]], [layer["down_proj"]]]
    probes = {}
    for stack_name in ("fp32",) if quick else tuple(FORMATS):
        layer_bytes = sum(STACKS[stack_name].weight_bytes(i, o) for group in layer_groups for i, o in group)
        # distinct copies of the layer, enough to stream from memory rather than hit the last-level cache
        copies = 1 if quick else min(shape.layers, max(1, -(-PROBE_STREAM_BYTES // int(layer_bytes))))
        parts = []  # (call, bytes per call, calls per decode step)
        for groups, repeat, blocks in ((layer_groups * copies, shape.layers / copies, shape), ([head], 1, None)):
            nbytes = sum(STACKS[stack_name].weight_bytes(i, o) for group in groups for i, o in group)
            parts.append((_matmul_set(groups, stack_name, blocks), nbytes, repeat))

        def bandwidth(parts: list = parts) -> float:
            seconds = sum(repeat * nbytes / probe.matmul_bandwidth(call, nbytes) for call, nbytes, repeat in parts)
            return sum(repeat * nbytes for _, nbytes, repeat in parts) / seconds

        probes[stack_name] = bandwidth
    return probes


def _matmul_set(groups: list[list[tuple[int, int]]], stack_name: str, blocks: ModelShape | None = None):
    """A call running one-token matmuls of the ``(in, out)`` shapes through ``stack_name``'s kernel, each group
    (weights sharing one input) in one call as the native step does. ``blocks``: the groups are whole decoder
    blocks (Q/K/V, O, gate/up, down) of this shape, run as the engine runs them: one native decode program call
    (its norms and attention over a one-column cache cost next to nothing)."""
    weights = [[torch.randn(n_out, n_in) / n_in**0.5 for n_in, n_out in group] for group in groups]
    inputs = [torch.randn(1, group[0][0]) for group in groups]
    if stack_name == "fp32":
        path = autotune.dense_decode_path()
        if path == "native":
            calls = [native.DenseGroup(group, [None] * len(group)) for group in weights]
        else:
            linear = autotune.dense_linear(path)
            calls = [lambda x, group=group: [linear(x, w, None) for w in group] for group in weights]
    else:
        bits, group_size = (8, None) if stack_name.startswith("w8") else (4, 32)
        calls = [native.PackedGroup([PackedWeight.from_quantized(quantize(w, bits, group_size, bits == 8))
                                     for w in group], [None] * len(group)) for group in weights]
    if blocks is not None and all(program_problem(call) is None for call in calls):
        return _program_call(calls, blocks)
    return lambda: [call(x) for call, x in zip(calls, inputs)]


def _program_call(calls: list, shape: ModelShape):
    """The groups (four per block) as a native decode program over a one-column KV cache."""
    norm = (torch.ones(shape.hidden), 1e-5, 0.0)
    blocks = [BlockSpec(*calls[i:i + 4], norm, norm, 0, shape.head_dim ** -0.5) for i in range(0, len(calls), 4)]
    program = DecodeProgram(blocks, norm, num_heads=shape.heads, num_kv_heads=shape.kv_heads,
                            head_dim=shape.head_dim, activation="silu", sandwich=False)
    keys, values = (torch.zeros(len(blocks), 1, shape.kv_heads, 1, shape.head_dim) for _ in range(2))
    rope = [(torch.ones(1, shape.head_dim), torch.zeros(1, shape.head_dim))]
    first = [torch.zeros(1, dtype=torch.int64)]
    return lambda: program(torch.randn(1, shape.hidden), rope, first, keys, values, 0)


def decode_run(model, ids: torch.Tensor, steps: int) -> float:
    """Seconds per greedy decode step after a prefill of ``ids`` (the static engine's native step)."""
    engine = shared_engine(model)
    cache = engine.cache_for(1, ids.shape[1] + steps + 1, name="roofline")
    token = engine.prefill(cache, ids, torch.ones_like(ids)).logits[:, -1].argmax(-1)
    started = time.perf_counter()
    for _ in range(steps):
        token = engine.decode(cache, token).argmax(-1)
    return (time.perf_counter() - started) / steps


def count_ops(model, ids: torch.Tensor) -> int:
    """Native calls one decode step makes (``RuntimeError`` if the native step does not run this model)."""
    engine = shared_engine(model)
    step = engine.native_step()
    if step is None:
        raise RuntimeError(f"the native decode step does not run here: {engine.native_reason}")
    timings = step.profile()
    decode_run(model, ids, 2)
    step.breakdown = None
    return round(timings["calls"] / timings["steps"])


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
        models[name] = composed.model
    return models, shape


def validate(models: dict, shape: ModelShape, hardware: Hardware, probes: dict[str, Callable[[], float]], prompt: int,
             steps: int, rounds: int) -> list[dict]:
    """Predicted ÷ measured decode per stack, paired round by round: each round probes the read bandwidth and the
    stack's matmul bandwidth right before timing its decode, and predicts that round from those readings (this
    host's bandwidth drifts by a third within minutes, so probes taken once, before all rounds, can sit in another
    spell than the decoding). A stack's ratio is the median of its rounds'."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, shape.vocab, (1, prompt), generator=generator)
    ops = {name: count_ops(model, ids) for name, model in models.items()}
    for model in models.values():
        decode_run(model, ids, 2)
    context = prompt + steps // 2
    paired: dict[str, list[dict]] = {name: [] for name in models}
    order = list(models)
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            read, gemv = probes["read"](), probes[name]()
            measured = decode_run(models[name], ids, steps)
            here = replace(hardware, bandwidth=read, matmul_bandwidth={name: gemv})
            ideal = decode(shape, STACKS[name], replace(here, matmul_bandwidth={}, op_overhead=0.0), context)
            probed = decode(shape, STACKS[name], here, context, dispatched_ops=ops[name])
            paired[name].append({"measured_s": measured, "read_bandwidth": read, "gemv_bandwidth": gemv,
                                 "ideal_s": ideal.seconds, "probed_s": probed.seconds,
                                 "probed_breakdown_s": probed.by_kind})
    return [validation_row(name, paired[name], ops[name]) for name in models]


def with_paired_readings(cpu: Hardware, validation: list[dict]) -> Hardware:
    """``cpu`` with the medians of the validation rounds' bandwidth readings (for its catalogue rows)."""
    reads = [r["read_bandwidth"] for row in validation for r in row["rounds"]]
    gemv = {row["stack"]: statistics.median(r["gemv_bandwidth"] for r in row["rounds"]) for row in validation}
    return replace(cpu, bandwidth=statistics.median(reads), matmul_bandwidth=gemv)


def validation_row(name: str, rounds: list[dict], dispatched_ops: int) -> dict:
    """A stack's validation from its paired rounds: medians, and the round at the median probed ratio for the
    breakdown."""
    for r in rounds:
        r["ideal_ratio"], r["probed_ratio"] = r["ideal_s"] / r["measured_s"], r["probed_s"] / r["measured_s"]
    middle = sorted(rounds, key=lambda r: r["probed_ratio"])[(len(rounds) - 1) // 2]
    measured = statistics.median(r["measured_s"] for r in rounds)
    row = {"stack": name, "measured_s": measured, "measured_tok_s": 1 / measured,
           "samples_s": [r["measured_s"] for r in rounds],
           "ideal_s": statistics.median(r["ideal_s"] for r in rounds),
           "probed_s": statistics.median(r["probed_s"] for r in rounds),
           "probed_breakdown_s": middle["probed_breakdown_s"], "dispatched_ops": dispatched_ops,
           "ideal_ratio": statistics.median(r["ideal_ratio"] for r in rounds),
           "probed_ratio": statistics.median(r["probed_ratio"] for r in rounds),
           "probed_ratio_range": [min(r["probed_ratio"] for r in rounds), max(r["probed_ratio"] for r in rounds)],
           "rounds": rounds}
    print(f"{name}: measured {measured * 1e3:.1f} ms/token; ideal roofline {row['ideal_s'] * 1e3:.1f} ms "
          f"({row['ideal_ratio']:.2f}×); probed model {row['probed_s'] * 1e3:.1f} ms ({row['probed_ratio']:.2f}× "
          f"[{row['probed_ratio_range'][0]:.2f}–{row['probed_ratio_range'][1]:.2f}]), {dispatched_ops} ops/step",
          flush=True)
    return row


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
        "on the model's own matrix shapes (the engine's native kernels, grouped as its native step groups them) and "
        "adds the counted native calls of one decode step × the probed cost of one call.", "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; machine: {meta['cpu']}, torch {torch.__version__}, {meta['threads']} threads",
        f"- probes: GEMM {figures['fp32_gemm_flops'] / 1e9:.0f} GFLOP/s fp32, "
        f"{figures['bf16_gemm_flops'] / 1e9:.0f} GFLOP/s bf16; "
        f"one native call {figures['op_overhead_s'] * 1e6:.1f} µs "
        f"(one torch op {figures.get('torch_op_overhead_s', 0) * 1e6:.1f} µs); read bandwidth and one-token matmul "
        "bandwidth probed right before every validation round (medians [range] of those readings): "
        + "; ".join(paired_readings(validation))
        + " (matmuls: distinct copies of one layer's projections, "
        f"≥ {PROBE_STREAM_BYTES // 2**20} MiB so they stream "
        f"from memory, weighted × {meta['layers']} layers, + the output head)",
        f"- decode: {meta['model']}, prompt {meta['prompt']} random tokens, {meta['steps']} greedy steps ("
        f"the static engine's native step) per round, {meta['rounds']} interleaved rounds; each round is predicted "
        "from the probes taken just before it, and a stack's ratios are the medians over its rounds", "",
        "### Validation on this CPU (decode, batch 1)", "",
        "| stack | measured ms/token | tok/s | ideal roofline ms | ideal ÷ measured | probed model ms | "
        "probed ÷ measured [rounds' range] | calls/step | probed breakdown (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in validation:
        breakdown = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in row["probed_breakdown_s"].items())
        low, high = row["probed_ratio_range"]
        lines.append(f"| {row['stack']} | {row['measured_s'] * 1e3:.1f} | {row['measured_tok_s']:.1f} | "
                     f"{row['ideal_s'] * 1e3:.1f} | {row['ideal_ratio']:.2f} | {row['probed_s'] * 1e3:.1f} | "
                     f"**{row['probed_ratio']:.2f}** [{low:.2f}–{high:.2f}] | {row['dispatched_ops']} | "
                     f"{breakdown} |")
    lines += ["", "Within ±30% means probed ÷ measured in 0.70–1.30. The ideal roofline is the floor the hardware "
              "allows; the gap between it and the measurement is the kernels' bandwidth shortfall plus dispatch.", "",
              markdown_catalogue(catalogue, meta["context"]), *cpu_bf16_note(figures)]
    return "\n".join(lines)


def paired_readings(validation: list[dict]) -> list[str]:
    """The validation rounds' probe readings, in GB/s: the read bandwidth over all rounds, then each stack's
    matmul bandwidth."""
    def summary(values: list[float]) -> str:
        return f"{statistics.median(values) / GB:.1f} [{min(values) / GB:.1f}–{max(values) / GB:.1f}] GB/s"

    reads = [r["read_bandwidth"] for row in validation for r in row["rounds"]]
    matmuls = [f"{row['stack']} matmuls {summary([r['gemv_bandwidth'] for r in row['rounds']])}" for row in validation]
    return [f"read {summary(reads)}"] + matmuls


def cpu_bf16_note(figures: dict) -> list[str]:
    """A note under the catalogue when this CPU's bf16 GEMM is far slower than its fp32 one (no native bf16): the
    16-bit-activation stacks' "this CPU" cells then predict what torch's bf16 matmuls would take, not effinfer's
    native W8A16 / W4A16, which compute in float32 (the validation table)."""
    bf16, fp32 = figures["bf16_gemm_flops"], figures["fp32_gemm_flops"]
    if bf16 >= fp32 / 4:
        return []
    return [f"On this CPU bf16 GEMMs run at {bf16 / 1e9:.0f} GFLOP/s against {fp32 / 1e9:.0f} fp32 (no native bf16), so "
            "the bf16, w8a16 and w4a16 cells of its rows, whose activations are 16-bit, are what torch's bf16 "
            "matmuls would take; effinfer's native W8A16 / W4A16 kernels compute in float32 (validation table "
            "above).", ""]


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
    parser.add_argument("--rounds", type=int, default=7)
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
        cpu, figures, probes = probe_cpu(source_shape, args.quick)
        validation = validate(models, source_shape, cpu, probes, args.prompt, args.steps, args.rounds)
        cpu = with_paired_readings(cpu, validation)
        figures |= {"read_bandwidth": cpu.bandwidth, "gemv_bandwidth": cpu.matmul_bandwidth}
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
