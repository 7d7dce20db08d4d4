"""Retention (RetNet) in place of softmax attention, converted from a pretrained layer.

Sun, Dong, Huang, Ma, Xia, Xue, Wang & Wei, "Retentive Network: A Successor to Transformer for
Large Language Models", arXiv:2307.08621. Multi-scale retention replaces softmax by an
exponential decay per head, ``oₙ = Σₘ≤ₙ γʰ^{n−m} (qₙ·kₘ) vₘ``, which has a parallel form
(``(QKᵀ ⊙ D) V`` with ``D_{nm} = γ^{n−m}``) for prefill and training and a recurrent form
(``Sₙ = γ Sₙ₋₁ + kₙᵀ vₙ``, ``oₙ = qₙ Sₙ``) with a constant ``d × d`` state per head for
decoding. Heads use RetNet's decay schedule ``γʰ = 1 − 2^{−5−h·8/H}`` (the paper's
``1 − 2^{−5−arange(H)}`` spread over 5 … 13 bits for any head count), the model's rotary embedding
stands for xPos, and each head's output goes through GroupNorm as in the paper (which makes the
parallel and recurrent forms equal without RetNet's extra scaling). RetNet's swish gate is left
out: the conversion starts from the layer's own q/k/v/o projections (copied) and fits the new
parts (the norms, and the decays when ``learn_decay``) to the softmax layer's output, then
repairs end to end with KD (:mod:`~effinfer.plugins.model.structure.repair`), in the manner of
linearizing work such as LoLCATs (arXiv:2410.10254). The state mechanism is
:mod:`~effinfer.plugins.model.structure.recurrent`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field
from torch import nn

from effinfer.core import Paper
from effinfer.plugins.model.structure.alternates import AlternateTechnique, AlternateTechniqueConfig
from effinfer.plugins.model.structure.recurrent import RecurrentMixer, masked, repeat_heads


def retnet_decays(heads: int) -> torch.Tensor:
    """``γʰ = 1 − 2^{−5 − 8h/H}`` for ``h = 0 … H−1`` (RetNet's schedule spread over 5 … 13 bits)."""
    return 1 - 2.0 ** (-5 - 8 * torch.arange(heads, dtype=torch.float64) / max(heads, 1))


class RetentionLayer(RecurrentMixer):
    """Multi-scale retention with per-head GroupNorm in place of a softmax attention."""

    kind = "retention"

    def __init__(self, attention: nn.Module, config: Any, layer_idx: int, learn_decay: bool = True,
                 chunk_size: int = 128, eps: float = 1e-5) -> None:
        super().__init__(attention, config, layer_idx, chunk_size)
        self.eps = eps
        gamma = retnet_decays(self.num_heads)
        #: ``log γ = −exp(decay_param)`` per head
        self.decay_param = nn.Parameter(torch.log(-torch.log(gamma)).float().view(-1, 1, 1),
                                        requires_grad=learn_decay)
        self.learn_decay = learn_decay
        self.norm_weight = nn.Parameter(torch.ones(self.num_heads, 1, self.head_dim))
        self.norm_bias = nn.Parameter(torch.zeros(self.num_heads, 1, self.head_dim))

    def new_parameters(self) -> dict[str, nn.Parameter]:
        names = ("norm_weight", "norm_bias") + (("decay_param",) if self.learn_decay else ())
        return {n: getattr(self, n) for n in names}

    def log_decay(self) -> torch.Tensor:  # H × 1 × 1
        return -self.decay_param.exp()

    def features(self, x: torch.Tensor, rope: Any, valid: torch.Tensor | None, state: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
        q, k, v = self.heads(x, rope)
        k = masked(repeat_heads(k, self.groups), valid) * self.head_dim ** -0.5
        return {"q": q, "k": k, "v": repeat_heads(v, self.groups)}

    def parallel(self, feats: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        q, k, v = feats["q"], feats["k"], feats["v"]
        length = q.shape[2]
        log_gamma = self.log_decay().to(q.dtype)  # H × 1 × 1
        t = torch.arange(length, device=q.device, dtype=q.dtype)
        distance = t[:, None] - t[None, :]
        decay = torch.where(distance >= 0, (distance * log_gamma).exp(), torch.zeros((), dtype=q.dtype,
                                                                                     device=q.device))
        y = ((q @ k.transpose(-1, -2)) * decay) @ v
        s0 = state.get("S")
        if s0 is not None:
            y = y + ((t + 1)[:, None] * log_gamma).exp() * (q @ s0)
        weights = ((length - 1 - t)[:, None] * log_gamma).exp()  # H × T × 1: decay of each key to the chunk end
        s = (k * weights).transpose(-1, -2) @ v
        if s0 is not None:
            s = s + (length * log_gamma).exp() * s0
        return y, {"S": s}

    def step(self, feats: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        q, k, v = feats["q"], feats["k"], feats["v"]  # B × H × 1 × d
        gamma = self.log_decay().to(q.dtype).exp()
        s = k.transpose(-1, -2) @ v
        if "S" in state:
            s = s + gamma * state["S"]
        return q @ s, {"S": s}

    def output(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        mean = y.mean(-1, keepdim=True)
        var = (y - mean).pow(2).mean(-1, keepdim=True)
        y = (y - mean) / torch.sqrt(var + self.eps) * self.norm_weight + self.norm_bias
        return super().output(y, x)


class RetentionConvert(AlternateTechnique):
    name = "retention_convert"
    node = "model.structure.transformer_alternates.other"
    paper = Paper(title="Retentive Network: A Successor to Transformer for Large Language Models", year=2023,
                  arxiv="2307.08621")
    summary = ("Replaces softmax attention in chosen layers by RetNet's multi-scale retention (exponential decay "
               "per head, GroupNorm), initialised from the layer's q/k/v/o and distilled from it; parallel form "
               "for prefill, recurrent form with a constant d×d state per head for decoding.")
    bench_config = {"count": 2, "fit_steps": 20, "fit_samples": 4, "repair_steps": 0}

    class Config(AlternateTechniqueConfig):
        learn_decay: bool = Field(True, description="train the per-head decays γ (else RetNet's fixed schedule "
                                                    "1 − 2^(−5…−13))")

    def build(self, attention: nn.Module, model_config: Any, index: int) -> RecurrentMixer:
        return RetentionLayer(attention, model_config, index, self.config.learn_decay, self.config.chunk_size)

    def describe_state(self, mixer: RecurrentMixer) -> str:
        return (f"state per replaced layer: {mixer.num_heads} heads × {mixer.head_dim}×{mixer.head_dim} "
                f"(γ from {math.exp(-math.exp(float(mixer.decay_param.detach().max()))):.4f} to "
                f"{math.exp(-math.exp(float(mixer.decay_param.detach().min()))):.6f})")
