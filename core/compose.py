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

from effinfer.core.calibration import calibration_source
from effinfer.core.engines import CacheFactory, DecodeEngine
from effinfer.core.errors import EffinferError
from effinfer.core.experiment import Runtime, TechniqueSpec, resolve_stack
from effinfer.core.generation import (GenerationConfig, GenerationResult, context_limit, encode_prompts,
                                      stop_token_ids)
from effinfer.core.hookspecs import PROJECT, StageSpecs
from effinfer.core.registry import Registry, get_registry
from effinfer.core.stages import DataStage, ModelStage, ModulePatcher, Request, SystemStage
from effinfer.core.technique import Requirement, Technique, layout_problems

#: what ``wrap_cache_factory`` receives and returns: the stack's cache factory (``None``: the default cache)
CacheFactoryWrapper = Callable[[CacheFactory], CacheFactory]


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


def make_engine(name: str | None = None, compile: bool = False, registry: Registry | None = None) -> DecodeEngine:
    """The registered engine called ``name`` (``None``: the default of ``runtime.engine``), built with ``compile``."""
    name = name or Runtime.model_fields["engine"].default
    entry = (registry or get_registry()).engine(name)
    engine = entry.factory(compile=compile)
    if not isinstance(engine, DecodeEngine):
        raise EffinferError(
            f"engine {name!r} (distribution {entry.distribution}) is broken: its factory returned "
            f"{type(engine).__name__}, not an effinfer.core.engines.DecodeEngine; register a factory that "
            "returns a DecodeEngine subclass instance")
    return engine


class ComposedModel:
    """A model with a technique stack applied; a context manager that undoes it on exit.

    ``engine`` is a :class:`~effinfer.core.engines.DecodeEngine` or a registered engine name
    (``None``: ``runtime.engine``'s default). ``wrap_cache_factory`` is applied to the stack's
    cache factory once the techniques have configured the system stage, before the decoding
    strategy is chosen (the evaluator records the caches built that way);
    :attr:`stack_cache_factory` keeps the stack's own.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, techniques: Sequence[Technique] = (),
                 calibration: Callable[[int, int], torch.Tensor] | None = None,
                 keep_originals: bool = True, engine: DecodeEngine | str | None = None, compile: bool = False,
                 registry: Registry | None = None, wrap_cache_factory: CacheFactoryWrapper | None = None) -> None:
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
        self.engine = engine if isinstance(engine, DecodeEngine) else make_engine(engine, compile, registry)
        self.wrap_cache_factory = wrap_cache_factory
        self.strategy: Any = self.engine.decoding()
        self.system: SystemStage | None = None
        self.stack_cache_factory: CacheFactory = None

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

        self.system = SystemStage(self.model, self.tokenizer, engine=self.engine)
        self.manager.hook.effinfer_configure_system(stage=self.system)
        self.stack_cache_factory = self.system.cache_factory
        if self.wrap_cache_factory is not None:
            self.system.cache_factory = self.wrap_cache_factory(self.stack_cache_factory)
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
        """Data stage, then the decoding strategy, on a batch of requests.

        A prompt longer than the model's context (:func:`prompt_limit`) is refused with
        :class:`~effinfer.core.generation.PromptTooLongError` before any prefill, as on the CLI.
        """
        config = config or GenerationConfig()
        requests = [Request.from_text(r) if isinstance(r, str) else r for r in requests]
        transformed = [self.transform_request(r) for r in requests]
        conversations = [r.render() for r in transformed]
        device = next(self.model.parameters()).device
        input_ids, mask = encode_prompts(self.tokenizer, conversations, config.chat_template, device,
                                         max_tokens=prompt_limit(self.tokenizer, self.model))
        result = self.strategy.generate(self.model, input_ids, mask, config,
                                        stop_token_ids(self.tokenizer, self.model, config),
                                        cache_factory=self.system.cache_factory if self.system else None)
        completions = [
            Completion(request, self.tokenizer.decode(tokens, skip_special_tokens=True), tokens,
                       int(mask[i].sum()))
            for i, (request, tokens) in enumerate(zip(transformed, result.sequences))
        ]
        return completions, result


def prompt_limit(tokenizer: Any, model: nn.Module) -> int | None:
    """The longest prompt ``model`` takes: the smaller of the tokenizer's real ``model_max_length``
    and the model's ``max_position_embeddings`` (either alone when the other says nothing: GGUF
    conversions declare no tokenizer limit). What the CLI checks after ``adopt_context_limit``."""
    limits = [n for n in (context_limit(tokenizer), context_limit(None, model)) if n is not None]
    return min(limits, default=None)


def compose_stack(model: nn.Module, tokenizer: Any, stack: Sequence[Technique | TechniqueSpec | str],
                  runtime: Runtime | None = None, *, registry: Registry | None = None, keep_originals: bool = True,
                  wrap_cache_factory: CacheFactoryWrapper | None = None) -> ComposedModel:
    """The one set-up path: resolve the stack, check it against the loaded model's layout, give it
    a calibration source if a technique requires one, and compose it on the runtime's engine.

    ``stack`` holds techniques (already resolved) or specs (``"rtn:bits=4"``, resolved here
    with every problem reported at once). The result is not applied yet: use it as a context
    manager, or call ``apply()`` and ``restore()``. ``keep_originals=False`` consumes the model
    (the originals are freed); ``wrap_cache_factory`` wraps the stack's cache factory (see
    :class:`ComposedModel`). Used by ``run_experiment``, the evaluator and the draft of
    ``draft_model``.
    """
    runtime = runtime or Runtime()
    registry = registry or get_registry()
    if all(isinstance(item, Technique) for item in stack):
        techniques = list(stack)
    else:
        specs = [item if isinstance(item, TechniqueSpec) else TechniqueSpec.model_validate(item) for item in stack]
        techniques = resolve_stack(specs, runtime, registry)
    config = getattr(model, "config", None)
    problems = layout_problems(techniques, getattr(config, "model_type", None))
    problems += [f"{t.name}: {problem}" for t in techniques for problem in t.check_model_config(config) or []]
    if problems:
        raise EffinferError("; ".join(problems))
    needs_calibration = any(Requirement.CALIBRATION_DATA in t.requires for t in techniques)
    calibration = calibration_source(tokenizer, runtime.seed) if needs_calibration else None
    return ComposedModel(model, tokenizer, techniques, calibration=calibration, keep_originals=keep_originals,
                         engine=runtime.engine, compile=runtime.compile, registry=registry,
                         wrap_cache_factory=wrap_cache_factory)
