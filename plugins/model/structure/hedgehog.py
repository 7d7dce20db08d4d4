"""Hedgehog: linear attention with a learned feature map that mimics softmax, with an optional
sliding window of exact attention (LoLCATs).

Zhang, Bhatia, Kumbong & Ré, "The Hedgehog & the Porcupine: Expressive Linear Attentions with
Softmax Mimicry", arXiv:2402.04347 (ICLR 2024): each head gets trainable feature maps
``φ(x) = [softmax(xW + b), softmax(−(xW + b))]`` for queries and keys, so that
``φ(q)·φ(k)`` can stand in for ``exp(q·k/√d)`` and attention becomes
``yᵢ = φ(qᵢ)ᵀ Sᵢ / φ(qᵢ)ᵀ zᵢ`` with the constant-size state ``Sᵢ = Σⱼ≤ᵢ φ(kⱼ) vⱼᵀ``,
``zᵢ = Σⱼ≤ᵢ φ(kⱼ)``. Zhang et al., "LoLCATs: On Low-Rank Linearizing of Large Language Models",
arXiv:2410.10254, keep the last ``window`` keys exact: ``yᵢ = (Σ_window e^{sᵢⱼ−mᵢ} vⱼ + α Σ_older
φ(qᵢ)·φ(kⱼ) vⱼ) / (Σ_window e^{sᵢⱼ−mᵢ} + α Σ_older φ(qᵢ)·φ(kⱼ))`` with a learned ``α`` per head;
the state is then the window's keys/values plus ``S, z`` (still constant in context length).
The conversion copies the layer's q/k/v/o projections (rotary embedding and Gemma 3's q/k norms
kept), initialises ``W`` to the identity, then fits the maps (layer-wise MSE to the softmax
layer's output, LoLCATs' "attention transfer") and repairs end to end with KD, through the shared
service :mod:`~effinfer.plugins.model.structure.repair`. The state mechanism (prefill in the
chunked parallel form, decode in the recurrent form, the state in the HF cache) is
:mod:`~effinfer.plugins.model.structure.recurrent`.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from effinfer.core import Paper
from effinfer.plugins.model.structure.alternates import AlternateTechnique, AlternateTechniqueConfig
from effinfer.plugins.model.structure.recurrent import RecurrentMixer, masked, repeat_heads


class FeatureMap(nn.Module):
    """Per-head ``φ(x) = [softmax(xW + b), softmax(−(xW + b))]`` (``… × d`` → ``… × 2f``)."""

    def __init__(self, heads: int, head_dim: int, features: int) -> None:
        super().__init__()
        weight = torch.zeros(heads, head_dim, features)
        weight[:, range(min(head_dim, features)), range(min(head_dim, features))] = 1.0
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(heads, 1, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: B × H × T × d
        projected = torch.einsum("bhtd,hdf->bhtf", x, self.weight) + self.bias
        return torch.cat([projected.softmax(-1), (-projected).softmax(-1)], dim=-1)


class HedgehogAttention(RecurrentMixer):
    """Hedgehog linear attention (+ optional exact sliding window) in place of a softmax attention."""

    kind = "hedgehog"

    def __init__(self, attention: nn.Module, config: Any, layer_idx: int, feature_dim: int | None = None,
                 window: int = 0, chunk_size: int = 128, eps: float = 1e-6) -> None:
        super().__init__(attention, config, layer_idx, chunk_size)
        features = feature_dim or self.head_dim
        self.window = window
        self.eps = eps
        self.feature_q = FeatureMap(self.num_heads, self.head_dim, features)
        self.feature_k = FeatureMap(self.num_heads, self.head_dim, features)
        #: log of LoLCATs' per-head weight of the linear (older) part against the exact window
        self.log_window_factor = nn.Parameter(torch.zeros(self.num_heads, 1, 1))

    def new_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if n.startswith(("feature_", "log_window"))}

    def features(self, x: torch.Tensor, rope: Any, valid: torch.Tensor | None, state: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
        q, k, v = self.heads(x, rope)
        ones = torch.ones(x.shape[0], 1, x.shape[1], dtype=x.dtype, device=x.device)
        return {"q": q, "fq": self.feature_q(q), "k": k, "v": v,
                "fk": masked(self.feature_k(repeat_heads(k, self.groups)), valid), "valid": masked(ones, valid)}

    def parallel(self, feats: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        q, fq = feats["q"], feats["fq"]
        batch, heads, length, dim = q.shape
        if "wk" in state:  # the exact window carried over from the tokens before this chunk
            keys = torch.cat([state["wk"], feats["k"]], dim=2)
            values = torch.cat([state["wv"], feats["v"]], dim=2)
            valid = torch.cat([state["wvalid"], feats["valid"]], dim=2)
            fk = torch.cat([masked(self.feature_k(repeat_heads(state["wk"], self.groups)), state["wvalid"][:, 0] > 0),
                            feats["fk"]], dim=2)
        else:
            keys, values, valid, fk = feats["k"], feats["v"], feats["valid"], feats["fk"]
        past = keys.shape[2] - length
        total = keys.shape[2]
        device = q.device
        rel = (past + torch.arange(length, device=device))[:, None] - torch.arange(total, device=device)[None, :]
        values_h = repeat_heads(values, self.groups)
        linear = (rel >= self.window).to(q.dtype)
        a_lin = (fq @ fk.transpose(-1, -2)) * linear
        s0 = state.get("S")
        z0 = state.get("z")
        factor = self.log_window_factor.exp()
        num = a_lin @ values_h
        den = a_lin.sum(-1)
        if s0 is not None:
            num = num + fq @ s0
            den = den + (fq @ z0.unsqueeze(-1)).squeeze(-1)
        num, den = factor * num, factor.squeeze(-1) * den
        if self.window > 0:
            exact = (rel >= 0) & (rel < self.window) & (valid[:, :, None, :] > 0)
            scores = (q @ repeat_heads(keys, self.groups).transpose(-1, -2)) * self.scaling
            scores = scores.masked_fill(~exact, float("-inf"))
            top = scores.amax(-1, keepdim=True)
            top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
            a_exact = (scores - top).exp()
            num = num + a_exact @ values_h
            den = den + a_exact.sum(-1)
        y = num / (den.unsqueeze(-1) + self.eps)
        # the outgoing state: keys that fall out of the window go into S and z
        keep = min(self.window, total)
        leaving = total - keep
        new: dict[str, torch.Tensor] = {}
        s = s0 if s0 is not None else fk.new_zeros(batch, heads, fk.shape[-1], dim)
        z = z0 if z0 is not None else fk.new_zeros(batch, heads, fk.shape[-1])
        if leaving:
            s = s + fk[:, :, :leaving].transpose(-1, -2) @ values_h[:, :, :leaving]
            z = z + fk[:, :, :leaving].sum(2)
        new["S"], new["z"] = s, z
        if keep:
            new["wk"], new["wv"], new["wvalid"] = keys[:, :, leaving:], values[:, :, leaving:], valid[:, :, leaving:]
        return y, new


class Hedgehog(AlternateTechnique):
    name = "hedgehog"
    node = "model.structure.efficient_attention.low_complexity.kernel_based"
    paper = Paper(title="The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry", year=2024,
                  arxiv="2402.04347")
    summary = ("Replaces softmax attention in chosen layers by linear attention with trainable per-head feature "
               "maps φ(x) = [softmax(xW), softmax(−xW)] fitted to mimic the softmax layer (Hedgehog), optionally "
               "keeping a sliding window of exact attention (LoLCATs); decoding keeps a constant-size state "
               "instead of a growing KV cache.")
    bench_config = {"count": 2, "window": 16, "fit_steps": 20, "fit_samples": 4, "repair_steps": 0}

    class Config(AlternateTechniqueConfig):
        feature_dim: int | None = Field(None, ge=4, le=1024, description="features per map half (φ has 2× this; "
                                                                         "None: the head dimension)")
        window: int = Field(0, ge=0, le=4096, description="keys kept exact (softmax) in a sliding window before "
                                                          "the linear part, LoLCATs-style (0: pure linear attention)")

    def build(self, attention: nn.Module, model_config: Any, index: int) -> RecurrentMixer:
        return HedgehogAttention(attention, model_config, index, self.config.feature_dim, self.config.window,
                                 self.config.chunk_size)

    def describe_state(self, mixer: RecurrentMixer) -> str:
        return (f"state per replaced layer: S, z over {2 * mixer.feature_q.weight.shape[-1]} features × "
                f"{mixer.num_heads} heads" + (f" + an exact window of {self.config.window} keys/values"
                                              if self.config.window else ""))
