"""The technique base of the attention replacements with a recurrent state (``hedgehog``,
``mamba_convert``, ``retention_convert``): choose layers, swap, fit, repair, report.

The conversion follows the recipe the linearizing papers share (LoLCATs' attention transfer,
Zhang et al., arXiv:2410.10254; Mamba-in-the-Llama's layer-wise then end-to-end distillation,
Wang et al., arXiv:2408.15237): the chosen layers' ``self_attn`` become
:class:`~effinfer.plugins.model.structure.recurrent.RecurrentMixer` s initialised from the
attention's weights; each is fitted to its softmax layer's output (layer-wise MSE on the
captured attention inputs), then the whole model is repaired with KD against the original,
both through the shared service :mod:`~effinfer.plugins.model.structure.repair`. Every swap
goes through the stage's patcher: the composition restores the original model on exit.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field
from torch import nn

from effinfer.core import Feature, Requirement, Technique, hookimpl
from effinfer.core.stages import ModelStage
from effinfer.plugins.model.quantization.layerwise import decoder_layers
from effinfer.plugins.model.structure.recurrent import (AlternateConfig, RecurrentMixer, chosen_layers,
                                                        config_problems, replace_layers)
from effinfer.plugins.model.structure.repair import (Conversion, FitTarget, LayerFitConfig, RepairConfig, fit_layers,
                                                     fit_notes, repair)


class AlternateTechniqueConfig(AlternateConfig, LayerFitConfig, RepairConfig):
    """Layers to replace, the layer-wise fit (on by default) and the end-to-end repair."""

    fit_steps: int = Field(60, ge=0, le=100_000, description="optimizer steps per replaced layer of the layer-wise "
                                                             "MSE fit to the softmax layer's output (0: none)")
    fit_lr: float = Field(3e-3, gt=0.0, le=1.0, description="AdamW peak learning rate of the layer-wise fit")


class AlternateTechnique(Technique):
    """Base class: subclasses set the metadata, ``Config`` and :meth:`build`."""

    requires = frozenset({Requirement.CALIBRATION_DATA, Requirement.TRAINING})
    #: the chosen layers' attention is no longer the architecture's own (the static engine, width
    #: pruning … need it: the static engine hands such a model to the HF path, techniques that
    #: declare the need are refused after this one before any model loads)
    removes_features = frozenset({Feature.STOCK_ATTENTION})
    #: refused before any model loads: strategies that roll the cache back or verify token trees (a recurrent
    #: state cannot be cropped), the static engine's block arithmetic (early exit), KV-cache policies and the
    #: paged serving engine (they manage per-token KV, which the replaced layers do not have)
    incompatible_with = frozenset({
        "draft_model", "lookahead", "medusa", "prompt_lookup", "rest", "self_speculative", "layerskip", "early_exit",
        "h2o", "kivi", "kv_int4", "kv_int8", "offload_kv", "sliding_window", "snapkv", "streaming_llm", "tova",
        "continuous_batching", "static_batching", "paged_kv"})
    Config = AlternateTechniqueConfig

    def build(self, attention: nn.Module, model_config: Any, index: int) -> RecurrentMixer:
        raise NotImplementedError

    def describe_state(self, mixer: RecurrentMixer) -> str:
        return ""

    def check_model_config(self, config: Any) -> list[str]:
        return config_problems(self.config, config)

    def convert(self, model: nn.Module, conversion: Conversion) -> list[tuple[int, nn.Module, RecurrentMixer]]:
        """Swap the chosen layers' attention (no training): ``(index, original, mixer)`` each."""
        _, layers = decoder_layers(model)
        indices = chosen_layers(self.config, len(layers))
        return replace_layers(layers, indices, lambda attention, i: self.build(attention, model.config, i),
                              conversion)

    def trained(self, mixer: RecurrentMixer) -> dict[str, nn.Parameter]:
        if self.config.train_projections:
            return dict(mixer.named_parameters())
        return mixer.new_parameters()

    @hookimpl
    def effinfer_transform_model(self, stage: ModelStage) -> None:
        config = self.config
        started = time.perf_counter()
        conversion = Conversion(stage.patcher)
        swapped = self.convert(stage.model, conversion)
        if not swapped:
            self.note("no attention layer replaced (count=0): the model is the original")
            return
        parameters = {f"layers.{i}.self_attn.{name}": p for i, _, mixer in swapped
                      for name, p in self.trained(mixer).items()}
        if config.fit_steps:
            tokens = stage.calibration_batches(config.fit_samples, config.fit_seq_len)
            targets = [FitTarget(i, "self_attn", old, new, self.trained(new)) for i, old, new in swapped]
            reports = fit_layers(stage.model, targets, tokens, config)
            for line in fit_notes(reports):
                self.note(line)
        report = repair(stage.model, stage.tokenizer, parameters, conversion, config, name=self.name,
                        identity=[config.model_dump(exclude={"repair_checkpoint", "repair_eval_windows"})])
        for line in report.notes() if report else []:
            self.note(line)
        conversion.release()
        mixer = swapped[0][2]
        total = len(decoder_layers(stage.model)[1])
        self.note(f"replaced the attention of decoder layers {[i for i, _, _ in swapped]} of {total} by "
                  f"{mixer.kind} ({sum(p.numel() for p in parameters.values()) / 1e6:.3f} M parameters trained); "
                  f"{self.describe_state(mixer)}; conversion {time.perf_counter() - started:.1f} s")
