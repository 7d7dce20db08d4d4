"""The static engine's runner: one sequence on the compute engine, what speculative strategies drive.

:class:`StaticRunner` implements the :class:`~effinfer.core.engines.Runner` interface on
:class:`~effinfer.plugins.system.engine.engine.Engine` (its own attention, tree masks
applied directly, commits by moving cache columns), plus ``step_layers``: one token
through a subset of the layers, written into the same cache (self-speculative drafting).
The Hugging Face runner of the core's ``"hf"`` engine is :class:`effinfer.core.engines.HFRunner`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from effinfer.core.engines import StepOutput
from effinfer.plugins.system.engine.engine import Engine, tree_width


def squeeze(out: StepOutput) -> StepOutput:
    """Batch-1 output → per-node ``k × V`` logits and ``k × H`` hidden states."""
    return StepOutput(out.logits[0], out.hidden[0])


class StaticRunner:
    """A batch-1 view of the static engine."""

    def __init__(self, engine: Engine, tokens: int, max_nodes: int, name: str = "target") -> None:
        """Room for ``tokens`` committed tokens plus a forward of up to ``max_nodes`` (padded) nodes."""
        self.engine = engine
        self.model = engine.model
        self.cache = engine.cache_for(1, tokens + tree_width(max_nodes), name)
        self.device = engine.device

    @property
    def length(self) -> int:
        return self.cache.length

    def prefill(self, prompt: torch.Tensor) -> StepOutput:
        return squeeze(self.engine.prefill(self.cache, prompt, torch.ones_like(prompt)))

    def forward(self, tokens: Sequence[int], parents: Sequence[int] | None = None) -> StepOutput:
        ids = torch.tensor([list(tokens)], device=self.device)
        return squeeze(self.engine.forward(self.cache, ids, parents))

    def step(self, token: int) -> torch.Tensor:
        """Logits after one committed token, through the (compiled) decode step."""
        return self.engine.decode(self.cache, torch.tensor([token], device=self.device))[0]

    def step_layers(self, token: int, layers: Sequence[int], column: int) -> torch.Tensor:
        """Logits after ``token`` through ``layers`` only, written at ``column`` (≥ ``length``), uncommitted."""
        return self.engine.decode(self.cache, torch.tensor([token], device=self.device), layers, column)[0]

    @property
    def num_layers(self) -> int:
        return self.engine.layout.num_layers

    def commit(self, kept: Sequence[int]) -> None:
        self.cache.commit(list(kept))

    def truncate(self, length: int) -> None:
        self.cache.length = min(self.cache.length, length)
