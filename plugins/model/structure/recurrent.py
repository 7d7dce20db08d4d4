"""The shared mechanism of attention replacements with a constant-size recurrent state.

``hedgehog`` (kernel-based linear attention, Zhang et al., "The Hedgehog & the Porcupine:
Expressive Linear Attentions with Softmax Mimicry", arXiv:2402.04347; LoLCATs' sliding window,
arXiv:2410.10254), ``mamba_convert`` (a selective scan, Mamba-in-the-Llama, arXiv:2408.15237)
and ``retention_convert`` (RetNet, arXiv:2307.08621) all replace the ``self_attn`` of chosen
decoder layers of a pretrained Hugging Face causal LM by a :class:`RecurrentMixer`. This module
is what they share:

**The call.** A mixer takes the attention's call unchanged (``hidden_states``,
``position_embeddings``, ``attention_mask``, ``cache`` / ``past_key_values`` …) and returns
``(output, None)``, so the decoder layer, the layer-wise fit of
:mod:`~effinfer.plugins.model.structure.repair` and the rest of the model do not know it is not
attention. Its projections are *copies* of the attention's (the original stays the untouched KD
teacher, and the composition restores it).

**Prefill in parallel form, decode in recurrent form.** A call with ``T`` tokens computes the
per-token features once (:meth:`RecurrentMixer.features`), then runs the parallel (matrix) form
over chunks of ``chunk_size`` tokens, each chunk starting from the state the previous one left
(memory ``O(chunk · (chunk + window))``, not ``O(T²)``). A one-token call with a state (a decode
step) runs the recurrent form (:meth:`RecurrentMixer.step`). Both give the same numbers; the
tests check it.

**Where the state lives: in the HF cache, not in the module.** The state of a replaced layer is a
:class:`RecurrentCacheLayer` put in place of that layer's entry of the ``Cache`` object the model
is called with (``DynamicCache`` as built by ``generate``, by effinfer's decode loop, or by the
user). So a new ``generate`` call (a new cache) starts from an empty state, a continuation with
the same cache continues it, a forward without a cache (``use_cache=False``: perplexity, training)
keeps no state, and two generations at once never share one. The layer reports the number of
tokens it has seen as its sequence length (``get_seq_length``/``get_mask_sizes``), so HF's
position and mask bookkeeping is right even when decoder layer 0 is replaced, and the remaining
softmax layers keep using the ordinary per-layer KV entries of the same cache. Its tensors are
ordinary attributes, so effinfer's cache-bytes measurement (``evaluation.metrics.memory``) counts
them: ``state_bytes`` per replaced layer is constant in context length.

**Padding.** Keys that the attention mask hides from every query (left padding in a batch) are
kept out of the state (their key features, write gates or step sizes are zero), so a padded row
gives what it gives alone.

**What cannot work, said up front.** A recurrent state cannot be rolled back: ``crop`` refuses
(speculative decoding's draft/verify rollbacks and token trees need per-token KV). The static
engine runs only stock attention: these techniques remove ``Feature.STOCK_ATTENTION`` and the
static engine hands such a model to the Hugging Face path with a warning (its layout check),
so a run never fails half-way. Fast GPU kernels (``flash-linear-attention``'s gated linear
attention, ``mamba-ssm``'s fused scan) are not wired in: they are CUDA/Triton-GPU builds and this
workplace has no GPU to check them against these plain-torch forms, which are the reference.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from transformers.cache_utils import DynamicLayer

from effinfer.core.errors import EffinferError

__all__ = ["AlternateConfig", "RecurrentCacheLayer", "RecurrentMixer", "RecurrentStateError", "apply_rope",
           "chosen_layers", "key_validity", "state_bytes", "state_layer"]


class RecurrentStateError(EffinferError, RuntimeError):
    """A use of a recurrent layer's state that cannot work (a rollback, a foreign cache)."""


# --------------------------------------------------------------------------- the state in the HF cache


