"""The static engine over a KV-cache policy (:class:`~effinfer.core.kv_cache.PolicyCache`).

A technique's policy decides what the cache holds (compact buffers of ``budget`` entries for the
eviction policies, packed integer codes for the quantized ones), so the engine's pre-allocated
``layers × capacity`` buffers cannot hold it. Instead, each attention layer of the engine's own
forward hands its new rotated keys and values to the layer's policy (and, for score-based
eviction, its scaled rotated queries, computed once here instead of by a pre-hook) and attends
over exactly what the policy returns: ``budget + k`` entries for a sparse policy, every entry
dequantized for a quantized one. Sliding-window layers (Gemma 3's local layers) keep
transformers' bounded window layer, as on the HF path.

The mask needs no positions: whatever a policy returns ends with the ``k`` new entries, and
every stored entry before them is in the past, so query ``i`` may attend to column ``j`` of
``n`` iff ``n - k + i - j ≥ 0`` (and, on a sliding layer, whose columns are contiguous
positions, ``< sliding_window``). Left-padded batches work with the policies that keep every
entry (their columns are the absolute columns); evicting ones refuse them, as on the HF path.
The step is eager (a policy's shapes change as it stores and evicts), so ``runtime.compile``
does not apply to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from effinfer.core.engines import StepOutput
from effinfer.core.kv_cache import PolicyCache, PolicyLayer
from effinfer.plugins.system.engine.forward import SLIDING, DecoderLayout, apply_rotary, lm_logits, mlp_forward


class PolicyState:
    """One generation's policy cache with the padding of its rows."""

    def __init__(self, cache: PolicyCache, attention_mask: torch.Tensor) -> None:
        if cache.evicts and not bool(attention_mask.bool().all()):
            raise ValueError(f"the {cache.name} KV policy evicts entries, which a left-padded batch cannot mask: "
                             "run prompts one at a time (batch 1) or of equal length")
        self.cache = cache
        self.not_pad = attention_mask.bool()  # B × columns fed so far
        self.pad = attention_mask.shape[1] - attention_mask.long().sum(-1)
        self.length = 0

    def extend(self, k: int) -> None:
        if self.not_pad.shape[1] < self.length + k:
            self.not_pad = torch.cat([self.not_pad, self.not_pad.new_ones(self.not_pad.shape[0], k)], dim=1)


def policy_attention(layout: DecoderLayout, state: PolicyState, index: int, attention: nn.Module,
                     x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, window: int | None) -> torch.Tensor:
    batch, k, _ = x.shape
    q = attention.q_proj(x).view(batch, k, layout.num_heads, layout.head_dim).transpose(1, 2)
    key = attention.k_proj(x).view(batch, k, layout.num_kv_heads, layout.head_dim).transpose(1, 2)
    value = attention.v_proj(x).view(batch, k, layout.num_kv_heads, layout.head_dim).transpose(1, 2)
    if hasattr(attention, "q_norm"):
        q, key = attention.q_norm(q), attention.k_norm(key)
    q, key = apply_rotary(q, cos, sin), apply_rotary(key, cos, sin)
    layer = state.cache.layers[index]
    if isinstance(layer, PolicyLayer):
        queries = q * attention.scaling if layer.policy.needs_queries else None
        keys, values = layer.policy.update(key, value, queries)
    else:  # transformers' sliding-window layer
        keys, values = layer.update(key, value)
    n = keys.shape[-2]
    total = state.length + k
    padded = not bool(state.not_pad[:, :total].all())
    mask = None
    if k > 1 or padded or (window is not None and n > window):
        distance = (n - k) + torch.arange(k, device=x.device)[:, None] - torch.arange(n, device=x.device)[None, :]
        allowed = distance >= 0
        if window is not None:
            allowed &= distance < window
        mask = allowed[None] & state.not_pad[:, None, total - n:total]
        mask |= (distance == 0)[None]  # a padding query sees itself (no empty row)
        mask = mask[:, None]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attention.scaling,
                                         enable_gqa=layout.num_kv_heads != layout.num_heads)
    return attention.o_proj(out.transpose(1, 2).reshape(batch, k, layout.num_heads * layout.head_dim))


@torch.inference_mode()
def policy_forward(layout: DecoderLayout, state: PolicyState, tokens: torch.Tensor, positions: torch.Tensor
                   ) -> StepOutput:
    """Feed ``tokens`` (``B × k``) at ``positions`` through the policy cache; last-position logits and hidden."""
    k = tokens.shape[1]
    state.extend(k)
    hidden = layout.embed(tokens)
    rope = layout.rope(hidden, positions)
    for index, layer in enumerate(layout.layers):
        kind = layout.layer_types[index]
        cos, sin = rope[kind]
        window = layout.sliding_window if kind == SLIDING else None
        attended = policy_attention(layout, state, index, layer.self_attn, layer.input_layernorm(hidden), cos, sin,
                                    window)
        if layout.sandwich_norms:
            hidden = hidden + layer.post_attention_layernorm(attended)
            hidden = hidden + layer.post_feedforward_layernorm(mlp_forward(layer.mlp,
                                                                           layer.pre_feedforward_layernorm(hidden),
                                                                           False))
        else:
            hidden = hidden + attended
            hidden = hidden + mlp_forward(layer.mlp, layer.post_attention_layernorm(hidden), False)
    state.length += k
    last = layout.norm(hidden[:, -1:])
    return StepOutput(lm_logits(layout, last), last)


def policy_prefill(layout: DecoderLayout, cache: PolicyCache, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> tuple[PolicyState, StepOutput]:
    from effinfer.core.generation import positions_from_mask

    state = PolicyState(cache, attention_mask)
    return state, policy_forward(layout, state, input_ids, positions_from_mask(attention_mask))


def policy_decode(layout: DecoderLayout, state: PolicyState, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (``B × V``) after one token per row."""
    positions = (state.length - state.pad)[:, None]
    return policy_forward(layout, state, tokens.view(-1, 1), positions).logits[:, -1]
