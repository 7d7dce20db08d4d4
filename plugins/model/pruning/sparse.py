"""What the unstructured / N:M pruners share: masks, the config, stored sparse formats, the layer loop.

- **Masks** (:func:`prune_lowest`, :func:`nm_mask`): the positions with the lowest importance
  score are zeroed, *exactly* ``round(sparsity · group)`` of them in each comparison group
  (a whole layer, one output row, or a block of columns), or ``M − N`` of every ``M``
  consecutive input weights for an ``N:M`` pattern (at most ``N`` non-zeros per group of
  ``M``, the 2:4 pattern of NVIDIA's sparse tensor cores).
- **Stored formats** (:class:`SparseLinear`): a masked weight can stay a dense ``nn.Linear``
  with zeros (``execution='dense'``: no bytes saved, the fastest on CPU), or be stored as a
  bitmask plus the non-zero values (``'bitmask'``: one bit per position + the values; the dense
  weight is rebuilt on every call) or in CSR (``'csr'``: values + int32 column indices + row
  pointers, run through ``torch.sparse`` CSR × dense matmul). The evaluator's
  ``memory.weight_bytes`` counts what is really stored; the technique's note gives every
  format's bytes next to the dense bytes (:func:`format_bytes`).
- **The layer loop** (:func:`prune_decoder`): GPTQ's sequential layer-wise calibration
  (:mod:`effinfer.plugins.model.quantization.layerwise`): each decoder layer's statistics are
  collected on the outputs of the already pruned layers before it.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from effinfer.core import Feature, Technique
from effinfer.core.stages import ModelStage
from effinfer.plugins.model.quantization.config import linear_input_features, weight_math_threads
from effinfer.plugins.model.quantization.layers import PackedLayer, build_quantized_linear
from effinfer.plugins.model.quantization.packing import QuantizedTensor
from effinfer.plugins.model.quantization.layerwise import (decoder_layers, first_layer_inputs, linears_of, run_layer,
                                                           watch_inputs)

Execution = Literal["dense", "bitmask", "csr"]
PATTERN = re.compile(r"^(unstructured|(\d+):(\d+))$")
EXECUTION_DESCRIPTION = ("how pruned layers are stored and run: 'dense' = float weights with zeros in nn.Linear "
                         "(no bytes saved; the fastest on CPU), 'bitmask' = 1 bit per position + the non-zero "
                         "values, dense weight rebuilt per call, 'csr' = values + int32 column indices + row "
                         "pointers, torch.sparse CSR matmul")


# --------------------------------------------------------------------------- config


class PruneConfig(BaseModel):
    """Sparsity, pattern, which layers, storage, where to save."""

    model_config = ConfigDict(extra="forbid")

    sparsity: float = Field(0.5, gt=0.0, lt=1.0, description="fraction of each pruned layer's weights set to zero "
                                                              "(pattern 'unstructured'; an N:M pattern implies 1 − N/M)")
    pattern: str = Field("unstructured", description="'unstructured', or 'N:M' (at most N non-zeros in every M "
                                                     "consecutive input weights of a row, e.g. '2:4', '4:8')")
    layers: list[int] | None = Field(None, description="decoder layer indices to prune (None = all)")
    skip_modules: list[str] = Field(default_factory=list, description="linear layers whose name contains one of "
                                                                      "these stay dense (embeddings and lm_head are "
                                                                      "never pruned)")
    execution: Execution = Field("dense", description=EXECUTION_DESCRIPTION)
    save_dir: str | None = Field(None, description="save the pruned model here (safetensors + JSON; reload with "
                                                   "effinfer.plugins.model.pruning.load_pruned)")

    @field_validator("pattern", mode="before")
    @classmethod
    def _sexagesimal(cls, value: object) -> object:
        """``pattern=2:4`` unquoted on the command line reaches here as YAML 1.1's base-60 integer 124."""
        if isinstance(value, int) and not isinstance(value, bool) and value >= 60:
            return f"{value // 60}:{value % 60}"
        return value

    @model_validator(mode="after")
    def _pattern_is_valid(self) -> PruneConfig:
        found = PATTERN.match(self.pattern)
        if not found:
            raise ValueError(f"pattern={self.pattern!r}: use 'unstructured' or 'N:M' with 1 ≤ N < M ≤ 64 (e.g. '2:4')")
        if found[2] is not None:
            n, m = int(found[2]), int(found[3])
            if not 1 <= n < m <= 64:
                raise ValueError(f"pattern={self.pattern!r}: N:M needs 1 ≤ N < M ≤ 64 (e.g. '2:4', '4:8')")
            if "sparsity" in self.model_fields_set and not math.isclose(self.sparsity, 1 - n / m):
                raise ValueError(f"sparsity={self.sparsity} contradicts pattern={self.pattern!r} (which keeps {n} of "
                                 f"every {m} weights: sparsity {1 - n / m:g}); leave sparsity out with an N:M pattern")
        if self.layers is not None and any(i < 0 for i in self.layers):
            raise ValueError(f"layers={self.layers}: decoder layer indices are ≥ 0")
        return self

    def nm(self) -> tuple[int, int] | None:
        found = PATTERN.match(self.pattern)
        return (int(found[2]), int(found[3])) if found and found[2] is not None else None

    def target_sparsity(self) -> float:
        nm = self.nm()
        return 1 - nm[0] / nm[1] if nm else self.sparsity

    def describe(self) -> str:
        return self.pattern if self.nm() else f"{self.sparsity:.0%} unstructured"


