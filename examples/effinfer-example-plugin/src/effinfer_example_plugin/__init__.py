"""An example third-party effinfer plugin: drop the last transformer layers.

Layer dropping is the simplest form of depth pruning (structured pruning of whole
blocks); see Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers",
arXiv:2403.17887. This package exists to show (and to test) how a plugin is shipped:
a ``Technique`` subclass, a pydantic ``Config``, one stage hook, and an entry point in
the ``effinfer`` group of ``pyproject.toml``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from effinfer.core import Paper, Technique, hookimpl


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
    def effinfer_transform_model(self, stage) -> None:
        decoder = stage.model.model
        layers = list(decoder.layers)
        if self.config.drop >= len(layers):
            raise ValueError(f"drop={self.config.drop} would remove all {len(layers)} layers")
        end = len(layers) - 1 if self.config.keep_last else len(layers)
        kept = layers[:end - self.config.drop] + layers[end:]
        stage.patcher.set_attr(decoder, "layers", nn.ModuleList(kept))
        stage.patcher.set_attr(stage.model.config, "num_hidden_layers", len(kept))
        for index, layer in enumerate(kept):  # the KV cache is indexed by layer position
            stage.patcher.set_attr(layer.self_attn, "layer_idx", index)
        self.note(f"dropped {self.config.drop} of {len(layers)} decoder layers")


@hookimpl
def effinfer_register_techniques(register):
    register(DropLayers)
