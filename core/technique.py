"""The technique base class: what every efficient-inference method declares."""

from __future__ import annotations

import inspect
import re
from enum import Enum, StrEnum
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from effinfer.core.errors import did_you_mean
from effinfer.core.hookspecs import PROJECT, StageSpecs, stage_hook_names
from effinfer.core.paper import Paper


class Requirement(str, Enum):
    """What a technique needs from the experiment before it can run."""

    CALIBRATION_DATA = "calibration_data"
    DRAFT_MODEL = "draft_model"
    CUDA = "cuda"
    TRAINING = "training"


class Feature(StrEnum):
    """Model features a technique needs (``needs_features``) or takes away (``removes_features``).

    A stack where a technique needs a feature that an earlier one removed is refused before
    any model loads (``rtn`` then a pruner that reads dense weights would otherwise prune
    nothing). A name that is not one of these is refused when the plugin registers.
    """

    #: floating-point ``nn.Linear`` weights a technique can read and rewrite (quantizers remove it)
    DENSE_WEIGHTS = "dense_weights"
    #: the architecture's own attention modules (a technique that swaps attention removes it)
    STOCK_ATTENTION = "stock_attention"
    #: every decoder layer of the original model (depth pruning removes it)
    ALL_LAYERS = "all_layers"


#: the Hugging Face ``model_type`` of each model family effinfer tests its built-ins on
LLAMA, QWEN2, GEMMA3 = "llama", "qwen2", "gemma3_text"
BUILTIN_LAYOUTS = frozenset({LLAMA, QWEN2, GEMMA3})


class NoConfig(BaseModel):
    """A technique with nothing to configure."""

    model_config = ConfigDict(extra="forbid")


