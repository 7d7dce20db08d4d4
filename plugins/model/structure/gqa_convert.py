"""GQA / MQA conversion: the key/value heads of a pretrained model merged into fewer groups.

Ainslie, Lee-Thorp, de Jong, Zemlyanskiy, Lebrón & Sanghai, "GQA: Training Generalized
Multi-Query Transformer Models from Multi-Head Checkpoints", arXiv:2305.13245 (multi-query
attention: Shazeer, arXiv:1911.02150). A checkpoint with ``kv`` key/value heads becomes one
with ``kv_heads`` (a divisor of ``kv``; 1 = MQA): the original KV heads are split into
``kv_heads`` groups of ``r = kv / kv_heads``, and each group's new key and value projection
is the **mean** of its heads' projections (and biases) — the paper's pooling, better than
keeping the first head (``pooling='first'``) — then briefly uptrained. The query heads that
used the merged heads now share the pooled one.

Grouping: ``'consecutive'`` merges neighbouring heads (what the paper does); ``'error'``
chooses the equal-size partition that minimises the reconstruction error of the keys and
values on calibration text, ``Σ_h ‖(W_h − W̄_g) X‖²`` over each group ``g`` and its heads
``h`` (exhaustive over the partitions up to 12 heads, else a balanced k-means of the heads
whitened by the input covariance). Non-consecutive groups are made contiguous by permuting
the query heads (rows of ``q_proj``, columns of ``o_proj``), which leaves the function unchanged.

The model keeps its architecture with fewer KV heads: ``config.num_key_value_heads``, each
attention's ``num_key_value_groups`` and physically smaller ``k_proj``/``v_proj`` (so
Hugging Face ``generate``, the static engine and every KV cache hold ``kv_heads / kv`` of the
keys and values: SmolLM2-135M's 3 KV heads → MQA keeps one third). Repair (``repair_steps``)
goes through the shared service :mod:`~effinfer.plugins.model.structure.repair`: the new key
and value projections (``repair_train='kv'``, the original model runs as teacher by undoing
the conversion) or every decoder parameter (``'all'``, as GQA uptraining does: a copy is converted and
trained and replaces the model, the untouched original is the teacher; twice the weights in
memory during the repair). ``kv_heads`` equal to the model's KV
heads is the original model exactly.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Iterator
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from effinfer.core import Feature, Paper, Requirement, Technique, hookimpl
from effinfer.core.stages import ModelStage
from effinfer.plugins.model.quantization.config import CalibrationConfig
from effinfer.plugins.model.quantization.layerwise import decoder_layers, first_layer_inputs, run_layer, watch_inputs
from effinfer.plugins.model.structure.moefication import balanced_kmeans
from effinfer.plugins.model.structure.repair import Conversion, RepairConfig, repair_technique, trainable_parameters

__all__ = ["GQAConvert", "equal_partitions", "kv_bytes_per_token", "merge_heads"]

#: up to this many KV heads the error grouping tries every equal-size partition
EXHAUSTIVE_HEADS = 12


def equal_partitions(items: list[int], size: int) -> Iterator[list[list[int]]]:
    """Every partition of ``items`` into groups of ``size`` (groups and their members in order)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partners in itertools.combinations(rest, size - 1):
        remaining = [i for i in rest if i not in partners]
        for tail in equal_partitions(remaining, size):
            yield [[first, *partners], *tail]


def group_error(heads: torch.Tensor, groups: list[list[int]]) -> float:
    """``Σ_g Σ_{h∈g} ‖W_h − mean_g W‖²`` of per-head (whitened) weight rows ``heads`` (``kv × features``)."""
    return sum(float((heads[g] - heads[g].mean(0)).pow(2).sum()) for g in groups)


def choose_groups(heads: torch.Tensor, count: int, rule: str, seed: int = 0) -> list[list[int]]:
    """``count`` equal groups of the KV heads (rows of ``heads``)."""
    kv = heads.shape[0]
    size = kv // count
    consecutive = [list(range(g * size, (g + 1) * size)) for g in range(count)]
    if rule == "consecutive" or size == 1 or count == 1:
        return consecutive
    if kv <= EXHAUSTIVE_HEADS:
        return min(equal_partitions(list(range(kv)), size), key=lambda p: group_error(heads, p))
    assignment = balanced_kmeans(heads, count, seed=seed)
    return [sorted(torch.nonzero(assignment == g).squeeze(1).tolist()) for g in range(count)]


