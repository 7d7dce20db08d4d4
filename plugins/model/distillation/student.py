"""Students made by depth pruning: a copy of the teacher with some decoder blocks removed.

Two rules choose the blocks:

- ``block_influence`` — ShortGPT (Men et al., "ShortGPT: Layers in Large Language Models are
  More Redundant Than You Expect", arXiv:2403.03853): a block's *Block Influence* is
  ``1 − mean cos(x_in, x_out)`` of its input and output hidden states on calibration text;
  the blocks that change their input least are removed.
- ``uniform`` — blocks spread evenly over the middle of the stack (the first and the last
  block are always kept).

The student is a deep copy (the teacher is untouched, so it can teach): its blocks are
re-indexed for the KV cache and the config is trimmed (``num_hidden_layers``, per-layer
``layer_types`` of Qwen2 and Gemma 3).
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import nn

from effinfer.core.errors import EffinferError

Rule = Literal["block_influence", "uniform"]


class StudentError(EffinferError, ValueError):
    """The student cannot be built from this model with this config."""


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """``model.model.layers`` of a decoder-only causal LM (Llama, Qwen2, Gemma 3 text), or a clear refusal."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(
            isinstance(getattr(getattr(block, "self_attn", None), "layer_idx", None), int) for block in layers):
        raise StudentError(f"{type(model).__name__} is not a decoder-only causal LM with its blocks at "
                           "model.model.layers, each with self_attn.layer_idx (the Llama, Qwen2 and Gemma 3 "
                           "layouts); use a model of one of those layouts")
    return layers


def check_drop(num_layers: int, drop: int) -> list[str]:
    if drop > num_layers - 2:
        return [f"drop={drop} leaves fewer than 2 of the model's {num_layers} decoder layers; use drop ≤ "
                f"{num_layers - 2}"]
    return []


@torch.no_grad()
def block_influence(model: nn.Module, tokens: torch.Tensor) -> list[float]:
    """ShortGPT's Block Influence of every block on ``tokens`` (``B × T``): 1 − mean cosine(in, out)."""
    device = next(model.parameters()).device
    out = model(input_ids=tokens.to(device), output_hidden_states=True, use_cache=False, logits_to_keep=1)
    states = out.hidden_states  # embeddings, then the output of each block (the last one after the final norm)
    scores = []
    for index in range(len(states) - 1):
        before, after = states[index].float(), states[index + 1].float()
        scores.append(float(1 - torch.nn.functional.cosine_similarity(before, after, dim=-1).mean()))
    # the last entry of hidden_states is normed, so the last block's score compares unlike things: keep it
    scores[-1] = float("inf")
    return scores


def choose_dropped(num_layers: int, drop: int, rule: Rule, scores: list[float] | None = None) -> list[int]:
    """The ``drop`` block indices to remove (never the first or the last block)."""
    problems = check_drop(num_layers, drop)
    if problems:
        raise StudentError(problems[0])
    middle = list(range(1, num_layers - 1))
    if rule == "uniform":
        return sorted({middle[int((i + 0.5) * len(middle) / drop)] for i in range(drop)}) if drop else []
    if scores is None:
        raise StudentError("the block_influence rule needs the blocks' scores (calibration tokens)")
    return sorted(sorted(middle, key=lambda i: scores[i])[:drop])


def drop_blocks(model: nn.Module, dropped: list[int]) -> nn.Module:
    """``model`` (modified in place) without the blocks ``dropped``; blocks re-indexed, config trimmed."""
    layers = decoder_blocks(model)
    kept = [i for i in range(len(layers)) if i not in set(dropped)]
    model.model.layers = nn.ModuleList(layers[i] for i in kept)
    config = model.config
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]
    config.num_hidden_layers = len(kept)
    for index, block in enumerate(model.model.layers):
        block.self_attn.layer_idx = index
        if hasattr(block, "layer_idx"):
            block.layer_idx = index
    return model


def build_student(teacher: nn.Module, drop: int, rule: Rule, tokens: torch.Tensor | None = None
                  ) -> tuple[nn.Module, list[int]]:
    """A deep copy of ``teacher`` without ``drop`` blocks chosen by ``rule``; and the dropped indices."""
    layers = decoder_blocks(teacher)
    scores = block_influence(teacher, tokens) if rule == "block_influence" and drop else None
    dropped = choose_dropped(len(layers), drop, rule, scores)
    student = drop_blocks(copy.deepcopy(teacher), dropped)
    return student.eval(), dropped


def kept_blocks(num_layers: int, dropped: list[int]) -> list[int]:
    return [i for i in range(num_layers) if i not in set(dropped)]


def describe(num_layers: int, dropped: list[int], rule: str) -> str:
    return f"student: {num_layers - len(dropped)} of {num_layers} layers (dropped {dropped} by {rule})"


__all__: list[Any] = ["StudentError", "block_influence", "build_student", "check_drop", "choose_dropped",
                      "decoder_blocks", "describe", "drop_blocks", "kept_blocks"]
