"""effinfer.kernels: every implementation (cpu, Triton — in its interpreter when there is no GPU) agrees
with the plain-torch reference over random shapes, group sizes and lengths."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from effinfer import kernels
from effinfer.kernels import native
from effinfer.kernels import reference
from effinfer.kernels.dispatch import backend_for, triton_problem
from effinfer.plugins.model.quantization.packing import quantize

BACKENDS = ["cpu", pytest.param("triton", marks=pytest.mark.skipif(
    triton_problem() is not None, reason=f"Triton kernels not testable: {triton_problem()}"))]


def max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-6))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=8, deadline=None)
@given(rows=st.sampled_from([1, 2, 5, 9, 20]), out_features=st.integers(1, 70), groups=st.integers(1, 3),
       group=st.sampled_from([16, 32, 48, 64]), bits=st.sampled_from([4, 8]),
       zero=st.sampled_from(["symmetric", "int", "float"]), seed=st.integers(0, 1000))
def test_dequant_matmul_matches_the_reference(backend, rows, out_features, groups, group, bits, zero, seed):
    torch.manual_seed(seed)
    weight = torch.randn(out_features, groups * group)
    qt = quantize(weight, bits, group, zero == "symmetric", float_zero=zero == "float")
    packed = kernels.PackedWeight.from_quantized(qt)
    x = torch.randn(rows, groups * group)
    # the folded bias reproduces the quantizer's own dequantization
    assert torch.allclose(reference.dequantize(packed), qt.dequantize(), atol=1e-5, rtol=1e-5)
    ref = reference.dequant_matmul(x, packed)
    out = kernels.dequant_matmul(x, packed, backend=backend)
    if backend == "cpu" and rows <= native.MAX_TOKENS and native.problem() is None and \
            native.packed_problem(packed) is None:  # the native matmul, int16 activations on its integer path
        bound = native.packed_error_bound(x, packed) * 1.01 + 1e-5 * float(ref.abs().max().clamp(min=1))
        assert (out - ref).abs().le(bound).all()
    else:
        assert max_error(out, ref) < 1e-5


@pytest.mark.skipif(triton_problem() is not None, reason=f"Triton kernels not testable: {triton_problem()}")
@settings(max_examples=4, deadline=None)
@given(rows=st.sampled_from([1, 3, 12]), split=st.integers(2, 5), bits=st.sampled_from([2, 4, 8]),
       seed=st.integers(0, 1000))
def test_split_k_dequant_matmul_matches_the_reference(rows, split, bits, seed):
    from effinfer.kernels.dispatch import triton_kernels

    torch.manual_seed(seed)
    packed = kernels.PackedWeight.from_quantized(quantize(torch.randn(40, 256), bits, 64, False))
    x = torch.randn(rows, 256)
    out = triton_kernels().dequant_matmul(x, packed, split_k=split)
    assert max_error(out, reference.dequant_matmul(x, packed)) < 1e-5


def test_dequant_matmul_reads_two_and_three_bit_codes():
    torch.manual_seed(0)
    x = torch.randn(3, 64)
    for bits in (2, 3):
        qt = quantize(torch.randn(8, 64), bits, 32, False)
        packed = kernels.PackedWeight.from_quantized(qt)
        assert torch.allclose(kernels.dequant_matmul(x, packed, backend="cpu"), x @ qt.dequantize().t(), atol=1e-4)
    if triton_problem() is None:  # the Triton kernel reads byte-aligned widths and says so for 3-bit
        with pytest.raises(ValueError, match="3-bit"):
            kernels.dequant_matmul(x, packed, backend="triton")


def _paged(cache: torch.Tensor, page: int, table: torch.Tensor) -> torch.Tensor:
    """The same cache cut into pages of ``page`` positions, placed as the block table says."""
    batch, heads, length, dim = cache.shape
    blocks = table.shape[1]
    pages = torch.zeros(batch * blocks, heads, page, dim)
    for b in range(batch):
        for j in range(blocks):
            chunk = cache[b, :, j * page:(j + 1) * page]
            pages[table[b, j], :, :chunk.shape[1]] = chunk
    return pages


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=6, deadline=None)
@given(batch=st.integers(1, 3), kv_heads=st.integers(1, 2), groups=st.sampled_from([1, 3, 4]),
       capacity=st.sampled_from([1, 7, 64, 300, 700]), dim=st.sampled_from([8, 16, 24]), page=st.sampled_from([16, 32]),
       seed=st.integers(0, 1000))
def test_decode_attention_matches_the_reference(backend, batch, kv_heads, groups, capacity, dim, page, seed):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * groups, dim, generator=generator)
    k = torch.randn(batch, kv_heads, capacity, dim, generator=generator)
    v = torch.randn(batch, kv_heads, capacity, dim, generator=generator)
    lengths = torch.randint(1, capacity + 1, (batch,), generator=generator)
    ref = reference.decode_attention(q, k, v, lengths)
    assert max_error(kernels.decode_attention(q, k, v, lengths, backend=backend), ref) < 1e-5
    blocks = -(-capacity // page)
    table = torch.randperm(batch * blocks, generator=generator).view(batch, blocks).int()  # shuffled pages
    k_pages, v_pages = _paged(k, page, table), _paged(v, page, table)
    assert max_error(kernels.paged_decode_attention(q, k_pages, v_pages, table, lengths, backend=backend), ref) < 1e-5


def test_decode_attention_equals_sdpa():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 16), torch.randn(2, 4, 33, 16), torch.randn(2, 4, 33, 16)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), k, v).squeeze(2)
    assert torch.allclose(reference.decode_attention(q, k, v, torch.tensor([33, 33])), sdpa, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=6, deadline=None)
@given(rows=st.integers(1, 6), hidden=st.sampled_from([8, 40, 64, 100]), residual=st.booleans(),
       offset=st.sampled_from([0.0, 1.0]), seed=st.integers(0, 1000))
def test_add_rmsnorm_matches_the_reference(backend, rows, hidden, residual, offset, seed):
    generator = torch.Generator().manual_seed(seed)
    x, r = torch.randn(rows, hidden, generator=generator), torch.randn(rows, hidden, generator=generator)
    weight = torch.randn(hidden, generator=generator)
    ref_y, ref_h = reference.add_rmsnorm(x, r if residual else None, weight, 1e-6, offset)
    y, h = kernels.add_rmsnorm(x, r if residual else None, weight, 1e-6, offset, backend=backend)
    assert max_error(y, ref_y) < 1e-5 and torch.allclose(h, ref_h)


def test_add_rmsnorm_equals_the_models_norm(tiny):
    model, _ = tiny
    norm = model.model.norm
    x = torch.randn(2, 3, norm.weight.shape[0])
    assert torch.allclose(reference.add_rmsnorm(x, None, norm.weight, norm.variance_epsilon)[0], norm(x), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=6, deadline=None)
@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 2), groups=st.sampled_from([1, 2]),
       length=st.integers(1, 4), dim=st.sampled_from([4, 8, 16]), start=st.integers(0, 5), seed=st.integers(0, 1000))
def test_rotary_kv_write_matches_the_reference(backend, batch, kv_heads, groups, length, dim, start, seed):
    generator = torch.Generator().manual_seed(seed)
    heads = kv_heads * groups
    # q and k as the attention layer has them: [B, L, H, D] transposed, so not contiguous
    q = torch.randn(batch, length, heads, dim, generator=generator).transpose(1, 2)
    k = torch.randn(batch, length, kv_heads, dim, generator=generator).transpose(1, 2)
    v = torch.randn(batch, length, kv_heads, dim, generator=generator).transpose(1, 2)
    cos, sin = torch.randn(batch, length, dim, generator=generator), torch.randn(batch, length, dim, generator=generator)
    positions = torch.arange(start, start + length)
    capacity = start + length + 2
    caches = [torch.zeros(batch, kv_heads, capacity, dim) for _ in range(4)]
    ref_q = reference.rotary_kv_write(q, k, v, cos, sin, caches[0], caches[1], positions)
    out_q = kernels.rotary_kv_write(q, k, v, cos, sin, caches[2], caches[3], positions, backend=backend)
    assert max_error(out_q, ref_q) < 1e-6
    assert torch.allclose(caches[2], caches[0], atol=1e-6) and torch.equal(caches[3], caches[1])


def test_rotary_matches_the_models_rotary(tiny):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, _ = tiny
    config = model.config
    dim = config.hidden_size // config.num_attention_heads
    q, k = torch.randn(1, config.num_attention_heads, 5, dim), torch.randn(1, config.num_key_value_heads, 5, dim)
    cos, sin = model.model.rotary_emb(q, torch.arange(5).unsqueeze(0))
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.allclose(reference.rotate(q, cos.unsqueeze(1), sin.unsqueeze(1)), hf_q, atol=1e-6)
    assert torch.allclose(reference.rotate(k, cos.unsqueeze(1), sin.unsqueeze(1)), hf_k, atol=1e-6)


def test_dispatcher_picks_cpu_here_and_honours_the_override(monkeypatch):
    monkeypatch.delenv("EFFINFER_KERNELS", raising=False)
    assert backend_for("cpu") == "cpu"
    monkeypatch.setenv("EFFINFER_KERNELS", "reference")
    assert backend_for("cpu") == "reference"
    assert backend_for("cpu", "cpu") == "cpu"  # an explicit backend wins
    monkeypatch.setenv("EFFINFER_KERNELS", "gpu")
    with pytest.raises(ValueError, match="EFFINFER_KERNELS"):
        backend_for("cpu")


def test_operators_refuse_bad_inputs_clearly():
    packed = kernels.PackedWeight.from_quantized(quantize(torch.randn(4, 32), 4, 16, True))
    with pytest.raises(ValueError, match="expects 32"):
        kernels.dequant_matmul(torch.randn(1, 16), packed)
    with pytest.raises(ValueError, match="capacity"):
        kernels.decode_attention(torch.randn(1, 2, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8),
                                 torch.tensor([5]))
    with pytest.raises(ValueError, match="cannot|unknown"):
        kernels.implementation("dequant_matmul", "gpu")


@pytest.mark.skipif(triton_problem() is not None, reason=f"Triton kernels not testable: {triton_problem()}")
def test_gpu_benchmark_dry_run(tmp_path):
    """benchmarks/gpu_kernels.py --dry-run: every kernel and the engine section on CPU, JSON + table written."""
    import importlib.util
    import json
    from pathlib import Path

    out = tmp_path / "gpu.json"
    script = Path(__file__).resolve().parent.parent / "benchmarks/gpu_kernels.py"
    spec = importlib.util.spec_from_file_location("gpu_kernels_benchmark", script)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    benchmark.main(["--dry-run", "--out", str(out)])
    data = json.loads(out.read_text())
    assert {row["kernel"].split()[0] for row in data["kernels"]} == {"dequant_matmul", "decode_attention",
                                                                     "add_rmsnorm", "rotary_kv_write"}
    assert all(row["max_rel_error"] < 1e-4 for row in data["kernels"])
    assert {row["model"] for row in data["engine"]} >= {"fp16", "W8A16", "W4A16"}
    assert "| kernel |" in out.with_suffix(".md").read_text()
