"""``offload_weights``: decoder layers streamed from a lower memory tier with prefetch.

FlexGen (Sheng et al., "FlexGen: High-Throughput Generative Inference of Large Language Models with
a Single GPU", arXiv:2303.06865): weights live in a lower tier (disk for a CPU model, pinned host RAM
for a CUDA one) and layer ``i + 1`` is loaded while layer ``i`` computes; see :mod:`.weights`.
"""

from pydantic import BaseModel, ConfigDict, Field

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.stages import ModelStage
from effinfer.plugins.system.offloading.weights import layer_streamer


class OffloadWeights(Technique):
    name = "offload_weights"
    node = "system.inference_engine.offloading"
    paper = Paper(title="FlexGen: High-Throughput Generative Inference of Large Language Models with a Single GPU",
                  year=2023, arxiv="2303.06865")
    summary = ("Decoder layers kept on disk (CPU) or in pinned host RAM (CUDA) and streamed into three small "
               "slots layer by layer, the next layer read in the background while the current one computes: "
               "resident memory of ~3 layers.")
    lossless = True

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        folder: str | None = Field(None, description="where the layer files go on the CPU (default: a new temporary "
                                                          "folder; on CUDA the layers wait in pinned host RAM)")
        prefetch: bool = Field(True, description="read layer i+1 in the background while layer i computes")

    @hookimpl
    def effinfer_transform_model(self, stage: ModelStage) -> None:
        streamer = layer_streamer(stage.model, self.config.folder, self.config.prefetch, patcher=stage.patcher)
        stage.extras["offload_streamer"] = streamer
        self.note(streamer.describe())
