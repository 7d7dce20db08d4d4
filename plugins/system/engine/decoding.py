"""Plain decoding on the static engine: the default decoding strategy of experiments.

Same contract and same tokens as the core's :class:`~effinfer.core.generation.PlainDecoding`
(Hugging Face forward over a ``DynamicCache``, kept as the reference path): batches with
left padding, greedy or seeded sampling with the same generator calls, stop tokens. The
per-token Python work is one call of the (optionally compiled) decode step, one token
selection and one stop check.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from effinfer.core.generation import (GenerationConfig, GenerationResult, PlainDecoding, make_generator,
                                      select_tokens)
from effinfer.core.kv_cache import PolicyCache
from effinfer.plugins.system.engine.policy import policy_decode, policy_prefill

if TYPE_CHECKING:
    from effinfer.plugins.system.engine.engine import Engine
    from effinfer.plugins.system.engine.static import StaticEngine


class StaticDecoding:
    """One compiled-or-eager decode step per token over a static KV cache."""

    name = "static"

    def __init__(self, engine: StaticEngine | None = None) -> None:
        from effinfer.plugins.system.engine.static import StaticEngine

        self.engine = engine or StaticEngine()

    def generate(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 config: GenerationConfig, stop_ids: set[int],
                 cache_factory: Callable[[nn.Module], Any] | None = None) -> GenerationResult:
        engine, probe = self.engine.engine_for(model, cache_factory, policy=True)
        if engine is None:
            return PlainDecoding().generate(model, input_ids, attention_mask, config, stop_ids,
                                            cache_factory=(lambda _: probe) if probe is not None else None)
        if isinstance(probe, PolicyCache):
            return self._generate_policy(engine, probe, input_ids, attention_mask, config, stop_ids)
        batch, prompt = input_ids.shape
        cache = engine.cache_for(batch, prompt + config.max_new_tokens, name="plain")
        if probe is not None:
            probe.static_kv = cache  # lets a recording cache factory count the static buffers
        return decode_loop(lambda: engine.prefill(cache, input_ids, attention_mask).logits[:, -1],
                           lambda tokens: engine.decode(cache, tokens), input_ids, config, stop_ids)

    def _generate_policy(self, engine: Engine, cache: PolicyCache, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor, config: GenerationConfig, stop_ids: set[int]
                         ) -> GenerationResult:
        """The same loop over a technique's KV policy (:mod:`.policy`), eager."""
        state: list[Any] = []

        def prefill() -> torch.Tensor:
            found, out = policy_prefill(engine.layout, cache, input_ids, attention_mask)
            state.append(found)
            return out.logits[:, -1]

        return decode_loop(prefill, lambda tokens: policy_decode(engine.layout, state[0], tokens), input_ids,
                           config, stop_ids)


def decode_loop(prefill: Callable[[], torch.Tensor], decode: Callable[[torch.Tensor], torch.Tensor],
                input_ids: torch.Tensor, config: GenerationConfig, stop_ids: set[int]) -> GenerationResult:
    """Prefill, then one token selection, stop check and ``decode`` step per new token; timed apart."""
    generator = make_generator(config, input_ids.device)
    started = time.perf_counter()
    logits = prefill()
    prefill_done = time.perf_counter()
    chosen: list[list[int]] = []  # per step, each row's token: the stop check stays in Python, off the torch path
    finished = [False] * input_ids.shape[0]
    for step in range(config.max_new_tokens):
        tokens = select_tokens(logits, config, generator)
        chosen.append(tokens.tolist())
        finished = [done or token in stop_ids for done, token in zip(finished, chosen[-1])]
        if step == config.max_new_tokens - 1 or all(finished):
            break
        logits = decode(tokens)
    done = time.perf_counter()
    return GenerationResult(cut_at_stop([list(row) for row in zip(*chosen)], stop_ids),
                            prefill_done - started, done - prefill_done, len(chosen) - 1)


def cut_at_stop(rows: list[list[int]], stop_ids: set[int]) -> list[list[int]]:
    """Each row up to and including its first stop token."""
    out = []
    for row in rows:
        end = next((i + 1 for i, token in enumerate(row) if token in stop_ids), len(row))
        out.append(row[:end])
    return out
