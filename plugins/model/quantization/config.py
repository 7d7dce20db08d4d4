"""Config fields shared by the quantizers, with their ranges, and the common apply helpers."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from effinfer.core.stages import ModelStage
from effinfer.core.technique import BUILTIN_LAYOUTS
from effinfer.plugins.model.quantization.layers import (PackedLayer, build_quantized_linear, packed_layers,
                                                       summarize_paths)
from effinfer.plugins.model.quantization.packing import SUGGESTED_GROUPS, group_size_problem, quantize

BITS_DESCRIPTION = "bits per weight (8, 4, 3 or 2); 8 and 4 have packed CPU kernels"
GROUP_DESCRIPTION = ("input columns sharing one scale (a multiple of 8 that divides every quantized layer's "
                     "input features; the int4 kernel takes 32, 64, 128 or 256); None = one scale per output "
                     "channel")
EXECUTION_DESCRIPTION = ("how quantized layers run: 'kernel' = PyTorch's packed int8/int4 CPU kernels "
                         "(error if the format has none), 'native' = effinfer's kernels (effinfer.kernels: packed "
                         "codes read by the decode matmul, float GEMM for prefill; 4/8 bits, group size a multiple "
                         "of 32), 'dequant' = packed codes dequantized per call "
                         "(reference path, any bit width), 'fake' = dequantized float weights stored "
                         "(fake quantization, no memory saved), 'auto' = kernel where one fits, else dequant")


class TargetConfig(BaseModel):
    """Which linear layers a quantizer replaces, and where it saves the result."""

    model_config = ConfigDict(extra="forbid")

    skip_modules: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        description="linear layers whose name contains one of these stay in float "
                    "(lm_head is tied to the embeddings in SmolLM2)",
    )
    save_dir: str | None = Field(None, description="save the quantized model here (safetensors + JSON), to load "
                                                   "it later without calibrating again")


class WeightQuantConfig(TargetConfig):
    """Weight-only quantization: grid, execution path, which layers, where to save."""

    bits: Literal[2, 3, 4, 8] = Field(4, description=BITS_DESCRIPTION)
    group_size: int | None = Field(32, ge=8, le=8192, multiple_of=8, description=GROUP_DESCRIPTION)
    symmetric: bool = Field(False, description="symmetric grid without zero points (else a uint8 zero point "
                                               "per group)")
    zero_point: Literal["integer", "float"] = Field(
        "integer", description="asymmetric grids: 'integer' = uint8 zero point, range stretched to include 0 "
                               "(GPTQ/AWQ); 'float' = bf16 offset, range exactly [min, max] (gpt-fast, GGUF Q4_1)")
    execution: Literal["auto", "kernel", "native", "dequant", "fake"] = Field(
        "auto", description=EXECUTION_DESCRIPTION)
    dense_above_tokens: int | None = Field(
        None, ge=1, le=1_000_000,
        description="kernel mode: calls with more rows than this (long prefills) dequantize the weight and run a "
                    "float GEMM instead of the packed kernel; None = always the kernel")

    @model_validator(mode="after")
    def _kernel_exists(self) -> WeightQuantConfig:
        if self.execution == "kernel" and self.bits not in (4, 8):
            raise ValueError(f"execution='kernel': there is no packed kernel for {self.bits}-bit weights (only 8 "
                             "and 4); use execution='dequant' or 'fake'")
        if self.execution == "kernel" and self.bits == 8 and (self.group_size is not None or not self.symmetric):
            raise ValueError("execution='kernel' with bits=8 needs group_size=None and symmetric=true (the int8 "
                             "kernel has one scale per output channel and no zero point)")
        if self.execution == "kernel" and self.bits == 4 and self.group_size not in (32, 64, 128, 256):
            raise ValueError(f"execution='kernel' with bits=4 needs group_size 32, 64, 128 or 256 (got "
                             f"{self.group_size})")
        if self.execution == "native" and (self.bits not in (4, 8) or (self.group_size or 32) % 32):
            raise ValueError(f"execution='native' needs bits 4 or 8 (got {self.bits}) and a group_size that is a "
                             f"multiple of 32 or None (got {self.group_size})")
        return self


def linear_input_features(model_config: Any, decoder_only: bool = False) -> dict[str, int]:
    """Every ``nn.Linear`` of a model of a built-in layout (Llama, Qwen2, Gemma 3) by full name, with
    its input features, read from the Hugging Face config alone (before loading); empty for
    another layout or a config without the sizes. ``decoder_only`` leaves out ``lm_head``."""
    if getattr(model_config, "model_type", None) not in BUILTIN_LAYOUTS:
        return {}
    try:
        hidden, intermediate = int(model_config.hidden_size), int(model_config.intermediate_size)
        heads, layers = int(model_config.num_attention_heads), int(model_config.num_hidden_layers)
    except (AttributeError, TypeError, ValueError):
        return {}
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    block = {"self_attn.q_proj": hidden, "self_attn.k_proj": hidden, "self_attn.v_proj": hidden,
             "self_attn.o_proj": heads * head_dim, "mlp.gate_proj": hidden, "mlp.up_proj": hidden,
             "mlp.down_proj": intermediate}
    features = {f"model.layers.{i}.{name}": size for i in range(layers) for name, size in block.items()}
    return features if decoder_only else features | {"lm_head": hidden}


def group_size_problems(model_config: Any, group_size: int | None, skip_modules: list[str],
                        decoder_only: bool = False) -> list[str]:
    """The quantized layers (those no ``skip_modules`` entry names) whose input features
    ``group_size`` does not divide, told from the model's config before loading: one message per
    input size, the post-load error's wording, offering the sizes that divide every quantized layer."""
    if group_size is None or model_config is None:
        return []
    quantized = {name: size for name, size in linear_input_features(model_config, decoder_only).items()
                 if not any(skip in name for skip in skip_modules)}
    suggest = [g for g in SUGGESTED_GROUPS if all(size % g == 0 for size in quantized.values())]
    problems = []
    for size in sorted(set(quantized.values())):
        problem = group_size_problem(size, group_size, suggest)
        if problem:
            kinds = dict.fromkeys(re.sub(r"^model\.layers\.\d+\.", "", n) for n, s in quantized.items() if s == size)
            problems.append(f"{problem}; layers with {size} input features: {', '.join(kinds)}")
    return problems


