"""The native CPU decode kernels (effinfer.kernels.native), their autotune, and the engine's native step.

Every kernel against a plain-torch computation (hypothesis over shapes, token counts, bit-widths,
group sizes, zero-point kinds, GQA ratios, cache slots and sliding windows); the engine's native
step against its torch step on tiny Llama / Qwen2 / Gemma 3 models and on SmolLM2 (float32 and a
native W4A16 model); the fall-back when the kernels cannot build; the autotune cache.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from effinfer.core.compose import ComposedModel
from effinfer.core.experiment import Experiment
from effinfer.core.testing import TINY_FAMILIES, tiny_model
from effinfer.kernels import PackedWeight, autotune, cpu, greedy_tokens, native, reference
from effinfer.plugins.model.quantization.packing import quantize
from effinfer.plugins.system.engine.engine import Engine
from effinfer.plugins.system.engine.native_step import NativeStep

pytestmark = pytest.mark.skipif(native.problem() is not None, reason=f"native kernels: {native.problem()}")
SETTINGS = settings(max_examples=25, deadline=None)


def close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-4) -> bool:
    if expected.numel() == 0:  # a weight with no rows
        return actual.shape == expected.shape
    scale = max(1.0, float(expected.abs().max()))
    return float((actual - expected).abs().max()) <= tolerance * scale


@SETTINGS
@given(n=st.integers(1, native.MAX_TOKENS), in_features=st.integers(1, 70), outs=st.lists(st.integers(0, 13), min_size=1,
       max_size=3), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_dense_group_equals_linear(n, in_features, outs, bias, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=generator)
    weights = [torch.randn(o, in_features, generator=generator) for o in outs]
    biases = [torch.randn(o, generator=generator) if bias else None for o in outs]
    for y, w, b in zip(native.DenseGroup(weights, biases)(x), weights, biases, strict=True):
        assert close(y, F.linear(x, w, b))


@pytest.mark.parametrize("outs", [[2, 0, 40], [2, 0, 0, 40], [0, 37]])
def test_a_far_row_stream_steps_over_a_weight_with_no_rows(outs):
    # one thread's stream runs from the first weight's rows straight into the last one's
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 24, generator=generator)
    weights = [torch.randn(o, 24, generator=generator) for o in outs]
    for y, w in zip(native.DenseGroup(weights, [None] * len(outs))(x), weights, strict=True):
        assert close(y, F.linear(x, w))


@SETTINGS
@given(n=st.integers(1, native.MAX_TOKENS), bits=st.sampled_from([4, 8]), groups=st.integers(1, 4),
       group=st.sampled_from([32, 64, 96, 128]), out=st.integers(1, 11), zero=st.sampled_from(["symmetric", "int", "float"]),
       seed=st.integers(0, 2**16))
def test_packed_matmul_and_dequantize_equal_the_reference(n, bits, groups, group, out, zero, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, groups * group, generator=generator)
    packed = PackedWeight.from_quantized(quantize(weight, bits, group, zero == "symmetric", float_zero=zero == "float"))
    x = torch.randn(n, groups * group, generator=generator)
    expected = reference.dequant_matmul(x, packed)
    assert (native.dequant_matmul(x, packed) - expected).abs().le(native.packed_error_bound(x, packed) * 1.01 + 1e-5).all()
    assert torch.allclose(native.dequantize(packed), reference.dequant_matmul(torch.eye(groups * group), packed).t(),
                          atol=1e-5)
    assert close(cpu.dequant_matmul(x, packed), expected, 2e-3)                 # the dispatcher's pick (native)
    prefill = torch.randn(cpu.DENSE_ROWS + 3, groups * group, generator=generator)
    assert close(cpu.dequant_matmul(prefill, packed), reference.dequant_matmul(prefill, packed))


@SETTINGS
@given(tokens=st.integers(1, 40), in_features=st.integers(1, 600), out=st.integers(1, 70), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_dense_gemm_equals_linear(tokens, in_features, out, bias, seed):
    """Token counts around the 6-token panels, outputs around the 16/32-output panels, inputs across K blocks."""
    generator = torch.Generator().manual_seed(seed)
    x, weight = torch.randn(tokens, in_features, generator=generator), torch.randn(out, in_features, generator=generator)
    b = torch.randn(out, generator=generator) if bias else None
    assert close(native.gemm(x, weight, b), F.linear(x, weight, b))


@SETTINGS
@given(tokens=st.integers(native.MAX_TOKENS + 1, 40), bits=st.sampled_from([4, 8]), groups=st.integers(1, 5),
       group=st.sampled_from([2, 12, 32, 64, 128]), out=st.integers(1, 40), zero=st.sampled_from(["symmetric", "float"]),
       seed=st.integers(0, 2**16))
def test_packed_gemm_dequantizes_inside_and_equals_the_reference(tokens, bits, groups, group, out, zero, seed):
    """Groups that are not a multiple of 8 take the scalar packing; the rest the vector one (both checked)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, groups * group, generator=generator)
    packed = PackedWeight.from_quantized(quantize(weight, bits, group, zero == "symmetric", float_zero=zero == "float"))
    x = torch.randn(2, tokens, groups * group, generator=generator)
    expected = reference.dequant_matmul(x, packed)
    assert native.gemm(x, packed).shape == (2, tokens, out)
    assert close(native.gemm(x, packed), expected)
    if native.packed_problem(packed) is None:
        assert close(cpu.dequant_matmul(x, packed), expected)          # the dispatcher's prefill pick


