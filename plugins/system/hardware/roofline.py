"""Analytical roofline model of a decoder-only LLM: FLOPs and bytes of every operator, time per hardware.

After LLM-Viewer (Yuan et al., *LLM Inference Unveiled: Survey and Roofline Model Insights*,
arXiv:2402.16363) and the roofline model (Williams, Waterman & Patterson, CACM 2009): each operator
of one forward pass (every projection, attention, norm, element-wise op and the output head) gets
its FLOPs and the bytes it must move (weights at the stack's bit-width with their group scales,
activations, KV cache at its precision); its time on a piece of hardware is
``max(FLOPs / peak FLOP/s, bytes / bandwidth)`` and a pass is the sum over operators.

A :class:`Stack` says what the techniques did to the model: weight bits and group size (rtn/gptq/awq),
sparsity (pruning: FLOPs and weight bytes scale by the kept fraction, an ideal sparse kernel), KV
bytes per element and the fraction of the cache kept (KV quantization / eviction). A
:class:`Hardware` entry is either published figures (GPUs, accelerator designs from the survey's
papers, cited) or this CPU's figures measured by :mod:`.probe`; a measured entry may also carry
the effective bandwidth of each matmul kernel and the cost of one dispatched op, which turns the
ideal roofline into a prediction of what the eager decode loop really does.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

GB = 1e9
TFLOP = 1e12


@dataclass(frozen=True)
class ModelShape:
    """The sizes that set a decoder's cost (Llama, Qwen2, Gemma 3 layouts: gated MLP, GQA)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = True

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers config object or its ``config.json`` dict."""
        get = (config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default))
        heads = get("num_attention_heads")
        hidden = get("hidden_size")
        if not (heads and hidden and get("intermediate_size") and get("num_hidden_layers") and get("vocab_size")):
            raise ValueError("the config lacks hidden_size / intermediate_size / num_hidden_layers / "
                             "num_attention_heads / vocab_size: the roofline model needs a decoder-only LM config")
        return cls(hidden=hidden, intermediate=get("intermediate_size"), layers=get("num_hidden_layers"),
                   heads=heads, kv_heads=get("num_key_value_heads") or heads,
                   head_dim=get("head_dim") or hidden // heads, vocab=get("vocab_size"),
                   tied_embeddings=bool(get("tie_word_embeddings", True)))

    def matrices(self) -> dict[str, tuple[int, int]]:
        """``(in, out)`` of each projection of one layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}

    @property
    def parameters(self) -> int:
        per_layer = sum(i * o for i, o in self.matrices().values()) + 2 * self.hidden
        return self.layers * per_layer + self.vocab * self.hidden * (1 if self.tied_embeddings else 2) + self.hidden


