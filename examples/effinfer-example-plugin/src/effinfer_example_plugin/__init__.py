"""An example third-party effinfer plugin: drop the last transformer layers.

Layer dropping is the simplest form of depth pruning (structured pruning of whole
blocks); see Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers",
arXiv:2403.17887. This package exists to show (and to test) how a plugin is shipped:
a ``Technique`` subclass, a pydantic ``Config``, one stage hook, and an entry point in
the ``effinfer`` group of ``pyproject.toml``.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.errors import EffinferError
from effinfer.core.stages import ModelStage


class UnsupportedModelError(EffinferError, ValueError):
    """The model does not have the layout ``drop_layers`` works on."""


class DropLayers(Technique):
    name = "drop_layers"
    node = "model.compression.sparsification.weight_pruning.structured"
    paper = Paper(title="The Unreasonable Ineffectiveness of the Deeper Layers", year=2024, arxiv="2403.17887")
    summary = "Removes the last transformer blocks before the final norm (depth pruning without retraining)."

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        drop: int = Field(2, ge=1, le=64, description="how many of the last decoder layers to remove")
        keep_last: bool = Field(True, description="keep the very last layer, drop the ones before it")

    @hookimpl
    def effinfer_transform_model(self, stage: ModelStage) -> None:
        decoder, layers = decoder_layers(stage.model)
        if self.config.drop >= len(layers):
            raise UnsupportedModelError(f"drop_layers: drop={self.config.drop} would remove all {len(layers)} "
                                        f"decoder layers; use drop <= {len(layers) - 1}")
        end = len(layers) - 1 if self.config.keep_last else len(layers)
        kept = list(range(end - self.config.drop)) + list(range(end, len(layers)))
        stage.patcher.set_attr(decoder, "layers", nn.ModuleList(layers[i] for i in kept))
        config = stage.model.config
        stage.patcher.set_attr(config, "num_hidden_layers", len(kept))
        if getattr(config, "layer_types", None):  # Qwen2, Gemma3: attention type (full/sliding) per layer
            stage.patcher.set_attr(config, "layer_types", [config.layer_types[i] for i in kept])
        for index, i in enumerate(kept):  # the KV cache is indexed by layer position
            stage.patcher.set_attr(layers[i].self_attn, "layer_idx", index)
        self.note(f"dropped {self.config.drop} of {len(layers)} decoder layers")


def decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The decoder and its blocks at ``model.model.layers``, each with ``self_attn.layer_idx``.

    That is the layout of transformers' decoder-only causal LMs (Llama, Qwen2, Gemma3 text); any
    other model is refused with the reason, before anything is changed.
    """
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(
            f"drop_layers needs a decoder-only causal LM with its blocks at model.model.layers (the layout of "
            f"Llama, Qwen2 and Gemma3 in transformers); {type(model).__name__} has no such list")
    for index, layer in enumerate(layers):
        if not isinstance(getattr(getattr(layer, "self_attn", None), "layer_idx", None), int):
            raise UnsupportedModelError(
                f"drop_layers renumbers each block's self_attn.layer_idx (its KV-cache slot), but block {index} "
                f"of {type(model).__name__} ({type(layer).__name__}) has none")
    return decoder, layers


@hookimpl
def effinfer_register_techniques(register: Callable[[type], None]) -> None:
    register(DropLayers)