class RecurrentCacheLayer(DynamicLayer):
    """One replaced layer's entry of an HF ``Cache``: a dict of constant-size state tensors and the
    count of tokens seen (what HF reads as this layer's sequence length)."""

    is_sliding = False
    is_croppable = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state: dict[str, torch.Tensor] = {}
        self.count = 0
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise RecurrentStateError("this decoder layer's attention was replaced by a recurrent layer; its cache "
                                  "entry holds a recurrent state, not keys and values")

    def get_seq_length(self) -> int:
        return self.count

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.count + query_length, 0

    def reset(self) -> None:
        self.state, self.count = {}, 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0 or self.count == 0:
            return
        raise RecurrentStateError(
            f"cannot remove {abs(tokens_to_remove)} token(s) from a recurrent layer's state: a constant-size state "
            "cannot be rolled back (speculative decoding and token trees need per-token KV); decode one token at "
            "a time with plain decoding")

    def _rows(self, function: Any) -> None:
        self.state = {name: function(tensor) for name, tensor in self.state.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rows(lambda t: t[indices])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())


def state_layer(cache: Any, layer_idx: int) -> RecurrentCacheLayer | None:
    """The :class:`RecurrentCacheLayer` of ``layer_idx`` in ``cache``, put in place on first use (``None``
    without a cache). A cache that already holds keys and values for this layer is refused."""
    if cache is None:
        return None
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        raise RecurrentStateError(f"a replaced attention layer keeps its state in a transformers Cache with a "
                                  f"`layers` list; got {type(cache).__name__} (KV-cache policies and custom caches "
                                  "cannot hold a recurrent state)")
    replicate = getattr(cache, "layer_class_to_replicate", None)
    while replicate is not None and len(layers) <= layer_idx:
        layers.append(replicate())
    if layer_idx >= len(layers):
        raise RecurrentStateError(f"the cache has {len(layers)} layers, none for decoder layer {layer_idx}")
    layer = layers[layer_idx]
    if isinstance(layer, RecurrentCacheLayer):
        return layer
    if layer.get_seq_length() > 0:
        raise RecurrentStateError(f"the cache already holds {layer.get_seq_length()} tokens of keys/values for "
                                  f"decoder layer {layer_idx}, whose attention is now a recurrent layer; start "
                                  "from a new cache")
    layers[layer_idx] = RecurrentCacheLayer()
    return layers[layer_idx]


def state_bytes(cache: Any) -> dict[str, int]:
    """``{"state": bytes of recurrent states, "kv": bytes of ordinary keys/values}`` held by an HF cache."""
    state = kv = 0
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, RecurrentCacheLayer):
            state += layer.nbytes()
        else:
            kv += sum(t.numel() * t.element_size() for t in (getattr(layer, "keys", None),
                                                            getattr(layer, "values", None))
                      if isinstance(t, torch.Tensor))
    return {"state": state, "kv": kv}


# --------------------------------------------------------------------------- helpers of the call


def key_validity(attention_mask: Any, length: int) -> torch.Tensor | None:
    """Which of the last ``length`` keys some query may see (``B × length`` bool), from the 4-D mask
    the model hands its attention (bool or additive float); ``None``: all of them."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        raise RecurrentStateError(f"recurrent layers read padding from a 4-D attention mask tensor; got "
                                  f"{type(attention_mask).__name__} (use the eager or sdpa attention implementation)")
    mask = attention_mask[..., -length:]
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    valid = allowed.any(dim=1).any(dim=1)
    return None if bool(valid.all()) else valid


def apply_rope(x: torch.Tensor, position_embeddings: Any) -> torch.Tensor:
    """Rotary embedding of ``x`` (``B × H × T × d``) with the model's ``(cos, sin)`` (``B × T × d``)."""
    if position_embeddings is None:
        return x
    cos, sin = (t.unsqueeze(1).to(x.dtype) for t in position_embeddings)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``B × Hkv × …`` → ``B × Hkv·groups × …`` (each KV head serves ``groups`` query heads)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


