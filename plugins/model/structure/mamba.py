"""A Mamba-style selective state-space layer in place of softmax attention, initialised from it.

Wang, Paliotta, May, Rush & Dao, "The Mamba in the Llama: Distilling and Accelerating Hybrid
Models", arXiv:2408.15237: attention's projections map onto a selective SSM — the query
projection gives ``C``, the key projection ``B``, the value projection the SSM input ``x``, the
output projection stays — and new parameters (step size ``Δ``, decay ``A``, skip ``D``, a short
causal convolution) are added, then the hybrid is distilled layer-wise and end to end. The scan
is Mamba-2's selective scan with a scalar decay per head (Dao & Gu, "Transformers are SSMs",
arXiv:2405.21060; Gu & Dao, "Mamba", arXiv:2312.00752)::

    hₜ = exp(Δₜ·A) hₜ₋₁ + Δₜ Bₜᵀ xₜ          (state d_state × head_dim per head)
    yₜ = Cₜ hₜ + D·xₜ,   Δₜ = softplus(W_Δ uₜ + b_Δ)

computed here as a chunked parallel scan (``(CBᵀ ⊙ L) (Δx)`` with the segment decays
``L_{ts} = exp(Σ_{s<r≤t} Δᵣ A)``) for prefill and as the recurrence for decoding. The causal
depthwise convolution (kernel ``conv_kernel``, over the q/k/v channels) starts as the identity
and keeps its last ``conv_kernel − 1`` inputs as a second piece of state; each head's output is
RMS-normalised (learned scale) before the output projection, as Mamba-2's norm does. No rotary
embedding (Mamba-in-the-Llama drops it). Distillation goes through
:mod:`~effinfer.plugins.model.structure.repair`; the state mechanism is
:mod:`~effinfer.plugins.model.structure.recurrent`. On CUDA, ``mamba-ssm``'s fused kernels would
be the fast path; they are not used here (CUDA-only builds, no GPU in this workplace).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from effinfer.core import Paper
from effinfer.plugins.model.structure.alternates import AlternateTechnique, AlternateTechniqueConfig
from effinfer.plugins.model.structure.recurrent import RecurrentMixer, masked, repeat_heads


class SelectiveScanLayer(RecurrentMixer):
    """Mamba-2-style selective scan (scalar decay per head) from an attention layer's weights."""

    kind = "mamba"

    def __init__(self, attention: nn.Module, config: Any, layer_idx: int, conv_kernel: int = 4,
                 dt_min: float = 1e-3, dt_max: float = 1e-1, chunk_size: int = 128, eps: float = 1e-6,
                 seed: int = 0) -> None:
        super().__init__(attention, config, layer_idx, chunk_size)
        self.eps = eps
        self.conv_kernel = conv_kernel
        heads, dim = self.num_heads, self.head_dim
        self.channels = (heads + 2 * self.num_kv_heads) * dim
        if conv_kernel:
            weight = torch.zeros(self.channels, conv_kernel)
            weight[:, -1] = 1.0  # identity: the convolution starts as a no-op
            self.conv_weight = nn.Parameter(weight)
        generator = torch.Generator().manual_seed(seed + layer_idx)
        dt = torch.exp(torch.rand(heads, generator=generator) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt), as Mamba initialises it
        self.dt_proj = nn.Linear(config.hidden_size, heads, bias=False)
        nn.init.zeros_(self.dt_proj.weight)
        self.A_log = nn.Parameter(torch.zeros(heads))  # A = −exp(A_log) = −1 at the start
        self.D = nn.Parameter(torch.zeros(heads, 1, 1))
        self.norm_weight = nn.Parameter(torch.ones(heads, 1, dim))

    def new_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if not n.startswith(("q_", "k_", "v_", "o_"))}

    def features(self, x: torch.Tensor, rope: Any, valid: torch.Tensor | None, state: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
        batch, length, _ = x.shape
        u = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)  # B × T × C
        if valid is not None:
            u = u * valid[..., None].to(u.dtype)
        if self.conv_kernel:
            past = state.pop("conv", None)
            if past is None:
                past = u.new_zeros(batch, self.conv_kernel - 1, self.channels)
            window = torch.cat([past, u], dim=1)
            state["conv"] = window[:, -(self.conv_kernel - 1):] if self.conv_kernel > 1 else window[:, :0]
            u = F.conv1d(window.transpose(1, 2), self.conv_weight.to(u.dtype).unsqueeze(1),
                         groups=self.channels).transpose(1, 2)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        c, b, xs = u.split([q_size, kv_size, kv_size], dim=-1)
        c = c.view(batch, length, -1, self.head_dim).transpose(1, 2)
        b = b.view(batch, length, -1, self.head_dim).transpose(1, 2)
        xs = xs.view(batch, length, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            c = self.q_norm(c)
        if self.k_norm is not None:
            b = self.k_norm(b)
        dt = F.softplus(self.dt_proj(x) + self.dt_bias).transpose(1, 2).unsqueeze(-1)  # B × H × T × 1
        dt = masked(dt, valid)
        return {"C": c * self.scaling, "B": repeat_heads(b, self.groups), "x": repeat_heads(xs, self.groups),
                "dt": dt}

    def parallel(self, feats: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c, b, xs, dt = feats["C"], feats["B"], feats["x"], feats["dt"]
        a = -self.A_log.exp().to(c.dtype).view(1, -1, 1, 1)
        log_decay = (dt * a).squeeze(-1)  # B × H × T, ≤ 0
        cumulative = log_decay.cumsum(-1)
        segment = cumulative[..., :, None] - cumulative[..., None, :]  # Σ_{s<r≤t} Δᵣ A
        causal = torch.ones(segment.shape[-2:], dtype=torch.bool, device=c.device).tril()
        decay = segment.masked_fill(~causal, float("-inf")).exp()
        y = ((c @ b.transpose(-1, -2)) * decay) @ (dt * xs)
        h0 = state.get("h")
        if h0 is not None:
            y = y + cumulative.exp().unsqueeze(-1) * (c @ h0)
        to_end = (cumulative[..., -1:] - cumulative).exp().unsqueeze(-1)  # decay from each token to the chunk end
        h = (b * to_end * dt).transpose(-1, -2) @ xs
        if h0 is not None:
            h = h + cumulative[..., -1].exp()[..., None, None] * h0
        out = dict(state)
        out["h"] = h
        return y + self.D.to(c.dtype) * xs, out

    def step(self, feats: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c, b, xs, dt = feats["C"], feats["B"], feats["x"], feats["dt"]  # B × H × 1 × …
        a = -self.A_log.exp().to(c.dtype).view(1, -1, 1, 1)
        h = (b * dt).transpose(-1, -2) @ xs
        if "h" in state:
            h = h + (dt * a).exp() * state["h"]
        out = dict(state)
        out["h"] = h
        return c @ h + self.D.to(c.dtype) * xs, out

    def output(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight
        return super().output(y, x)


class MambaConvert(AlternateTechnique):
    name = "mamba_convert"
    node = "model.structure.transformer_alternates.ssm"
    paper = Paper(title="The Mamba in the Llama: Distilling and Accelerating Hybrid Models", year=2024,
                  arxiv="2408.15237")
    summary = ("Replaces softmax attention in chosen layers by a Mamba-2-style selective scan whose C, B and x come "
               "from the layer's q, k and v projections (Mamba-in-the-Llama), with new step size, decay, skip and "
               "causal convolution; distilled layer-wise then end to end; constant-size state while decoding.")
    bench_config = {"count": 2, "fit_steps": 20, "fit_samples": 4, "repair_steps": 0}

    class Config(AlternateTechniqueConfig):
        conv_kernel: int = Field(4, ge=0, le=16, description="width of the causal depthwise convolution over the "
                                                             "q/k/v channels (0: none); starts as the identity")
        dt_min: float = Field(1e-3, gt=0.0, le=1.0, description="smallest initial step size Δ (log-uniform per head)")
        dt_max: float = Field(1e-1, gt=0.0, le=1.0, description="largest initial step size Δ")

        @model_validator(mode="after")
        def _dt_range(self) -> MambaConvert.Config:
            if self.dt_min > self.dt_max:
                raise ValueError(f"dt_min={self.dt_min} > dt_max={self.dt_max}; use dt_min ≤ dt_max")
            return self

    def build(self, attention: nn.Module, model_config: Any, index: int) -> RecurrentMixer:
        config = self.config
        return SelectiveScanLayer(attention, model_config, index, config.conv_kernel, config.dt_min, config.dt_max,
                                  config.chunk_size)

    def describe_state(self, mixer: RecurrentMixer) -> str:
        conv = f" + a convolution window of {mixer.conv_kernel - 1} × {mixer.channels}" if mixer.conv_kernel else ""
        return f"state per replaced layer: {mixer.num_heads} heads × {mixer.head_dim}×{mixer.head_dim}{conv}"
