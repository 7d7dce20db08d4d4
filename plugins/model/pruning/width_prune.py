"""Width pruning: remove attention heads (or whole KV groups) and FFN channels by importance.

An-Zhao-Yu-Tang-Wang, "Fluctuation-based Adaptive Structured Pruning for Large Language
Models" (FLAP), AAAI 2024, arXiv:2312.11983, with the structure of Ma, Fang & Wang,
"LLM-Pruner", arXiv:2305.11627. The importance of an input channel ``c`` of ``o_proj`` or
``down_proj`` is FLAP's fluctuation metric ``Var_t[x_c] · ‖W[:, c]‖²`` on calibration
text (how much the layer's output would move if the channel were replaced by its mean);
a head's score is the sum over its channels, a KV group's the sum over its heads, an FFN
channel's its own. Every decoder layer loses the same number of units, so the result is
a smaller model of the same architecture: ``intermediate_size``, ``num_attention_heads``
(and ``num_key_value_heads`` when whole KV groups go) shrink in the model config, the
linear layers are physically smaller, and the model saves and reloads as such.

Heads are removed evenly within every KV group (``attention_unit='head'``: grouped-query
attention keeps its group size uniform) or as whole groups with their key/value head
(``'kv_group'``: the KV cache shrinks too). ``bias_compensation`` (FLAP) adds
``W[:, removed] · mean(x[removed])`` to the output bias of ``o_proj`` and ``down_proj``;
it needs a layout whose config can give those layers a bias (Llama: ``attention_bias``,
``mlp_bias``), so it is refused on Qwen2 and Gemma 3.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from effinfer.core import LLAMA, Feature, Paper, Requirement, Technique, hookimpl
from effinfer.core.stages import ModelStage
from effinfer.plugins.model.pruning.sparse import maybe_save
from effinfer.plugins.model.quantization.config import CalibrationConfig
from effinfer.plugins.model.quantization.layerwise import decoder_layers, first_layer_inputs, run_layer, watch_inputs


class ChannelMoments:
    """Running mean and variance of every input channel of one linear layer (float64 sums)."""

    def __init__(self, linear: nn.Linear) -> None:
        self.sum = torch.zeros(linear.in_features, dtype=torch.float64, device=linear.weight.device)
        self.squares = torch.zeros_like(self.sum)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).double()
        self.sum += flat.sum(0)
        self.squares += flat.pow(2).sum(0)
        self.tokens += flat.shape[0]

    def mean(self) -> torch.Tensor:
        return (self.sum / max(1, self.tokens)).float()

    def variance(self) -> torch.Tensor:
        mean = self.sum / max(1, self.tokens)
        return (self.squares / max(1, self.tokens) - mean.pow(2)).clamp_min(0).float()


def fluctuation(linear: nn.Linear, moments: ChannelMoments) -> torch.Tensor:
    """FLAP's importance of each input channel: ``Var[x_c] · ‖W[:, c]‖²``."""
    return moments.variance() * linear.weight.detach().float().pow(2).sum(0)


def sliced(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
           bias: torch.Tensor | None = None, force_bias: bool = False) -> nn.Linear:
    """A new, smaller ``nn.Linear`` with the chosen output ``rows`` and input ``cols`` of ``linear``."""
    weight = linear.weight.detach()
    old_bias = None if linear.bias is None else linear.bias.detach()
    if rows is not None:
        weight = weight[rows]
        old_bias = None if old_bias is None else old_bias[rows]
    if cols is not None:
        weight = weight[:, cols]
    if bias is not None:
        old_bias = bias if old_bias is None else old_bias + bias
    if force_bias and old_bias is None:
        old_bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=old_bias is not None, device=weight.device,
                    dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if old_bias is not None:
            new.bias.copy_(old_bias.to(weight.dtype))
    return new.requires_grad_(False)