class RecurrentMixer(nn.Module):
    """Base class of a replacement of ``self_attn`` with a constant-size state (see the module docstring).

    A subclass implements :meth:`features` (per-token tensors, time on dim 2, from the layer input),
    :meth:`parallel` (a chunk of features + the incoming state → outputs + the outgoing state),
    :meth:`step` (one token, recurrent form; default: :meth:`parallel` on one token) and
    :meth:`output` (outputs → the layer's output).
    """

    #: the name reported in errors and notes
    kind = "recurrent"

    def __init__(self, attention: nn.Module, config: Any, layer_idx: int, chunk_size: int = 128) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.chunk_size = chunk_size
        self.head_dim = int(getattr(attention, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.groups = self.num_heads // self.num_kv_heads
        self.scaling = float(getattr(attention, "scaling", self.head_dim ** -0.5))
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not isinstance(getattr(attention, name, None), nn.Module):
                raise EffinferError(f"{self.kind}: the attention of decoder layer {layer_idx} "
                                    f"({type(attention).__name__}) has no {name}; only Llama-style q/k/v/o "
                                    "projections (Llama, Qwen2, Gemma 3) can be converted")
            setattr(self, name, copy.deepcopy(getattr(attention, name)))
        # Gemma 3 normalizes queries and keys per head before the rotary embedding
        self.q_norm = copy.deepcopy(attention.q_norm) if isinstance(getattr(attention, "q_norm", None),
                                                                   nn.Module) else None
        self.k_norm = copy.deepcopy(attention.k_norm) if isinstance(getattr(attention, "k_norm", None),
                                                                   nn.Module) else None

    # -- the projections of the attention, per head
    def heads(self, x: torch.Tensor, rope: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries ``B × H × T × d``, keys and values ``B × Hkv × T × d`` (rotary applied when ``rope``)."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return apply_rope(q, rope), apply_rope(k, rope), v

    # -- to implement
    def new_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters this replacement adds (what the fit and the repair train by default)."""
        raise NotImplementedError

    def features(self, x: torch.Tensor, rope: Any, valid: torch.Tensor | None, state: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def parallel(self, feats: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def step(self, feats: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.parallel(feats, state)

    def output(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``B × H × T × d`` → ``B × T × hidden`` through the output projection."""
        return self.o_proj(y.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))

    # -- the forms
    def mix(self, x: torch.Tensor, rope: Any = None, valid: torch.Tensor | None = None,
            state: dict[str, torch.Tensor] | None = None, form: str = "auto"
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The layer's output for ``x`` (``B × T × hidden``) after ``state``, and the state after it.

        ``form``: ``"parallel"`` (chunked matrix form), ``"recurrent"`` (one token at a time) or
        ``"auto"`` (recurrent for a one-token call with a state, parallel otherwise).
        """
        state = dict(state or {})
        length = x.shape[1]
        if form == "auto":
            form = "recurrent" if length == 1 and state else "parallel"
        feats = self.features(x, rope, valid, state)
        size = 1 if form == "recurrent" else self.chunk_size
        outputs = []
        for start in range(0, length, size):
            chunk = {name: value[:, :, start:start + size] for name, value in feats.items()}
            y, state = (self.step if form == "recurrent" else self.parallel)(chunk, state)
            outputs.append(y)
        return self.output(torch.cat(outputs, dim=2), x), state

    def forward(self, hidden_states: torch.Tensor, position_embeddings: Any = None, attention_mask: Any = None,
                cache: Any = None, past_key_values: Any = None, use_cache: bool | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
        cache = cache if cache is not None else past_key_values
        layer = state_layer(cache, self.layer_idx) if use_cache is not False else None
        valid = key_validity(attention_mask, hidden_states.shape[1])
        out, state = self.mix(hidden_states, position_embeddings, valid, layer.state if layer else None)
        if layer is not None:
            layer.state = {name: value.detach() for name, value in state.items()}
            layer.count += hidden_states.shape[1]
        return out, None

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, " \
               f"head_dim={self.head_dim}, chunk_size={self.chunk_size}"


def masked(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``x`` (``B × H × T × …``) with the positions of hidden keys zeroed."""
    if valid is None:
        return x
    shape = (valid.shape[0], 1, valid.shape[1]) + (1,) * (x.dim() - 3)
    return x * valid.view(shape).to(x.dtype)


# --------------------------------------------------------------------------- config and layer choice


class AlternateConfig(BaseModel):
    """Which attention layers to replace (inherited by the three techniques' configs)."""

    model_config = ConfigDict(extra="forbid")

    layers: list[int] | None = Field(None, description="indices of the decoder layers whose attention is replaced "
                                                       "(None: `count` layers spread evenly, never layer 0)")
    count: int = Field(2, ge=0, le=1024, description="how many attention layers to replace when `layers` is None "
                                                     "(0: none; the model stays the original)")
    chunk_size: int = Field(128, ge=1, le=8192, description="tokens per chunk of the parallel form (memory "
                                                            "O(chunk · (chunk + window)) per layer)")
    train_projections: bool = Field(False, description="also train the copied q/k/v/o projections in the repair "
                                                       "(else only the new parameters: feature maps, decays, "
                                                       "norms)")

    @field_validator("layers")
    @classmethod
    def _distinct(cls, value: list[int] | None) -> list[int] | None:
        if value is not None:
            if any(i < 0 for i in value):
                raise ValueError(f"layers: indices must be ≥ 0, got {value}")
            if len(set(value)) != len(value):
                raise ValueError(f"layers: each index once, got {value}")
        return value


def chosen_layers(config: AlternateConfig, total: int) -> list[int]:
    """The decoder layers to replace (explicit ``layers`` or ``count`` spread evenly over 1 … total−1)."""
    if config.layers is not None:
        wrong = [i for i in config.layers if i >= total]
        if wrong:
            raise EffinferError(f"layers: {wrong} out of range; the model has {total} decoder layers (0 … {total - 1})")
        return sorted(config.layers)
    if config.count > total:
        raise EffinferError(f"count={config.count} but the model has {total} decoder layers; use count ≤ {total}")
    if config.count == total:
        return list(range(total))
    return sorted({round((k + 1) * total / (config.count + 1)) for k in range(config.count)})


def config_problems(config: AlternateConfig, model_config: Any) -> list[str]:
    """What in ``config`` does not fit a model with this HF config (for ``check_model_config``)."""
    total = getattr(model_config, "num_hidden_layers", None)
    if not isinstance(total, int):
        return []
    try:
        chosen_layers(config, total)
    except EffinferError as error:
        return [str(error)]
    return []


def replace_layers(layers: Sequence[nn.Module], indices: Sequence[int], build: Any, conversion: Any
                   ) -> list[tuple[int, nn.Module, nn.Module]]:
    """Put ``build(attention, index)`` at ``self_attn`` of each chosen decoder layer through ``conversion``
    (a :class:`~effinfer.plugins.model.structure.repair.Conversion`); ``(index, original, new)`` each."""
    swapped = []
    for index in indices:
        attention = getattr(layers[index], "self_attn", None)
        if attention is None:
            raise EffinferError(f"decoder layer {index} ({type(layers[index]).__name__}) has no self_attn")
        if getattr(attention, "attn_logit_softcapping", None):
            raise EffinferError(f"decoder layer {index}: attention logit soft-capping is not mimicked by recurrent "
                                "layers; use a model without it")
        new = build(attention, index)
        new.to(device=next(attention.parameters()).device, dtype=next(attention.parameters()).dtype)
        conversion.replace_module(layers[index], "self_attn", new)
        swapped.append((index, attention, new))
    return swapped
