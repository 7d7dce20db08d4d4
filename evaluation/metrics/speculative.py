"""Speculative-decoding statistics from :class:`~effinfer.core.generation.GenerationResult`.

- ``mean_accepted``: drafted tokens accepted per verification step (Spec-Bench's τ minus
  the one token the target model always adds);
- ``tokens_per_step``: new tokens per forward step of the target model (τ);
- ``acceptance_rate``: accepted ÷ drafted tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from effinfer.core.generation import GenerationResult


@dataclass(frozen=True)
class SpeculativeStats:
    mean_accepted: float
    acceptance_rate: float
    tokens_per_step: float
    steps: int

    @classmethod
    def collect(cls, results: Iterable[GenerationResult]) -> SpeculativeStats | None:
        """Aggregate over results; ``None`` when no result drafted anything (not speculative)."""
        accepted: list[int] = []
        drafted: list[int] = []
        new_tokens = forward_steps = 0
        for result in results:
            accepted += result.accepted_per_step
            drafted += result.drafted_per_step
            new_tokens += result.new_tokens
            forward_steps += result.forward_steps + len(result.sequences)  # + the prefill's token
        if not drafted:
            return None
        return cls(
            mean_accepted=sum(accepted) / len(accepted),
            acceptance_rate=sum(accepted) / max(sum(drafted), 1),
            tokens_per_step=new_tokens / max(forward_steps, 1),
            steps=len(accepted),
        )