def kept_units(config: Any, attention_unit: str, attn_ratio: float, ffn_ratio: float, multiple: int
               ) -> tuple[int, int, int, str | None]:
    """``(heads, kv_heads, intermediate)`` after pruning, or a problem message."""
    heads, kv = int(config.num_attention_heads), int(config.num_key_value_heads)
    group = heads // kv
    if attention_unit == "head":
        per_group = group - round(attn_ratio * group)
        new_heads, new_kv = per_group * kv, kv
        if per_group < 1:
            return heads, kv, 0, (f"attn_ratio={attn_ratio} would remove all {group} query heads of each KV group; "
                                  f"use attn_ratio < {1 - 0.5 / group:.2f}, or attention_unit='kv_group'")
    else:
        new_kv = kv - round(attn_ratio * kv)
        new_heads = new_kv * group
        if new_kv < 1:
            return heads, kv, 0, (f"attn_ratio={attn_ratio} would remove all {kv} KV groups; use attn_ratio < "
                                  f"{1 - 0.5 / kv:.2f}")
    intermediate = int(config.intermediate_size)
    keep = intermediate - round(ffn_ratio * intermediate)
    keep = max(multiple, keep // multiple * multiple) if keep >= multiple else keep
    if keep < 1:
        return heads, kv, 0, f"ffn_ratio={ffn_ratio} would remove every FFN channel; use a smaller ffn_ratio"
    return new_heads, new_kv, keep, None


class WidthPrune(Technique):
    name = "width_prune"
    node = "model.compression.sparsification.weight_pruning.structured"
    paper = Paper(title="Fluctuation-based Adaptive Structured Pruning for Large Language Models", year=2023,
                  arxiv="2312.11983")
    summary = ("Removes attention heads (evenly per KV group, or whole KV groups) and FFN channels of every "
               "decoder layer by FLAP's fluctuation importance (Var[x]·‖W col‖² on calibration text), optionally "
               "compensating the removed channels' mean with a bias; physically smaller matrices and a smaller "
               "model config that saves and reloads.")
    requires = frozenset({Requirement.CALIBRATION_DATA})
    needs_features = frozenset({Feature.DENSE_WEIGHTS, Feature.STOCK_ATTENTION})
    bench_config = {"attn_ratio": 0.34, "ffn_ratio": 0.3, "n_samples": 8, "seq_len": 256}

    class Config(CalibrationConfig):
        attn_ratio: float = Field(0.25, ge=0.0, lt=1.0, description="fraction of query heads (per KV group) or of "
                                                                     "KV groups to remove")
        ffn_ratio: float = Field(0.25, ge=0.0, lt=1.0, description="fraction of FFN channels to remove")
        attention_unit: Literal["head", "kv_group"] = Field(
            "head", description="'head' = query heads, the same number in every KV group; 'kv_group' = whole groups "
                                "with their key/value head (the KV cache shrinks too)")
        channel_multiple: int = Field(8, ge=1, le=256, description="the kept FFN width is rounded down to a multiple "
                                                                   "of this (GEMM-friendly shapes)")
        bias_compensation: bool = Field(False, description="FLAP's bias compensation for the removed channels' mean "
                                                           "(Llama layout only: it gives o_proj/down_proj a bias)")
        save_dir: str | None = Field(None, description="save the smaller model here (reload with "
                                                       "effinfer.plugins.model.pruning.load_pruned)")

        @model_validator(mode="after")
        def _prunes_something(self) -> Any:
            if self.attn_ratio == 0 and self.ffn_ratio == 0:
                raise ValueError("attn_ratio=0 and ffn_ratio=0 would prune nothing; set one of them above 0")
            return self

    def check_model_config(self, config: Any) -> list[str]:
        if config is None or not hasattr(config, "num_attention_heads"):
            return []
        config_ = self.config
        problems = []
        if config_.bias_compensation and getattr(config, "model_type", None) != LLAMA:
            problems.append(f"bias_compensation=true needs the Llama layout (its config can give o_proj and "
                            f"down_proj a bias); this model is {getattr(config, 'model_type', '?')!r}: set "
                            f"bias_compensation=false")
        *_, problem = kept_units(config, config_.attention_unit, config_.attn_ratio, config_.ffn_ratio,
                                 config_.channel_multiple)
        return problems + ([problem] if problem else [])

    @hookimpl
    def effinfer_transform_model(self, stage: ModelStage) -> None:
        config, model_config = self.config, stage.model.config
        problems = self.check_model_config(model_config)
        if problems:
            raise ValueError("width_prune: " + "; ".join(problems))
        started = time.perf_counter()
        _, layers = decoder_layers(stage.model)
        #: per decoder layer: the kept query heads, KV heads and FFN channels (original indices)
        self.kept: list[dict[str, list[int]]] = []
        heads, kv = int(model_config.num_attention_heads), int(model_config.num_key_value_heads)
        head_dim = int(getattr(model_config, "head_dim", None) or model_config.hidden_size // heads)
        new_heads, new_kv, new_ffn, _ = kept_units(model_config, config.attention_unit, config.attn_ratio,
                                                   config.ffn_ratio, config.channel_multiple)
        before = sum(p.numel() for p in stage.model.parameters())
        old_ffn = int(model_config.intermediate_size)
        tokens = stage.calibration_batches(config.n_samples, config.seq_len)
        batches = first_layer_inputs(stage.model, tokens, config.batch_size)
        for layer in layers:
            attention, mlp = layer.self_attn, layer.mlp
            watched = {"o": attention.o_proj, "down": mlp.down_proj}
            moments = {name: ChannelMoments(m) for name, m in watched.items()}
            with watch_inputs(watched, lambda name, x: moments[name].add(x)):
                next_batches = run_layer(layer, batches)
            ffn_keep = torch.topk(fluctuation(mlp.down_proj, moments["down"]), new_ffn).indices.sort().values
            head_score = fluctuation(attention.o_proj, moments["o"]).view(heads, head_dim).sum(1)
            q_heads, kv_heads = choose_heads(head_score, heads, kv, new_heads, new_kv)
            self._shrink(stage, layer, q_heads, kv_heads, ffn_keep, head_dim, moments)
            self.kept.append({"q_heads": q_heads.tolist(), "kv_heads": kv_heads.tolist(), "ffn": ffn_keep.tolist()})
            batches = next_batches
        if getattr(model_config, "head_dim", None) is None:
            # Qwen2 derives head_dim from hidden_size // num_attention_heads, which fewer heads would change; the
            # explicit (same) value stays on the config after the composition exits, harmlessly
            model_config.head_dim = head_dim
        for name, value in (("num_attention_heads", new_heads), ("num_key_value_heads", new_kv),
                            ("intermediate_size", new_ffn)):
            stage.patcher.set_attr(model_config, name, value)
        if config.bias_compensation:
            stage.patcher.set_attr(model_config, "attention_bias", True)
            stage.patcher.set_attr(model_config, "mlp_bias", True)
        after = sum(p.numel() for p in stage.model.parameters())
        self.note(f"width-pruned {len(layers)} decoder layers: query heads {heads} → {new_heads}, KV heads {kv} → "
                  f"{new_kv}, FFN channels {old_ffn} → {new_ffn}; parameters "
                  f"{before / 1e6:.1f} M → {after / 1e6:.1f} M ({after / before:.1%})"
                  + ("; bias compensation" if config.bias_compensation else ""))
        self.note(f"calibrated on {tokens.shape[0]}×{tokens.shape[1]} tokens in {time.perf_counter() - started:.1f} s")
        maybe_save(stage, config.save_dir, self)

    def _shrink(self, stage: ModelStage, layer: nn.Module, q_heads: torch.Tensor, kv_heads: torch.Tensor,
                ffn_keep: torch.Tensor, head_dim: int, moments: dict[str, ChannelMoments]) -> None:
        attention, mlp = layer.self_attn, layer.mlp
        compensate = self.config.bias_compensation

        def channels(units: torch.Tensor) -> torch.Tensor:
            return (units.unsqueeze(1) * head_dim + torch.arange(head_dim, device=units.device)).reshape(-1)

        q_rows, kv_rows = channels(q_heads), channels(kv_heads)

        def compensation(linear: nn.Linear, kept: torch.Tensor, name: str) -> torch.Tensor | None:
            if not compensate:
                return None
            removed = torch.ones(linear.in_features, dtype=torch.bool, device=kept.device)
            removed[kept] = False
            mean = moments[name].mean().to(linear.weight.device)
            return linear.weight.detach().float()[:, removed] @ mean[removed]

        replacements = {
            "self_attn.q_proj": sliced(attention.q_proj, rows=q_rows, force_bias=compensate),
            "self_attn.k_proj": sliced(attention.k_proj, rows=kv_rows, force_bias=compensate),
            "self_attn.v_proj": sliced(attention.v_proj, rows=kv_rows, force_bias=compensate),
            "self_attn.o_proj": sliced(attention.o_proj, cols=q_rows,
                                       bias=compensation(attention.o_proj, q_rows, "o"), force_bias=compensate),
            "mlp.gate_proj": sliced(mlp.gate_proj, rows=ffn_keep, force_bias=compensate),
            "mlp.up_proj": sliced(mlp.up_proj, rows=ffn_keep, force_bias=compensate),
            "mlp.down_proj": sliced(mlp.down_proj, cols=ffn_keep, bias=compensation(mlp.down_proj, ffn_keep, "down"),
                                    force_bias=compensate),
        }
        for path, new in replacements.items():
            stage.patcher.replace_module(layer, path, new)
        stage.patcher.set_attr(attention, "num_key_value_groups", len(q_heads) // len(kv_heads))
        if hasattr(mlp, "intermediate_size"):
            stage.patcher.set_attr(mlp, "intermediate_size", len(ffn_keep))


def choose_heads(score: torch.Tensor, heads: int, kv: int, new_heads: int, new_kv: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept query heads and KV heads (sorted), from per-query-head scores.

    Fewer KV heads: the groups of highest total score stay whole. Same KV heads: each group
    keeps its ``new_heads / kv`` best query heads.
    """
    group = heads // kv
    by_group = score.view(kv, group)
    if new_kv < kv:
        kv_keep = torch.topk(by_group.sum(1), new_kv).indices.sort().values
        q_keep = (kv_keep.unsqueeze(1) * group + torch.arange(group)).reshape(-1)
        return q_keep, kv_keep
    per_group = new_heads // kv
    best = torch.topk(by_group, per_group, dim=1).indices.sort(dim=1).values
    q_keep = (torch.arange(kv).unsqueeze(1) * group + best).reshape(-1)
    return q_keep, torch.arange(kv)
