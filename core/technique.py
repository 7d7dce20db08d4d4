"""The technique base class: what every efficient-inference method declares."""

from __future__ import annotations

import re
from enum import Enum
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from effinfer.core.hookspecs import stage_hook_names


class Requirement(str, Enum):
    """What a technique needs from the experiment before it can run."""

    CALIBRATION_DATA = "calibration_data"
    DRAFT_MODEL = "draft_model"
    CUDA = "cuda"
    TRAINING = "training"


class Paper(BaseModel):
    """The publication a technique implements."""

    model_config = ConfigDict(frozen=True)

    title: str
    year: int | None = None
    arxiv: str | None = Field(default=None, pattern=r"^\d{4}\.\d{4,5}$")
    url: str | None = None

    @property
    def link(self) -> str | None:
        return f"https://arxiv.org/abs/{self.arxiv}" if self.arxiv else self.url

    def cite(self) -> str:
        where = f"arXiv:{self.arxiv}" if self.arxiv else (self.url or "")
        return f"{self.title} ({self.year}) {where}".strip()


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
    #: feature names this technique needs from the model (e.g. ``"dense_weights"``) …
    needs_features: ClassVar[frozenset[str]] = frozenset()
    #: … and the ones it takes away (a quantizer removes ``"dense_weights"``).
    removes_features: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: BaseModel | dict[str, Any] | None = None) -> None:
        if config is None or isinstance(config, dict):
            config = self.Config(**(config or {}))
        self.config = config
        self.notes: list[str] = []

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
    if not cls.stage_hooks():
        raise TypeError(f"technique {cls.name!r} implements no stage hook (see effinfer.core.hookspecs)")