def kv_bytes_per_token(config: Any, kv_heads: int, element_size: int) -> int:
    """Bytes of keys and values one token adds to the cache over all layers."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * element_size


def merge_heads(linear: nn.Linear, groups: list[list[int]], head_dim: int, pooling: str) -> nn.Linear:
    """A new projection with one head per group: the mean (or first) of the group's heads."""
    weight = linear.weight.detach().view(-1, head_dim, linear.in_features)
    bias = None if linear.bias is None else linear.bias.detach().view(-1, head_dim)

    def pool(t: torch.Tensor, group: list[int]) -> torch.Tensor:
        return t[group].mean(0) if pooling == "mean" else t[group[0]]

    new = nn.Linear(linear.in_features, len(groups) * head_dim, bias=bias is not None, device=weight.device,
                    dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(torch.cat([pool(weight, g) for g in groups]))
        if bias is not None:
            new.bias.copy_(torch.cat([pool(bias, g) for g in groups]))
    return new.requires_grad_(False)


def permuted(linear: nn.Linear, order: torch.Tensor, dim: int) -> nn.Linear:
    """A copy of ``linear`` with its output rows (``dim=0``) or input columns (``dim=1``) in ``order``."""
    new = copy.deepcopy(linear)
    with torch.no_grad():
        new.weight.copy_(linear.weight.index_select(dim, order))
        if dim == 0 and linear.bias is not None:
            new.bias.copy_(linear.bias[order])
    return new.requires_grad_(False)


class GQAConvert(Technique):
    name = "gqa_convert"
    node = "model.structure.efficient_attention.shared_kv"
    paper = Paper(title="GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints",
                  year=2023, arxiv="2305.13245")
    summary = ("Merges the key/value heads into fewer groups by mean pooling their projections (neighbouring heads, "
               "or the grouping of least reconstruction error on calibration text), down to multi-query attention, "
               "then optionally uptrains through the shared repair service; config, attention modules and KV caches "
               "shrink to kv_heads / KV heads.")
    requires = frozenset({Requirement.CALIBRATION_DATA})
    needs_features = frozenset({Feature.DENSE_WEIGHTS, Feature.STOCK_ATTENTION})
    bench_config = {"kv_heads": 1, "n_samples": 4, "seq_len": 128}

    class Config(CalibrationConfig, RepairConfig):
        kv_heads: int = Field(1, ge=1, le=1024, description="KV heads after the merge: a divisor of the model's KV "
                                                            "heads (1 = multi-query attention; the model's own "
                                                            "count = no change)")
        grouping: Literal["consecutive", "error"] = Field(
            "consecutive", description="which KV heads merge: neighbours, or the equal-size grouping of least "
                                       "key/value reconstruction error on calibration text")
        pooling: Literal["mean", "first"] = Field("mean", description="the merged head's projection: the mean of "
                                                                      "the group's heads (GQA) or its first head")
        repair_train: Literal["kv", "all"] = Field(
            "kv", description="what repair trains: the new key/value projections, or every decoder parameter "
                              "(against a frozen copy of the original model)")
        n_samples: int = Field(4, ge=1, le=4096, description="calibration windows (grouping='error' only)")
        seq_len: int = Field(128, ge=16, le=8192, description="tokens per calibration window")

    def check_model_config(self, config: Any) -> list[str]:
        kv = getattr(config, "num_key_value_heads", None)
        if not isinstance(kv, int):
            return []
        if kv % self.config.kv_heads:
            allowed = [d for d in range(1, kv + 1) if kv % d == 0]
            return [f"kv_heads={self.config.kv_heads} does not divide the model's {kv} KV heads; use one of "
                    f"{', '.join(map(str, allowed))}"]
        return []

    @hookimpl
    def effinfer_transform_model(self, stage: ModelStage) -> None:
        c = self.config
        model, model_config = stage.model, stage.model.config
        problems = self.check_model_config(model_config)
        if problems:
            raise ValueError("gqa_convert: " + "; ".join(problems))
        _, layers = decoder_layers(model)
        for index, layer in enumerate(layers):
            attention = getattr(layer, "self_attn", None)
            if attention is None or not all(isinstance(getattr(attention, n, None), nn.Linear)
                                            for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
                raise ValueError(f"gqa_convert needs attention with nn.Linear q/k/v/o_proj (Llama, Qwen2, Gemma 3); "
                                 f"layer {index} has {type(attention).__name__} — apply gqa_convert before quantizers "
                                 "and attention replacements")
        started = time.perf_counter()
        heads, kv = int(model_config.num_attention_heads), int(model_config.num_key_value_heads)
        head_dim = int(getattr(model_config, "head_dim", None) or model_config.hidden_size // heads)
        element = next(model.parameters()).element_size()
        teacher = None
        if c.repair_steps and c.repair_train == "all":  # convert and train a copy; the original is the teacher
            teacher, model = model, copy.deepcopy(model)
            model_config = model.config
            _, layers = decoder_layers(model)
        covariances = self.input_covariances(stage, model, layers) if c.grouping == "error" and 1 < c.kv_heads < kv else None
        conversion = Conversion(stage.patcher)
        self.groups: list[list[list[int]]] = []
        new_modules: dict[str, nn.Module] = {}
        for index, layer in enumerate(layers):
            attention = layer.self_attn
            features = self.head_features(attention, head_dim, None if covariances is None else covariances[index])
            groups = choose_groups(features, c.kv_heads, c.grouping, index)
            self.groups.append(groups)
            for name in ("k_proj", "v_proj"):
                new = merge_heads(getattr(attention, name), groups, head_dim, c.pooling)
                conversion.replace_module(attention, name, new)
                new_modules[f"layer{index}.{name}"] = new
            order = [h for g in groups for h in g]
            if order != sorted(order):  # make each group's query heads contiguous
                group = heads // kv
                rows = torch.tensor([h * group * head_dim + i for h in order for i in range(group * head_dim)],
                                    device=attention.q_proj.weight.device)
                conversion.replace_module(attention, "q_proj", permuted(attention.q_proj, rows, 0))
                conversion.replace_module(attention, "o_proj", permuted(attention.o_proj, rows, 1))
            conversion.set_attr(attention, "num_key_value_groups", heads // c.kv_heads)
            if hasattr(attention, "num_key_value_heads"):
                conversion.set_attr(attention, "num_key_value_heads", c.kv_heads)
        conversion.set_attr(model_config, "num_key_value_heads", c.kv_heads)
        before, after = kv_bytes_per_token(model_config, kv, element), kv_bytes_per_token(model_config, c.kv_heads,
                                                                                           element)
        self.kv_fraction = after / before
        regrouped = sum(1 for g in self.groups if [h for grp in g for h in grp] != sorted(h for grp in g for h in grp))
        self.note(f"KV heads {kv} → {c.kv_heads} in {len(layers)} layers ({c.grouping} grouping, {c.pooling} pooling"
                  + (f", {regrouped} layers with non-neighbouring groups" if c.grouping == "error" else "")
                  + f"); KV cache {before:,} → {after:,} bytes per token ({after / before:.3f} of the original); "
                  f"converted in {time.perf_counter() - started:.1f} s")
        if c.repair_steps:
            if teacher is None:
                parameters = trainable_parameters(new_modules)
            else:
                parameters = {n: p for n, p in model.named_parameters() if ".layers." in n and p.is_floating_point()}
            repair_technique(self, model, stage.tokenizer, parameters, conversion if teacher is None else teacher)
            stage.model = model
        conversion.release()

    def head_features(self, attention: nn.Module, head_dim: int, covariance: torch.Tensor | None) -> torch.Tensor:
        """Per KV head, its key and value projection rows (whitened by the input covariance when given)."""
        rows = []
        for name in ("k_proj", "v_proj"):
            weight = getattr(attention, name).weight.detach().float()
            if covariance is not None:
                weight = weight @ covariance
            rows.append(weight.reshape(-1, head_dim * weight.shape[1]))
        return torch.cat(rows, dim=1).cpu()

    def input_covariances(self, stage: ModelStage, model: nn.Module, layers: nn.ModuleList) -> list[torch.Tensor]:
        """Per layer, the square root of the attention input's second moment (``‖W X‖² = ‖W C^½‖² · n``)."""
        c = self.config
        tokens = stage.calibration_batches(c.n_samples, c.seq_len)
        batches = first_layer_inputs(model, tokens, c.batch_size)
        roots = []
        for layer in layers:
            moment = None
            count = 0

            def add(_name: str, x: torch.Tensor) -> None:
                nonlocal moment, count
                flat = x.reshape(-1, x.shape[-1]).double()
                moment = flat.t() @ flat if moment is None else moment + flat.t() @ flat
                count += flat.shape[0]

            with watch_inputs({"k": layer.self_attn.k_proj}, add):
                batches = run_layer(layer, batches)
            values, vectors = torch.linalg.eigh(moment / max(1, count))
            roots.append((vectors * values.clamp_min(0).sqrt()) @ vectors.t())
        return [r.float() for r in roots]
