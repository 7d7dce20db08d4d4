"""Tensor parallelism (Megatron-LM, Shoeybi et al., arXiv:1909.08053) over ``torch.distributed``.

Each of ``world`` processes keeps a slice of every block: attention heads (the q/k/v
projections split by output rows = column-parallel, ``o_proj`` split by input columns =
row-parallel) and MLP channels (``gate``/``up`` column-parallel, ``down`` row-parallel); the
partial outputs of the two row-parallel layers are summed with one ``all_reduce`` each per
block. Embeddings, norms and the LM head stay replicated. Works with gloo on CPU and NCCL on
CUDA; the number of attention heads and of KV heads must be divisible by ``world``.

:func:`shard_model` cuts a loaded Hugging Face model (Llama, Qwen2, Gemma 3 layouts) in place
for this rank; :func:`tp_logits` runs a full causal forward over a prompt (no cache) and
returns the same logits as the unsharded model (up to float rounding)::

    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, init_method=...)
    layout = shard_model(model, rank, 2)
    logits = tp_logits(layout, input_ids)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from effinfer.plugins.system.engine.forward import DecoderLayout, apply_rotary


def _slice_linear(linear: nn.Linear, dim: int, rank: int, world: int, keep_bias: bool = True) -> nn.Linear:
    size = linear.weight.shape[dim] // world
    weight = linear.weight.detach().narrow(dim, rank * size, size).clone()
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None and keep_bias,
                    dtype=weight.dtype, device=weight.device)
    out.weight.data.copy_(weight)
    if out.bias is not None:
        bias = linear.bias.detach()
        out.bias.data.copy_(bias.narrow(0, rank * size, size) if dim == 0 else bias)
    return out


def shard_model(model: nn.Module, rank: int, world: int) -> DecoderLayout:
    """Keep this rank's heads and MLP channels of every block (in place); the sharded layout."""
    layout = DecoderLayout.of(model)
    if layout.num_heads % world or layout.num_kv_heads % world:
        raise ValueError(f"{layout.num_heads} attention heads and {layout.num_kv_heads} KV heads must both be "
                         f"divisible by the tensor-parallel world size {world}; use a world size that divides them")
    for layer in layout.layers:
        attention, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attention, name, _slice_linear(getattr(attention, name), 0, rank, world))
        attention.o_proj = _slice_linear(attention.o_proj, 1, rank, world, keep_bias=rank == 0)
        for name in ("gate_proj", "up_proj"):
            setattr(mlp, name, _slice_linear(getattr(mlp, name), 0, rank, world))
        mlp.down_proj = _slice_linear(mlp.down_proj, 1, rank, world, keep_bias=rank == 0)
    return layout


def _reduce(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


@torch.inference_mode()
def tp_logits(layout: DecoderLayout, input_ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits (``B × T × V``) of a causal forward over ``input_ids`` on this rank's shard."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    heads, kv_heads, dim = layout.num_heads // world, layout.num_kv_heads // world, layout.head_dim
    batch, length = input_ids.shape
    positions = torch.arange(length, device=input_ids.device)[None].expand(batch, -1)
    hidden = layout.embed(input_ids)
    rope = layout.rope(hidden, positions)
    causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
    masks = {"full_attention": causal}
    if layout.sliding_window is not None:
        near = positions[0][:, None] - positions[0][None, :] < layout.sliding_window
        masks["sliding_attention"] = causal & near
    for index, layer in enumerate(layout.layers):
        kind = layout.layer_types[index]
        cos, sin = rope[kind]
        attention = layer.self_attn
        x = layer.input_layernorm(hidden)
        q = attention.q_proj(x).view(batch, length, heads, dim).transpose(1, 2)
        k = attention.k_proj(x).view(batch, length, kv_heads, dim).transpose(1, 2)
        v = attention.v_proj(x).view(batch, length, kv_heads, dim).transpose(1, 2)
        if hasattr(attention, "q_norm"):
            q, k = attention.q_norm(q), attention.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=masks.get(kind, causal), scale=attention.scaling,
                                             enable_gqa=heads != kv_heads)
        attended = _reduce(attention.o_proj(out.transpose(1, 2).reshape(batch, length, heads * dim)))
        mlp = layer.mlp
        if layout.sandwich_norms:
            hidden = hidden + layer.post_attention_layernorm(attended)
            y = layer.pre_feedforward_layernorm(hidden)
            hidden = hidden + layer.post_feedforward_layernorm(
                _reduce(mlp.down_proj(mlp.act_fn(mlp.gate_proj(y)) * mlp.up_proj(y))))
        else:
            hidden = hidden + attended
            y = layer.post_attention_layernorm(hidden)
            hidden = hidden + _reduce(mlp.down_proj(mlp.act_fn(mlp.gate_proj(y)) * mlp.up_proj(y)))
    return layout.lm_head(layout.norm(hidden)).float()
