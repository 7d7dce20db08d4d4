"""Layer-by-layer calibration, as GPTQ and AWQ process a decoder: one block in memory at a time.

The calibration windows run through the embeddings once; the inputs of the first decoder
layer (hidden states) and the keyword arguments the model passes each layer (rotary
position embeddings, masks) are caught there, with the decoder layers stubbed out so the
pass costs no more than the embeddings. The keyword arguments differ between layers in
some families: Gemma 3 interleaves sliding-window layers (a banded mask, local rotary
base) with global ones. Then each layer in turn: hooks collect what the quantizer needs
from its linear layers' inputs, the quantizer replaces them, and the *quantized* layer's
outputs become the next layer's inputs, so later layers are calibrated on the activations
they will really see (GPTQ's sequential scheme). Only one layer's activations are held
(``n_samples × seq_len × hidden`` floats).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers")


class _Caught(Exception):
    """Raised by the stub of the last decoder layer to stop the forward pass there."""


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index`` during the catching pass: records its inputs, computes nothing."""

    def __init__(self, layer: nn.Module, index: int, last: bool,
                 seen: dict[int, tuple[torch.Tensor, dict[str, Any]]]) -> None:
        super().__init__()
        self.index, self.last, self.seen = index, last, seen
        object.__setattr__(self, "_layer", layer)  # not a submodule: its parameters stay out of this stub

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # a model reading an attribute of its layer (e.g. its attention type)
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if len(args) > 1:
            raise TypeError("layer-wise calibration needs the decoder layers called as layer(hidden, **kwargs); "
                            f"this model passes {len(args) - 1} more positional argument(s)")
        self.seen[self.index] = (hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"})
        if self.last:
            raise _Caught()
        return hidden


@dataclass
class LayerBatch:
    """One mini-batch of a decoder layer's inputs, and the keyword arguments of the layers after it."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]
    later: list[dict[str, Any]] = field(default_factory=list)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, layers)`` of a decoder-only transformer; a clear error for other models."""
    for path in LAYER_PATHS:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return path, layers
    raise ValueError(f"layer-wise calibration needs a decoder-only model with its blocks at one of "
                     f"{', '.join(LAYER_PATHS)}; {type(model).__name__} has none")


@torch.no_grad()
def first_layer_inputs(model: nn.Module, tokens: torch.Tensor, batch_size: int) -> list[LayerBatch]:
    """Run ``tokens`` (``n × seq_len``) up to the first decoder layer; return its inputs.

    Each batch also carries the keyword arguments the model gives every later layer
    (:func:`run_layer` hands them on), caught in the same pass with the layers stubbed out.
    """
    _, layers = decoder_layers(model)
    device = next(model.parameters()).device
    originals = list(layers)
    seen: dict[int, tuple[torch.Tensor, dict[str, Any]]] = {}
    batches = []
    try:
        for index in range(len(layers)):
            layers[index] = _Recorder(originals[index], index, index == len(layers) - 1, seen)
        for chunk in tokens.split(batch_size):
            seen.clear()
            try:
                model(input_ids=chunk.to(device), use_cache=False)
            except _Caught:
                pass
            if len(seen) != len(originals):
                raise RuntimeError(f"calibration saw {len(seen)} of the model's {len(originals)} decoder layers "
                                   "called; layer-wise calibration needs every layer called once, in order")
            hidden, kwargs = seen[0]
            batches.append(LayerBatch(hidden.detach(), kwargs, [seen[i][1] for i in range(1, len(originals))]))
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer
    return batches


def _output(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, (tuple, list)) else result


@torch.no_grad()
def run_layer(layer: nn.Module, batches: list[LayerBatch]) -> list[LayerBatch]:
    """The layer's outputs on every batch, as the next layer's inputs."""
    return [LayerBatch(_output(layer(b.hidden, **b.kwargs)).detach(), *_next_kwargs(b)) for b in batches]


def _next_kwargs(batch: LayerBatch) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The next layer's keyword arguments (the last layer's again after the last layer), and the rest."""
    return (batch.later[0], batch.later[1:]) if batch.later else (batch.kwargs, [])


@contextmanager
def watch_inputs(modules: dict[str, nn.Module], collect: Callable[[str, torch.Tensor], None]
                 ) -> Iterator[None]:
    """Call ``collect(name, input)`` for every forward call of the named modules."""
    handles = [module.register_forward_pre_hook(lambda _m, args, name=name: collect(name, args[0].detach()))
               for name, module in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def collect_inputs(layer: nn.Module, batches: list[LayerBatch], modules: dict[str, nn.Module],
                   max_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """Run the layer and return each module's inputs, flattened to ``tokens × features``."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    with watch_inputs(modules, lambda name, x: seen[name].append(x.reshape(-1, x.shape[-1]))):
        run_layer(layer, batches)
    flat = {name: torch.cat(chunks) for name, chunks in seen.items() if chunks}
    if max_tokens is not None:
        flat = {name: subsample_rows(x, max_tokens) for name, x in flat.items()}
    return flat


def subsample_rows(x: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` rows of ``x`` drawn without replacement (seeded); all of them when there are fewer."""
    if x.shape[0] <= n:
        return x
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return x[order.to(x.device)]


def linears_of(layer: nn.Module, layer_path: str, skip: list[str]) -> dict[str, nn.Linear]:
    """The layer's ``nn.Linear`` modules by relative name, minus those whose full name matches ``skip``."""
    return {name: module for name, module in layer.named_modules()
            if isinstance(module, nn.Linear) and not any(s in f"{layer_path}.{name}" for s in skip)}
