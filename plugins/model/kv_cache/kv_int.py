"""Per-token integer KV cache: each cached key and value vector stored as int8 or int4.

Every new key and value (one token, one KV head: ``head_dim`` numbers) is quantized on arrival
with its own float32 scale and minimum (asymmetric round-to-nearest) and stored packed; attention
reads the dequantized cache. The per-token baseline of the KV-quantization literature (FlexGen,
Sheng et al., arXiv:2303.06865, stores its KV cache in 4-bit groups; KIVI, arXiv:2402.02750,
shows keys need per-channel grouping below 4 bits).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.kv_cache import KVPolicy, use_kv_policy
from effinfer.core.stages import SystemStage
from effinfer.plugins.model.kv_cache.packing import Quantized, cat, quantize


class PerTokenQuantPolicy(KVPolicy):
    """Keys and values quantized per token and head to ``bits`` bits, stored packed."""

    name = "kv_int"

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.qkeys: Quantized | None = None
        self.qvalues: Quantized | None = None
        self.length = 0

    def update(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        new_keys, new_values = quantize(keys, self.bits, -1), quantize(values, self.bits, -1)
        self.qkeys = new_keys if self.qkeys is None else cat([self.qkeys, new_keys], -2)
        self.qvalues = new_values if self.qvalues is None else cat([self.qvalues, new_values], -2)
        self.length += keys.shape[-2]
        self.seen += keys.shape[-2]
        return self.qkeys.dequantize(keys.dtype), self.qvalues.dequantize(values.dtype)

    def __len__(self) -> int:
        return self.length

    def crop(self, count: int) -> None:
        if count <= 0 or self.qkeys is None:
            return
        keep = self.length - count
        for name in ("qkeys", "qvalues"):
            q = getattr(self, name)
            setattr(self, name, Quantized(q.codes[..., :keep, :], q.scale[..., :keep, :], q.low[..., :keep, :], q.bits))
        self.length, self.seen = keep, self.seen - count

    def nbytes(self) -> int:
        return sum(q.nbytes() for q in (self.qkeys, self.qvalues) if q is not None)

    def reset(self) -> None:
        self.qkeys = self.qvalues = None
        self.length = self.seen = 0


class NoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


def head_dim_problems(config, per_byte: int, name: str) -> list[str]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim % per_byte:
        return [f"{name}: head_dim {head_dim} is not a multiple of {per_byte}, so its codes cannot be packed"]
    return []


class KVInt8(Technique):
    name = "kv_int8"
    node = "model.compression.quantization.ptq.kv_cache"
    paper = Paper(title="FlexGen: High-Throughput Generative Inference of Large Language Models with a Single GPU",
                  year=2023, arxiv="2303.06865")
    summary = "int8 KV cache: every cached key and value vector quantized per token (asymmetric, fp32 scale)."
    Config = NoConfig

    @hookimpl
    def effinfer_configure_system(self, stage: SystemStage) -> None:
        use_kv_policy(stage, lambda layer, config: PerTokenQuantPolicy(8), owner=self.name)
        self.note("KV cache: int8 per token")


class KVInt4(Technique):
    name = "kv_int4"
    node = "model.compression.quantization.ptq.kv_cache"
    paper = KVInt8.paper
    summary = "int4 KV cache: every cached key and value vector quantized per token, two codes a byte."
    Config = NoConfig

    def check_model_config(self, config) -> list[str]:
        return head_dim_problems(config, 2, self.name)

    @hookimpl
    def effinfer_configure_system(self, stage: SystemStage) -> None:
        use_kv_policy(stage, lambda layer, config: PerTokenQuantPolicy(4), owner=self.name)
        self.note("KV cache: int4 per token, packed")
