"""Equivalent per-channel rescaling, shared by AWQ and SmoothQuant.

``y = f(x) W`` with ``x`` produced by a norm or a linear layer stays the same when the
producer's output channel ``j`` is divided by ``s_j`` and the reader's input column
``j`` multiplied by ``s_j``. AWQ (arXiv:2306.00978) uses it to protect salient weights,
SmoothQuant (arXiv:2211.10438) to move activation outliers into the weights. Every
change goes through the stage's patcher, so the composition can undo it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from effinfer.core.stages import ModulePatcher


@dataclass
class ScaleGroup:
    """Linear layers that read one input, and the module whose output that input is."""

    previous: str          # relative name of an RMSNorm/LayerNorm or nn.Linear
    linears: list[str]     # relative names of the linear layers reading its output


def fold_scales(layer: nn.Module, group: ScaleGroup, scales: torch.Tensor, patcher: ModulePatcher) -> None:
    """Divide the producing module by ``s`` and multiply the readers' input columns by ``s`` (function kept)."""
    previous = layer.get_submodule(group.previous)
    divisor = scales[:, None] if isinstance(previous, nn.Linear) else scales
    _set_weight(previous, previous.weight / divisor, patcher)
    if getattr(previous, "bias", None) is not None:
        patcher.set_attr(previous, "bias", nn.Parameter(previous.bias / scales, requires_grad=False))
    for name in group.linears:
        linear = layer.get_submodule(name)
        _set_weight(linear, linear.weight * scales[None, :], patcher)


def _set_weight(module: nn.Module, value: torch.Tensor, patcher: ModulePatcher) -> None:
    patcher.set_attr(module, "weight", nn.Parameter(value.detach().to(module.weight.dtype), requires_grad=False))


def check_block(layer: nn.Module, groups: tuple[ScaleGroup, ...], technique: str) -> None:
    """A clear error when a decoder block lacks the modules the scaling groups name."""
    names = dict(layer.named_modules())
    missing = [n for g in groups for n in (g.previous, *g.linears) if n not in names]
    if missing:
        wanted = sorted({n for g in groups for n in (g.previous, *g.linears)})
        raise ValueError(f"{technique} supports Llama-style decoder blocks with {', '.join(wanted)}; this "
                         f"{type(layer).__name__} lacks {', '.join(missing)}")
