"""Named evaluation suites: how much of each measurement one evaluation runs.

``tiny`` is for unit tests with tiny random models (seconds), ``quick`` is for smoke tests and CI (about half a minute per technique on a 2-core CPU for the
135M default model), ``standard`` produces the numbers in the docs, ``full`` runs every
example and window the data sources hold. A suite is a pydantic model, so a custom one is
a dict or YAML file away::

    from effinfer.evaluation.suites import get_suite
    suite = get_suite("quick").with_changes(speed={"prompt_lengths": [64, 256]})
"""

from __future__ import annotations

import hashlib
import json
from typing import Any
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from effinfer.evaluation.tasks_data_level import DataTasksSpec
from effinfer.evaluation.tasks_long_context import LongContextSpec


class PerplexitySpec(BaseModel):
    """Windowed (optionally strided) perplexity on real corpora."""

    model_config = ConfigDict(extra="forbid")

    corpora: list[str] = Field(default_factory=lambda: ["wikipedia"],
                               description="corpus names of effinfer.data (test split)")
    window: int = Field(1024, ge=8, le=32768, description="tokens per window")
    stride: int | None = Field(None, ge=1, description="window step; None = disjoint windows (stride = window)")
    max_windows: int | None = Field(None, ge=1, description="windows per corpus; None = the whole split")

    @model_validator(mode="after")
    def _stride_fits(self) -> PerplexitySpec:
        if self.stride is not None and self.stride > self.window:
            raise ValueError(f"stride ({self.stride}) must be ≤ window ({self.window}); "
                             "leave it empty for disjoint windows")
        return self


class TasksSpec(BaseModel):
    """Zero-shot multiple-choice BIG-bench tasks through lm-eval."""

    model_config = ConfigDict(extra="forbid")

    names: list[str] = Field(default_factory=lambda: ["general_knowledge", "phrase_relatedness"],
                             description="tasks of effinfer.data.BIGBENCH_TASKS")
    limit: int | None = Field(None, ge=1, description="examples per task (seeded subset); None = all")
    batch_size: int = Field(16, ge=1, le=512, description="lm-eval log-likelihood batch size")


class FidelitySpec(BaseModel):
    """Next-token distributions compared with the baseline on the perplexity windows."""

    model_config = ConfigDict(extra="forbid")

    max_positions: int = Field(2048, ge=1, le=65536,
                               description="positions (from the first perplexity windows of the first corpus) "
                                           "whose full distributions are compared; the baseline's are kept in memory")


class GenerationSpec(BaseModel):
    """Greedy generation on the versioned prompt set: outputs, losslessness, speculative stats."""

    model_config = ConfigDict(extra="forbid")

    categories: list[str] = Field(default_factory=lambda: ["summarize", "qa", "code_edit", "story", "chat"])
    n_per_category: int = Field(1, ge=1, le=64)
    max_new_tokens: int = Field(64, ge=1, le=4096, description="cap on each prompt's own length")
    max_chars: int = Field(1600, ge=700, description="cap on each prompt's passage, in characters")


class SpeedSpec(BaseModel):
    """A timing grid over prompt length × batch size, warm-up excluded, repeated."""

    model_config = ConfigDict(extra="forbid")

    prompt_lengths: list[int] = Field(default_factory=lambda: [128], description="prompt tokens")
    batch_sizes: list[int] = Field(default_factory=lambda: [1])
    new_tokens: int = Field(32, ge=2, le=4096, description="tokens generated per timed run")
    warmup: int = Field(1, ge=0, le=20, description="untimed runs before the timed ones")
    repeats: int = Field(3, ge=1, le=100, description="timed runs per grid cell (for a stack: rounds, each "
                                                        "timing the baseline and the stack side by side)")
    drift_tolerance: float = Field(0.10, gt=0, le=10,
                                   description="relative change of the baseline measured next to a stack (vs the "
                                               "bench's first baseline measurement, or within the rounds) above "
                                               "which the stack's speed ratios are flagged as drifted")


class MemorySpec(BaseModel):
    """Peak memory tracking; weight bytes are always measured, KV-cache bytes in the speed grid.

    The KV cache is measured on the caches built during the speed grid's batch-1 run with the
    longest prompt (every cache the decoding strategy creates, a draft model's included).
    """

    model_config = ConfigDict(extra="forbid")

    track_peak: bool = Field(True, description="reset and read peak RSS (and CUDA peak) around the speed "
                                               "grid and the generation phase")


class RooflineSpec(BaseModel):
    """Memory bandwidth benchmark behind the roofline figure."""

    model_config = ConfigDict(extra="forbid")

    buffer_mib: int = Field(256, ge=8, le=16384, description="size of the tensor read by the bandwidth benchmark")
    repeats: int = Field(5, ge=1, le=100)


