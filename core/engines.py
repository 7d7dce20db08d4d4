"""Decode engines: the typed route from ``runtime.engine`` to every decoding strategy.

An engine runs the model's forward passes while generating. The composition builds the
engine the runtime names (``runtime.engine``, looked up among the engines registered
through ``effinfer_register_engines``) and puts it on :attr:`SystemStage.engine
<effinfer.core.stages.SystemStage.engine>`; every decoding strategy then decodes through
it, so a third-party engine is used by every strategy, speculative ones included. An
engine offers two things:

- :meth:`DecodeEngine.decoding` — its plain decoding strategy (one token per forward), the
  experiment's decode loop when no technique brings a strategy;
- :meth:`DecodeEngine.runner` — a :class:`Runner` over one sequence, the interface the
  draft → verify → commit loop of speculative strategies drives (prefill, a forward of a
  chain or token tree *without* committing, commit of the accepted path, truncate).

The core provides :class:`HFEngine` (``"hf"``): transformers' own forward over a
``DynamicCache``, the reference every other engine is checked against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

if TYPE_CHECKING:
    from effinfer.core.generation import DecodingStrategy

CacheFactory = Callable[[nn.Module], Any] | None


@dataclass
class StepOutput:
    """Float32 logits (``… × k × V``) and final-norm hidden states (``… × k × H``) of ``k`` nodes."""

    logits: torch.Tensor
    hidden: torch.Tensor


@runtime_checkable
class Runner(Protocol):
    """The KV cache of one sequence (batch 1) and the forwards a speculative strategy drives.

    ``forward(tokens, parents)`` feeds a chain (``parents=None``) or a token tree
    (``parents[i] < i`` is the node ``i`` hangs under, ``-1`` the committed prefix) after the
    committed tokens and returns every node's logits and hidden state (``k × V``,
    ``k × H``) *without* committing; ``commit(kept)`` then keeps the listed nodes (a
    root-to-node path) in order. A runner may offer ``step_layers(token, layers, column)``
    (one token through a subset of the layers, written at ``column`` of its own cache,
    uncommitted): self-speculative decoding then drafts inside the target's cache.
    """

    model: nn.Module
    #: committed tokens
    length: int

    def prefill(self, prompt: torch.Tensor) -> StepOutput:
        """Commit the prompt (``1 × T``); logits and hidden state of its last position (``1 × …``)."""

    def forward(self, tokens: Sequence[int], parents: Sequence[int] | None = None) -> StepOutput: ...

    def commit(self, kept: Sequence[int]) -> None: ...

    def truncate(self, length: int) -> None:
        """Drop committed tokens past ``length``."""

    def step(self, token: int) -> torch.Tensor:
        """Commit one token; the logits (``V``) after it."""


class DecodeEngine:
    """Base class of decode engines (see the module docstring).

    A registered engine factory ``factory(compile=bool)`` returns an instance; ``compile``
    is ``runtime.compile`` (an engine that cannot compile ignores it).
    """

    name: ClassVar[str] = "engine"

    def __init__(self, compile: bool = False) -> None:
        self.compile = compile

    def decoding(self) -> DecodingStrategy:
        """The plain decoding strategy on this engine."""
        raise NotImplementedError(f"engine {self.name!r} does not implement decoding()")

    def runner(self, model: nn.Module, tokens: int, max_nodes: int, cache_factory: CacheFactory = None,
               name: str = "target") -> Runner:
        """A runner over one sequence of up to ``tokens`` committed tokens, plus forwards of up to
        ``max_nodes`` nodes. ``cache_factory`` is the stack's (or a measurement wrapper's) cache
        factory; ``name`` tells apart several runners on one model (a target and its draft)."""
        raise NotImplementedError(f"engine {self.name!r} does not implement runner()")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, compile={self.compile})"


class HFEngine(DecodeEngine):
    """transformers' forward over a ``DynamicCache``: the core's reference engine, ``"hf"``."""

    name = "hf"

    def decoding(self) -> DecodingStrategy:
        from effinfer.core.generation import PlainDecoding

        return PlainDecoding()

    def runner(self, model: nn.Module, tokens: int, max_nodes: int, cache_factory: CacheFactory = None,
               name: str = "target") -> HFRunner:
        return HFRunner(model, cache_factory(model) if cache_factory else None)


def tree_geometry(parents: Sequence[int] | None, k: int, device: torch.device | str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Depths (``k``) and the ancestor-or-self mask (``k × k``) of a token tree.

    ``parents[i] < i`` is the node ``i`` hangs under; ``-1`` hangs under the committed
    prefix. ``None`` is a chain (each token under the previous one).
    """
    if parents is None:
        return torch.arange(k, device=device), torch.ones(k, k, dtype=torch.bool, device=device).tril()
    if len(parents) != k or any(not -1 <= p < i for i, p in enumerate(parents)):
        raise ValueError(f"parents must have {k} entries with -1 ≤ parents[i] < i, got {list(parents)}")
    depth = [0] * k
    mask = torch.eye(k, dtype=torch.bool, device=device)
    for i, parent in enumerate(parents):
        if parent >= 0:
            depth[i] = depth[parent] + 1
            mask[i] |= mask[parent]
    return torch.tensor(depth, device=device), mask


