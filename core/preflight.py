"""Checks run before any model is loaded or any measurement starts.

Everything a user can get wrong that can be told without loading weights is checked here,
so that a run, a generation or a bench refuses at once with every problem named (and its
fix) instead of failing after minutes of loading, conversion or measuring:

* the runtime (``device: cuda`` on a torch without CUDA);
* the model source (a folder that is not a model, a missing ``.gguf`` file);
* technique configs against the model's ``config.json`` when it can be read without
  loading (a folder, a converted built-in alias, a cached hub id): each technique may
  implement ``check_model_config(config) -> list[str]``;
* output folders and files (``--out``, ``save_dir``) are writable.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from effinfer.core.errors import EffinferError

__all__ = [
    "UniqueKeyLoader", "YamlFileError", "load_yaml_text", "read_yaml_mapping", "model_config_problems", "model_source_problems",
    "peek_model_config", "runtime_problems", "writable_problem",
]


class UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a mapping with the same key twice.

    Plain ``yaml.safe_load`` keeps the last value silently, so ``model: a`` followed by
    ``model: b`` would run ``b`` without a word.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base loader reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {first + 1}); keep one of them",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_yaml_text(text: str, name: str | None = None) -> Any:
    """Parse YAML with :class:`UniqueKeyLoader` (safe constructors, no duplicate keys); ``name``
    (a file path) is what error messages call the text."""
    stream: Any = text
    if name is not None:
        stream = io.StringIO(text)
        stream.name = name
    return yaml.load(stream, Loader=UniqueKeyLoader)  # noqa: S506 — a SafeLoader subclass


class YamlFileError(EffinferError, ValueError):
    """A YAML input file (an experiment, a suite) cannot be read as a mapping of fields."""


def read_yaml_mapping(path: Path, what: str, fields: Iterable[str]) -> dict[str, Any]:
    """The mapping in a YAML file, refusing with the fix: a missing path, a folder, a binary or
    non-UTF-8 file, invalid YAML, a duplicated key, an empty file (never taken as the defaults),
    and a document that is not a mapping. ``what`` names the file in messages ("experiment")."""
    listed = ", ".join(fields)
    if not path.exists():
        raise YamlFileError(f"{what} file {path} does not exist")
    if path.is_dir():
        raise YamlFileError(f"{path} is a folder, not {_a(what)} file; give a .yaml file")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise YamlFileError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        if b"\x00" in raw:
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\x00"), raw.index(b"\x00") + 1, "NUL byte")
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise YamlFileError(f"{path} is not a text file (binary or not UTF-8); {_a(what)} is a YAML file with "
                            f"fields such as {listed}") from None
    try:
        data = load_yaml_text(text, str(path))
    except yaml.YAMLError as error:
        raise YamlFileError(f"{path} is not valid YAML: {error}") from None
    if data is None:
        raise YamlFileError(f"{path} is empty; write the {what} in it (fields: {listed}); an empty file is not "
                            "taken as the defaults")
    if not isinstance(data, dict):
        raise YamlFileError(f"{path} holds a YAML {type(data).__name__}, not a mapping of {what} fields ({listed})")
    return data


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


def runtime_problems(device: str) -> list[str]:
    """``cuda`` asked for on a torch build or machine without it (told before loading)."""
    if not device.startswith("cuda"):
        return []
    import torch

    if not torch.cuda.is_available():
        build = "built without CUDA" if torch.version.cuda is None else "unable to see a GPU"
        return [f"runtime.device is {device!r} but this torch ({torch.__version__}) is {build}; "
                "use device cpu, or run on a machine with a GPU and a CUDA build of torch"]
    index = int(device.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        return [f"runtime.device is {device!r} but this machine has {count} CUDA device(s) "
                f"(cuda:0 … cuda:{count - 1}); pick one of those"]
    return []


def model_source_problems(source: str) -> list[str]:
    """A model path that cannot be a model: missing, a folder without ``config.json``, an empty file."""
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.exists():
            return [f"model: GGUF file {source} does not exist; check the path"]
        if path.is_dir():
            return [f"model: {source} is a folder, not a .gguf file"]
        return []
    if path.is_dir():
        if not (path / "config.json").is_file():
            return [f"model: the folder {source} is not a model (it has no config.json); give a Hugging Face "
                    "model folder (config.json, weights, tokenizer files), a .gguf file or an alias "
                    "(`effinfer plugins` lists plugin aliases)"]
        return []
    if path.exists():
        return [f"model: {source} is neither a model folder (with config.json) nor a .gguf file"]
    if source.startswith((".", "/", "~")):
        return [f"model: {source} does not exist; give a model folder, a .gguf file or an alias"]
    return []


def peek_model_config(source: str) -> Any | None:
    """The model's ``PretrainedConfig`` read from ``config.json`` alone, or ``None`` when that
    cannot be done without loading or downloading (a .gguf file, an alias not converted yet)."""
    folder = _config_folder(source)
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception:  # an unreadable config: loading will report it with its own message
        return None


def _config_folder(source: str) -> Path | None:
    from effinfer.core.models import BUILTIN_ALIASES

    if source in BUILTIN_ALIASES:
        folder = BUILTIN_ALIASES[source].folder
        return folder if (folder / ".complete").exists() else None
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if source.endswith(".gguf") or path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source, "config.json")
    except Exception:  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


def model_config_problems(techniques: Iterable[Any], config: Any | None) -> list[str]:
    """Ask each technique that implements ``check_model_config(config)`` what does not fit the model."""
    if config is None:
        return []
    problems: list[str] = []
    for technique in techniques:
        check = getattr(technique, "check_model_config", None)
        if callable(check):
            problems += [f"{technique.name}: {p}" for p in check(config) or []]
    return problems


def writable_problem(path: Path, what: str) -> str | None:
    """Why ``path`` (a folder, created if missing) cannot be written, or ``None``.

    Checked by creating and removing a temporary file in the nearest existing folder, so
    a read-only or full disk is found before the work rather than after it.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        return f"{what} {path} is a file, not a folder; give a folder path"
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        return f"{what} {path} cannot be created: {existing} is a file, not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".effinfer-write-check-"):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        return f"{what} {path} is not writable ({reason} in {existing}); choose another folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{what} {path} is not writable (no permission in {existing}); choose another folder"
    return None


#: technique config fields that name a folder the technique writes into
OUTPUT_FIELDS = ("save_dir", "output_dir")


def output_problems(specs: Iterable[Any]) -> list[str]:
    """Technique configs whose output folder (``save_dir`` …) cannot be written, told before any work."""
    problems = []
    for position, spec in enumerate(specs):
        for key in OUTPUT_FIELDS:
            value = spec.config.get(key)
            if isinstance(value, str) and value and (problem := writable_problem(Path(value), f"{key}")):
                problems.append(f"techniques[{position}] ({spec.name}): {problem}")
    return problems