def prune_config_problems(config: PruneConfig, model_config: Any) -> list[str]:
    """An N:M group that does not divide a pruned layer's input features, or a layer index past the
    model's last decoder layer, told from the model's config before loading."""
    if model_config is None:
        return []
    problems = []
    count = getattr(model_config, "num_hidden_layers", None)
    if config.layers is not None and isinstance(count, int) and any(i >= count for i in config.layers):
        problems.append(f"layers={config.layers}: the model has {count} decoder layers (indices 0–{count - 1})")
    nm = config.nm()
    if nm:
        sizes = {}
        for name, size in linear_input_features(model_config, decoder_only=True).items():
            if not any(s in name for s in config.skip_modules):
                sizes.setdefault(size, re.sub(r"^model\.layers\.\d+\.", "", name))
        for size, kind in sorted(sizes.items()):
            if size % nm[1]:
                problems.append(f"pattern={config.pattern!r}: M={nm[1]} does not divide the {size} input features "
                                f"of {kind}; choose an M that divides it or skip_modules=['{kind.split('.')[-1]}']")
    return problems


class MaskPruner(Technique):
    """Base of the unstructured / N:M pruners: a :class:`PruneConfig`, its checks, the features it removes."""

    needs_features = frozenset({Feature.DENSE_WEIGHTS})

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        # stored sparse (bitmask / CSR), no nn.Linear is left for a later technique to rewrite
        self.removes_features = (frozenset() if self.config.execution == "dense"
                                 else frozenset({Feature.DENSE_WEIGHTS}))

    def check_model_config(self, config: Any) -> list[str]:
        return prune_config_problems(self.config, config)


# --------------------------------------------------------------------------- masks


