"""Composition: one fresh pluggy ``PluginManager`` per experiment, stages in order.

::

    with ComposedModel(model, tokenizer, techniques) as composed:
        completions = composed.generate([Request.from_text("Hi!")], GenerationConfig())
    # here every module a technique swapped through the patcher is back in place
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pluggy
import torch
from torch import nn

from effinfer.core.generation import GenerationConfig, GenerationResult, encode_prompts, stop_token_ids
from effinfer.core.hookspecs import PROJECT, StageSpecs
from effinfer.core.registry import Registry, get_registry
from effinfer.core.stages import DataStage, ModelStage, ModulePatcher, Request, SystemStage
from effinfer.core.technique import Technique


@dataclass
class Completion:
    request: Request
    text: str
    tokens: list[int]
    prompt_tokens: int


@dataclass
class StageReport:
    """What each technique did, per level, in the order it happened."""

    entries: list[tuple[str, str, str]] = field(default_factory=list)  # (level, technique, note)

    def collect(self, level: str, techniques: Sequence[Technique]) -> None:
        for technique in techniques:
            self.entries += [(level, technique.name, note) for note in technique.notes]
            technique.notes.clear()


def default_strategy(engine: str = "static", compile: bool = False, registry: Registry | None = None) -> Any:
    """The decode loop used when no technique offers one: the registered engine called ``engine``."""
    return (registry or get_registry()).engine(engine).factory(compile=compile)


class ComposedModel:
    """A model with a technique stack applied; a context manager that undoes it on exit."""

    def __init__(self, model: nn.Module, tokenizer: Any, techniques: Sequence[Technique] = (),
                 calibration: Callable[[int, int], torch.Tensor] | None = None,
                 keep_originals: bool = True, engine: str = "static", compile: bool = False,
                 registry: Registry | None = None) -> None:
        self.tokenizer = tokenizer
        self.techniques = list(techniques)
        self.report = StageReport()
        self.patcher = ModulePatcher(keep_originals=keep_originals)
        self._calibration = calibration
        self._original_model = model
        self.model = model
        self.manager = pluggy.PluginManager(PROJECT)
        self.manager.add_hookspecs(StageSpecs)
        # pluggy calls the most recently registered implementation first, so register
        # in reverse to have the stack run in the order the user wrote it.
        for technique in reversed(self.techniques):
            self.manager.register(technique, name=technique.name)
        self.engine_options = {"engine": engine, "compile": compile}
        self.strategy: Any = default_strategy(engine, compile, registry)
        self.system: SystemStage | None = None

    def __enter__(self) -> ComposedModel:
        self.apply()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def apply(self) -> None:
        """Run the model-level then the system-level stage."""
        stage = ModelStage(self.model, self.tokenizer, self.patcher, self._calibration)
        self.manager.hook.effinfer_transform_model(stage=stage)
        self.model = stage.model
        self.report.collect("model", self.techniques)

        self.system = SystemStage(self.model, self.tokenizer, extras={"engine": dict(self.engine_options)})
        self.manager.hook.effinfer_configure_system(stage=self.system)
        strategy = self.manager.hook.effinfer_decoding_strategy(stage=self.system)
        if strategy is not None:
            self.strategy = strategy
        self.report.collect("system", self.techniques)

    def restore(self) -> None:
        if self.patcher.keep_originals:
            self.patcher.restore()
            self.model = self._original_model
        for technique in self.techniques:
            self.manager.unregister(technique)

    def transform_request(self, request: Request) -> Request:
        """Run the data-level stage on one request (a transformed copy is returned)."""
        request = Request([dict(m) for m in request.messages], list(request.documents), dict(request.metadata))
        self.manager.hook.effinfer_transform_request(request=request, stage=DataStage(self.model, self.tokenizer))
        self.report.collect("data", self.techniques)
        return request

    def generate(self, requests: Sequence[Request | str], config: GenerationConfig | None = None
                 ) -> tuple[list[Completion], GenerationResult]:
        """Data stage, then the decoding strategy, on a batch of requests."""
        config = config or GenerationConfig()
        requests = [Request.from_text(r) if isinstance(r, str) else r for r in requests]
        transformed = [self.transform_request(r) for r in requests]
        conversations = [r.render() for r in transformed]
        device = next(self.model.parameters()).device
        input_ids, mask = encode_prompts(self.tokenizer, conversations, config.chat_template, device)
        result = self.strategy.generate(self.model, input_ids, mask, config,
                                        stop_token_ids(self.tokenizer, self.model, config),
                                        cache_factory=self.system.cache_factory if self.system else None)
        completions = [
            Completion(request, self.tokenizer.decode(tokens, skip_special_tokens=True), tokens,
                       int(mask[i].sum()))
            for i, (request, tokens) in enumerate(zip(transformed, result.sequences))
        ]
        return completions, result
