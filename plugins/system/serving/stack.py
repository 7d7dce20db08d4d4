"""From an experiment (model + technique stack) to a serving engine.

The model-level techniques of the stack transform the model (quantized weights are then
served); the serving techniques (``paged_kv``, ``continuous_batching`` / ``static_batching``,
``fcfs`` / ``sjf`` / ``priority``) choose the engine and its policies. A stack whose
decoding strategy replaces plain decoding (speculative decoding) is served one request at
a time through that strategy (:class:`StrategyEngine`): batching and paging do not apply
to it, and the server says so at start.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from effinfer.core.compose import ComposedModel, compose_stack
from effinfer.core.experiment import Experiment
from effinfer.core.generation import GenerationConfig, adopt_context_limit, stop_token_ids
from effinfer.core.models import load_model
from effinfer.core.runner import apply_runtime, check_source_layout
from effinfer.plugins.system.serving.engine import (BaseEngine, EngineConfig, ServeRequest, build_engine)
from effinfer.plugins.system.serving.forward import UnsupportedModel
from effinfer.plugins.system.serving.scheduling import Scheduler
from effinfer.plugins.system.serving.techniques import serving_policy


class StrategyEngine(BaseEngine):
    """One request at a time through the stack's decoding strategy (e.g. speculative decoding)."""

    name = "strategy"

    def __init__(self, composed: ComposedModel, config: EngineConfig, scheduler: Scheduler,
                 eos_ids: set[int]) -> None:
        super().__init__(composed.model, config, scheduler, eos_ids)
        self.composed = composed

    def step(self) -> int:
        self._drain()
        if not self.waiting:
            return 0
        request = self.scheduler.order(self.waiting, time.perf_counter())[0]
        self.waiting.remove(request)
        self.running.append(request)
        request.status, request.admitted = "running", time.perf_counter()
        config = GenerationConfig(max_new_tokens=request.max_tokens, do_sample=request.temperature > 0,
                                  temperature=max(request.temperature, 1e-3), top_p=max(request.top_p, 1e-3),
                                  seed=request.seed or 0, stop_token_ids=sorted(request.stop_ids))
        ids = torch.tensor([request.prompt], device=self.device)
        stops = set() if request.ignore_eos else self.eos_ids
        result = self.composed.strategy.generate(self.composed.model, ids, torch.ones_like(ids), config,
                                                 stops | set(request.stop_ids),
                                                 cache_factory=self.composed.system.cache_factory)
        now = time.perf_counter()
        for token in result.sequences[0]:
            if request.status != "running":
                break
            self._emit(request, token, now)
        if request.status == "running":
            self._finish(request, "length")
        return len(request.prompt) + len(result.sequences[0])


@dataclass
class Served:
    """What ``effinfer serve`` runs: the engine, the tokenizer and how it was set up."""

    engine: BaseEngine
    tokenizer: Any
    model_name: str
    composed: ComposedModel
    description: str


def eos_ids(tokenizer: Any, model: nn.Module) -> set[int]:
    return stop_token_ids(tokenizer, model, GenerationConfig())


def build_served(experiment: Experiment, model: nn.Module | None = None, tokenizer: Any = None) -> Served:
    """Check the stack (before loading), load the model, apply the stack, build the engine."""
    if model is None:
        techniques = experiment.preflight()
        check_source_layout(techniques, experiment.model)
        apply_runtime(experiment)
        model, tokenizer = load_model(experiment.model, experiment.runtime.dtype, experiment.runtime.device)
        adopt_context_limit(tokenizer, model)
    else:
        techniques = experiment.build_stack()
    composed = compose_stack(model, tokenizer, techniques, experiment.runtime)
    composed.apply()
    kind, config, scheduler = serving_policy(composed.system.extras.get("serving"))
    eos = eos_ids(tokenizer, composed.model)
    strategy_techniques = [t.name for t in techniques if t.is_decoding_strategy()]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if strategy_techniques:
        warnings.warn(f"{strategy_techniques[0]} replaces plain decoding: requests are served one at a time through "
                      "it (continuous batching and the paged KV cache do not apply)", RuntimeWarning, stacklevel=2)
        engine: BaseEngine = StrategyEngine(composed, config, scheduler, eos)
    else:
        try:
            engine = build_engine(kind, composed.model, config, scheduler, eos, pad)
        except UnsupportedModel as error:
            raise UnsupportedModel(f"the continuous-batching engine cannot run this model ({error}); serve it with "
                                   "the static_batching technique instead") from None
    stack = ", ".join(t.name for t in techniques) or "none"
    return Served(engine, tokenizer, experiment.model, composed,
                  f"model {experiment.model}, stack [{stack}], engine {engine.name}, scheduler "
                  f"{engine.scheduler.name}")


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat (the tokenizer's chat template, or the contents joined when it has none)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return encode_text(tokenizer, "\n".join(m["content"] for m in messages))


def encode_text(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def make_request(request_id: str, prompt: list[int], **options: Any) -> ServeRequest:
    return ServeRequest(request_id, prompt, **options)