@dataclass(frozen=True)
class Stack:
    """What the stack's techniques change in the cost of a pass."""

    name: str = "fp32"
    weight_bits: float = 32          # 32, 16, 8, 4 (2, 3 for the low-bit quantizers)
    group_size: int | None = None    # input columns per scale; None = one per output channel (or no scales)
    group_bytes: float = 0.0         # bytes stored per group: scale (+ zero point / offset)
    act_bytes: int = 4               # activation element: 4 fp32, 2 bf16/fp16
    kv_bytes: float = 4              # KV cache element
    kv_keep: float = 1.0             # fraction of the cache attention reads (eviction / sparse attention)
    sparsity: float = 0.0            # fraction of weights pruned (ideal sparse kernel)
    compute: str = "fp32"            # arithmetic the matmuls run in: fp32, bf16, int8
    head_bits: float | None = None   # the output head's bits when it stays unquantized (skip_modules)

    def weight_bytes(self, n_in: int, n_out: int, bits: float | None = None) -> float:
        bits = self.weight_bits if bits is None else bits
        groups = (n_in // self.group_size if self.group_size else 1) if self.group_bytes else 0
        return (n_in * n_out * bits / 8 + n_out * groups * self.group_bytes) * (1 - self.sparsity)


#: stacks the project runs (rtn's packed CPU kernels: int8 per channel with a bf16 scale, int4 with
#: bf16 scale + zero pairs per group of 32, activations bf16 around the kernels)
STACKS = {
    "fp32": Stack(),
    "bf16": Stack("bf16", 16, act_bytes=2, kv_bytes=2, compute="bf16"),
    "fp16": Stack("fp16", 16, act_bytes=2, kv_bytes=2, compute="bf16"),
    "w8a16": Stack("w8a16", 8, None, 2, act_bytes=2, kv_bytes=2, compute="bf16"),
    "w4a16_g32": Stack("w4a16_g32", 4, 32, 4, act_bytes=2, kv_bytes=2, compute="bf16"),
    "w4a16_g128": Stack("w4a16_g128", 4, 128, 4, act_bytes=2, kv_bytes=2, compute="bf16"),
    "w8a8": Stack("w8a8", 8, None, 2, act_bytes=2, kv_bytes=2, compute="int8"),
    "w4a16_g128_50%sparse": Stack("w4a16_g128_50%sparse", 4, 128, 4, act_bytes=2, kv_bytes=2, sparsity=0.5,
                                  compute="bf16"),
    "w4a16_g128_kv4": Stack("w4a16_g128_kv4", 4, 128, 4, act_bytes=2, kv_bytes=0.5, compute="bf16"),
    # effinfer's native CPU kernels (execution=native): float32 activations and KV, a float32 scale and a
    # float32 folded zero per group (8 bytes), codes widened to float32 in registers
    "w8a16_native": Stack("w8a16_native", 8, None, 8),
    "w4a16_g32_native": Stack("w4a16_g32_native", 4, 32, 8),
}


@dataclass(frozen=True)
class Op:
    name: str
    kind: str          # matmul, attention, norm, elementwise
    flops: float
    bytes: float
    weight_bytes: float = 0.0
    count: int = 1     # dispatched ops this operator is, in an eager loop


@dataclass(frozen=True)
class Hardware:
    name: str
    bandwidth: float                         # bytes/s
    flops: dict[str, float]                  # peak FLOP/s (OP/s for int8) per compute kind
    source: str
    kind: str = "published"                  # published | measured
    matmul_bandwidth: dict[str, float] = field(default_factory=dict)   # stack name → effective bytes/s of its GEMV
    op_overhead: float = 0.0                 # seconds per dispatched op (measured eager loop)

    def peak(self, compute: str) -> float:
        return self.flops.get(compute) or self.flops.get("bf16") or self.flops["fp32"]


#: published figures (dense, no structured-sparsity doubling); bandwidth in bytes/s
CATALOGUE = [
    Hardware("NVIDIA A100 SXM4 80GB", 2039 * GB, {"fp32": 19.5 * TFLOP, "bf16": 312 * TFLOP, "int8": 624 * TFLOP},
             "NVIDIA A100 Tensor Core GPU datasheet (2021): HBM2e 2,039 GB/s; 312 TFLOPS BF16, 624 TOPS INT8 dense"),
    Hardware("NVIDIA H100 SXM5", 3350 * GB, {"fp32": 67 * TFLOP, "bf16": 989 * TFLOP, "int8": 1979 * TFLOP},
             "NVIDIA H100 Tensor Core GPU datasheet (2023): HBM3 3.35 TB/s; 989 TFLOPS BF16, 1,979 TOPS INT8 dense"),
    Hardware("NVIDIA H200 SXM", 4800 * GB, {"fp32": 67 * TFLOP, "bf16": 989 * TFLOP, "int8": 1979 * TFLOP},
             "NVIDIA H200 datasheet (2024): HBM3e 4.8 TB/s; H100's compute (989 TFLOPS BF16, 1,979 TOPS INT8 dense)"),
    Hardware("FlightLLM on Alveo U280 (FPGA)", 460 * GB, {"fp32": 0.5 * TFLOP, "bf16": 6 * TFLOP, "int8": 24.5 * TFLOP},
             "FlightLLM (Zeng et al., arXiv:2401.03868) runs on the Alveo U280: HBM2 460 GB/s (AMD UG1393), "
             "24.5 INT8 TOPS (Alveo U280 data sheet DS963); fp32/bf16 rates are DSP estimates of this model"),
    Hardware("DFX, 4× Alveo U280 (FPGA appliance)", 4 * 460 * GB,
             {"fp32": 2 * TFLOP, "bf16": 24 * TFLOP, "int8": 98 * TFLOP},
             "DFX (Hong et al., arXiv:2209.10797): four Alveo U280 cards with model parallelism, 4 × 460 GB/s HBM2 "
             "(AMD UG1393), 4 × 24.5 INT8 TOPS (DS963); fp32/bf16 rates are DSP estimates of this model"),
]


def operators(shape: ModelShape, stack: Stack, tokens: int, context: int, batch: int = 1) -> list[Op]:
    """Every operator of one forward pass of ``tokens`` new tokens per sequence after ``context`` cached ones."""
    rows = batch * tokens
    act = stack.act_bytes
    dense = 1 - stack.sparsity
    ops: list[Op] = []
    for name, (n_in, n_out) in shape.matrices().items():
        weight = stack.weight_bytes(n_in, n_out)
        ops.append(Op(name, "matmul", 2 * rows * n_in * n_out * dense, weight + rows * (n_in + n_out) * act, weight))
    # attention: scores and weighted sum over the (kept) cache plus the new tokens; causal within the new ones
    seen = stack.kv_keep * context * tokens + tokens * (tokens + 1) / 2
    kv_dim = shape.kv_heads * shape.head_dim
    kv_read = batch * stack.kv_keep * context * kv_dim * 2 * stack.kv_bytes
    kv_write = rows * kv_dim * 2 * stack.kv_bytes
    q_io = 2 * rows * shape.heads * shape.head_dim * act
    ops.append(Op("attention", "attention", 4 * batch * seen * shape.heads * shape.head_dim, kv_read + kv_write + q_io,
                  count=6))
    ops.append(Op("rotary", "elementwise", 6 * rows * (shape.heads + shape.kv_heads) * shape.head_dim,
                  2 * rows * (shape.heads + shape.kv_heads) * shape.head_dim * act, count=10))
    ops.append(Op("norms", "norm", 2 * 4 * rows * shape.hidden, 2 * (2 * rows * shape.hidden * act + shape.hidden * 4),
                  count=12))
    ops.append(Op("residual", "elementwise", 2 * rows * shape.hidden, 2 * 3 * rows * shape.hidden * act, count=2))
    ops.append(Op("act_fn", "elementwise", 5 * rows * shape.intermediate, 3 * rows * shape.intermediate * act, count=2))
    layers = [replace(op, flops=op.flops * shape.layers, bytes=op.bytes * shape.layers,
                      weight_bytes=op.weight_bytes * shape.layers, count=op.count * shape.layers) for op in ops]
    head_bits = stack.head_bits if stack.head_bits is not None else stack.weight_bits
    head = stack.weight_bytes(shape.hidden, shape.vocab, head_bits)
    logits_rows = batch  # logits of the last position only (decode: the new token; prefill: logits_to_keep=1)
    return layers + [
        Op("final_norm", "norm", 4 * rows * shape.hidden, 2 * rows * shape.hidden * act, count=6),
        Op("lm_head", "matmul", 2 * logits_rows * shape.hidden * shape.vocab * dense,
           head + logits_rows * (shape.hidden + shape.vocab) * act, head),
        Op("embedding", "elementwise", 0, rows * shape.hidden * (4 if stack.weight_bits >= 16 else act)),
    ]


@dataclass(frozen=True)
class Prediction:
    seconds: float
    flops: float
    bytes: float
    by_kind: dict[str, float]
    bound: str           # memory | compute (of the larger share of the time)
    overhead: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.seconds if self.seconds else float("inf")


def predict(ops: list[Op], hardware: Hardware, stack: Stack, dispatched_ops: int | None = None) -> Prediction:
    """Time of a pass on ``hardware``: per operator ``max(FLOPs / peak, bytes / bandwidth)`` (a measured CPU
    entry uses its probed kernel bandwidth for the matmuls), plus ``op_overhead`` per dispatched op
    (``dispatched_ops`` when counted on the real model, else the operators' own estimate)."""
    by_kind: dict[str, float] = defaultdict(float)
    memory_time = compute_time = 0.0
    for op in ops:
        bandwidth = hardware.bandwidth
        if op.kind == "matmul" and stack.name in hardware.matmul_bandwidth:
            bandwidth = hardware.matmul_bandwidth[stack.name]
        memory = op.bytes / bandwidth
        compute = op.flops / hardware.peak(stack.compute if op.kind == "matmul" else "fp32")
        by_kind[op.kind] += max(memory, compute)
        memory_time += memory if memory >= compute else 0.0
        compute_time += compute if compute > memory else 0.0
    count = dispatched_ops if dispatched_ops is not None else sum(op.count for op in ops)
    overhead = hardware.op_overhead * count
    if overhead:
        by_kind["dispatch"] = overhead
    return Prediction(sum(by_kind.values()), sum(op.flops for op in ops), sum(op.bytes for op in ops), dict(by_kind),
                      "memory" if memory_time >= compute_time else "compute", overhead)


def decode(shape: ModelShape, stack: Stack, hardware: Hardware, context: int, batch: int = 1,
           dispatched_ops: int | None = None) -> Prediction:
    """One decode step (one new token per sequence) after ``context`` cached tokens."""
    return predict(operators(shape, stack, 1, context, batch), hardware, stack, dispatched_ops)


def prefill(shape: ModelShape, stack: Stack, hardware: Hardware, prompt: int, batch: int = 1) -> Prediction:
    """The prefill of ``prompt`` tokens per sequence (no dispatch overhead: it is amortized over the prompt)."""
    return predict(operators(shape, stack, prompt, 0, batch), hardware, replace(stack), 0)


def weight_bytes(shape: ModelShape, stack: Stack) -> float:
    """Bytes of weights one decode step reads (every projection and the output head)."""
    return sum(op.weight_bytes for op in operators(shape, stack, 1, 0))


#: technique names whose config sets the weight format (bits, group_size, symmetric)
WEIGHT_QUANTIZERS = ("rtn", "gptq", "awq", "qat")
#: techniques that run int8 × int8 matmuls (per-channel int8 weights)
W8A8 = ("smoothquant", "llm_int8")
#: techniques whose ``sparsity`` field prunes that fraction of the weights
PRUNERS = ("magnitude", "wanda", "sparsegpt")
#: KV-cache quantizers and their bits (a ``bits`` field wins)
KV_QUANTIZERS = {"kivi": 2, "kv_int": 8, "kv_int8": 8, "kv_int4": 4}
#: KV eviction / sparse attention: a ``budget`` of kept entries per layer and KV head
KV_BUDGETED = ("eviction", "h2o", "sliding_window", "snapkv", "streaming_llm", "tova")


def stack_from_techniques(techniques: list[tuple[str, dict]], context: int | None = None,
                          base: Stack = Stack()) -> tuple[Stack, list[str]]:
    """The roofline :class:`Stack` of an effinfer stack given as ``(technique name, config dict)`` pairs, and the
    names of the techniques it does not model (speculative decoding, prompt compression, ...).

    ``context`` turns a KV budget into the kept fraction of the cache. The evaluator can call this per stack
    with the techniques' resolved configs and show :func:`decode`'s prediction beside its measured decode.
    """
    stack = base
    unmodelled = []
    for name, config in techniques:
        config = config or {}
        if name in WEIGHT_QUANTIZERS:
            bits = config.get("bits", 4)
            symmetric = config.get("symmetric", False)
            group = config.get("group_size", 128 if name != "rtn" else None)
            kernel_int4 = config.get("execution") == "kernel" and bits == 4
            group_bytes = 4 if kernel_int4 else 2 + (0 if symmetric else 1)  # bf16 scale+zero / fp16 scale (+u8 zero)
            stack = replace(stack, name=f"{stack.name}+{name}", weight_bits=bits, group_size=group,
                            group_bytes=group_bytes, act_bytes=2 if config.get("execution") == "kernel" else stack.act_bytes)
        elif name in W8A8:
            stack = replace(stack, name=f"{stack.name}+{name}", weight_bits=8, group_size=None, group_bytes=4,
                            compute="int8")
        elif name in PRUNERS:
            stack = replace(stack, name=f"{stack.name}+{name}", sparsity=config.get("sparsity", 0.5))
        elif name in KV_QUANTIZERS:
            stack = replace(stack, name=f"{stack.name}+{name}", kv_bytes=config.get("bits", KV_QUANTIZERS[name]) / 8)
        elif name in KV_BUDGETED and context:
            keep = min(1.0, config.get("budget", 1024) / max(context, 1))
            stack = replace(stack, name=f"{stack.name}+{name}", kv_keep=keep)
        else:
            unmodelled.append(name)
    return stack, unmodelled