def prune_lowest(scores: torch.Tensor, sparsity: float, dim: int | None = None) -> torch.Tensor:
    """A boolean *keep* mask: ``round(sparsity · n)`` lowest scores zeroed in each group.

    ``dim=None``: one group (the whole tensor); ``dim=1``: one group per row.
    """
    if dim is None:
        flat = scores.reshape(-1)
        k = round(sparsity * flat.numel())
        keep = torch.ones_like(flat, dtype=torch.bool)
        if k:
            keep[torch.topk(flat, k, largest=False).indices] = False
        return keep.view_as(scores)
    k = round(sparsity * scores.shape[dim])
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k:
        keep.scatter_(dim, torch.topk(scores, k, dim=dim, largest=False).indices, False)
    return keep


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """A boolean keep mask with exactly ``n`` kept in every ``m`` consecutive columns (the ``n`` highest scores)."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"an {n}:{m} pattern needs the input features ({cols}) to be a multiple of {m}")
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return keep.reshape(rows, cols)


def mask_for(scores: torch.Tensor, config: PruneConfig, per_row: bool) -> torch.Tensor:
    nm = config.nm()
    if nm:
        return nm_mask(scores, *nm)
    return prune_lowest(scores, config.sparsity, 1 if per_row else None)


def is_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive weights of each row has at most ``n`` non-zeros."""
    rows, cols = weight.shape
    return bool(((weight.reshape(rows, cols // m, m) != 0).sum(-1) <= n).all())


# --------------------------------------------------------------------------- stored formats


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as ``ceil(numel / 8)`` bytes, little-endian bit order."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = F.pad(flat, (0, (-flat.numel()) % 8))
    weights = (2 ** torch.arange(8, dtype=torch.uint8)).to(flat.device)
    return (flat.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, numel: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits.unsqueeze(1) >> shifts) & 1).reshape(-1)[:numel].bool()


def format_bytes(weight: torch.Tensor) -> dict[str, int]:
    """Bytes of one weight in every storage format (values in the weight's own dtype)."""
    rows, cols = weight.shape
    nnz = int((weight != 0).sum())
    value = weight.element_size()
    sizes = {"dense": weight.numel() * value, "bitmask": nnz * value + math.ceil(weight.numel() / 8),
             "csr": nnz * (value + 4) + (rows + 1) * 4}
    return sizes


class SparseLinear(PackedLayer):
    """A pruned linear layer stored sparse: ``bitmask`` (mask bits + values) or ``csr``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, mode: Literal["bitmask", "csr"]) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.mode = mode
        weight = weight.detach()
        if mode == "bitmask":
            nonzero = weight != 0
            self.register_buffer("mask_bits", pack_bits(nonzero))
            self.register_buffer("values", weight[nonzero].contiguous())
        elif mode == "csr":
            with warnings.catch_warnings():  # "sparse CSR support is in beta state"
                warnings.simplefilter("ignore", UserWarning)
                csr = weight.to_sparse_csr()
            self.register_buffer("crow", csr.crow_indices().to(torch.int32))
            self.register_buffer("col", csr.col_indices().to(torch.int32))
            self.register_buffer("values", csr.values().contiguous())
        else:
            raise ValueError(f"SparseLinear mode {mode!r}: use 'bitmask' or 'csr'")
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def dense_weight(self) -> torch.Tensor:
        shape = (self.out_features, self.in_features)
        if self.mode == "bitmask":
            mask = unpack_bits(self.mask_bits, shape[0] * shape[1]).view(shape)
            return torch.zeros(shape, dtype=self.values.dtype, device=self.values.device).masked_scatter(
                mask, self.values)
        return self.csr().to_dense()

    def csr(self) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow, self.col, self.values, (self.out_features, self.in_features),
                                       check_invariants=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "bitmask":
            return F.linear(x, self.dense_weight(), self.bias)
        flat = x.reshape(-1, self.in_features)
        out = torch.mm(self.csr(), flat.t().to(self.values.dtype)).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def path(self) -> str:
        return "bitmask + values, dense per call" if self.mode == "bitmask" else "CSR sparse matmul"

    def metadata(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "mode": self.mode}

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        weight = self.dense_weight()
        nonzero = weight != 0
        tensors = {"mask_bits": pack_bits(nonzero), "values": weight[nonzero].contiguous()}
        if self.bias is not None:
            tensors["bias"] = self.bias.detach()
        return self.metadata(), tensors

    @classmethod
    def from_export(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> SparseLinear:
        shape = (meta["out_features"], meta["in_features"])
        mask = unpack_bits(tensors["mask_bits"], shape[0] * shape[1]).view(shape)
        weight = torch.zeros(shape, dtype=tensors["values"].dtype).masked_scatter(mask, tensors["values"])
        return cls(weight, tensors.get("bias"), meta["mode"])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


# --------------------------------------------------------------------------- the layer loop

#: ``(weight float32, statistics or None, config) -> pruned weight float32`` for one linear layer, or the
#: packed quantized weight when the pruner also quantizes (SparseGPT's joint mode)
PruneOne = Callable[[torch.Tensor, Any, PruneConfig], "torch.Tensor | QuantizedTensor"]


def prune_decoder(stage: ModelStage, technique: Any, prune_one: PruneOne,
                  new_stat: Callable[[nn.Linear], Any] | None = None,
                  add: Callable[[Any, torch.Tensor], None] | None = None) -> None:
    """Prune every selected linear layer of the decoder blocks, layer by layer.

    Without ``new_stat`` (magnitude) no calibration runs. With it, each block's linear
    layers get a statistic (``new_stat(linear)``) fed with their inputs (``add(stat, x)``)
    on the calibration windows, as the already pruned blocks before it transform them.
    """
    from rich.progress import Progress

    config = technique.config
    started = time.perf_counter()
    path, layers = decoder_layers(stage.model)
    chosen = range(len(layers)) if config.layers is None else sorted(set(config.layers))
    if config.layers is not None and max(chosen) >= len(layers):
        raise ValueError(f"layers={config.layers}: the model has {len(layers)} decoder layers "
                         f"(indices 0–{len(layers) - 1})")
    batches = None
    if new_stat is not None:
        tokens = stage.calibration_batches(config.n_samples, config.seq_len)
        batches = first_layer_inputs(stage.model, tokens, config.batch_size)
    sizes = {"dense": 0, "bitmask": 0, "csr": 0}
    zeros = total = pruned = packed_bytes = 0
    with Progress(transient=True) as progress:
        task = progress.add_task(f"{technique.name}: pruning", total=len(layers))
        for index, layer in enumerate(layers):
            if index not in chosen:
                if batches is not None and index < max(chosen):
                    batches = run_layer(layer, batches)
                progress.advance(task)
                continue
            linears = linears_of(layer, f"{path}.{index}", config.skip_modules)
            stats: dict[str, Any] = {}
            if new_stat is not None:
                stats = {name: new_stat(m) for name, m in linears.items()}
                with watch_inputs(linears, lambda name, x: add(stats[name], x)):
                    run_layer(layer, batches)
            for name, linear in linears.items():
                weight = linear.weight.detach()
                with torch.no_grad(), weight_math_threads():
                    result = prune_one(weight.float(), stats.get(name), config)
                if isinstance(result, QuantizedTensor):
                    new = result.dequantize()
                    packed_bytes += result.nbytes
                    stage.patcher.replace_module(layer, name, build_quantized_linear(result, linear.bias, "auto",
                                                                                     f"{path}.{index}.{name}"))
                else:
                    new = result.to(weight.dtype)
                    install(stage, layer, name, linear, new, config.execution)
                for key, value in format_bytes(new).items():
                    sizes[key] += value
                zeros += int((new == 0).sum())
                total += new.numel()
                pruned += 1
            if batches is not None and index < max(chosen):
                batches = run_layer(layer, batches)
            progress.advance(task)
    seconds = time.perf_counter() - started
    mib = {k: v / 2**20 for k, v in sizes.items()}
    technique.note(f"pruned {pruned} linear layers to {config.describe()} (measured {zeros / max(1, total):.2%} zeros): "
                   f"dense {mib['dense']:.2f} MiB → bitmask+values {mib['bitmask']:.2f} MiB, CSR {mib['csr']:.2f} "
                   f"MiB; " + (f"stored as {config.execution}" if not packed_bytes else
                               f"stored quantized and packed: {packed_bytes / 2**20:.2f} MiB (zeros included)")
                   + ("" if config.execution != "dense" or packed_bytes else " (zeros in float: no bytes saved)"))
    calibration = (f"calibrated on {config.n_samples}×{config.seq_len} tokens, " if new_stat is not None else "")
    technique.note(f"{calibration}{seconds:.1f} s")
    maybe_save(stage, config.save_dir, technique)


def install(stage: ModelStage, layer: nn.Module, name: str, linear: nn.Linear, weight: torch.Tensor,
            execution: Execution) -> None:
    """Put the pruned ``weight`` in place (restored when the composition exits)."""
    if execution == "dense":
        stage.patcher.set_attr(linear, "weight", nn.Parameter(weight, requires_grad=False))
    else:
        stage.patcher.replace_module(layer, name, SparseLinear(weight, linear.bias, execution))


def maybe_save(stage: ModelStage, save_dir: str | None, technique: Any) -> None:
    """Save the model (the quantization checkpoint format, which carries the sparse layers too)."""
    if not save_dir:
        return
    from effinfer.plugins.model.quantization.checkpoint import save_quantized

    folder = save_quantized(stage.model, stage.tokenizer, Path(save_dir),
                            technique={"name": technique.name, "config": technique.config.model_dump(mode="json")})
    technique.note(f"saved the pruned model to {folder}")


def load_pruned(folder: str | Path, device: str = "cpu") -> tuple[nn.Module, Any]:
    """Reload a model saved by a pruning / low-rank technique's ``save_dir`` (its sparse layers registered)."""
    import effinfer.plugins.model.low_rank.factorize  # noqa: F401  (registers LowRankLinear)
    from effinfer.plugins.model.quantization.checkpoint import load_quantized

    return load_quantized(folder, device)
