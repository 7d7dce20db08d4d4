"""Activation statistics on calibration data, shared by the quantizers (and later the pruners).

The calibration *tokens* come from core (:mod:`effinfer.core.calibration`: seeded
``n_samples × seq_len`` windows of the corpus's calibration split, what
``stage.calibration_batches`` returns); they are re-exported here for convenience.
This module adds what only model-compression plugins need:

- :func:`activation_stats` — per-input-channel statistics (max and mean of ``|x|``) of
  every ``nn.Linear`` of a model on a calibration batch, cached by a fingerprint of the
  model's weights and of the batch: SmoothQuant (arXiv:2211.10438) and LLM.int8()
  (arXiv:2208.07339) both read it, and a bench that evaluates several stacks on fresh
  copies of the same model measures it once.
- :func:`model_fingerprint`, :func:`tokens_digest` — the cache keys.

Layer-by-layer activation capture (GPTQ, AWQ) lives in
:mod:`effinfer.plugins.model.quantization.layerwise`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from effinfer.core.calibration import (calibration_source, corpus_tokens, sample_windows, text_source,
                                       tokenizer_key)

__all__ = ["ChannelStats", "activation_stats", "calibration_source", "corpus_tokens", "model_fingerprint",
           "sample_windows", "text_source", "tokenizer_key", "tokens_digest"]

_STATS: dict[tuple[str, str], dict[str, ChannelStats]] = {}
_MAX_CACHED_STATS = 4


# --------------------------------------------------------------------------- activation statistics


@dataclass
class ChannelStats:
    """Per-input-channel statistics of one linear layer's inputs over calibration tokens."""

    absmax: torch.Tensor     # max |x_j| over tokens
    mean_abs: torch.Tensor   # mean |x_j| over tokens
    tokens: int

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).abs().float()
        count = flat.shape[0]
        self.absmax = torch.maximum(self.absmax, flat.amax(0))
        self.mean_abs = (self.mean_abs * self.tokens + flat.sum(0)) / (self.tokens + count)
        self.tokens += count


def model_fingerprint(model: nn.Module) -> str:
    """A cheap fingerprint of a model's weights: names, shapes and a few sums per tensor."""
    digest = hashlib.sha256()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        flat = tensor.detach().reshape(-1)
        probe = flat[:: max(1, flat.numel() // 4096)].double()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}{probe.sum().item():.12e}"
                      f"{probe.abs().sum().item():.12e}".encode())
    return digest.hexdigest()[:24]


def tokens_digest(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).numpy().tobytes()).hexdigest()[:24]


@torch.no_grad()
def activation_stats(model: nn.Module, tokens: torch.Tensor, batch_size: int = 4) -> dict[str, ChannelStats]:
    """Statistics of the inputs of every ``nn.Linear`` of ``model`` on ``tokens`` (cached).

    Only the last position's logits are computed, so an output head's statistics cover one
    token per window (quantizers skip ``lm_head`` by default).
    """
    key = (model_fingerprint(model), tokens_digest(tokens))
    if key in _STATS:
        return _STATS[key]
    stats: dict[str, ChannelStats] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            zeros = torch.zeros(module.in_features, device=module.weight.device)
            stats[name] = ChannelStats(zeros, zeros.clone(), 0)
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, name=name: stats[name].update(args[0])))
    try:
        device = next(model.parameters()).device
        for chunk in tokens.split(batch_size):
            model(input_ids=chunk.to(device), use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    if len(_STATS) >= _MAX_CACHED_STATS:
        _STATS.pop(next(iter(_STATS)))
    _STATS[key] = stats
    return stats
