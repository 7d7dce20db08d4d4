"""One decode step through a chosen number of blocks of a static-cache decoder, with an exit.

The block arithmetic is the static engine's own (:mod:`effinfer.plugins.system.engine.forward`:
``attention_block`` and ``mlp_forward``, Llama, Qwen2 and Gemma 3 layouts), so a step that runs
every block is the engine's decode step exactly. What is added:

- a per-block callback that may stop the step (an early exit), and
- :func:`fill_kv`: the keys and values of the blocks a token skipped, computed from the
  exit's hidden state (CALM's *state propagation*, arXiv:2207.07061 §4), so later tokens
  attend to a complete cache.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from effinfer.plugins.system.engine import DecoderLayout, StaticKVCache
from effinfer.plugins.system.engine.forward import SLIDING, apply_rotary, attention_block, mlp_forward


class StepContext:
    """Positions, rotary tables and masks of one token written at cache column ``slot`` (batch 1)."""

    def __init__(self, layout: DecoderLayout, cache: StaticKVCache, hidden: torch.Tensor, slot: int) -> None:
        device = hidden.device
        self.slots = torch.tensor([slot], device=device)
        columns = torch.arange(cache.capacity, device=device)
        positions = self.slots[None, :] - cache.pad[:, None]
        mask = (cache.not_pad & (columns <= slot))[:, None, :]
        self.rope = layout.rope(hidden, positions)
        self.masks = {"full_attention": mask}
        if layout.sliding_window is not None:
            key_positions = columns[None, :] - cache.pad[:, None]
            near = positions[:, :, None] - key_positions[:, None, :] < layout.sliding_window
            self.masks[SLIDING] = mask & near


def block(layout: DecoderLayout, cache: StaticKVCache, context: StepContext, index: int,
          hidden: torch.Tensor) -> torch.Tensor:
    """Block ``index`` on ``hidden`` (its K/V written at the step's slot): the engine's loop body."""
    layer, kind = layout.layers[index], layout.layer_types[index]
    cos, sin = context.rope[kind]
    attended = attention_block(layout, layer, index, layer.input_layernorm(hidden), cos, sin, cache.keys,
                               cache.values, context.slots, context.masks.get(kind, context.masks["full_attention"]),
                               False)
    if layout.sandwich_norms:
        hidden = hidden + layer.post_attention_layernorm(attended)
        return hidden + layer.post_feedforward_layernorm(mlp_forward(layer.mlp, layer.pre_feedforward_layernorm(
            hidden), False))
    hidden = hidden + attended
    return hidden + mlp_forward(layer.mlp, layer.post_attention_layernorm(hidden), False)


def fill_kv(layout: DecoderLayout, cache: StaticKVCache, context: StepContext, index: int,
            hidden: torch.Tensor) -> None:
    """Write block ``index``'s key and value of ``hidden`` (the exit state) at the step's slot."""
    layer, kind = layout.layers[index], layout.layer_types[index]
    attention = layer.self_attn
    x = layer.input_layernorm(hidden)
    key = attention.k_proj(x).view(1, 1, layout.num_kv_heads, layout.head_dim).transpose(1, 2)
    value = attention.v_proj(x).view(1, 1, layout.num_kv_heads, layout.head_dim).transpose(1, 2)
    if hasattr(attention, "k_norm"):
        key = attention.k_norm(key)
    cos, sin = context.rope[kind]
    cache.keys[index].index_copy_(2, context.slots, apply_rotary(key, cos, sin).to(cache.keys.dtype))
    cache.values[index].index_copy_(2, context.slots, value.to(cache.values.dtype))


@torch.inference_mode()
def exit_step(layout: DecoderLayout, cache: StaticKVCache, token: int, slot: int,
              stop: Callable[[int, torch.Tensor], torch.Tensor | None], last: int | None = None,
              fill: bool = True) -> tuple[torch.Tensor, int]:
    """Feed ``token`` at column ``slot``: run blocks 0, 1, … until ``stop(index, hidden)`` returns a
    final hidden state (an exit; the blocks after it get :func:`fill_kv` when ``fill``) or block
    ``last`` (default: the last block, then the model's final norm). Returns the final-norm-equivalent
    hidden state (``1 × 1 × H``) and the number of blocks run. Nothing is committed."""
    device = layout.embed.weight.device
    hidden = layout.embed(torch.tensor([[token]], device=device))
    context = StepContext(layout, cache, hidden, slot)
    last = layout.num_layers - 1 if last is None else last
    for index in range(last + 1):
        hidden = block(layout, cache, context, index, hidden)
        exited = stop(index, hidden)
        if exited is not None:
            if fill:
                for skipped in range(index + 1, layout.num_layers):
                    fill_kv(layout, cache, context, skipped, hidden)
            return exited, index + 1
    return layout.norm(hidden), last + 1