class Technique:
    """Base class of every technique; subclasses are pluggy plugins.

    A subclass declares its metadata as class attributes and implements one or more
    stage hooks from :mod:`effinfer.core.hookspecs` as methods decorated with
    ``@hookimpl``. One instance is created per experiment with a validated config::

        class Halve(Technique):
            name = "halve"
            node = "model.compression.quantization.ptq.weight_only"
            paper = Paper(title="...", year=2024, arxiv="2401.00001")
            summary = "Stores weights in half precision."

            class Config(BaseModel):
                dtype: Literal["float16", "bfloat16"] = "bfloat16"

            @hookimpl
            def effinfer_transform_model(self, stage): ...
    """

    name: ClassVar[str]
    node: ClassVar[str]
    paper: ClassVar[Paper | None] = None
    summary: ClassVar[str] = ""
    Config: ClassVar[type[BaseModel]] = NoConfig
    lossless: ClassVar[bool] = False
    requires: ClassVar[frozenset[Requirement]] = frozenset()
    incompatible_with: ClassVar[frozenset[str]] = frozenset()
    #: :class:`Feature` values this technique needs from the model (e.g. ``Feature.DENSE_WEIGHTS``) …
    needs_features: ClassVar[frozenset[Feature]] = frozenset()
    #: … and the ones it takes away (a quantizer removes ``Feature.DENSE_WEIGHTS``).
    removes_features: ClassVar[frozenset[Feature]] = frozenset()
    #: model layouts (Hugging Face ``model_type``) this technique works on; a stack is checked
    #: against the model's layout before the model loads (when the source tells it) and after
    layouts: ClassVar[frozenset[str]] = BUILTIN_LAYOUTS
    #: the config ``effinfer bench -t NAME`` (and the default bench) runs, when it should differ
    #: from the defaults (cheaper set-up, a draft stack); ``None``: the defaults
    bench_config: ClassVar[dict[str, Any] | None] = None
    #: stacks benched with this technique's family (``effinfer bench --node <its node>``), written
    #: like ``-c``: ``("wanda+gptq",)``; each names this technique
    bench_compositions: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: BaseModel | dict[str, Any] | None = None) -> None:
        if config is None or isinstance(config, dict):
            config = self.Config(**(config or {}))
        self.config = config
        self.notes: list[str] = []

    def check_model_config(self, config: Any) -> list[str]:
        """What in this technique's config does not fit a model with this Hugging Face ``config``
        (one message per problem, each with the fix). Called before the model loads when its
        config can be read without loading, and again on the loaded model; default: nothing."""
        return []

    def note(self, message: str) -> None:
        """Record what this technique did; the composition reports it per stage."""
        self.notes.append(message)

    @classmethod
    def stage_hooks(cls) -> list[str]:
        """Names of the stage hooks this class implements."""
        return [hook for hook in stage_hook_names() if callable(getattr(cls, hook, None))]

    @classmethod
    def levels(cls) -> list[str]:
        """The levels (``data``/``model``/``system``) at which this technique acts."""
        names = stage_hook_names()
        return sorted({names[hook] for hook in cls.stage_hooks()})

    @classmethod
    def is_decoding_strategy(cls) -> bool:
        return "effinfer_decoding_strategy" in cls.stage_hooks()

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """A JSON-serializable description (used by ``effinfer plugins --json`` and the docs)."""
        return {
            "name": cls.name,
            "node": cls.node,
            "levels": cls.levels(),
            "summary": cls.summary,
            "paper": cls.paper.model_dump() | {"link": cls.paper.link} if cls.paper else None,
            "lossless": cls.lossless,
            "requires": sorted(r.value for r in cls.requires),
            "decoding_strategy": cls.is_decoding_strategy(),
            "incompatible_with": sorted(cls.incompatible_with),
            "layouts": sorted(cls.layouts),
            "config_schema": cls.Config.model_json_schema(),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


TECHNIQUE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def check_technique_class(cls: Any) -> None:
    """Raise ``TypeError``/``ValueError`` if ``cls`` is not a well-formed technique class."""
    if not (isinstance(cls, type) and issubclass(cls, Technique)):
        raise TypeError(f"{cls!r} is not a subclass of effinfer.core.Technique")
    for attribute in ("name", "node"):
        if not isinstance(getattr(cls, attribute, None), str):
            raise TypeError(f"technique class {cls.__name__} must set the class attribute {attribute!r}")
    if not TECHNIQUE_NAME.match(cls.name):
        raise ValueError(
            f"technique name {cls.name!r} of {cls.__name__} must be lowercase snake_case "
            "(letters, digits, underscores; starting with a letter)"
        )
    if not (isinstance(cls.Config, type) and issubclass(cls.Config, BaseModel)):
        raise TypeError(f"{cls.__name__}.Config must be a pydantic BaseModel subclass")
    check_hook_methods(cls)
    if not cls.stage_hooks():
        raise TypeError(f"technique {cls.name!r} implements no stage hook (see effinfer.core.hookspecs)")
    for attribute in ("needs_features", "removes_features"):
        values = getattr(cls, attribute)
        if not isinstance(values, (set, frozenset)):
            raise TypeError(f"{cls.__name__}.{attribute} must be a frozenset of effinfer.core.Feature values")
        for value in values:
            if value not in Feature._value2member_map_:
                raise ValueError(f"{cls.__name__}.{attribute}: unknown feature {value!r}"
                                 f"{did_you_mean(str(value), [f.value for f in Feature])} (known: "
                                 f"{', '.join(f'Feature.{f.name}' for f in Feature)})")
    check_layouts(cls)
    if cls.bench_config is not None and not isinstance(cls.bench_config, dict):
        raise TypeError(f"{cls.__name__}.bench_config must be a dict of config values or None")
    if not isinstance(cls.bench_compositions, tuple) or not all(
            isinstance(c, str) and cls.name in [p.split(":")[0].strip() for p in c.split("+")]
            for c in cls.bench_compositions):
        raise TypeError(f"{cls.__name__}.bench_compositions must be a tuple of 'a+b' strings, each naming "
                        f"{cls.name!r}")


def check_hook_methods(cls: type[Technique]) -> None:
    """Every ``effinfer_*`` method must be a stage hook, decorated with ``@hookimpl``, with the spec's arguments.

    pluggy silently never calls a method without the marker (or with a misspelt name), so
    such a class is refused instead of behaving as a no-op.
    """
    hooks = stage_hook_names()
    for attribute in dir(cls):
        if not attribute.startswith(f"{PROJECT}_") or not callable(getattr(cls, attribute)):
            continue
        if attribute not in hooks:
            raise TypeError(f"{cls.__name__}.{attribute} is not a stage hook{did_you_mean(attribute, hooks)} "
                            f"(stage hooks: {', '.join(hooks)})")
        method = getattr(cls, attribute)
        if getattr(method, f"{PROJECT}_impl", None) is None:
            raise TypeError(f"{cls.__name__}.{attribute} is not decorated with @hookimpl, so it would never be "
                            f"called: add `@hookimpl` (from effinfer.core import hookimpl) above `def {attribute}`")
        allowed = set(inspect.signature(getattr(StageSpecs, attribute)).parameters) - {"self"}
        taken = set(inspect.signature(method).parameters) - {"self"}
        if taken - allowed:
            raise TypeError(f"{cls.__name__}.{attribute} takes {sorted(taken - allowed)}, which the hook does not "
                            f"pass; its arguments are {sorted(allowed)}")


def check_layouts(cls: type[Technique]) -> None:
    """``layouts`` must name Hugging Face model types (``"llama"``, ``"qwen2"``, ``"gemma3_text"`` …)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if not isinstance(cls.layouts, (set, frozenset)) or not cls.layouts:
        raise TypeError(f"{cls.__name__}.layouts must be a non-empty frozenset of model types")
    for layout in cls.layouts:
        if layout not in CONFIG_MAPPING_NAMES:
            raise ValueError(f"{cls.__name__}.layouts: {layout!r} is not a transformers model type"
                             f"{did_you_mean(str(layout), CONFIG_MAPPING_NAMES)}")


def layout_problems(stack: list[Technique] | list[type[Technique]], layout: str | None) -> list[str]:
    """One message per technique of ``stack`` that does not support the model ``layout`` (``None``: unknown)."""
    if layout is None:
        return []
    return [f"{t.name} does not support the {layout!r} model layout (it supports: {', '.join(sorted(t.layouts))}); "
            f"use a model of a supported layout or drop {t.name}" for t in stack if layout not in t.layouts]
