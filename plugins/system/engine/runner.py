"""One-sequence runners: what speculative strategies drive, on the static engine or on HF.

A runner holds the KV cache of one sequence and offers four operations:

- ``prefill(prompt)`` — commit the prompt; logits and hidden state of its last position;
- ``forward(tokens, parents)`` — feed a chain or token tree after the committed prefix
  (``parents[i] < i``, ``-1`` = under the prefix) and return every node's logits and
  final-norm hidden state, *without* committing;
- ``commit(kept)`` — keep the listed nodes of the last ``forward`` (a root-to-node path),
  in order, as committed tokens;
- ``truncate(length)`` — drop committed tokens past ``length``.

:class:`StaticRunner` runs on :class:`~effinfer.plugins.system.engine.engine.Engine` (its own
attention, tree masks applied directly, commits by moving cache columns). :class:`HFRunner`
runs any Hugging Face causal LM through its decoder with a custom 4-D attention mask
(transformers passes a 4-D mask through unchanged) over a ``DynamicCache``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from effinfer.core.generation import new_cache
from effinfer.plugins.system.engine.engine import Engine, StepOutput, tree_geometry, tree_width


class Runner(Protocol):
    length: int

    def prefill(self, prompt: torch.Tensor) -> StepOutput: ...

    def forward(self, tokens: Sequence[int], parents: Sequence[int] | None = None) -> StepOutput: ...

    def commit(self, kept: Sequence[int]) -> None: ...

    def truncate(self, length: int) -> None: ...

    def step(self, token: int) -> torch.Tensor: ...


def squeeze(out: StepOutput) -> StepOutput:
    """Batch-1 output → per-node ``k × V`` logits and ``k × H`` hidden states."""
    return StepOutput(out.logits[0], out.hidden[0])


def crop_to(cache: Any, length: int) -> None:
    """Keep the first ``length`` entries of an HF cache (``crop`` takes how many to remove)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


class StaticRunner:
    """A batch-1 view of the static engine."""

    def __init__(self, engine: Engine, tokens: int, max_nodes: int, name: str = "target") -> None:
        """Room for ``tokens`` committed tokens plus a forward of up to ``max_nodes`` (padded) nodes."""
        self.engine = engine
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

    def step(self, token: int, layers: Sequence[int] | None = None, start: int | None = None) -> torch.Tensor:
        """Logits after one token through the (compiled) decode step; committed unless ``start``."""
        return self.engine.decode(self.cache, torch.tensor([token], device=self.device), layers, start)[0]

    def commit(self, kept: Sequence[int]) -> None:
        self.cache.commit(list(kept))

    def truncate(self, length: int) -> None:
        self.cache.length = min(self.cache.length, length)


class HFRunner:
    """A batch-1 Hugging Face causal LM over a ``DynamicCache`` (or a technique's cache)."""

    def __init__(self, model: nn.Module, cache: Any = None) -> None:
        self.model = model
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.cache = cache if cache is not None else new_cache(model)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.length = 0
        self._pending = 0  # entries the last forward appended, not yet committed
        self._tokens: list[int] = []

    @torch.inference_mode()
    def _run(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> StepOutput:
        out = self.decoder(input_ids=ids, attention_mask=mask, position_ids=positions,
                           past_key_values=self.cache, use_cache=True)
        hidden = out.last_hidden_state
        return StepOutput(self.head(hidden).float()[0], hidden[0])

    def prefill(self, prompt: torch.Tensor) -> StepOutput:
        positions = torch.arange(prompt.shape[1], device=self.device)[None]
        out = self._run(prompt, positions, torch.ones_like(prompt))
        self.length = prompt.shape[1]
        return StepOutput(out.logits[-1:], out.hidden[-1:])

    def forward(self, tokens: Sequence[int], parents: Sequence[int] | None = None) -> StepOutput:
        self._drop_pending()
        k = len(tokens)
        depth, tree = tree_geometry(parents, k, self.device)
        allowed = torch.ones(k, self.length + k, dtype=torch.bool, device=self.device)
        allowed[:, self.length:] = tree
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        ids = torch.tensor([list(tokens)], device=self.device)
        out = self._run(ids, (self.length + depth)[None], mask[None, None])
        self._pending, self._tokens = k, list(tokens)
        return out

    def step(self, token: int) -> torch.Tensor:
        """Logits after one committed token."""
        out = self.forward([token])
        self.commit([0])
        return out.logits[-1]

    def commit(self, kept: Sequence[int]) -> None:
        kept = list(kept)
        if kept == list(range(len(kept))):
            crop_to(self.cache, self.length + len(kept))
        elif all(hasattr(layer, "keys") for layer in getattr(self.cache, "layers", [None])):
            index = torch.tensor(list(range(self.length)) + [self.length + i for i in kept], device=self.device)
            for layer in self.cache.layers:
                layer.keys = layer.keys.index_select(-2, index)
                layer.values = layer.values.index_select(-2, index)
        else:  # an opaque cache (a technique's policy): drop the tree, feed the accepted tokens again
            self._drop_pending()
            self.forward([self._tokens[i] for i in kept])
        self.length += len(kept)
        self._pending = 0

    def truncate(self, length: int) -> None:
        self._drop_pending()
        if length < self.length:
            crop_to(self.cache, length)
            self.length = length

    def _drop_pending(self) -> None:
        if self._pending:
            crop_to(self.cache, self.length)
            self._pending = 0