def crop_to(cache: Any, length: int) -> None:
    """Keep the first ``length`` entries of an HF cache (``crop`` takes how many to remove)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def sliding_window(model: nn.Module) -> int | None:
    """The window of the model's sliding-window layers (``config.layer_types``), if it has any."""
    config = model.config
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return int(config.sliding_window)
    return None


class HFRunner:
    """A batch-1 Hugging Face causal LM over a ``DynamicCache`` (or a technique's cache).

    Tree forwards pass an explicit 4-D attention mask (transformers uses a 4-D mask as
    given); a model with sliding-window layers (Gemma 3) gets one mask per layer type.
    The cache keeps every position of every layer: a default ``DynamicCache`` built with
    sliding-window layers (which would drop the columns a commit moves) is switched to
    full layers while still empty; a technique's own cache class is used as it is.
    """

    def __init__(self, model: nn.Module, cache: Any = None) -> None:
        self.model = model
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.cache = cache if cache is not None else DynamicCache()
        if type(self.cache) is DynamicCache and self.cache.get_seq_length() == 0 and any(
                isinstance(layer, DynamicSlidingWindowLayer) for layer in self.cache.layers):
            self.cache.layers = [DynamicLayer() for _ in self.cache.layers]
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.window = sliding_window(model)
        self.length = 0
        self._pending = 0  # entries the last forward appended, not yet committed
        self._tokens: list[int] = []

    @torch.inference_mode()
    def _run(self, ids: torch.Tensor, depth: torch.Tensor, tree: torch.Tensor) -> StepOutput:
        k = ids.shape[1]
        positions = self.length + depth
        allowed = torch.ones(k, self.length + k, dtype=torch.bool, device=self.device)
        allowed[:, self.length:] = tree
        mask: Any = self._additive(allowed)
        if self.window is not None:
            key_positions = torch.cat([torch.arange(self.length, device=self.device), positions])
            near = positions[:, None] - key_positions[None, :] < self.window
            mask = {"full_attention": mask, "sliding_attention": self._additive(allowed & near)}
        out = self.decoder(input_ids=ids, attention_mask=mask, position_ids=positions[None],
                           past_key_values=self.cache, use_cache=True)
        hidden = out.last_hidden_state
        return StepOutput(self.head(hidden).float()[0], hidden[0])

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        return mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)[None, None]

    def prefill(self, prompt: torch.Tensor) -> StepOutput:
        self.truncate(0)
        out = self.forward(prompt[0].tolist())
        self.commit(range(prompt.shape[1]))
        return StepOutput(out.logits[-1:], out.hidden[-1:])

    def forward(self, tokens: Sequence[int], parents: Sequence[int] | None = None) -> StepOutput:
        self._drop_pending()
        depth, tree = tree_geometry(parents, len(tokens), self.device)
        out = self._run(torch.tensor([list(tokens)], device=self.device), depth, tree)
        self._pending, self._tokens = len(tokens), list(tokens)
        return out

    def step(self, token: int) -> torch.Tensor:
        out = self.forward([token])
        self.commit([0])
        return out.logits[-1]

    def commit(self, kept: Sequence[int]) -> None:
        kept = list(kept)
        if kept == list(range(len(kept))):
            crop_to(self.cache, self.length + len(kept))
        elif all(isinstance(layer, DynamicLayer) and not hasattr(layer, "sliding_window")
                 for layer in getattr(self.cache, "layers", [None])):
            index = torch.tensor(list(range(self.length)) + [self.length + i for i in kept], device=self.device)
            for layer in self.cache.layers:
                if getattr(layer, "keys", None) is not None and layer.keys.numel():
                    layer.keys = layer.keys.index_select(-2, index)
                    layer.values = layer.values.index_select(-2, index)
        else:  # an opaque cache (a technique's policy, effinfer.core.kv_cache): drop the tree, feed the accepted
            # tokens again
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
