"""The serving policies as techniques on their taxonomy nodes, so a stack selects them.

A serving technique changes nothing in one-shot generation; at the system stage it puts
its policy on ``stage.extras["serving"]`` under its role (``memory``, ``batching``,
``scheduler``), where ``effinfer serve`` and the load-test/benchmark harness read it
(:func:`serving_policy`). One technique per role per stack (checked here: the stack's
``incompatible_with`` lists the others of the same role)::

    techniques: [rtn, paged_kv: {block_size: 16}, continuous_batching, sjf]
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from effinfer.core import Paper, Technique, hookimpl
from effinfer.plugins.system.serving.engine import EngineConfig
from effinfer.plugins.system.serving.scheduling import (FCFS, OutputLengthPredictor, PriorityPreemptive, Scheduler,
                                                        ShortestJobFirst)

MEMORY, BATCHING, SCHEDULER = "memory", "batching", "scheduler"


class ServingTechnique(Technique):
    """Base: registers ``self`` under its role on ``stage.extras['serving']``."""

    role: ClassVar[str]
    lossless = True

    @hookimpl
    def effinfer_configure_system(self, stage: Any) -> None:
        stage.extras.setdefault("serving", {})[self.role] = self
        self.note(f"serving {self.role}: {self.name} {self.config.model_dump()}")


class PagedKV(ServingTechnique):
    name = "paged_kv"
    node = "system.serving.memory_management"
    role = MEMORY
    paper = Paper(title="Efficient Memory Management for Large Language Model Serving with PagedAttention",
                  year=2023, arxiv="2309.06180")
    summary = ("KV cache in fixed-size blocks of one shared pool with a block table per sequence; identical "
               "prompt prefixes share blocks (copy-on-write); plain-torch paged attention.")

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        block_size: int = Field(16, ge=1, le=256, description="tokens per KV block")
        kv_cache_mb: float = Field(256.0, gt=0, le=1 << 20, description="size of the block pool")
        prefix_caching: bool = Field(True, description="share identical prompt prefixes across requests")
        attention_kernel: Literal["auto", "torch", "reference", "cpu", "triton"] = Field(
            "auto", description="decode attention over the blocks: plain torch, or effinfer.kernels' "
                                "paged_decode_attention (auto: the Triton kernel on CUDA, plain torch elsewhere)")


class ContinuousBatching(ServingTechnique):
    name = "continuous_batching"
    node = "system.serving.continuous_batching"
    role = BATCHING
    incompatible_with = frozenset({"static_batching"})
    paper = Paper(title="Taming Throughput-Latency Tradeoff in LLM Inference with Sarathi-Serve", year=2024,
                  arxiv="2403.02310")
    summary = ("Iteration-level batching (Orca): requests join and leave the running batch every step; prefills "
               "split in chunks that ride along with decodes under a token budget (Sarathi).")

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        max_num_seqs: int = Field(32, ge=1, le=4096, description="running requests at most")
        max_batched_tokens: int = Field(256, ge=1, le=65536, description="new tokens per iteration")
        chunked_prefill: bool = Field(True, description="mix prefill chunks with decodes")


class StaticBatching(ServingTechnique):
    name = "static_batching"
    node = "system.serving.continuous_batching"
    role = BATCHING
    incompatible_with = frozenset({"continuous_batching", "paged_kv"})
    paper = None
    summary = ("The baseline: Hugging Face forward over a DynamicCache on left-padded batches, a new batch only "
               "when the previous one has completely finished.")

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        batch_size: int = Field(8, ge=1, le=1024, description="requests per batch")


class Fcfs(ServingTechnique):
    name = "fcfs"
    node = "system.serving.scheduling"
    role = SCHEDULER
    incompatible_with = frozenset({"sjf", "priority"})
    summary = "First come, first served; memory pressure preempts the newest admitted request (recompute)."

    def scheduler(self) -> Scheduler:
        return FCFS()


class Sjf(ServingTechnique):
    name = "sjf"
    node = "system.serving.scheduling"
    role = SCHEDULER
    incompatible_with = frozenset({"fcfs", "priority"})
    paper = Paper(title="S3: Increasing GPU Utilization during Generative Inference for Higher Throughput",
                  year=2023, arxiv="2306.06000")
    summary = ("Shortest job first on the output length predicted by a ridge regressor on prompt features, "
               "trained online on the requests this server completed.")

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        min_samples: int = Field(8, ge=1, le=100000, description="completions before the predictor is used")
        refit_every: int = Field(8, ge=1, le=100000, description="refit after this many completions")
        buckets: int = Field(64, ge=1, le=4096, description="hashed prompt-token feature buckets")
        aging: float = Field(0.0, ge=0, le=1e6, description="predicted tokens forgiven per second waited")

    def scheduler(self) -> Scheduler:
        c = self.config
        return ShortestJobFirst(OutputLengthPredictor(c.buckets, min_samples=c.min_samples,
                                                      refit_every=c.refit_every), c.aging)


class Priority(ServingTechnique):
    name = "priority"
    node = "system.serving.scheduling"
    role = SCHEDULER
    incompatible_with = frozenset({"fcfs", "sjf"})
    paper = Paper(title="Fast Distributed Inference Serving for Large Language Models", year=2023, arxiv="2305.05920")
    summary = ("Lowest priority value first; a more urgent waiting request preempts lower-priority running ones "
               "(recompute).")

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        preempt: bool = Field(True, description="preempt running lower-priority requests")

    def scheduler(self) -> Scheduler:
        return PriorityPreemptive(self.config.preempt)


TECHNIQUES = (PagedKV, ContinuousBatching, StaticBatching, Fcfs, Sjf, Priority)


def serving_policy(policies: dict[str, Any] | None) -> tuple[str, EngineConfig, Scheduler]:
    """``(engine kind, engine config, scheduler)`` from ``stage.extras['serving']`` (defaults for missing roles:
    paged KV + continuous batching + FCFS)."""
    policies = policies or {}
    config: dict[str, Any] = {}
    memory, batching = policies.get(MEMORY), policies.get(BATCHING)
    if memory is not None:
        config |= memory.config.model_dump()
    kind = "continuous"
    if isinstance(batching, StaticBatching):
        kind, config["static_batch_size"] = "static", batching.config.batch_size
    elif batching is not None:
        config |= batching.config.model_dump()
    scheduler = policies[SCHEDULER].scheduler() if SCHEDULER in policies else FCFS()
    return kind, EngineConfig(**config), scheduler