@SETTINGS
@given(size=st.integers(1, 5000), seed=st.integers(0, 2**16))
def test_the_four_stream_read_probe_sums_every_element(size, seed):
    buffer = torch.rand(size, generator=torch.Generator().manual_seed(seed))
    assert native.stream_read(buffer) == pytest.approx(float(buffer.double().sum()), rel=1e-5)
    assert set(native.read_probes(buffer)) == {"torch sum", "native 4 streams"}


def test_the_gemv_streams_benchmark_builds_and_measures_every_variant(tmp_path):
    """benchmarks/gemv_streams.py on 8 MiB, one round: the C++ harness (which includes the kernels' source) builds
    with the kernels' flags and reports a positive speed for every read pattern."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gemv_streams.py"
    spec = importlib.util.spec_from_file_location("gemv_streams", script)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    rows = benchmark.run(benchmark.build(tmp_path), mib=8, rounds=1, threads=2)
    assert len(rows) == 16 and all(row["gb_s"] > 0 for row in rows)  # 8 patterns over 4 KiB and huge pages
    assert [row["pages"] for row in rows] == ["4 KiB"] * 8 + ["huge"] * 8
    assert rows[0]["ratio"] == rows[8]["ratio"] == 1.0 and rows[-1]["variant"].startswith("ef_linear_f32")
    assert "| GB/s, huge pages |" in benchmark.markdown(rows, type("Args", (), {"mib": 8, "rounds": 1, "threads": 2}),
                                                         ("-", "-"))


@pytest.mark.parametrize("bits,group,groups", [(8, 64, 4), (8, 32, 4), (4, 32, 4), (4, 64, 4),
                                               (8, 576, 1), (8, 1536, 1), (4, 160, 3)])  # per channel, 64+64+32
@pytest.mark.parametrize("outs", [[67], [40, 13, 13]])
def test_one_token_packed_rows_read_far_apart_equal_the_reference(bits, group, groups, outs):
    """One token, many rows: the register tile over rows far apart (row i of each quarter of a thread's share, across
    the weights of a fused group), the leftover rows one at a time: every output row lands in its place. Groups above
    64 inputs (per-channel ones too) run as chunks of 64 whose int32 sums never overflow."""
    generator = torch.Generator().manual_seed(bits * group + len(outs))
    packed = [PackedWeight.from_quantized(quantize(torch.randn(o, groups * group, generator=generator), bits, group,
                                                   False)) for o in outs]
    biases = [torch.randn(o, generator=generator) for o in outs]
    x = torch.randn(1, groups * group, generator=generator)
    for y, weight, b in zip(native.PackedGroup(packed, biases)(x), packed, biases, strict=True):
        expected = reference.dequant_matmul(x, weight) + b
        assert (y - expected).abs().le(native.packed_error_bound(x, weight) * 1.01 + 1e-4).all()


def test_gemm_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="the input has 5 features, the weight takes 4"):
        native.gemm(torch.randn(3, 5), torch.randn(2, 4))
    with pytest.raises(ValueError, match="bias must be"):
        native.gemm(torch.randn(3, 4), torch.randn(2, 4), torch.randn(3))
    with pytest.raises(ValueError, match="float32 CPU"):
        native.gemm(torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 4))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


@SETTINGS
@given(batch=st.integers(1, 3), kv_heads=st.integers(1, 3), group=st.integers(1, 3), dim=st.sampled_from([16, 64]),
       capacity=st.integers(4, 40), data=st.data())
def test_decode_attention_rotates_writes_and_attends(batch, kv_heads, group, dim, capacity, data):
    slot = data.draw(st.integers(0, capacity - 1))
    first = torch.tensor([data.draw(st.integers(0, slot)) for _ in range(batch)])
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    heads = kv_heads * group
    q, k, v = (torch.randn(batch, h, dim, generator=generator) for h in (heads, kv_heads, kv_heads))
    angles = torch.randn(batch, dim // 2, generator=generator)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    keys = torch.randn(batch, kv_heads, capacity, dim, generator=generator)
    values = torch.randn(batch, kv_heads, capacity, dim, generator=generator)
    expected_keys, expected_values = keys.clone(), values.clone()
    rq, rk = rotate(q, cos[:, None], sin[:, None]), rotate(k, cos[:, None], sin[:, None])
    expected_keys[:, :, slot], expected_values[:, :, slot] = rk, v
    out = native.decode_attention(q.clone(), k.clone(), v, cos, sin, keys, values, slot, first, 0.3)
    assert torch.allclose(keys, expected_keys, atol=1e-6) and torch.equal(values, expected_values)
    with pytest.raises(ValueError, match="slot"):
        native.decode_attention(q.clone(), k.clone(), v, cos, sin, keys, values, capacity, first, 0.3)
    for b in range(batch):
        span = slice(int(first[b]), slot + 1)
        kk = expected_keys[b, :, span].repeat_interleave(group, 0)
        vv = expected_values[b, :, span].repeat_interleave(group, 0)
        expected = torch.softmax(rq[b, :, None] @ kk.transpose(1, 2) * 0.3, -1) @ vv
        assert close(out[b], expected[:, 0])


@SETTINGS
@given(rows=st.integers(1, 4), dim=st.integers(1, 80), offset=st.sampled_from([0.0, 1.0]), residual=st.booleans(),
       seed=st.integers(0, 2**16))
def test_add_rmsnorm_and_gated_activations(rows, dim, offset, residual, seed):
    generator = torch.Generator().manual_seed(seed)
    x, r, w = torch.randn(rows, dim, generator=generator), torch.randn(rows, dim, generator=generator), torch.randn(dim)
    out, hidden = native.add_rmsnorm(x, r.clone() if residual else None, w, 1e-6, offset)
    expected_hidden = x + r if residual else x
    expected, _ = reference.add_rmsnorm(x, r if residual else None, w, 1e-6, offset)
    assert torch.allclose(hidden, expected_hidden) and close(out, expected)
    gate, up = torch.randn(rows * dim, generator=generator), torch.randn(rows * dim, generator=generator)
    assert close(native.gated_act(gate.clone(), up, "silu"), F.silu(gate) * up)
    assert close(native.gated_act(gate.clone(), up, "gelu_pytorch_tanh"), F.gelu(gate, approximate="tanh") * up)


def step_logits(model, kernels: str, prompt: torch.Tensor, tokens: list[int]) -> list[torch.Tensor]:
    """Prefill ``prompt`` then decode ``tokens`` one by one (teacher-forced), logits of each step."""
    engine = Engine(model, kernels=kernels)
    cache = engine.cache_for(1, prompt.shape[1] + len(tokens) + 1)
    engine.prefill(cache, prompt, torch.ones_like(prompt))
    return [engine.decode(cache, torch.tensor([t])) for t in tokens]


@pytest.fixture
def native_dense(monkeypatch):
    """The native float32 matmul whatever the autotune would pick for tiny weights (MKL, often)."""
    monkeypatch.setenv(autotune.ENV, "native")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_native_step_equals_the_torch_step_on_each_layout(family, native_dense):
    model, _ = tiny_model(family, layers=3, seed=1)  # gemma3: sliding-window and global layers, window 8
    prompt = torch.randint(3, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(3, model.config.vocab_size, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    assert Engine(model).native_step().dense_path == "native"
    for native_logits, torch_logits in zip(step_logits(model, "auto", prompt, tokens),
                                           step_logits(model, "torch", prompt, tokens), strict=True):
        assert close(native_logits, torch_logits)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_the_one_call_program_equals_the_per_call_step(family, native_dense):
    """The whole-step native program runs the same kernels in the same order as the per-call loop: equal logits,
    also over a subset of layers (self-speculative drafting) and with its timers on."""
    model, _ = tiny_model(family, layers=3, seed=4)
    prompt = torch.randint(3, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
    results = {}
    for program in (True, False):
        engine = Engine(model)
        step = engine.native_step()
        assert step.program is not None, step.program_reason
        if not program:
            step.program = None
        cache = engine.cache_for(1, 24)
        engine.prefill(cache, prompt, torch.ones_like(prompt))
        timings = step.profile()
        logits = [engine.decode(cache, torch.tensor([4 + i])) for i in range(6)]
        logits += [engine.decode(cache, torch.tensor([7]), layers=[0, 2], start=cache.length)]
        logits += [engine.decode(cache, torch.tensor([8]), layers=[-1], start=cache.length)]  # Python's last block
        with pytest.raises(IndexError):  # refused before the C side reads past its blocks
            engine.decode(cache, torch.tensor([7]), layers=[3], start=cache.length)
        step.breakdown = None
        assert {"norms", "matmuls", "attention", "activation", "output head"} <= set(timings)
        results[program] = logits
    for a, b in zip(results[True], results[False], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_a_whole_token_step_in_one_call_equals_the_step_with_python_inputs(family, native_dense):
    """The token step gathers the embedded tokens (Gemma's scale included), rotary rows and first attended columns
    (sliding windows, left padding) itself and runs the head in the same call: the same logits, bit for bit, as
    the program fed from Python, also after its rotary tables grow; a bad token is refused, nothing written."""
    model, _ = tiny_model(family, layers=3, seed=5)
    ids = torch.randint(3, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    results = {}
    for token_step in (True, False):
        engine = Engine(model)
        step = engine.native_step()
        assert step.token_inputs is not None, step.token_reason
        if not token_step:
            step.token_inputs = None
        cache = engine.cache_for(2, 40)
        engine.prefill(cache, ids, mask)
        logits = []
        for i in range(12):
            if i == 6:
                step._grow_rope(step._rope_length + 1)  # new tables, new pointers
            logits.append(engine.decode(cache, torch.tensor([5 + i, 9 + 2 * i])))
        if token_step:
            before = cache.keys.clone()
            with pytest.raises(IndexError, match="outside the embedding"):
                engine.decode(cache, torch.tensor([3, model.config.vocab_size]))
            assert torch.equal(cache.keys, before) and cache.length == ids.shape[1] + 12
        results[token_step] = logits
    for a, b in zip(results[True], results[False], strict=True):
        assert torch.equal(a, b)


@SETTINGS
@given(rows=st.integers(1, 3), cols=st.integers(1, 300), ties=st.booleans(), nan=st.booleans(),
       seed=st.integers(0, 2**16))
def test_greedy_tokens_equal_torch_argmax(rows, cols, ties, nan, seed):
    """The native argmax keeps torch's rules: the first index of the largest, a NaN counting as largest."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, cols, generator=generator)
    if ties:
        logits = logits.round()  # many equal maxima
    if nan:
        logits.view(-1)[torch.randint(0, rows * cols, (2,), generator=generator)] = float("nan")
    assert torch.equal(native.argmax(logits), logits.argmax(-1))
    assert torch.equal(greedy_tokens(logits), logits.argmax(-1))
    assert torch.equal(native.argmax(logits.view(1, rows, cols)), logits.view(1, rows, cols).argmax(-1))


def test_native_step_over_a_left_padded_batch_equals_the_torch_step(native_dense):
    model, _ = tiny_model("gemma3", layers=2, seed=2)
    ids = torch.randint(3, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    results = {}
    for kernels in ("auto", "torch"):
        engine = Engine(model, kernels=kernels)
        cache = engine.cache_for(2, 20)
        engine.prefill(cache, ids, mask)
        results[kernels] = [engine.decode(cache, torch.tensor([5 + i, 9 + i])) for i in range(10)]
    for a, b in zip(*results.values(), strict=True):
        assert close(a, b)


def test_without_the_kernels_the_engine_and_the_dispatcher_fall_back(monkeypatch):
    model, _ = tiny_model("llama", layers=2, seed=0)
    monkeypatch.setattr(native, "_load", lambda: (None, "no C++ compiler found (test)"))
    engine = Engine(model)
    assert engine.native_step() is None and "no C++ compiler" in engine.native_reason
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        Engine(model, kernels="native").native_step()
    packed = PackedWeight.from_quantized(quantize(torch.randn(8, 64), 4, 32, False))
    x = torch.randn(2, 64)
    assert close(cpu.dequant_matmul(x, packed), reference.dequant_matmul(x, packed))


def test_empty_and_oversized_calls_are_refused_and_the_dispatcher_handles_them():
    packed = PackedWeight.from_quantized(quantize(torch.randn(8, 64), 4, 32, False))
    for rows in (0, native.MAX_TOKENS + 1):
        with pytest.raises(ValueError, match="1 to 8 tokens"):
            native.dequant_matmul(torch.randn(rows, 64), packed)
    assert cpu.dequant_matmul(torch.randn(0, 64), packed).shape == (0, 8)
    with pytest.raises(ValueError, match="float32"):
        native.gated_act(torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64), "silu")


def test_the_native_paths_keep_gradients_flowing():
    packed = PackedWeight.from_quantized(quantize(torch.randn(8, 64), 8, 32, False))
    x = torch.randn(2, 64, requires_grad=True)
    cpu.dequant_matmul(x, packed).sum().backward()
    assert x.grad is not None and torch.allclose(x.grad, reference.dequantize(packed).sum(0).expand(2, -1), atol=1e-5)


def test_bad_kernel_choices_are_refused(monkeypatch):
    model, _ = tiny_model("llama", layers=1, seed=0)
    with pytest.raises(ValueError, match="kernels='fast'.*auto"):
        Engine(model, kernels="fast")
    monkeypatch.setenv(autotune.ENV, "blas")
    with pytest.raises(ValueError, match="EFFINFER_DENSE_DECODE='blas'.*mkl"):
        autotune.dense_decode_path()
    with pytest.raises(ValueError, match="group_size that is a multiple of 32"):
        Experiment(techniques=["rtn:bits=4,group_size=16,execution=native"]).build_stack()


def test_autotune_measures_once_and_caches_its_choice(monkeypatch, tmp_path):
    monkeypatch.setenv("EFFINFER_CACHE", str(tmp_path))
    monkeypatch.delenv(autotune.ENV, raising=False)
    weights = [torch.randn(64, 96), torch.randn(96, 64)]
    real = autotune.measure(weights, rounds=1)  # the real measurement runs and times every candidate
    assert set(real) == set(autotune.candidates()) and all(t > 0 for t in real.values())
    calls = []
    steady = {path: 1.0 + index / 10 for index, path in enumerate(autotune.candidates())}
    monkeypatch.setattr(autotune, "measure", lambda w=None, rounds=3, tokens=1: calls.append(tokens) or steady)
    first = autotune.dense_decode_path(weights)
    assert first == min(steady, key=steady.get) and autotune.dense_decode_path(weights) == first and calls == [1]
    stored = json.loads((tmp_path / "kernels" / "autotune.json").read_text())
    [entry] = stored.values()
    assert entry["path"] == first and entry["seconds_per_pass"] == steady
    assert autotune.dense_prefill_path(weights) == first and autotune.dense_prefill_path(weights) == first
    assert calls == [1, autotune.PREFILL_TOKENS] and len(json.loads((tmp_path / "kernels" / "autotune.json")
                                                                   .read_text())) == 2  # its own entry
    monkeypatch.setenv(autotune.ENV, "mkl")
    assert autotune.dense_decode_path(weights) == "mkl"
    monkeypatch.setenv(autotune.PREFILL_ENV, "onednn")
    assert autotune.dense_prefill_path(weights) == "onednn"


@pytest.mark.real_model
def test_smollm2_native_steps_equal_the_torch_step(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    tokens = tokenizer(" Paris, and the capital of Italy is Rome.", return_tensors="pt")["input_ids"][0].tolist()
    for a, b in zip(step_logits(model, "auto", prompt, tokens), step_logits(model, "torch", prompt, tokens),
                    strict=True):
        assert close(a, b, 1e-3) and a.argmax() == b.argmax()
    stack = Experiment(techniques=["rtn:bits=4,group_size=32,symmetric=false,execution=native,skip_modules=[]"])
    with ComposedModel(copy.deepcopy(model), tokenizer, stack.build_stack()) as composed:
        quantized = composed.model
        layer = quantized.model.layers[0].mlp.down_proj
        assert layer.path() == "int4 effinfer kernels" and layer.packed.numel() * 8 == layer.in_features * \
            layer.out_features * 4  # really 4 bits per weight
        for a, b in zip(step_logits(quantized, "auto", prompt, tokens), step_logits(quantized, "torch", prompt, tokens),
                        strict=True):
            assert close(a, b, 1e-2)
        dense = copy.deepcopy(quantized)  # the same codes dequantized once: the native path computes this model
        for name, module in list(dense.named_modules()):
            if type(module).__name__ == "QuantizedLinear":
                parent, child = dense.get_submodule(name.rsplit(".", 1)[0]) if "." in name else dense, \
                    name.rsplit(".", 1)[-1]
                linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
                linear.weight.data = module.dense_weight()
                setattr(parent, child, linear)
        # the same function up to the packed matmul's int16 activations (one scale per token): the logits agree
        # to a few thousandths of their range after 30 layers (measured: <= 3.2e-3)
        for a, b in zip(step_logits(quantized, "auto", prompt, tokens), step_logits(dense, "torch", prompt, tokens),
                        strict=True):
            assert close(a, b, 1e-2)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_short_forwards_use_the_native_matmuls_and_equal_the_torch_path(family, monkeypatch):
    """Speculative verification: a chain of drafted tokens runs as the native program's causal chain step, a tree
    and short prompts through the torch forward with the native matmul; all equal the torch path."""
    monkeypatch.setenv(autotune.ENV, "native")  # the autotune may pick MKL for tiny weights
    model, _ = tiny_model(family, layers=2, seed=3)
    prompt = torch.randint(3, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(4))
    draft = torch.randint(3, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(5))
    chains = []
    original = NativeStep.chain
    monkeypatch.setattr(NativeStep, "chain", lambda self, *a, **k: chains.append(a[0].shape) or original(self, *a, **k))
    results = {}
    for kernels in ("auto", "torch"):
        engine = Engine(model, kernels=kernels)
        cache = engine.cache_for(1, 32)
        first = engine.prefill(cache, prompt, torch.ones_like(prompt)).logits
        timings = engine.native_step().profile() if kernels == "auto" else {}
        chain = engine.forward(cache, draft)  # a chain of 6: the native program's causal chain step
        if kernels == "auto":  # the chain feeds the step profile as one step
            engine.native_step().breakdown = None
            assert timings["steps"] == 1 and timings["matmuls"] > 0 and timings["attention"] > 0
        tree = engine.forward(cache, draft, parents=[-1, 0, 0, 1, 2, 2]).logits  # a tree: the torch forward
        results[kernels] = (first, chain.logits, chain.hidden, tree, engine.small_matmul())
    assert chains == [(1, 6)]  # gemma3: its 8-token window cuts into the chain's keys (positions 5..10)
    assert results["auto"][-1] == "native"
    assert results["torch"][-1] == "library"
    for native_out, torch_out in zip(results["auto"][:-1], results["torch"][:-1], strict=True):
        assert close(native_out, torch_out)


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("prefill_path", ["native", "mkl"])
def test_a_prefill_takes_the_autotuned_gemm_and_equals_the_torch_path(family, prefill_path, monkeypatch):
    monkeypatch.setenv(autotune.ENV, "native")
    monkeypatch.setenv(autotune.PREFILL_ENV, prefill_path)
    model, _ = tiny_model(family, layers=2, seed=6)
    prompt = torch.randint(3, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0  # left padding
    gemms = []
    original = native.gemm
    monkeypatch.setattr(native, "gemm", lambda x, *a: gemms.append(x.shape[:-1].numel()) or original(x, *a))
    outputs = {}
    for kernels in ("auto", "torch"):
        engine = Engine(model, kernels=kernels)
        outputs[kernels] = engine.prefill(engine.cache_for(2, 16), prompt, mask).logits
    assert close(outputs["auto"], outputs["torch"])
    assert (set(gemms) == {26}) if prefill_path == "native" else not gemms  # 2 x 13 rows, each projection


def test_autotune_does_not_store_a_measurement_taken_under_load(monkeypatch, tmp_path):
    monkeypatch.setenv("EFFINFER_CACHE", str(tmp_path))
    monkeypatch.delenv(autotune.ENV, raising=False)
    busy = {path: 1.0 for path in autotune.candidates()} | {"mkl": 0.1}  # 10x apart: the CPU was busy
    monkeypatch.setattr(autotune, "measure", lambda weights=None, rounds=3, tokens=1: busy)
    assert autotune.dense_decode_path([torch.randn(8, 8)]) == "mkl"
    assert not (tmp_path / "kernels" / "autotune.json").exists()


def test_weights_move_into_huge_pages_unchanged_and_tied_weights_stay_tied(monkeypatch):
    """hugepages.relocate: float32 parameters copied into one 2 MiB-aligned huge-page arena, values and ties kept,
    each moved once; small ones left where they are; nothing moved where huge pages are off."""
    from effinfer.kernels import hugepages

    model, _ = tiny_model("llama", layers=2, seed=7)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    large = [p for p in model.parameters() if p.numel() * 4 >= hugepages.SMALLEST]
    if hugepages.problem() is not None:
        assert hugepages.relocate(model.parameters()) == 0
        return
    assert hugepages.buffer(100).data_ptr() % hugepages.HUGE_PAGE == 0
    moved = hugepages.relocate([*model.parameters(), *model.parameters()])
    assert moved >= sum(p.numel() * 4 for p in large) and large
    assert hugepages.relocate(model.parameters()) == 0  # each parameter once
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])
    monkeypatch.setenv(hugepages.ENV, "0")
    assert "EFFINFER_HUGE_PAGES=0" in hugepages.problem()
    assert hugepages.relocate(tiny_model("llama", layers=1, seed=8)[0].parameters()) == 0


def test_huge_pages_are_refused_where_the_kernel_never_gives_them(monkeypatch, tmp_path):
    from effinfer.kernels import hugepages

    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(hugepages, "THP_SETTING", setting)
    assert "never" in hugepages.problem()
    assert hugepages.buffer(64).numel() == 64  # ordinary memory then
    setting.write_text("always [madvise] never\n")
    assert hugepages.problem() is None or "Linux" in hugepages.problem()


def test_a_step_built_in_inference_mode_leaves_the_weights_trainable():
    """The engine builds its native step lazily, often inside torch.inference_mode(); the weights it moves into
    huge pages must stay ordinary tensors, since a technique may train on the model afterwards (exit heads, Medusa,
    EAGLE)."""
    model, _ = tiny_model("qwen2", layers=2, seed=9)
    engine = Engine(model)
    with torch.inference_mode():
        cache = engine.cache_for(1, 8)
        engine.prefill(cache, torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long))
        engine.decode(cache, torch.tensor([8]))
    assert engine.native_step() is not None
    assert not any(p.is_inference() for p in model.parameters())
    model(torch.tensor([[5, 6, 7]])).logits.sum().backward()
    assert model.lm_head.weight.grad is not None
