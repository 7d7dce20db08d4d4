"""What the low-rank techniques share: the factorized layer, the rank rule, the config, the layer loop.

A linear layer ``y = W x + b`` (``W``: ``out × in``) becomes two thin ones,
``y = U (V x) + b`` with ``V``: ``r × in`` and ``U``: ``out × r`` (:class:`LowRankLinear`).
It stores and computes ``r · (in + out)`` instead of ``in · out`` weights, so it saves
only when ``r < in · out / (in + out)``. ``param_ratio`` is the fraction of each layer's
weights kept: ``r = floor(param_ratio · in · out / (in + out))``, rounded down to a
multiple of ``rank_multiple``; a layer whose rank would not save (``r`` at or above the
break-even rank) or would be zero stays dense, and the note says which.

How ``U`` and ``V`` are found is each technique's (plain SVD, activation-aware ASVD,
whitened SVD-LLM): they all reduce to a truncated SVD of ``W S`` for an invertible input
transform ``S`` (identity, a diagonal of activation scales, the Cholesky factor of the
inputs' Gram matrix), with ``V = Σ_r^{1/2} V_rᵀ S⁻¹`` and ``U = U_r Σ_r^{1/2}``
(:func:`factorize`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from effinfer.core.stages import ModelStage
from effinfer.plugins.model.quantization.config import weight_math_threads
from effinfer.plugins.model.quantization.layers import PackedLayer
from effinfer.plugins.model.quantization.layerwise import (decoder_layers, first_layer_inputs, linears_of, run_layer,
                                                           watch_inputs)


class LowRankLinear(PackedLayer):
    """``y = up(down(x)) + b``: a rank-``r`` factorization of a linear layer."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.rank = up.shape
        self.in_features = down.shape[1]
        self.up = nn.Parameter(up.detach().contiguous(), requires_grad=False)
        self.down = nn.Parameter(down.detach().contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down), self.up, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.up @ self.down

    def path(self) -> str:
        return f"rank-{self.rank} factors"

    def metadata(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank}

    @classmethod
    def from_export(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LowRankLinear:
        return cls(tensors["up"], tensors["down"], tensors.get("bias"))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def break_even_rank(in_features: int, out_features: int) -> float:
    return in_features * out_features / (in_features + out_features)


def rank_for(in_features: int, out_features: int, param_ratio: float, multiple: int) -> int | None:
    """The rank that keeps ``param_ratio`` of the layer's weights, or ``None`` if it would not save."""
    rank = int(param_ratio * break_even_rank(in_features, out_features))
    rank = rank // multiple * multiple
    if rank < 1 or rank >= break_even_rank(in_features, out_features) or rank >= min(in_features, out_features):
        return None
    return rank


def factorize(weight: torch.Tensor, rank: int, transform: torch.Tensor | None = None,
              inverse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` with ``up @ down`` the best rank-``rank`` approximation of ``weight`` in the metric ``transform``.

    ``transform`` ``S`` (``in × in``, or a vector for a diagonal) and its inverse: the SVD is of
    ``W S`` and ``down`` is multiplied by ``S⁻¹``. ``None``: plain SVD (Eckart–Young).
    """
    W = weight.double()
    if transform is None:
        scaled = W
    elif transform.dim() == 1:
        scaled = W * transform.double().unsqueeze(0)
    else:
        scaled = W @ transform.double()
    u, s, vh = torch.linalg.svd(scaled, full_matrices=False)
    root = s[:rank].sqrt()
    up = u[:, :rank] * root.unsqueeze(0)
    down = root.unsqueeze(1) * vh[:rank]
    if transform is not None:
        down = down / transform.double().unsqueeze(0) if transform.dim() == 1 else down @ inverse.double()
    return up.to(weight.dtype), down.to(weight.dtype)


class LowRankConfig(BaseModel):
    """How much each layer keeps, which layers, where to save."""

    model_config = ConfigDict(extra="forbid")

    param_ratio: float = Field(0.8, gt=0.0, lt=1.0, description="fraction of each factorized layer's weights "
                                                                "kept: rank = floor(ratio · in·out/(in+out))")
    rank_multiple: int = Field(8, ge=1, le=256, description="ranks are rounded down to a multiple of this")
    skip_modules: list[str] = Field(default_factory=list, description="linear layers whose name contains one of "
                                                                      "these stay dense (embeddings and lm_head are "
                                                                      "never factorized)")
    save_dir: str | None = Field(None, description="save the factorized model here (reload with "
                                                   "effinfer.plugins.model.pruning.load_pruned)")


def low_rank_problems(config: LowRankConfig, model_config: Any) -> list[str]:
    """A ``param_ratio`` so small that a decoder layer would get rank 0, told from the model's config."""
    if model_config is None or not hasattr(model_config, "hidden_size"):
        return []
    try:
        hidden, intermediate = int(model_config.hidden_size), int(model_config.intermediate_size)
        heads, kv = int(model_config.num_attention_heads), int(model_config.num_key_value_heads)
    except (AttributeError, TypeError, ValueError):
        return []
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    shapes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv * head_dim), "mlp": (hidden, intermediate)}
    for name, (i, o) in shapes.items():
        if not any(s in name for s in config.skip_modules) and \
                int(config.param_ratio * break_even_rank(i, o)) < config.rank_multiple:
            return [f"param_ratio={config.param_ratio} gives {name} ({i}→{o}) a rank below rank_multiple="
                    f"{config.rank_multiple}; raise param_ratio or lower rank_multiple"]
    return []


#: ``(weight, statistic or None, rank) -> (up, down)``
FactorOne = Callable[[torch.Tensor, Any, int], tuple[torch.Tensor, torch.Tensor]]


def factorize_decoder(stage: ModelStage, technique: Any, factor_one: FactorOne,
                      new_stat: Callable[[nn.Linear], Any] | None = None,
                      add: Callable[[Any, torch.Tensor], None] | None = None,
                      fixed: dict[str, Any] | None = None) -> None:
    """Replace every selected linear layer of the decoder blocks by its factorization, block by block.

    ``fixed``: a statistic per full module name, measured beforehand; ``new_stat``/``add``: one
    collected per block on the calibration windows, as the already factorized blocks before it
    transform them (sequential, as GPTQ).
    """
    from rich.progress import Progress

    config = technique.config
    started = time.perf_counter()
    path, layers = decoder_layers(stage.model)
    batches = None
    if new_stat is not None:
        tokens = stage.calibration_batches(config.n_samples, config.seq_len)
        batches = first_layer_inputs(stage.model, tokens, config.batch_size)
    before = after = 0
    factored, dense = 0, []
    with Progress(transient=True) as progress:
        task = progress.add_task(f"{technique.name}: factorizing", total=len(layers))
        for index, layer in enumerate(layers):
            linears = linears_of(layer, f"{path}.{index}", config.skip_modules)
            stats: dict[str, Any] = {name: fixed.get(f"{path}.{index}.{name}") for name in linears} if fixed else {}
            if new_stat is not None:
                stats = {name: new_stat(m) for name, m in linears.items()}
                with watch_inputs(linears, lambda name, x: add(stats[name], x)):
                    run_layer(layer, batches)
            for name, linear in linears.items():
                rank = rank_for(linear.in_features, linear.out_features, config.param_ratio, config.rank_multiple)
                before += linear.weight.numel()
                if rank is None:
                    dense.append(name)
                    after += linear.weight.numel()
                    continue
                with torch.no_grad(), weight_math_threads():  # LAPACK on 2 contended threads: 100× slower
                    up, down = factor_one(linear.weight.detach().float(), stats.get(name), rank)
                dtype = linear.weight.dtype
                new = LowRankLinear(up.to(dtype), down.to(dtype), linear.bias)
                after += new.up.numel() + new.down.numel()
                factored += 1
                stage.patcher.replace_module(layer, name, new)
            if batches is not None:
                batches = run_layer(layer, batches)
            progress.advance(task)
    seconds = time.perf_counter() - started
    kept = f"; {len(dense)} stayed dense (rank would not save): {', '.join(sorted(set(dense)))}" if dense else ""
    technique.note(f"factorized {factored} linear layers at param_ratio {config.param_ratio}: {before / 1e6:.2f} M → "
                   f"{after / 1e6:.2f} M weights ({after / max(1, before):.1%}){kept}; {seconds:.1f} s")
    from effinfer.plugins.model.pruning.sparse import maybe_save

    maybe_save(stage, config.save_dir, technique)
