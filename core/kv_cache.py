"""KV-cache policies: the public interface through which a technique decides what the KV cache holds.

A *policy* is one small object per attention layer that receives the new keys and values of
every forward and decides what to store, how (full precision, packed integers) and what to
evict. The interface is three methods::

    class MyPolicy(KVPolicy):
        def update(self, keys, values, queries=None):
            # keys/values: B × kv_heads × k × head_dim (RoPE applied), the k new entries
            # return the keys and values the k queries attend to now (stored ones, then the
            # new ones, in the model's dtype), and keep what the next forward should see
            ...
        def __len__(self): ...          # entries stored (the same on every layer)
        def nbytes(self): ...           # bytes really held

plus ``crop(count)`` (drop the newest entries: speculative roll-back) where the policy can.
A policy whose class sets ``needs_queries = True`` also receives the scaled, rotated queries
of the forward (``B × heads × k × head_dim``) to score entries (H2O, SnapKV, TOVA).

A technique hands its policy to the experiment in ``effinfer_configure_system``::

    @hookimpl
    def effinfer_configure_system(self, stage):
        use_kv_policy(stage, lambda layer, config: MyPolicy(...), owner=self.name)

:func:`use_kv_policy` puts a cache factory on ``stage.cache_factory`` that builds a
:class:`PolicyCache` — a transformers ``Cache`` subclass, so it is what HF ``generate``,
the core's HF engine, perplexity and every decoding strategy use. Sliding-window layers
(Gemma 3's local layers) keep transformers' own bounded window; the policy runs on the
global layers. The static engine steps aside for a policy cache (its fixed buffers hold the
full cache), with a warning naming the policy.

Eviction with a left-padded batch: a policy that evicts (``evicts = True``) stores fewer
entries than positions, so the 2-D padding mask no longer lines up with its columns; such a
policy runs batches of equal-length prompts (or batch 1) and refuses padded batches.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

#: ``policy_factory(layer_index, text_config) -> KVPolicy``
PolicyFactory = Callable[[int, Any], "KVPolicy"]


class KVPolicy:
    """One layer's KV store (see the module docstring). The base class keeps everything, in full precision."""

    name: ClassVar[str] = "full"
    #: receives the forward's queries in :meth:`update` (score-based eviction)
    needs_queries: ClassVar[bool] = False
    #: may store fewer entries than positions seen (refuses left-padded batches)
    evicts: ClassVar[bool] = False

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        #: positions fed so far (what transformers calls the sequence length)
        self.seen = 0

    def update(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys = keys if self.keys is None else torch.cat([self.keys, keys], dim=-2)
        self.values = values if self.values is None else torch.cat([self.values, values], dim=-2)
        self.seen += keys.shape[-2]
        return self.keys, self.values

    def __len__(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def stored_before(self, new: int) -> int:
        """Stored entries a forward of ``new`` tokens attends to besides its own (for the attention mask)."""
        return len(self)

    def crop(self, count: int) -> None:
        """Drop the ``count`` newest entries (a policy that cannot raises ``NotImplementedError``)."""
        if count <= 0 or self.keys is None:
            return
        if count > len(self):
            raise ValueError(f"cannot crop {count} entries from a cache of {len(self)}")
        self.keys, self.values = self.keys[..., :-count, :], self.values[..., :-count, :]
        self.seen -= count

    def nbytes(self) -> int:
        """Bytes of the tensors this policy holds."""
        return sum(t.untyped_storage().nbytes() for t in vars(self).values() if isinstance(t, torch.Tensor))

    def reset(self) -> None:
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor):
                setattr(self, name, None)
        self.seen = 0


class PolicyLayer(CacheLayerMixin):
    """A transformers cache layer backed by a :class:`KVPolicy`."""

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(self, policy: KVPolicy) -> None:
        super().__init__()
        self.policy = policy
        #: scaled rotated queries of the running forward (set by the attention pre-hook, consumed by update)
        self.pending_query: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        queries, self.pending_query = self.pending_query, None
        if self.policy.needs_queries and queries is None:
            raise RuntimeError(f"the {self.policy.name} KV policy needs the queries, but no attention pre-hook "
                               "delivered them: build the cache with policy_cache(...)(model)")
        return self.policy.update(key_states, value_states, queries)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.policy.stored_before(query_length)
        return stored + query_length, self.policy.seen - stored

    def get_seq_length(self) -> int:
        return self.policy.seen

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:  # the legacy form: the length to keep
            tokens_to_remove = tokens_to_remove - self.policy.seen
        self.policy.crop(-tokens_to_remove)

    def reset(self) -> None:
        self.policy.reset()
        self.pending_query = None

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a KV policy cache does not support beam search")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a KV policy cache does not support beam search")

    def offload(self) -> None:  # the policy owns its tensors
        pass

    def prefetch(self) -> None:
        pass


