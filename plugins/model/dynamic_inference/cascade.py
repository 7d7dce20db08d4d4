"""Sample-level dynamic inference: a model cascade with a confidence-based escalation rule.

FrugalGPT (Chen et al., "FrugalGPT: How to Use Large Language Models While Reducing Cost and
Improving Performance", arXiv:2305.05176): a cheap model answers first; a scoring function
decides whether the answer is good enough, and if not the request *escalates* to the next,
more expensive model. Here the cheap model is a compressed copy of the experiment's model made
by other registered techniques (``cheap: ["layer_drop:..."]``, ``["rtn:bits=4"]``, a
distilled student ``["kd_white_box:drop=6"]`` …, through the same composition path as any
experiment), and the score is the cheap model's own confidence in its answer: the mean token
log-probability (escalate when it is *below* ``threshold``) or the mean predictive entropy in
nats (escalate when it is *above*). The decision is taken once per request, so a whole request
follows one path. The strategy keeps per-request records (escalated or not, latency) for the
run record and the benchmark.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.generation import GenerationConfig, GenerationResult
from effinfer.core.stages import SystemStage


def check_cheap_stack(specs: list[Any]) -> list[Any]:
    """Validate the cheap model's technique specs against the registry (before any model loads)."""
    from effinfer.core.experiment import Runtime, TechniqueSpec, resolve_stack
    from effinfer.core.registry import get_registry

    parsed = [TechniqueSpec.model_validate(spec) for spec in specs]
    techniques = resolve_stack(parsed, Runtime(), get_registry())
    strategies = [t.name for t in techniques if t.is_decoding_strategy()]
    if strategies:
        raise ValueError(f"the cheap model's techniques must transform the model, not decode: drop {strategies}")
    return parsed


def build_cheap(model: nn.Module, tokenizer: Any, specs: list[Any]) -> tuple[nn.Module, list[str]]:
    from effinfer.core.compose import compose_stack

    composed = compose_stack(copy.deepcopy(model), tokenizer, check_cheap_stack(specs), keep_originals=False)
    composed.apply()
    return composed.model.eval(), [f"cheap {name}: {note}" for _, name, note in composed.report.entries]


@torch.inference_mode()
def answer_confidence(model: nn.Module, prompt: torch.Tensor, answer: list[int]) -> tuple[float, float]:
    """Mean log-probability of ``answer`` under ``model`` and its mean predictive entropy (nats)."""
    if not answer:
        return 0.0, 0.0
    ids = torch.cat([prompt[0], torch.tensor(answer, device=prompt.device)])[None]
    logits = model(input_ids=ids, use_cache=False).logits[0, prompt.shape[1] - 1:-1].float()
    log_probs = logits.log_softmax(-1)
    chosen = log_probs.gather(-1, ids[0, prompt.shape[1]:, None]).mean()
    entropy = -(log_probs.exp() * log_probs).sum(-1).mean()
    return float(chosen), float(entropy)


class CascadeDecoding:
    """Per request: the cheap model answers; escalate to the full model when not confident."""

    name = "cascade"

    def __init__(self, cheap: nn.Module, decoding: Any, signal: str, threshold: float) -> None:
        self.cheap, self.decoding, self.signal, self.threshold = cheap, decoding, signal, threshold
        #: per request of the last ``generate``: escalated, confidence, seconds
        self.records: list[dict[str, Any]] = []

    def escalate(self, log_prob: float, entropy: float) -> bool:
        return log_prob < self.threshold if self.signal == "log_prob" else entropy > self.threshold

    def generate(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 config: GenerationConfig, stop_ids: set[int],
                 cache_factory: Callable[[nn.Module], Any] | None = None) -> GenerationResult:
        self.records = []
        sequences, prefill, decode, steps = [], 0.0, 0.0, 0
        for row in range(input_ids.shape[0]):
            prompt = input_ids[row:row + 1][:, attention_mask[row].bool()]
            ones = torch.ones_like(prompt)
            started = time.perf_counter()
            first = self.decoding.generate(self.cheap, prompt, ones, config, stop_ids)
            log_prob, entropy = answer_confidence(self.cheap, prompt, first.sequences[0])
            escalated = self.escalate(log_prob, entropy)
            prefill += first.prefill_seconds
            decode += first.decode_seconds
            steps += first.forward_steps
            result = first
            if escalated:
                result = self.decoding.generate(model, prompt, ones, config, stop_ids, cache_factory)
                prefill += result.prefill_seconds
                decode += result.decode_seconds
                steps += result.forward_steps
            sequences.append(result.sequences[0])
            self.records.append({"escalated": escalated, "log_prob": log_prob, "entropy": entropy,
                                 "seconds": time.perf_counter() - started})
        return GenerationResult(sequences, prefill, decode, steps)

    def escalated_fraction(self) -> float | None:
        return sum(r["escalated"] for r in self.records) / len(self.records) if self.records else None


class Cascade(Technique):
    name = "cascade"
    node = "model.compression.dynamic_inference.sample_level"
    paper = Paper(title="FrugalGPT: How to Use Large Language Models While Reducing Cost and Improving Performance",
                  year=2023, arxiv="2305.05176")
    summary = ("A compressed copy of the model answers each request first; the request escalates to the full "
               "model when the cheap answer's mean token log-probability (or entropy) crosses a threshold.")
    #: the cheap model drops 8 of the blocks (faster on a CPU, where 4-bit RTN weights decode no faster)
    bench_config = {"cheap": ["layer_drop:drop=8,n_samples=8,seq_len=256"], "threshold": -1.0}

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        cheap: list[Any] = Field(default_factory=lambda: ["rtn:bits=4"],
                                 description="techniques that make the cheap model from a copy of the model, e.g. "
                                             "['rtn:bits=4'] or ['layer_drop:...']")
        signal: Literal["log_prob", "entropy"] = Field(
            "log_prob", description="confidence signal: the cheap answer's mean token log-probability (escalate "
                                    "below threshold) or mean entropy in nats (escalate above)")
        threshold: float = Field(-1.0, ge=-50.0, le=50.0, description="escalation threshold of the signal")

        @model_validator(mode="after")
        def _valid(self) -> Cascade.Config:
            if not self.cheap:
                raise ValueError("cheap is empty: name the techniques that make the cheap model, e.g. "
                                 "['rtn:bits=4']")
            if self.signal == "log_prob" and self.threshold > 0:
                raise ValueError(f"a mean log-probability is ≤ 0, so threshold={self.threshold} escalates "
                                 "every request; use a threshold ≤ 0")
            if self.signal == "entropy" and self.threshold < 0:
                raise ValueError(f"an entropy is ≥ 0, so threshold={self.threshold} escalates every request; "
                                 "use a threshold ≥ 0")
            check_cheap_stack(self.cheap)
            return self

    @hookimpl
    def effinfer_decoding_strategy(self, stage: SystemStage) -> CascadeDecoding:
        started = time.perf_counter()
        cheap, notes = build_cheap(stage.model, stage.tokenizer, self.config.cheap)
        for note in notes:
            self.note(note)
        self.note(f"cheap model built in {time.perf_counter() - started:.1f} s; escalate when mean "
                  f"{'log-prob <' if self.config.signal == 'log_prob' else 'entropy >'} {self.config.threshold:g}")
        self.strategy = CascadeDecoding(cheap, stage.engine.decoding(), self.config.signal, self.config.threshold)
        return self.strategy
