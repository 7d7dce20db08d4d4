"""Equivalent per-channel rescaling, shared by AWQ and SmoothQuant.

``y = f(x) W`` with ``x`` produced by a norm or a linear layer stays the same when the
producer's output channel ``j`` is divided by ``s_j`` and the reader's input column
``j`` multiplied by ``s_j``. AWQ (arXiv:2306.00978) uses it to protect salient weights,
SmoothQuant (arXiv:2211.10438) to move activation outliers into the weights. Every
change goes through the stage's patcher, so the composition can undo it.

Where the groups are depends on the family. Llama and Qwen2 blocks normalize once before
attention (``input_layernorm``) and once before the MLP (``post_attention_layernorm``).
Gemma 2/3 blocks have four norms: ``post_attention_layernorm`` normalizes the attention
*output* before the residual sum, and the MLP reads ``pre_feedforward_layernorm``; their
RMSNorm multiplies by ``1 + weight`` instead of ``weight`` (Gemma Team, arXiv:2503.19786),
so dividing the gain by ``s`` means ``weight ← (1 + weight) / s − 1``. The gain convention
of a norm is measured, not assumed from its class name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from effinfer.core.stages import ModulePatcher

ATTENTION_INPUTS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
MLP_INPUTS = ["mlp.gate_proj", "mlp.up_proj"]
#: the norm whose output the MLP reads: Gemma's pre-feedforward norm when the block has one
MLP_INPUT_NORMS = ("pre_feedforward_layernorm", "post_attention_layernorm")
#: folding may change a block's output by rounding only (relative norm of the change, by the
#: block's dtype); more than this means a wrong group
FUNCTION_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
HALF_PRECISION_TOLERANCE = 3e-2


@dataclass
class ScaleGroup:
    """Linear layers that read one input, and the module whose output that input is."""

    previous: str          # relative name of an RMSNorm/LayerNorm or nn.Linear
    linears: list[str]     # relative names of the linear layers reading its output


def block_groups(layer: nn.Module, technique: str, *, value_output: bool, down_proj: bool) -> list[ScaleGroup]:
    """The scaling groups of a Llama-, Qwen2- or Gemma-style decoder block.

    Always ``attention norm → q, k, v`` and ``MLP norm → gate, up``; with ``value_output``
    also ``v → o`` (skipped under grouped-query attention, where ``v_proj`` is narrower
    than ``o_proj``'s input), with ``down_proj`` also ``up → down``. A block without these
    modules is refused with the names it lacks.
    """
    names = dict(layer.named_modules())
    mlp_norm = next((n for n in MLP_INPUT_NORMS if n in names), MLP_INPUT_NORMS[-1])
    groups = [ScaleGroup("input_layernorm", ATTENTION_INPUTS), ScaleGroup(mlp_norm, MLP_INPUTS)]
    if value_output:
        groups.insert(1, ScaleGroup("self_attn.v_proj", ["self_attn.o_proj"]))
    if down_proj:
        groups.append(ScaleGroup("mlp.up_proj", ["mlp.down_proj"]))
    check_block(layer, groups, technique)
    kept = []
    for group in groups:
        previous = names[group.previous]
        if isinstance(previous, nn.Linear) and previous.out_features != names[group.linears[0]].in_features:
            continue  # grouped-query attention: v_proj is narrower than o_proj's input
        kept.append(group)
    return kept


def fold_scales(layer: nn.Module, group: ScaleGroup, scales: torch.Tensor, patcher: ModulePatcher) -> None:
    """Divide the producing module by ``s`` and multiply the readers' input columns by ``s`` (function kept)."""
    previous = layer.get_submodule(group.previous)
    if isinstance(previous, nn.Linear):
        _set_weight(previous, previous.weight / scales[:, None], patcher)
    else:
        offset = norm_gain_offset(previous, group.previous)
        gain = previous.weight.detach().float() + offset
        weight = (gain / scales - offset).to(previous.weight.dtype)
        _check_representable(weight, gain, scales, offset, group.previous)
        _set_weight(previous, weight, patcher)
    if getattr(previous, "bias", None) is not None:
        patcher.set_attr(previous, "bias", nn.Parameter(previous.bias / scales, requires_grad=False))
    for name in group.linears:
        linear = layer.get_submodule(name)
        _set_weight(linear, linear.weight * scales[None, :], patcher)


@torch.no_grad()
def norm_gain_offset(norm: nn.Module, name: str = "norm") -> float:
    """``0`` for a norm whose gain is ``weight`` (Llama, Qwen2), ``1`` for ``1 + weight`` (Gemma).

    Measured on a ±1 input (zero mean, unit RMS: every RMSNorm and LayerNorm leaves it
    unchanged up to ``eps``), so the answer does not depend on the class's name. A norm
    with any other behaviour cannot take folded scales and is refused.
    """
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.shape[0] < 2:
        raise ValueError(f"cannot fold scales into {name} ({type(norm).__name__}): it has no per-channel weight")
    sign = torch.ones(weight.shape[0], device=weight.device)
    sign[1::2] = -1.0
    if weight.shape[0] % 2:
        sign[-1] = 0.0  # an odd width: one zero keeps the mean at zero
    probe = (sign / sign.pow(2).mean().sqrt()).to(weight.dtype)[None]
    bias = getattr(norm, "bias", None)
    gain = norm(probe)[0].float() - (bias.float() if isinstance(bias, torch.Tensor) else 0.0)
    channels = probe[0].float().abs() > 0
    gain = gain[channels] / probe[0].float()[channels]
    for offset in (0.0, 1.0):
        expected = weight.float()[channels] + offset
        if torch.allclose(gain, expected, rtol=1e-2, atol=1e-3 * float(expected.abs().max().clamp(min=1.0))):
            return offset
    raise ValueError(f"cannot fold scales into {name} ({type(norm).__name__}): its gain is neither its weight "
                     "(Llama RMSNorm) nor 1 + weight (Gemma RMSNorm)")


def _check_representable(weight: torch.Tensor, gain: torch.Tensor, scales: torch.Tensor, offset: float,
                         name: str) -> None:
    """A ``1 + weight`` gain divided by large scales is lost to rounding in 16-bit weights: refuse."""
    wanted = gain / scales
    error = ((weight.float() + offset) - wanted).abs() / wanted.abs().clamp(min=1e-12)
    if offset and float(error.max()) > 1e-2:
        raise ValueError(f"folding scales into {name} ({weight.dtype}, gain 1 + weight) loses "
                         f"{float(error.max()):.0%} of a gain to rounding; load the model in float32 for this "
                         "technique")


def _set_weight(module: nn.Module, value: torch.Tensor, patcher: ModulePatcher) -> None:
    patcher.set_attr(module, "weight", nn.Parameter(value.detach().to(module.weight.dtype), requires_grad=False))


def check_block(layer: nn.Module, groups: list[ScaleGroup] | tuple[ScaleGroup, ...], technique: str) -> None:
    """A clear error when a decoder block lacks the modules the scaling groups name."""
    names = dict(layer.named_modules())
    missing = [n for g in groups for n in (g.previous, *g.linears) if n not in names]
    if missing:
        wanted = sorted({n for g in groups for n in (g.previous, *g.linears)})
        raise ValueError(f"{technique} supports Llama-, Qwen2- and Gemma-style decoder blocks with "
                         f"{', '.join(wanted)}; this {type(layer).__name__} lacks {', '.join(missing)}")


def check_function_kept(before: torch.Tensor, after: torch.Tensor, where: str, technique: str) -> None:
    """Refuse when folding scales changed a block's output by more than rounding.

    Folding is exact in real arithmetic, so a larger change means a group's producer is
    not what its readers read (a block of another layout), which would silently damage
    the model.
    """
    change = float((after.float() - before.float()).norm() / before.float().norm().clamp(min=1e-12))
    tolerance = FUNCTION_TOLERANCE.get(before.dtype, HALF_PRECISION_TOLERANCE)
    if not change <= tolerance:
        raise ValueError(f"{technique}: folding scales changed the output of {where} by {change:.2%} (rounding "
                         f"allows {tolerance:.1%}); this block's layout does not match the scaling groups "
                         f"{technique} assumes — use rtn or gptq for this model")
