"""``offload_kv``: the KV cache beyond a budget of recent entries kept on disk, read back exactly.

FlexGen (Sheng et al., arXiv:2303.06865) places the KV cache in a lower memory tier too; here the
newest ``budget`` entries per layer stay in RAM and older blocks go to disk (:mod:`.kv`).
"""

from pydantic import BaseModel, ConfigDict, Field

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.kv_cache import use_kv_policy
from effinfer.core.stages import SystemStage
from effinfer.plugins.system.offloading.kv import offloaded_kv_factory


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
