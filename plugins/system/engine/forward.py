"""The decoder forward of the static engine (Llama, Qwen2, Gemma 3 layouts), readable top to bottom.

The weights stay in the Hugging Face modules (so a model-level technique that swapped a
linear layer, dropped blocks or quantized weights is honoured); only the attention is
re-written, because it has to read and write the pre-allocated cache of
:mod:`effinfer.plugins.system.engine.cache` at explicit slots and accept an arbitrary
boolean mask (causal for decoding, a token tree for speculative verification).

What differs between the three layouts is read from the modules and the config:

- Qwen2: biases on the q/k/v projections (the ``nn.Linear`` modules carry them);
- Gemma 3 (Gemma Team, arXiv:2503.19786): embeddings scaled by ``sqrt(hidden)`` (its
  embedding module does it), RMS norms on queries and keys (``q_norm``/``k_norm``), four
  norms per block (``pre_/post_feedforward_layernorm`` around the MLP, the attention output
  normed before the residual), ``query_pre_attn_scalar`` as the attention scale, and
  sliding-window layers (``config.layer_types``) with their own rotary base: a query at
  position ``p`` sees keys at positions ``> p - sliding_window`` there.

``matmul="sum"`` (used inside ``torch.compile``) writes each plain ``nn.Linear`` of a
one-row step as multiply-and-sum, so that Inductor generates its own memory-bound
kernel instead of calling MKL's fp32 GEMV, which reaches only ~10 GB/s on the 2-core
machines of this project (see ``DATA-SOURCES.md``); ``matmul="native"`` sends the plain
float32 linears of calls up to 8 rows (speculative verification, short prompts) to
effinfer's native CPU matmul instead, and ``matmul="native_gemm"`` every call (a prefill: the
native blocked GEMM above 8 rows), where the autotune found it the fastest.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from effinfer.kernels import native

#: model types whose decoder block this forward implements
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "gemma3_text"})
#: attention classes of those model types (a technique that swaps attention is not bypassed)
SUPPORTED_ATTENTION = frozenset({"LlamaAttention", "MistralAttention", "Qwen2Attention", "Gemma3Attention"})
#: rows up to which a fused (multiply-and-sum) projection beats the library GEMM
FUSED_MAX_ROWS = 1
SLIDING = "sliding_attention"


class UnsupportedModel(ValueError):
    """The static engine cannot run this model; the reason says why (the HF path can)."""


@dataclass(frozen=True)
class DecoderLayout:
    """The modules of a supported causal LM, its attention geometry and per-layer attention type."""

    embed: nn.Module
    layers: tuple[nn.Module, ...]
    norm: nn.Module
    rotary: nn.Module
    lm_head: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    #: per layer: ``"full_attention"`` or ``"sliding_attention"``
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    #: Gemma's four norms per block
    sandwich_norms: bool = False
    #: the rotary module takes the layer type (one rotary base per attention type)
    rotary_per_type: bool = False

    @classmethod
    def of(cls, model: nn.Module) -> DecoderLayout:
        """Read the layout of ``model``; raise :class:`UnsupportedModel` with the reason."""
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModel(f"model type {model_type!r} is not one of {sorted(SUPPORTED_MODEL_TYPES)}")
        for option in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(config, option, None):
                raise UnsupportedModel(f"{option} is not implemented by the static engine")
        decoder = getattr(model, "model", None)
        parts = ("embed_tokens", "layers", "norm", "rotary_emb")
        missing = [p for p in parts if not hasattr(decoder, p)]
        if missing or getattr(model, "lm_head", None) is None:
            raise UnsupportedModel(f"the decoder lacks {missing or ['lm_head']}")
        for index, layer in enumerate(decoder.layers):
            attention = getattr(layer, "self_attn", None)
            if type(attention).__name__ not in SUPPORTED_ATTENTION:
                raise UnsupportedModel(f"layer {index} has attention {type(attention).__name__}, "
                                       "not a stock attention of a supported layout (a technique replaced it?)")
        layer_types = tuple(getattr(config, "layer_types", None) or ["full_attention"] * len(decoder.layers))
        if len(layer_types) != len(decoder.layers):  # a technique dropped blocks: keep each block's own type
            layer_types = tuple(getattr(layer, "attention_type", None) or getattr(layer.self_attn, "layer_type", None)
                                or "full_attention" for layer in decoder.layers)
        window = getattr(config, "sliding_window", None) if SLIDING in layer_types else None
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(decoder.embed_tokens, tuple(decoder.layers), decoder.norm, decoder.rotary_emb, model.lm_head,
                   config.num_attention_heads, config.num_key_value_heads, head_dim, config.hidden_size,
                   layer_types, window, hasattr(decoder.layers[0], "pre_feedforward_layernorm") if decoder.layers
                   else False, "layer_type" in inspect.signature(decoder.rotary_emb.forward).parameters)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def rope(self, hidden: torch.Tensor, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``(cos, sin)`` per attention type of the layers."""
        if not self.rotary_per_type:
            both = self.rotary(hidden, positions)
            return {kind: both for kind in set(self.layer_types)}
        return {kind: self.rotary(hidden, positions, kind) for kind in set(self.layer_types)}

    def matches(self, model: nn.Module) -> bool:
        """Whether ``model`` still has these modules (a technique may have swapped some since)."""
        decoder = getattr(model, "model", None)
        return (tuple(getattr(decoder, "layers", ())) == self.layers and getattr(decoder, "embed_tokens", None) is
                self.embed and getattr(decoder, "norm", None) is self.norm and model.lm_head is self.lm_head
                and all(type(layer.self_attn).__name__ in SUPPORTED_ATTENTION for layer in self.layers))


