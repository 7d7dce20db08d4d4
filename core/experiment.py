"""The experiment schema, shared by Python scripts and YAML files, and its validation.

Everything here runs before a model is loaded: a typo in a technique name, a config
value out of range or a conflicting stack is reported at once, all problems together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from effinfer.core.errors import ExperimentError, UnknownEngineError, UnknownTechniqueError
from effinfer.core.generation import GenerationConfig
from effinfer.core.models import DEFAULT_MODEL
from effinfer.core.preflight import (YamlFileError, model_config_problems, model_source_problems, output_problems,
                                     peek_model_config, read_yaml_mapping, runtime_problems)
from effinfer.core.registry import Registry, get_registry
from effinfer.core.technique import Requirement, Technique, layout_problems


class TechniqueSpec(BaseModel):
    """One entry of a stack: a technique name and its config values."""

    model_config = ConfigDict(extra="forbid")

    name: str
    config: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return parse_technique(value).model_dump() if isinstance(value, str) else value


def parse_technique(text: str) -> TechniqueSpec:
    """Parse ``"rtn:bits=4,group_size=32"`` (values read as YAML scalars)."""
    name, _, options = text.partition(":")
    config: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"technique option {item!r} in {text!r} must look like key=value")
        config[key.strip()] = yaml.safe_load(value)
    return TechniqueSpec(name=name.strip(), config=config)


class Runtime(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="cpu or cuda[:N]")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    threads: int | None = Field(None, ge=1, le=512, description="torch intra-op threads")
    seed: int = Field(0, ge=0)
    engine: str = Field(
        "static", min_length=1,
        description="decode loop used when no technique offers a decoding strategy, by registered name "
                    "(effinfer_register_engines): 'static' (static KV cache, Llama family; other models "
                    "fall back to hf) or 'hf' (transformers' forward over a DynamicCache, the reference)")
    compile: bool = Field(False, description="torch.compile the engine's decode step (static engine: tens of "
                                              "seconds once per shape, cached on disk)")


class Experiment(BaseModel):
    """A model, a technique stack, generation settings and a runtime."""

    model_config = ConfigDict(extra="forbid")

    name: str = "experiment"
    model: str = Field(DEFAULT_MODEL, description="alias, .gguf file, folder or hub id")
    techniques: list[TechniqueSpec] = Field(default_factory=list)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    runtime: Runtime = Field(default_factory=Runtime)
    prompts: list[str] = Field(default_factory=lambda: ["What is the capital of France?"])
    #: context passages given with every prompt (what data-level techniques compress)
    documents: list[str] = Field(default_factory=list)

    @field_validator("prompts")
    @classmethod
    def _prompts_given(cls, prompts: list[str]) -> list[str]:
        if not prompts:
            raise ValueError("no prompt given; list at least one prompt (or leave `prompts` out for the default)")
        empty = [i for i, prompt in enumerate(prompts) if not prompt.strip()]
        if empty:
            raise ValueError(f"prompt(s) {empty} are empty; give each prompt some text")
        return prompts

    @classmethod
    def from_yaml(cls, path: str | Path) -> Experiment:
        """Read and validate an experiment file; every problem is an :class:`ExperimentError`
        (a missing, empty, binary or non-YAML file, a duplicated key, a wrong field)."""
        path = Path(path)
        data = cls._read_yaml(path)
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise ExperimentError(format_validation_errors(error, cls, prefix=f"{path}: ")) from None

    @staticmethod
    def _read_yaml(path: Path) -> dict[str, Any]:
        try:
            return read_yaml_mapping(path, "experiment", Experiment.model_fields)
        except YamlFileError as error:
            raise ExperimentError([str(error)]) from None

    @classmethod
    def checked(cls, **fields: Any) -> Experiment:
        """Build an experiment from keyword fields, raising :class:`ExperimentError` (one line per
        problem, with the allowed range) instead of pydantic's ``ValidationError``."""
        try:
            return cls.model_validate(fields)
        except ValidationError as error:
            raise ExperimentError(format_validation_errors(error, cls)) from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def build_stack(self, registry: Registry | None = None) -> list[Technique]:
        """Validate the stack and instantiate its techniques; raise with every problem."""
        return resolve_stack(self.techniques, self.runtime, registry or get_registry())

    def preflight(self, registry: Registry | None = None) -> list[Technique]:
        """Everything that can be checked before loading the model, all problems together:
        the stack (:meth:`build_stack`), the runtime (CUDA present), the model source (a folder
        that is a model), output folders (``save_dir``) writable, and each technique's config against the model's ``config.json`` when it
        can be read without loading (techniques implementing ``check_model_config``)."""
        problems = (runtime_problems(self.runtime.device) + model_source_problems(self.model)
                    + output_problems(self.techniques))
        try:
            techniques = self.build_stack(registry)
        except ExperimentError as error:
            raise ExperimentError(error.problems + problems) from None
        if not problems:
            problems = model_config_problems(techniques, peek_model_config(self.model))
        if problems:
            raise ExperimentError(problems)
        return techniques


