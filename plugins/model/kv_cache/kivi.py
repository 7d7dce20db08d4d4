"""KIVI (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", arXiv:2402.02750).

Keys have outlier *channels*, values do not: KIVI quantizes keys per channel (each channel's
scale and minimum over a group of ``group`` tokens) and values per token, both asymmetric at 2 or
4 bits, and keeps the newest tokens in full precision until a whole group is there (the
residual window, at most ``group - 1`` tokens... plus the current one): then the group is
quantized and packed. Attention reads the dequantized groups and the full-precision residual.
At 2 bits with groups of 32, a SmolLM2 token costs ≈ 56 bytes per KV head instead of 512 (fp32).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.kv_cache import KVPolicy, use_kv_policy
from effinfer.core.stages import SystemStage
from effinfer.plugins.model.kv_cache.kv_int import head_dim_problems
from effinfer.plugins.model.kv_cache.packing import Quantized, cat, quantize


class KiviPolicy(KVPolicy):
    """Keys per channel in groups of ``group`` tokens, values per token, a full-precision residual."""

    name = "kivi"

    def __init__(self, bits: int, group: int) -> None:
        super().__init__()
        self.bits, self.group = bits, group
        self.qkeys: Quantized | None = None    # B × H × tokens × packed D; scale/low B × H × groups·1 … per group
        self.qvalues: Quantized | None = None
        self.quantized = 0
        # self.keys / self.values (from KVPolicy) hold the full-precision residual

    def _quantize_groups(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        batch, heads, tokens, dim = keys.shape
        groups = keys.view(batch, heads, tokens // self.group, self.group, dim)
        qk = quantize(groups, self.bits, dim=-2)  # per channel over the group's tokens
        qk = Quantized(qk.codes.view(batch, heads, tokens, -1), qk.scale.view(batch, heads, -1, dim),
                       qk.low.view(batch, heads, -1, dim), self.bits)
        qv = quantize(values, self.bits, dim=-1)  # per token
        self.qkeys = qk if self.qkeys is None else cat([self.qkeys, qk], -2)
        self.qvalues = qv if self.qvalues is None else cat([self.qvalues, qv], -2)
        self.quantized += tokens

    def _dequantized(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.qkeys is None:
            return None
        q = self.qkeys
        batch, heads, tokens, _ = q.codes.shape
        codes = q.codes.view(batch, heads, tokens // self.group, self.group, -1)
        keys = Quantized(codes, q.scale[..., None, :], q.low[..., None, :], self.bits).dequantize(dtype)
        return keys.view(batch, heads, tokens, -1), self.qvalues.dequantize(dtype)

    def update(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        old = self._dequantized(keys.dtype)
        residual_k = keys if self.keys is None else torch.cat([self.keys, keys], dim=-2)
        residual_v = values if self.values is None else torch.cat([self.values, values], dim=-2)
        self.seen += keys.shape[-2]
        out_k = residual_k if old is None else torch.cat([old[0], residual_k], dim=-2)
        out_v = residual_v if old is None else torch.cat([old[1], residual_v], dim=-2)
        full = residual_k.shape[-2] // self.group * self.group
        if full:
            self._quantize_groups(residual_k[..., :full, :], residual_v[..., :full, :])
        self.keys = residual_k[..., full:, :].clone() if residual_k.shape[-2] > full else None
        self.values = residual_v[..., full:, :].clone() if residual_v.shape[-2] > full else None
        return out_k, out_v

    def __len__(self) -> int:
        return self.seen

    def crop(self, count: int) -> None:
        residual = 0 if self.keys is None else self.keys.shape[-2]
        if count <= 0:
            return
        if count > residual:
            raise NotImplementedError(f"kivi cannot roll back {count} entries: only its {residual} newest are "
                                      "still in full precision")
        KVPolicy.crop(self, count)

    def nbytes(self) -> int:
        residual = sum(t.untyped_storage().nbytes() for t in (self.keys, self.values) if t is not None)
        return residual + sum(q.nbytes() for q in (self.qkeys, self.qvalues) if q is not None)

    def reset(self) -> None:
        self.keys = self.values = self.qkeys = self.qvalues = None
        self.seen = self.quantized = 0


class Kivi(Technique):
    name = "kivi"
    node = "model.compression.quantization.ptq.kv_cache"
    paper = Paper(title="KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", year=2024, arxiv="2402.02750")
    summary = ("2/4-bit KV cache: keys quantized per channel in groups of tokens, values per token, the newest "
               "tokens kept in full precision until their group is complete; stored packed.")

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        bits: Literal[2, 4] = Field(2, description="bits per cached key and value element")
        group: int = Field(32, ge=4, le=1024, description="tokens per key group (= the full-precision residual)")

    def check_model_config(self, config) -> list[str]:
        return head_dim_problems(config, 8 // self.config.bits, self.name)

    @hookimpl
    def effinfer_configure_system(self, stage: SystemStage) -> None:
        config = self.config
        use_kv_policy(stage, lambda layer, model_config: KiviPolicy(config.bits, config.group), owner=self.name)
        self.note(f"KV cache: KIVI {config.bits}-bit, key groups of {config.group} tokens")