class Suite(BaseModel):
    """One evaluation protocol; a section set to ``None`` is skipped."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    perplexity: PerplexitySpec | None = Field(default_factory=PerplexitySpec)
    tasks: TasksSpec | None = Field(default_factory=TasksSpec)
    fidelity: FidelitySpec | None = Field(default_factory=FidelitySpec)
    generation: GenerationSpec | None = Field(default_factory=GenerationSpec)
    speed: SpeedSpec | None = Field(default_factory=SpeedSpec)
    memory: MemorySpec | None = Field(default_factory=MemorySpec)
    roofline: RooflineSpec | None = Field(default_factory=RooflineSpec)
    #: data-level tasks (long-context QA, multi-doc summary, few-shot BIG-bench); off unless set
    data_tasks: DataTasksSpec | None = None
    #: long-context passes (perplexity at 2k/4k/8k, needle, KV bytes, decode speed); off unless set
    long_context: LongContextSpec | None = None

    @model_validator(mode="after")
    def _fidelity_needs_windows(self) -> Suite:
        if self.fidelity is not None and self.perplexity is None:
            raise ValueError("the fidelity section compares next-token distributions on the perplexity "
                             "windows; enable the perplexity section or set fidelity to null")
        return self

    def with_changes(self, **sections: Any) -> Suite:
        """A validated copy with some sections replaced (a dict is validated like YAML input;
        ``None`` skips a section). Unlike ``model_copy(update=...)`` nothing unvalidated gets in."""
        return Suite.model_validate({**self.model_dump(), **sections})

    def fingerprint(self) -> str:
        """A short hash of everything that changes the numbers (the name excluded)."""
        payload = self.model_dump(mode="json", exclude={"name", "description"})
        if payload.get("data_tasks") is None:  # suites without data tasks keep their fingerprints
            payload.pop("data_tasks", None)
        if payload.get("long_context") is None:  # likewise for suites without long-context passes
            payload.pop("long_context", None)
        if payload.get("speed"):
            payload["speed"].pop("drift_tolerance")  # decides a flag, not a number
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


SUITES: dict[str, Suite] = {
    "tiny": Suite(
        name="tiny",
        description="seconds, for unit tests with tiny random models (effinfer.core.testing.tiny_llama)",
        perplexity=PerplexitySpec(window=64, max_windows=2),
        tasks=TasksSpec(names=["general_knowledge"], limit=8, batch_size=8),
        fidelity=FidelitySpec(max_positions=128),
        generation=GenerationSpec(categories=["summarize"], n_per_category=1, max_new_tokens=8, max_chars=900),
        speed=SpeedSpec(prompt_lengths=[32], batch_sizes=[1], new_tokens=4, warmup=1, repeats=2),
        roofline=RooflineSpec(buffer_mib=16, repeats=2),
    ),
    "quick": Suite(
        name="quick",
        description="minutes for a whole bench on a 2-core CPU: tests, CI, smoke checks",
        perplexity=PerplexitySpec(window=512, max_windows=4),
        tasks=TasksSpec(names=["general_knowledge", "phrase_relatedness"], limit=24),
        fidelity=FidelitySpec(max_positions=1024),
        generation=GenerationSpec(categories=["summarize", "code_edit"], n_per_category=1, max_new_tokens=24,
                                  max_chars=900),
        # its cells time 16 tokens (about a second): on a 2-core VM the same model's speed moves by
        # 10-20% between such samples minutes apart (seen on an exclusive CPU), so only larger moves flag
        speed=SpeedSpec(prompt_lengths=[128], batch_sizes=[1], new_tokens=16, warmup=1, repeats=5,
                        drift_tolerance=0.25),
        roofline=RooflineSpec(buffer_mib=128, repeats=3),
    ),
    "standard": Suite(
        name="standard",
        description="the numbers in the docs: 131k Wikipedia tokens, six BIG-bench tasks, a 2×2 speed grid",
        perplexity=PerplexitySpec(window=1024, max_windows=128),
        tasks=TasksSpec(names=["general_knowledge", "phrase_relatedness", "social_iqa", "goal_step_wikihow",
                               "emoji_movie", "physical_intuition"], limit=100),
        fidelity=FidelitySpec(max_positions=4096),
        generation=GenerationSpec(n_per_category=2, max_new_tokens=128),
        speed=SpeedSpec(prompt_lengths=[128, 512], batch_sizes=[1, 4], new_tokens=64, warmup=1, repeats=5),
        roofline=RooflineSpec(buffer_mib=512, repeats=5),
    ),
    "full": Suite(
        name="full",
        description="every window of both corpora, every task example, a 3×3 speed grid",
        perplexity=PerplexitySpec(corpora=["wikipedia", "shakespeare"], window=1024, stride=512),
        tasks=TasksSpec(names=["general_knowledge", "phrase_relatedness", "social_iqa", "goal_step_wikihow",
                               "emoji_movie", "physical_intuition"], limit=None),
        fidelity=FidelitySpec(max_positions=8192),
        generation=GenerationSpec(n_per_category=4, max_new_tokens=256),
        speed=SpeedSpec(prompt_lengths=[128, 512, 1024], batch_sizes=[1, 4, 16], new_tokens=128, warmup=2,
                        repeats=5),
        roofline=RooflineSpec(buffer_mib=1024, repeats=7),
    ),
}
# data-level techniques (``effinfer bench --node data --suite data``): the quick suite's speed and
# generation phases plus the tasks where the context matters; perplexity, zero-shot tasks and
# fidelity are left out (a data-level technique does not change the model they measure)
SUITES["data"] = SUITES["quick"].with_changes(
    name="data", description="data-level tasks (long-context QA, multi-document summary, few-shot "
                             "BIG-bench): accuracy vs compression ratio and end-to-end latency",
    perplexity=None, fidelity=None, tasks=None, roofline=None,
    data_tasks=DataTasksSpec(n_examples=8).model_dump())


def get_suite(suite: str | Path | Suite | dict) -> Suite:
    """A suite by name (``tiny``/``quick``/``standard``/``full``), from a YAML file, a dict, or as given."""
    if isinstance(suite, Suite):
        return suite
    if isinstance(suite, dict):
        return Suite.model_validate(suite)
    if str(suite) in SUITES:
        return SUITES[str(suite)]
    path = Path(suite)
    if path.suffix in {".yaml", ".yml"} and path.is_file():
        data = yaml.safe_load(path.read_text()) or {}
        data.setdefault("name", path.stem)
        return Suite.model_validate(data)
    raise ValueError(f"unknown suite {str(suite)!r}: use one of {', '.join(SUITES)} or a suite YAML file")