class PolicyCache(Cache):
    """A transformers ``Cache`` whose global-attention layers are :class:`PolicyLayer` s."""

    def __init__(self, model: nn.Module, factory: PolicyFactory, name: str = "policy") -> None:
        config = model.config.get_text_config(decoder=True)
        kinds = list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
        layers: list[CacheLayerMixin] = []
        for index, kind in enumerate(kinds):
            if kind == "sliding_attention":
                layers.append(DynamicSlidingWindowLayer(sliding_window=config.sliding_window))
            else:
                layers.append(PolicyLayer(factory(index, config)))
        super().__init__(layers=layers)
        self.name = name
        self.needs_queries = any(isinstance(layer, PolicyLayer) and layer.policy.needs_queries for layer in layers)
        self.evicts = any(isinstance(layer, PolicyLayer) and layer.policy.evicts for layer in layers)
        install_hooks(model)

    def policies(self) -> list[KVPolicy]:
        return [layer.policy for layer in self.layers if isinstance(layer, PolicyLayer)]

    def nbytes(self) -> int:
        """Bytes held by every layer (policies, and sliding-window layers' tensors)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, PolicyLayer):
                total += layer.policy.nbytes()
            elif getattr(layer, "keys", None) is not None and layer.keys.numel():
                total += layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes()
        return total

    def __repr__(self) -> str:
        return f"PolicyCache({self.name}, {len(self.layers)} layers)"


def policy_cache(factory: PolicyFactory, name: str = "policy") -> Callable[[nn.Module], PolicyCache]:
    """A cache factory (``model -> PolicyCache``) for ``SystemStage.cache_factory``."""

    def build(model: nn.Module) -> PolicyCache:
        return PolicyCache(model, factory, name)

    build.policy_name = name  # type: ignore[attr-defined]
    return build


def use_kv_policy(stage: Any, factory: PolicyFactory, owner: str) -> None:
    """Make ``factory``'s policy the stack's KV cache (``stage`` is the :class:`SystemStage`).

    A stack has one KV cache: a second technique that sets one is refused, naming both.
    """
    current = stage.extras.get("kv_policy")
    if current is not None and current != owner:
        raise ValueError(f"{owner} and {current} both provide the KV cache; a stack holds one KV-cache "
                         "policy: keep one of them")
    if stage.cache_factory is not None and current is None:
        raise ValueError(f"{owner} provides the KV cache, but another technique of the stack already set "
                         "a cache factory: keep one of them")
    stage.extras["kv_policy"] = owner
    stage.cache_factory = policy_cache(factory, owner)


# ---------------------------------------------------------------------- hooks

_HOOKED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _cache_of(kwargs: dict[str, Any]) -> Any:
    return kwargs.get("cache", kwargs.get("past_key_values"))


def _attention_pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    cache = _cache_of(kwargs)
    if not isinstance(cache, PolicyCache) or not cache.needs_queries:
        return
    layer = cache.layers[module.layer_idx]
    if not isinstance(layer, PolicyLayer) or not layer.policy.needs_queries:
        return
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    cos, sin = kwargs["position_embeddings"]
    batch, length, _ = hidden.shape
    query = module.q_proj(hidden).view(batch, length, -1, module.head_dim).transpose(1, 2)
    if hasattr(module, "q_norm"):
        query = module.q_norm(query)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    layer.pending_query = (query * cos + rotate_half(query) * sin) * module.scaling


def _decoder_pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    cache = _cache_of(kwargs)
    mask = kwargs.get("attention_mask")
    if isinstance(cache, PolicyCache) and cache.evicts and isinstance(mask, torch.Tensor) and mask.dim() == 2 \
            and not bool(mask.bool().all()):
        raise ValueError(f"the {cache.name} KV policy evicts entries, which a left-padded batch cannot mask: "
                         "run prompts one at a time (batch 1) or of equal length")


def install_hooks(model: nn.Module) -> None:
    """Attention pre-hooks that hand the queries to policies needing them, and a padding check
    (once per model; inert for any other cache)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    if decoder in _HOOKED:
        return
    decoder.register_forward_pre_hook(_decoder_pre_hook, with_kwargs=True)
    for layer in getattr(decoder, "layers", []):
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "q_proj"):
            attention.register_forward_pre_hook(_attention_pre_hook, with_kwargs=True)
    _HOOKED.add(decoder)


def attention_scores(queries: torch.Tensor, keys: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Softmax attention weights summed over the queries and over each KV head's query heads.

    ``queries`` (``B × heads × k × d``, scaled) are the last ``k`` positions of the ``n`` keys
    (``B × kv_heads × n × d``), causal among themselves; returns ``B × kv_heads × n`` (fp32).
    Computed in chunks of queries so a long prefill does not hold a ``k × n`` matrix per head.
    """
    batch, heads, k, dim = queries.shape
    kv_heads, n = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    grouped = queries.float().view(batch, kv_heads, group, k, dim)
    keys32 = keys.float()
    total = keys.new_zeros(batch, kv_heads, n, dtype=torch.float32)
    columns = torch.arange(n, device=keys.device)
    for start in range(0, k, chunk):
        part = grouped[:, :, :, start:start + chunk]
        logits = torch.einsum("bhgqd,bhnd->bhgqn", part, keys32)
        rows = torch.arange(start, start + part.shape[3], device=keys.device) + (n - k)
        logits = logits.masked_fill(columns[None, :] > rows[:, None], float("-inf"))
        total += logits.softmax(-1).sum(dim=(2, 3))
    return total
