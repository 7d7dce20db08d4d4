"""Layer dropping by block influence (ShortGPT).

Men, Xu, Zhang, Wang, Lin, Lu, Han & Chen, "ShortGPT: Layers in Large Language Models
are More Redundant Than You Expect", arXiv:2403.03853. The block influence of decoder
layer ``i`` is ``BI_i = 1 − E_t[cos(x_i,t, x_{i+1},t)]``, one minus the mean cosine
similarity between a token's hidden state entering and leaving the layer, measured on
calibration text; the ``drop`` layers of lowest influence are removed. The model keeps
its architecture with fewer blocks (``num_hidden_layers``, the per-layer attention types
and each block's KV-cache slot renumbered), so it saves and reloads as a smaller model.
Compare the example plugin's ``drop_layers``, which removes the last blocks blindly.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from effinfer.core import Feature, Paper, Requirement, Technique, hookimpl
from effinfer.core.stages import ModelStage
from effinfer.plugins.model.pruning.sparse import maybe_save
from effinfer.plugins.model.quantization.config import CalibrationConfig
from effinfer.plugins.model.quantization.layerwise import decoder_layers, first_layer_inputs, run_layer


@torch.no_grad()
def block_influence(model: nn.Module, tokens: torch.Tensor, batch_size: int = 4) -> list[float]:
    """``1 − mean cos(input, output)`` of every decoder layer over the tokens."""
    _, layers = decoder_layers(model)
    batches = first_layer_inputs(model, tokens, batch_size)
    influence = []
    for layer in layers:
        outputs = run_layer(layer, batches)
        cosines = torch.cat([F.cosine_similarity(b.hidden.float(), o.hidden.float(), dim=-1).reshape(-1)
                             for b, o in zip(batches, outputs)])
        influence.append(float(1 - cosines.mean()))
        batches = outputs
    return influence


def keep_layers(stage: ModelStage, kept: list[int]) -> None:
    """Leave only the decoder layers ``kept`` (restored when the composition exits)."""
    path, layers = decoder_layers(stage.model)
    parent_path, _, attribute = path.rpartition(".")
    parent = stage.model.get_submodule(parent_path)
    stage.patcher.set_attr(parent, attribute, nn.ModuleList(layers[i] for i in kept))
    config = stage.model.config
    stage.patcher.set_attr(config, "num_hidden_layers", len(kept))
    if getattr(config, "layer_types", None):  # Qwen2, Gemma 3: the attention type (full / sliding) of each layer
        stage.patcher.set_attr(config, "layer_types", [config.layer_types[i] for i in kept])
    for index, i in enumerate(kept):  # the KV cache is indexed by layer position
        attention = getattr(layers[i], "self_attn", None)
        if attention is None or not isinstance(getattr(attention, "layer_idx", None), int):
            raise ValueError(f"layer_drop renumbers each block's self_attn.layer_idx (its KV-cache slot); block {i} "
                             f"of {type(stage.model).__name__} has none")
        stage.patcher.set_attr(attention, "layer_idx", index)


class LayerDrop(Technique):
    name = "layer_drop"
    node = "model.compression.sparsification.weight_pruning.structured"
    paper = Paper(title="ShortGPT: Layers in Large Language Models are More Redundant Than You Expect", year=2024,
                  arxiv="2403.03853")
    summary = ("Removes the decoder layers of lowest block influence (1 − cosine similarity of a layer's input "
               "and output hidden states on calibration text); the model keeps its architecture with fewer "
               "blocks, so decode is faster in proportion and the smaller model saves and reloads.")
    requires = frozenset({Requirement.CALIBRATION_DATA})
    removes_features = frozenset({Feature.ALL_LAYERS})
    bench_config = {"drop": 8, "n_samples": 8, "seq_len": 256}
    bench_compositions = ("layer_drop+rtn",)

    class Config(CalibrationConfig):
        drop: int = Field(4, ge=1, le=255, description="how many decoder layers to remove")
        save_dir: str | None = Field(None, description="save the smaller model here (reload with "
                                                       "effinfer.plugins.model.pruning.load_pruned)")

    def check_model_config(self, config: Any) -> list[str]:
        count = getattr(config, "num_hidden_layers", None)
        if isinstance(count, int) and self.config.drop >= count:
            return [f"drop={self.config.drop} would remove all {count} decoder layers; use drop ≤ {count - 1}"]
        return []

    @hookimpl
    def effinfer_transform_model(self, stage: ModelStage) -> None:
        config = self.config
        _, layers = decoder_layers(stage.model)
        if config.drop >= len(layers):
            raise ValueError(f"layer_drop: drop={config.drop} would remove all {len(layers)} decoder layers; use "
                             f"drop ≤ {len(layers) - 1}")
        started = time.perf_counter()
        tokens = stage.calibration_batches(config.n_samples, config.seq_len)
        influence = block_influence(stage.model, tokens, config.batch_size)
        dropped = sorted(sorted(range(len(layers)), key=lambda i: influence[i])[:config.drop])
        kept = [i for i in range(len(layers)) if i not in dropped]
        before = sum(p.numel() for p in stage.model.parameters())
        keep_layers(stage, kept)
        after = sum(p.numel() for p in stage.model.parameters())
        self.note(f"dropped decoder layers {dropped} of {len(layers)} (block influence "
                  f"{', '.join(f'{influence[i]:.3f}' for i in dropped)}; kept layers' median "
                  f"{sorted(influence[i] for i in kept)[len(kept) // 2]:.3f}); parameters {before / 1e6:.1f} M → "
                  f"{after / 1e6:.1f} M ({after / before:.1%}); calibrated on {tokens.shape[0]}×{tokens.shape[1]} "
                  f"tokens in {time.perf_counter() - started:.1f} s")
        maybe_save(stage, config.save_dir, self)