def project(module: nn.Module, x: torch.Tensor, matmul: str = "library") -> torch.Tensor:
    """``module(x)``; a plain ``nn.Linear`` of a small call as multiply-and-sum (``matmul="sum"``, for Inductor)
    or through effinfer's native CPU matmul (``matmul="native"``: float32 CPU, up to 8 rows;
    ``matmul="native_gemm"``: any number of rows)."""
    if type(module) is nn.Linear and matmul != "library":
        rows = x.shape[:-1].numel()
        if matmul == "sum" and rows <= FUSED_MAX_ROWS:
            y = (x.unsqueeze(-2) * module.weight).sum(-1)
            return y if module.bias is None else y + module.bias
        rows_taken = rows <= native.MAX_TOKENS if matmul == "native" else matmul == "native_gemm"
        if rows_taken and rows >= 1 and x.device.type == "cpu" \
                and x.dtype == module.weight.dtype == torch.float32 and not torch.is_grad_enabled():
            return native.linear(x, module.weight, module.bias)
    return module(x)


def mlp_forward(mlp: nn.Module, x: torch.Tensor, matmul: str = "library") -> torch.Tensor:
    """The gated MLP, through :func:`project` when it is the stock one, else the module itself."""
    names = ("gate_proj", "up_proj", "down_proj")
    if matmul != "library" and hasattr(mlp, "act_fn") and all(hasattr(mlp, n) for n in names):
        gate = mlp.act_fn(project(mlp.gate_proj, x, matmul))
        return project(mlp.down_proj, gate * project(mlp.up_proj, x, matmul), matmul)
    return mlp(x)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (Su et al., arXiv:2104.09864); ``x`` is ``B × heads × k × d``."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def attention_block(layout: DecoderLayout, layer: nn.Module, index: int, x: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    slots: torch.Tensor, mask: torch.Tensor, matmul: str = "library") -> torch.Tensor:
    """Self-attention of one layer: write this step's K/V at ``slots``, attend over the cache."""
    attention = layer.self_attn
    batch, k, _ = x.shape
    q = project(attention.q_proj, x, matmul).view(batch, k, layout.num_heads, layout.head_dim).transpose(1, 2)
    key = project(attention.k_proj, x, matmul).view(batch, k, layout.num_kv_heads, layout.head_dim).transpose(1, 2)
    value = project(attention.v_proj, x, matmul).view(batch, k, layout.num_kv_heads, layout.head_dim).transpose(1, 2)
    if hasattr(attention, "q_norm"):  # Gemma 3: RMS norm of each head's query and key
        q, key = attention.q_norm(q), attention.k_norm(key)
    q, key = apply_rotary(q, cos, sin), apply_rotary(key, cos, sin)
    keys[index].index_copy_(2, slots, key.to(keys.dtype))
    values[index].index_copy_(2, slots, value.to(values.dtype))
    out = F.scaled_dot_product_attention(q, keys[index], values[index], attn_mask=mask[:, None],
                                         scale=attention.scaling, enable_gqa=layout.num_kv_heads != layout.num_heads)
    out = out.transpose(1, 2).reshape(batch, k, layout.num_heads * layout.head_dim)
    return project(attention.o_proj, out, matmul)


def decoder_forward(layout: DecoderLayout, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                    mask: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    layers: Sequence[int] | None = None, matmul: str = "library",
                    key_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Final-norm hidden states (``B × k × hidden``) of ``tokens`` at ``positions``.

    ``slots`` (``k``) are the cache columns the new K/V go to; ``mask`` (``B × k × T``,
    ``True`` = may attend) covers the whole cache of ``T`` columns; ``key_positions``
    (``B × T``) are the positions of those columns, needed by sliding-window layers.
    ``layers`` runs only those blocks (layer skipping); the cache of the others is left untouched.
    """
    hidden = layout.embed(tokens)
    rope = layout.rope(hidden, positions)
    masks = {"full_attention": mask}
    if layout.sliding_window is not None:
        if key_positions is None:
            raise ValueError("a model with sliding-window layers needs the key positions")
        near = positions[:, :, None] - key_positions[:, None, :] < layout.sliding_window
        masks[SLIDING] = mask & near
    for index in range(layout.num_layers) if layers is None else layers:
        layer, kind = layout.layers[index], layout.layer_types[index]
        cos, sin = rope[kind]
        attended = attention_block(layout, layer, index, layer.input_layernorm(hidden), cos, sin, keys, values,
                                   slots, masks.get(kind, mask), matmul)
        if layout.sandwich_norms:
            hidden = hidden + layer.post_attention_layernorm(attended)
            mlp_out = mlp_forward(layer.mlp, layer.pre_feedforward_layernorm(hidden), matmul)
            hidden = hidden + layer.post_feedforward_layernorm(mlp_out)
        else:
            hidden = hidden + attended
            hidden = hidden + mlp_forward(layer.mlp, layer.post_attention_layernorm(hidden), matmul)
    return layout.norm(hidden)


def lm_logits(layout: DecoderLayout, hidden: torch.Tensor, matmul: str = "library") -> torch.Tensor:
    """Float32 next-token logits of final-norm hidden states."""
    return project(layout.lm_head, hidden, matmul).float()