class CalibrationConfig(BaseModel):
    """How much calibration text a technique reads."""

    model_config = ConfigDict(extra="forbid")

    n_samples: int = Field(32, ge=1, le=4096, description="calibration windows (GPTQ and AWQ use 128)")
    seq_len: int = Field(512, ge=16, le=8192, description="tokens per calibration window")
    batch_size: int = Field(4, ge=1, le=256, description="windows per forward pass during calibration")


def selected_linears(model: nn.Module, skip: list[str], prefix: str = "") -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` modules under ``model`` whose full names contain none of ``skip``."""
    found = []
    for name, module in model.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        if isinstance(module, nn.Linear) and not any(s in full for s in skip):
            found.append((name, module))
    return found


def weight_bytes(modules: list[nn.Module]) -> int:
    tensors = {id(t): t for m in modules for t in [*m.parameters(), *m.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def swap_note(what: str, before: int, layers: dict[str, PackedLayer]) -> str:
    after = weight_bytes(list(layers.values()))
    return (f"{what}: {before / 2**20:.2f} MiB → {after / 2**20:.2f} MiB in {len(layers)} layers; "
            f"execution: {summarize_paths(layers)}")


def swap_in(stage: ModelStage, linears: list[tuple[str, nn.Module]], swapped: dict[str, PackedLayer],
            what: str) -> str:
    """Put the packed layers in place of ``linears`` (restored when the composition exits); the note
    that says what they cost before and after."""
    before = weight_bytes([m for _, m in linears])
    for name, layer in swapped.items():
        stage.patcher.replace_module(stage.model, name, layer)
    return swap_note(what, before, swapped)


def round_to_nearest_linear(weight: torch.Tensor, bias: torch.Tensor | None, name: str,
                            config: WeightQuantConfig) -> PackedLayer:
    """``weight`` rounded to the config's grid, packed, and wrapped in the config's execution path."""
    packed = quantize(weight, config.bits, config.group_size, config.symmetric, float_zero=float_zero(config))
    return build_quantized_linear(packed, bias, config.execution, name, config.dense_above_tokens)


def grid_text(config: WeightQuantConfig) -> str:
    kind = "symmetric" if config.symmetric else f"asymmetric, {config.zero_point} zero point"
    return f"int{config.bits} (group {config.group_size or 'per-channel'}, {kind})"


def float_zero(config: WeightQuantConfig) -> bool:
    return not config.symmetric and config.zero_point == "float"


def maybe_save(stage: ModelStage, save_dir: str | None, technique: Any) -> None:
    """Save the quantized model when the config asks for it, and say so in the technique's notes."""
    if not save_dir:
        return
    from effinfer.plugins.model.quantization.checkpoint import save_quantized

    folder = save_quantized(stage.model, stage.tokenizer, Path(save_dir),
                            technique={"name": technique.name, "config": technique.config.model_dump(mode="json")})
    technique.note(f"saved {len(packed_layers(stage.model))} quantized layers to {folder}")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def weight_math_threads(threads: int = 1) -> Iterator[None]:
    """Run per-weight arithmetic (rounding, GPTQ's column loop) on ``threads`` intra-op threads.

    These are many small operations; on a loaded 2-core machine, OpenMP synchronisation
    made GPTQ on a 1536×576 weight 20× slower with 2 threads than with 1 (5.7 s vs 0.27 s).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(min(threads, previous))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
