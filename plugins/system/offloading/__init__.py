"""Weight and KV offloading (system › inference engine › offloading).

``offload_weights`` keeps the decoder layers on disk and streams them layer by layer with
prefetch (:mod:`.weights`).

This package's ``__init__`` is its entry point (``[project.entry-points.effinfer]``): it registers
every technique of the family through the public ``effinfer_register_techniques`` hook.
"""

from pydantic import BaseModel, ConfigDict, Field

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.stages import ModelStage
from effinfer.plugins.system.offloading.weights import LayerStreamer

__all__ = ["LayerStreamer", "OffloadWeights"]


class OffloadWeights(Technique):
    name = "offload_weights"
    node = "system.inference_engine.offloading"
    paper = Paper(title="FlexGen: High-Throughput Generative Inference of Large Language Models with a Single GPU",
                  year=2023, arxiv="2303.06865")
    summary = ("Decoder layers kept on disk and streamed into three small RAM slots layer by layer, the next "
               "layer read in the background while the current one computes: resident memory of ~3 layers.")
    lossless = True

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        folder: str | None = Field(None, description="where the layer files go (default: a new temporary folder)")
        prefetch: bool = Field(True, description="read layer i+1 in the background while layer i computes")

    @hookimpl
    def effinfer_transform_model(self, stage: ModelStage) -> None:
        streamer = LayerStreamer(stage.model, self.config.folder, self.config.prefetch, patcher=stage.patcher)
        stage.extras["offload_streamer"] = streamer
        self.note(f"offloaded {len(streamer.layers)} decoder layers ({streamer.file_bytes() / 2**20:.0f} MiB) to "
                  f"{streamer.folder}; {streamer.resident_bytes() / 2**20:.0f} MiB of RAM slots")


@hookimpl
def effinfer_register_techniques(register):
    register(OffloadWeights)
