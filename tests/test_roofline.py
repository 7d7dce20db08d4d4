"""The analytical roofline model: byte and FLOP counts that match the model, and the expected bounds."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from effinfer.core.testing import tiny_gemma3, tiny_llama, tiny_qwen2
from effinfer.plugins.system.hardware import roofline
from effinfer.plugins.system.hardware.roofline import CATALOGUE, STACKS, ModelShape, Stack

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = ModelShape(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, head_dim=64, vocab=49152)
A100 = CATALOGUE[0]


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2, tiny_gemma3])
def test_fp32_weight_bytes_are_the_models_projection_and_head_bytes(factory):
    model, _ = factory(layers=2, seed=0)
    shape = ModelShape.from_config(model.config)
    linear = sum(m.weight.numel() for m in model.modules() if type(m).__name__ == "Linear")
    assert roofline.weight_bytes(shape, STACKS["fp32"]) == pytest.approx(4 * linear)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n and "self_attn" not in n)
    embedding = model.get_input_embeddings().weight.numel()
    # exact for Llama/Qwen2; Gemma 3's two extra norms per layer are a rounding error of the count
    assert shape.parameters == pytest.approx(linear + norms + (0 if shape.tied_embeddings else embedding), rel=0.01)


def test_smollm2_decode_step_bytes_and_bit_widths():
    fp32 = roofline.weight_bytes(SMOLLM2, STACKS["fp32"])
    assert fp32 == pytest.approx(4 * (30 * 3_538_944 + 49152 * 576))  # 538 MB: 30 layers + the tied head
    int8 = roofline.weight_bytes(SMOLLM2, STACKS["w8a16"])
    int4 = roofline.weight_bytes(SMOLLM2, STACKS["w4a16_g32"])
    assert int8 == pytest.approx(fp32 / 4 + 2 * (30 * (576 * 3 + 192 * 2 + 1536 * 2) + 49152))  # + one bf16 scale/row
    assert int4 == pytest.approx(fp32 / 4 * (0.5 + 4 / 32))  # 0.5 B/weight + 4 B (bf16 scale + zero) per 32


def test_decode_is_memory_bound_and_long_prefill_compute_bound_on_gpus():
    for hardware in CATALOGUE[:3]:
        assert roofline.decode(SMOLLM2, STACKS["bf16"], hardware, 1024).bound == "memory"
        assert roofline.prefill(SMOLLM2, STACKS["bf16"], hardware, 4096).bound == "compute"
    # decode at batch 1 is the weight bytes over the bandwidth, within the small KV / activation share
    step = roofline.decode(SMOLLM2, STACKS["bf16"], A100, 16)
    assert step.seconds == pytest.approx(roofline.weight_bytes(SMOLLM2, STACKS["bf16"]) / A100.bandwidth, rel=0.05)


@settings(max_examples=20, deadline=None)
@given(context=st.integers(0, 8192), batch=st.integers(1, 64), sparsity=st.floats(0, 0.9),
       keep=st.floats(0.05, 1.0), hardware=st.sampled_from(CATALOGUE))
def test_predictions_move_the_right_way(context, batch, sparsity, keep, hardware):
    base = Stack("bf16", 16, act_bytes=2, kv_bytes=2, compute="bf16")
    step = roofline.decode(SMOLLM2, base, hardware, context, batch)
    assert roofline.decode(SMOLLM2, base, hardware, context + 512, batch).seconds > step.seconds
    assert roofline.decode(SMOLLM2, base, hardware, context, batch + 1).seconds >= step.seconds
    sparse = Stack("sparse", 16, act_bytes=2, kv_bytes=2, compute="bf16", sparsity=sparsity)
    assert roofline.decode(SMOLLM2, sparse, hardware, context, batch).seconds <= step.seconds + 1e-12
    pruned_kv = Stack("kv", 16, act_bytes=2, kv_bytes=2, compute="bf16", kv_keep=keep)
    assert roofline.decode(SMOLLM2, pruned_kv, hardware, context, batch).seconds <= step.seconds + 1e-12
    ops = roofline.operators(SMOLLM2, sparse, 1, context, batch)
    matmul_flops = sum(op.flops for op in ops if op.kind == "matmul")
    dense_flops = sum(op.flops for op in roofline.operators(SMOLLM2, base, 1, context, batch) if op.kind == "matmul")
    assert matmul_flops == pytest.approx(dense_flops * (1 - sparsity))


def test_quantized_decode_is_faster_in_proportion_to_bytes():
    speed = {name: roofline.decode(SMOLLM2, STACKS[name], CATALOGUE[2], 256).tokens_per_s
             for name in ("fp32", "bf16", "w8a16", "w4a16_g128")}
    assert speed["fp32"] < speed["bf16"] < speed["w8a16"] < speed["w4a16_g128"]
    assert 3.0 < speed["w4a16_g128"] / speed["bf16"] < 4.0


def test_probed_kernels_and_dispatch_cost_slow_the_prediction_down():
    cpu = roofline.Hardware("cpu", 50e9, {"fp32": 1e12}, "test", "measured")
    probed = roofline.Hardware("cpu", 50e9, {"fp32": 1e12}, "test", "measured", {"fp32": 10e9}, 5e-6)
    ideal = roofline.decode(SMOLLM2, STACKS["fp32"], cpu, 128)
    slow = roofline.decode(SMOLLM2, STACKS["fp32"], probed, 128, dispatched_ops=1000)
    assert slow.by_kind["dispatch"] == pytest.approx(5e-3)
    assert slow.by_kind["matmul"] == pytest.approx(ideal.by_kind["matmul"] * 5, rel=0.01)


def test_from_config_refuses_a_non_decoder_config():
    with pytest.raises(ValueError, match="decoder-only"):
        ModelShape.from_config({"hidden_size": 8})


def test_every_catalogue_entry_cites_its_figures():
    for hardware in CATALOGUE:
        assert hardware.bandwidth > 0 and hardware.flops["bf16"] > 0
        assert "datasheet" in hardware.source or "arXiv" in hardware.source


def test_the_benchmark_runs_quick(tmp_path, capsys):
    benchmark = load_benchmark()
    out = tmp_path / "roofline.json"
    benchmark.main(["--quick", "--out", str(out)])
    data = json.loads(out.with_name("roofline_quick.json").read_text())
    assert data["validation"][0]["stack"] == "fp32" and data["validation"][0]["measured_s"] > 0
    assert len(data["validation"][0]["rounds"]) == 1 and data["validation"][0]["rounds"][0]["gemv_bandwidth"] > 0
    assert "Predicted decode" in capsys.readouterr().out


def load_benchmark():
    spec = importlib.util.spec_from_file_location("roofline_benchmark", ROOT / "benchmarks/roofline.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    return benchmark


def test_each_validation_round_is_judged_by_its_own_probes():
    benchmark = load_benchmark()
    # three rounds whose own predicted ÷ measured ratios are 1.0, 0.5 and 2.0
    rounds = [{"measured_s": m, "probed_s": p, "ideal_s": p / 2, "read_bandwidth": b, "gemv_bandwidth": b / 2,
               "probed_breakdown_s": {"matmul": p}} for m, p, b in ((1.0, 1.0, 30e9), (2.0, 1.0, 20e9),
                                                                    (1.0, 2.0, 40e9))]
    row = benchmark.validation_row("fp32", rounds, dispatched_ops=1)
    assert row["probed_ratio"] == 1.0 and row["probed_ratio_range"] == [0.5, 2.0]
    assert row["measured_s"] == 1.0 and row["probed_breakdown_s"] == {"matmul": 1.0}
    cpu = benchmark.with_paired_readings(A100, [row])
    assert cpu.bandwidth == 30e9 and cpu.matmul_bandwidth == {"fp32": 15e9}


def test_stack_from_techniques_reads_the_configs():
    stack, unmodelled = roofline.stack_from_techniques(
        [("rtn", {"bits": 4, "group_size": 32, "symmetric": False, "execution": "kernel"}),
         ("wanda", {"sparsity": 0.5}), ("kv_int4", {}), ("h2o", {"budget": 256}), ("prompt_lookup", {})], context=1024)
    assert (stack.weight_bits, stack.group_size, stack.group_bytes, stack.sparsity) == (4, 32, 4, 0.5)
    assert (stack.kv_bytes, stack.kv_keep, unmodelled) == (0.5, 0.25, ["prompt_lookup"])
    fp32 = roofline.decode(SMOLLM2, STACKS["fp32"], A100, 1024).seconds
    assert roofline.decode(SMOLLM2, stack, A100, 1024).seconds < fp32 / 8
