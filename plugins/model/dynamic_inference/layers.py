"""One decode step through a chosen number of blocks of a static-cache decoder, with an exit.

The block arithmetic is the static engine's own (:mod:`effinfer.plugins.system.engine.forward`:
``attention_block`` and ``mlp_forward``, Llama, Qwen2 and Gemma 3 layouts), so a step that runs
every block is the engine's decode step exactly. What is added:

- a per-block callback that may stop the step (an early exit), and
- :func:`fill_kv`: the keys and values of the blocks a token skipped, computed from the
  exit's hidden state (CALM's *state propagation*, arXiv:2207.07061 §4), so later tokens
  attend to a complete cache;
- :class:`FusedFill`: the same for all the skipped blocks at once. Every skipped block reads
  the same exit state, and an RMS norm is ``g ⊙ x / rms(x)``, so each block's norm weight
  folds into its key and value projections; the projections of all blocks are stacked into
  one matrix, and filling the cache after an exit is one matrix product, one rotary and one
  write instead of a dozen small operations per skipped block (Llama- and Qwen2-style blocks
  with stock RMS norms and one rotary table; other layouts fill block by block).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from effinfer.plugins.system.engine import DecoderLayout, StaticKVCache
from effinfer.plugins.system.engine.forward import SLIDING, apply_rotary, attention_block, mlp_forward


class StepContext:
    """Positions, rotary tables and masks of one token written at cache column ``slot`` (batch 1)."""

    def __init__(self, layout: DecoderLayout, cache: StaticKVCache, hidden: torch.Tensor, slot: int) -> None:
        device = hidden.device
        self.slot = slot
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


class FusedFill:
    """All skipped blocks' K/V of an exit state in one product (see the module docstring)."""

    def __init__(self, layout: DecoderLayout) -> None:
        first = layout.layers[0]
        self.eps = first.input_layernorm.variance_epsilon
        rows, biases = [], []
        with torch.no_grad():
            for layer in layout.layers:
                gain = layer.input_layernorm.weight.float()
                for projection in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                    rows.append(projection.weight.float() * gain[None, :])
                    bias = projection.bias
                    biases.append(bias.float() if bias is not None else torch.zeros(projection.out_features,
                                                                                      device=gain.device))
        self.weight = torch.cat(rows)  # (layers · 2 · kv) × hidden
        self.bias = torch.cat(biases)
        self.width = layout.num_kv_heads * layout.head_dim
        self.kv_heads, self.head_dim, self.layers = layout.num_kv_heads, layout.head_dim, layout.num_layers

    @staticmethod
    def supports(layout: DecoderLayout) -> bool:
        norm_types = {type(layer.input_layernorm).__name__ for layer in layout.layers}
        plain = all(type(getattr(layer.self_attn, name)) is torch.nn.Linear
                    for layer in layout.layers for name in ("k_proj", "v_proj"))
        return (not layout.sandwich_norms and not layout.rotary_per_type and plain
                and norm_types <= {"LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm"}
                and not any(hasattr(layer.self_attn, "k_norm") for layer in layout.layers))

    def fill(self, layout: DecoderLayout, cache: StaticKVCache, context: StepContext, after: int,
             hidden: torch.Tensor) -> None:
        """Write the K/V of blocks ``after + 1 …`` for ``hidden`` at the step's slot."""
        count = self.layers - after - 1
        if count <= 0:
            return
        x = hidden.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        start = (after + 1) * 2 * self.width
        kv = F.linear(x.reshape(1, -1), self.weight[start:], self.bias[start:])
        kv = kv.view(count, 2, self.kv_heads, 1, self.head_dim)
        cos, sin = context.rope[layout.layer_types[0]]
        keys = apply_rotary(kv[:, 0], cos, sin)
        cache.keys[after + 1:, 0, :, context.slot] = keys[:, :, 0].to(cache.keys.dtype)
        cache.values[after + 1:, 0, :, context.slot] = kv[:, 1, :, 0].to(cache.values.dtype)


_FILLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def weight_versions(layout: DecoderLayout) -> tuple[int, ...]:
    """In-place edit counters of the weights a :class:`FusedFill` folds (a change means rebuild it)."""
    return tuple(t._version for layer in layout.layers for t in (
        layer.input_layernorm.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight))


def fused_fill(layout: DecoderLayout) -> FusedFill | None:
    """The layout's :class:`FusedFill` (rebuilt when its weights were edited in place), or ``None``
    where it does not apply."""
    entry = _FILLS.get(layout)
    if entry is None:
        entry = _FILLS[layout] = [FusedFill.supports(layout), None, None]
    if not entry[0]:
        return None
    versions = weight_versions(layout)
    if entry[1] != versions:
        entry[1], entry[2] = versions, FusedFill(layout)
    return entry[2]


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
                fused = fused_fill(layout) if cache.batch == 1 else None
                if fused is not None:
                    fused.fill(layout, cache, context, index, hidden)
                else:
                    for skipped in range(index + 1, layout.num_layers):
                        fill_kv(layout, cache, context, skipped, hidden)
            return exited, index + 1
    return layout.norm(hidden), last + 1