def resolve_stack(specs: list[TechniqueSpec], runtime: Runtime, registry: Registry,
                  layout: str | None = None) -> list[Technique]:
    """Validate the stack and instantiate its techniques; raise with every problem.

    ``layout`` is the model's Hugging Face ``model_type`` when it is known before loading
    (:func:`effinfer.core.models.model_layout`): techniques that do not support it are refused.
    """
    problems: list[str] = []
    techniques: list[Technique] = []
    for position, spec in enumerate(specs):
        where = f"techniques[{position}] ({spec.name})"
        try:
            cls = registry.get(spec.name)
        except UnknownTechniqueError as error:
            problems.append(f"{where}: {error}")
            continue
        try:
            config = cls.Config.model_validate(spec.config)
        except ValidationError as error:
            problems += format_validation_errors(error, cls.Config, prefix=f"{where}: ")
            continue
        techniques.append(cls(config))
    if runtime.engine not in registry.engines:
        problems.append(f"runtime.engine: {UnknownEngineError(runtime.engine, registry.engines)}")
    problems += stack_conflicts(techniques, runtime, layout)
    if problems:
        raise ExperimentError(problems)
    return techniques


def stack_conflicts(stack: list[Technique], runtime: Runtime, layout: str | None = None) -> list[str]:
    """Conflicts between techniques of one stack, and requirements the runtime or the model layout cannot meet."""
    problems: list[str] = []
    names = [t.name for t in stack]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"technique {name!r} appears {names.count(name)} times; list it once")
    strategies = [t.name for t in stack if t.is_decoding_strategy()]
    if len(strategies) > 1:
        problems.append(
            f"{' and '.join(strategies)} are both decoding strategies; an experiment uses exactly "
            "one (keep one of them)"
        )
    for i, first in enumerate(stack):
        for second in stack[i + 1:]:
            if second.name in first.incompatible_with or first.name in second.incompatible_with:
                problems.append(f"{first.name} and {second.name} are declared incompatible")
    for i, technique in enumerate(stack):
        removed_before = {str(f): t.name for t in stack[:i] for f in t.removes_features}
        for feature in sorted({str(f) for f in technique.needs_features} & removed_before.keys()):
            problems.append(
                f"{technique.name} needs {feature!r}, which {removed_before[feature]} (earlier in the "
                f"stack) removes; put {technique.name} before {removed_before[feature]} or drop one"
            )
        if Requirement.CUDA in technique.requires and not runtime.device.startswith("cuda"):
            problems.append(f"{technique.name} requires CUDA but runtime.device is {runtime.device!r}")
    problems += layout_problems(stack, layout)
    return problems


def format_validation_errors(error: ValidationError, schema: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per pydantic error: the field, the message and the allowed range (also for the
    fields of optional sections and of list items, e.g. a suite's ``speed.repeats``)."""
    json_schema = schema.model_json_schema()
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "<config>"
        parent = schema_at(json_schema, item["loc"][:-1])
        prop = schema_at(json_schema, item["loc"]) if item["loc"] else {}
        allowed = allowed_range(prop)
        got = f" (got {item['input']!r})" if item["type"] != "missing" and "input" in item else ""
        hint = f"; allowed: {allowed}" if allowed else ""
        if item["type"] == "extra_forbidden":
            hint = f"; known fields: {', '.join(parent.get('properties', {})) or 'none'}"
        if item["type"] == "value_error":  # a validator's own message already says what is allowed
            lines.append(f"{prefix}{field}: {item['msg'].removeprefix('Value error, ')}{got}")
            continue
        lines.append(f"{prefix}{field}: {item['msg']}{got}{hint}")
    return lines


def schema_at(json_schema: dict[str, Any], loc: tuple[Any, ...]) -> dict[str, Any]:
    """The sub-schema at ``loc`` (field names and list indices), following ``$ref`` into ``$defs``
    and an optional section's ``anyOf`` to its one non-null schema; ``{}`` when unknown."""
    node = _resolved(json_schema, json_schema)
    for part in loc:
        if isinstance(part, int) and isinstance(node.get("items"), dict):
            node = node["items"]
        elif str(part) in node.get("properties", {}):
            node = node["properties"][str(part)]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            return {}
        node = _resolved(json_schema, node)
    return node


def _resolved(json_schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """``node`` with its ``$ref`` followed, and ``X | None`` reduced to ``X`` when ``X`` is a
    section or a list (a leaf's ``anyOf`` is kept: :func:`allowed_range` describes it)."""
    for _ in range(16):  # a guard against a self-referencing schema
        if "$ref" in node:
            node = json_schema.get("$defs", {}).get(node["$ref"].rsplit("/", 1)[-1], {})
            continue
        options = [option for option in node.get("anyOf", []) if option.get("type") != "null"]
        if len(options) == 1 and ("$ref" in options[0] or "properties" in options[0] or "items" in options[0]):
            node = options[0]
            continue
        break
    return node


def allowed_range(prop: dict[str, Any]) -> str:
    """Describe a JSON-schema property's allowed values, e.g. ``2 ≤ value ≤ 8``."""
    options = [allowed_range(p) for p in prop.get("anyOf", []) if p.get("type") != "null"]
    if options:
        return " or ".join(o for o in options if o)
    if "enum" in prop:
        return "one of " + ", ".join(repr(v) for v in prop["enum"])
    if "const" in prop:
        return repr(prop["const"])
    low = prop.get("minimum", prop.get("exclusiveMinimum"))
    high = prop.get("maximum", prop.get("exclusiveMaximum"))
    low_op = "<" if "exclusiveMinimum" in prop else "≤"
    high_op = "<" if "exclusiveMaximum" in prop else "≤"
    if low is not None and high is not None:
        return f"{low} {low_op} value {high_op} {high}"
    if low is not None:
        return f"value {'>' if low_op == '<' else '≥'} {low}"
    if high is not None:
        return f"value {high_op} {high}"
    return prop.get("type", "")
