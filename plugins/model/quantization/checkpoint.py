"""Save a quantized model and load it back without calibrating again.

A checkpoint is a folder::

    quantized.safetensors   every tensor: the quantized layers' portable tensors (plain packed
                            codes, scales, zero points — never a kernel's private layout) and
                            the model's other parameters and buffers (norms changed by AWQ or
                            SmoothQuant included)
    quantization.json       format version, the model's Hugging Face config, one entry per
                            quantized layer (its class and metadata: bits, group size, mode …),
                            tied-tensor aliases and the technique that produced it
    tokenizer files         when a tokenizer was given

:func:`load_quantized` rebuilds the architecture from the config, puts the quantized
layers in place (converting to the kernel layouts of *this* machine) and loads every
tensor, so the reloaded model gives the same logits as the saved one::

    save_quantized(model, tokenizer, "out/smollm2-gptq-w4")
    model, tokenizer = load_quantized("out/smollm2-gptq-w4")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from effinfer.plugins.model.quantization.layers import PackedLayer, packed_layers

FORMAT = "effinfer-quantized"
FORMAT_VERSION = 1
WEIGHTS_FILE = "quantized.safetensors"
CONFIG_FILE = "quantization.json"


def save_quantized(model: nn.Module, tokenizer: Any, folder: str | Path, technique: dict[str, Any] | None = None
                   ) -> Path:
    """Write ``model`` (with its quantized layers) and ``tokenizer`` to ``folder``; return the folder."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    layers = packed_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    layer_meta: dict[str, dict[str, Any]] = {}
    for name, layer in layers.items():
        meta, layer_tensors = layer.export()
        layer_meta[name] = {"type": type(layer).__name__, **meta}
        tensors.update({f"{name}.{key}": value.detach().cpu().contiguous() for key, value in layer_tensors.items()})
    aliases = _add_plain_tensors(model, set(layers), tensors)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})
    config = getattr(model, "config", None)
    description = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "torch": torch.__version__,
        "model_class": type(model).__name__,
        "model_config": config.to_dict() if config is not None else None,
        "layers": layer_meta, "aliases": aliases, "technique": technique,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(description, indent=2, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def _add_plain_tensors(model: nn.Module, quantized: set[str], tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Add every non-quantized parameter/buffer once; return ``{alias: stored name}`` for tied ones."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    aliases: dict[str, str] = {}
    for key, value in model.state_dict(keep_vars=False).items():
        owner = key.rpartition(".")[0]
        if any(owner == q or owner.startswith(q + ".") for q in quantized):
            continue
        identity = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if identity in seen:
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        tensors[key] = value.detach().cpu().contiguous()
    return aliases


def load_quantized(folder: str | Path, device: str = "cpu") -> tuple[nn.Module, Any]:
    """Rebuild the model saved by :func:`save_quantized` (and its tokenizer, if saved)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import effinfer.plugins.model.quantization.layers  # noqa: F401  (registers the layer classes)

    folder = Path(folder).expanduser()
    description = _read_description(folder)
    config_dict = dict(description["model_config"])
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    tensors = load_file(str(folder / WEIGHTS_FILE))
    model = AutoModelForCausalLM.from_config(config).to(_float_dtype(tensors, description["layers"]))
    for name, meta in description["layers"].items():
        cls = PackedLayer.registry.get(meta["type"])
        if cls is None:
            raise ValueError(f"{folder / CONFIG_FILE}: layer {name} has unknown type {meta['type']!r}; known: "
                             f"{', '.join(sorted(PackedLayer.registry))}")
        prefix = f"{name}."
        layer_tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        _replace(model, name, cls.from_export(meta, layer_tensors))
    plain = {k: v for k, v in tensors.items() if not any(k.startswith(f"{n}.") for n in description["layers"])}
    plain.update({alias: plain[target] for alias, target in description["aliases"].items() if target in plain})
    missing, unexpected = model.load_state_dict(plain, strict=False)
    missing = [k for k in missing if not any(k.startswith(f"{n}.") for n in description["layers"])]
    if missing or unexpected:
        raise ValueError(f"{folder / WEIGHTS_FILE} does not match the saved architecture: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    return model.to(device).eval(), tokenizer


def _float_dtype(tensors: dict[str, torch.Tensor], layers: dict[str, Any]) -> torch.dtype:
    """The dtype of the saved model's float parameters (quantized layers' own tensors aside)."""
    for key, value in tensors.items():
        if value.is_floating_point() and not any(key.startswith(f"{n}.") for n in layers):
            return value.dtype
    return torch.float32


def _read_description(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a quantized checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    description = json.loads(path.read_text())
    if description.get("format") != FORMAT or description.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: format {description.get('format')!r} version {description.get('format_version')} "
                         f"is not readable by this effinfer (reads {FORMAT} ≤ {FORMAT_VERSION})")
    if description.get("model_config") is None:
        raise ValueError(f"{path} has no model config; only Hugging Face models can be reloaded")
    return description


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def is_checkpoint(folder: str | Path) -> bool:
    folder = Path(folder).expanduser()
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()
