"""Fidelity to the baseline: next-token distributions and greedy outputs.

- **KL divergence** ``KL(P_base || P_exp)`` of the next-token distributions at the same
  text positions, averaged over positions (what llama.cpp's ``perplexity --kl-divergence``
  reports for quantized models), with its standard error and 99th percentile;
- **top-1 agreement**: the fraction of positions where both models' most likely token agree;
- **greedy match**: per prompt, the number of leading generated tokens identical to the
  baseline's greedy output, and the fraction of prompts whose output is identical. A
  technique declared lossless must score 1.0 on the latter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class ReferenceDistributions:
    """The baseline's log-probabilities at up to ``max_positions`` positions (kept in memory)."""

    max_positions: int
    log_probs: list[torch.Tensor] = field(default_factory=list)
    taken: int = 0

    def add(self, log_probs: torch.Tensor, targets: torch.Tensor | None = None) -> None:
        """Keep the first rows of ``log_probs`` until ``max_positions`` are held."""
        room = self.max_positions - self.taken
        if room > 0:
            kept = log_probs[:room].detach().to("cpu", torch.float32).clone()
            self.log_probs.append(kept)
            self.taken += len(kept)


@dataclass
class FidelityAccumulator:
    """Compares an experiment's log-probabilities with a :class:`ReferenceDistributions`, in order."""

    reference: ReferenceDistributions
    kl: list[torch.Tensor] = field(default_factory=list)
    agree: list[torch.Tensor] = field(default_factory=list)
    _chunk: int = 0
    _offset: int = 0

    def add(self, log_probs: torch.Tensor, targets: torch.Tensor | None = None) -> None:
        """Consume rows in the order the reference was filled (same windows, same positions)."""
        rows = log_probs.detach().to("cpu", torch.float32)
        while len(rows) and self._chunk < len(self.reference.log_probs):
            base = self.reference.log_probs[self._chunk][self._offset:]
            n = min(len(base), len(rows))
            self.kl.append(kl_divergence(base[:n], rows[:n]))
            self.agree.append(base[:n].argmax(-1) == rows[:n].argmax(-1))
            rows = rows[n:]
            self._offset += n
            if self._offset == len(self.reference.log_probs[self._chunk]):
                self._chunk, self._offset = self._chunk + 1, 0

    def summary(self) -> dict[str, tuple[float, float]]:
        """``{"kl_mean": (value, stderr), "kl_p99": (value, nan), "top1_agreement": (value, stderr)}``."""
        if not self.kl:
            raise ValueError("no positions compared: the reference distributions are empty")
        kl = torch.cat(self.kl).double()
        agree = torch.cat(self.agree).double()
        n = len(kl)
        kl_se = float(kl.std() / math.sqrt(n)) if n > 1 else float("nan")
        p = float(agree.mean())
        return {
            "kl_mean": (float(kl.mean()), kl_se),
            "kl_p99": (float(torch.quantile(kl, 0.99)), float("nan")),
            "top1_agreement": (p, math.sqrt(p * (1 - p) / n)),
            "positions": (float(n), float("nan")),
        }


def kl_divergence(base_log_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(base || other)`` in nats, from log-probabilities (clamped at 0 for rounding)."""
    base_p = base_log_probs.exp()
    kl = (base_p * (base_log_probs - log_probs)).sum(-1)
    return kl.clamp_min(0.0)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class GreedyMatch:
    """How closely greedy outputs follow the baseline's."""

    mean_prefix: float
    identical_fraction: float
    n: int

    @classmethod
    def compare(cls, outputs: list[list[int]], baseline: list[list[int]]) -> GreedyMatch:
        if len(outputs) != len(baseline) or not outputs:
            raise ValueError(f"need the same non-zero number of outputs ({len(outputs)}) and "
                             f"baseline outputs ({len(baseline)})")
        prefixes = [common_prefix(a, b) for a, b in zip(outputs, baseline)]
        identical = [a == b for a, b in zip(outputs, baseline)]
        return cls(sum(prefixes) / len(prefixes), sum(identical) / len(identical), len(outputs))
