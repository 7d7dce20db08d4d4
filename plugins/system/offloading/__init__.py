"""Weight and KV offloading (system › inference engine › offloading).

``offload_weights`` keeps the decoder layers on disk and streams them layer by layer with
prefetch (:mod:`.weights`); ``offload_kv`` keeps the KV cache beyond a budget of recent entries
on disk and reads it back when a layer attends, exactly (:mod:`.kv`).

This package's ``__init__`` is its entry point (``[project.entry-points.effinfer]``): it registers
every technique of the family through the public ``effinfer_register_techniques`` hook.
"""

from pydantic import BaseModel, ConfigDict, Field

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.kv_cache import use_kv_policy
from effinfer.core.stages import ModelStage, SystemStage
from effinfer.plugins.system.offloading.kv import OffloadedKVPolicy, Staging, offloaded_kv_factory
from effinfer.plugins.system.offloading.weights import LayerStreamer

__all__ = ["LayerStreamer", "OffloadKV", "OffloadWeights", "OffloadedKVPolicy", "Staging", "offloaded_kv_factory"]


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


class OffloadKV(Technique):
    name = "offload_kv"
    node = "system.inference_engine.offloading"
    paper = Paper(title="FlexGen: High-Throughput Generative Inference of Large Language Models with a Single GPU",
                  year=2023, arxiv="2303.06865")
    summary = ("KV cache beyond a budget of recent entries kept on disk in blocks and read back into one shared "
               "staging buffer when a layer attends: exact, resident KV of `budget` entries per layer.")
    lossless = True

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        budget: int = Field(1024, ge=1, le=1_048_576, description="newest KV entries per layer kept in RAM")
        block: int = Field(256, ge=1, le=65_536, description="entries moved to disk at a time")
        folder: str | None = Field(None, description="where the KV files go (default: the system's temp folder)")

    bench_config = {"budget": 64, "block": 32}

    @hookimpl
    def effinfer_configure_system(self, stage: SystemStage) -> None:
        config = self.config
        use_kv_policy(stage, offloaded_kv_factory(config.budget, config.block, config.folder), owner=self.name)
        self.note(f"KV cache: newest {config.budget} entries per layer in RAM, older ones on disk in blocks of "
                  f"{config.block}")


@hookimpl
def effinfer_register_techniques(register):
    register(OffloadWeights)
    register(OffloadKV)
