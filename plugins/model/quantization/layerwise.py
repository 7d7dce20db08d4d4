"""Layer-by-layer calibration, as GPTQ and AWQ process a decoder: one block in memory at a time.

The calibration windows run through the embeddings once; the inputs of the first decoder
layer (hidden states and the keyword arguments the model passes it: rotary position
embeddings, masks) are caught there. Then each layer in turn: hooks collect what the
quantizer needs from its linear layers' inputs, the quantizer replaces them, and the
*quantized* layer's outputs become the next layer's inputs, so later layers are
calibrated on the activations they will really see (GPTQ's sequential scheme).
Only one layer's activations are held (``n_samples × seq_len × hidden`` floats).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers")


class _Caught(Exception):
    """Raised by the hook on the first decoder layer to stop the forward pass there."""

    def __init__(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.hidden, self.kwargs = hidden, kwargs


@dataclass
class LayerBatch:
    """One mini-batch of a decoder layer's inputs."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]


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
    """Run ``tokens`` (``n × seq_len``) up to the first decoder layer; return its inputs."""
    _, layers = decoder_layers(model)
    device = next(model.parameters()).device

    def catch(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        raise _Caught(hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"})

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    batches = []
    try:
        for chunk in tokens.split(batch_size):
            try:
                model(input_ids=chunk.to(device), use_cache=False)
            except _Caught as caught:
                batches.append(LayerBatch(caught.hidden.detach(), caught.kwargs))
            else:
                raise RuntimeError("the first decoder layer was never called during calibration")
    finally:
        handle.remove()
    return batches


def _output(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, (tuple, list)) else result


@torch.no_grad()
def run_layer(layer: nn.Module, batches: list[LayerBatch]) -> list[LayerBatch]:
    """The layer's outputs on every batch, as the next layer's inputs."""
    return [LayerBatch(_output(layer(b.hidden, **b.kwargs)).detach(), b.kwargs) for b in batches]


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
