"""Token-level early exit with a confidence threshold (CALM).

Schuster et al., "Confident Adaptive Language Modeling", arXiv:2207.07061. Each generated
token runs the decoder block by block; after each exit block
(:mod:`~effinfer.plugins.model.dynamic_inference.exits`: a trained copy of the final norm
and CALM's linear early-exit classifier) the classifier's confidence that this exit already
predicts the full model's token is compared with ``threshold``: above it, the token is
predicted there through the model's shared LM head and the remaining blocks are skipped.
The skipped blocks' keys and values are filled from the exit hidden state (CALM's state
propagation), so later tokens attend to a complete cache. ``confidence: softmax`` uses the
exit's own top-1 probability instead (costs one LM-head product per exit tried).

``threshold: 1.0`` never exits (a probability never exceeds 1): the output is the full
model's. Lower thresholds trade quality for speed; the run record gives the mean number of
blocks executed per token. Decodes on the static engine's cache and block arithmetic
(Llama, Qwen2 and Gemma 3 layouts), one sequence at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from effinfer.core import Paper, Requirement, Technique, hookimpl
from effinfer.core.errors import EffinferError
from effinfer.core.generation import GenerationConfig, GenerationResult, make_generator, select_tokens
from effinfer.core.stages import SystemStage
from effinfer.plugins.model.dynamic_inference.exits import (ExitHeads, ExitTraining, check_exits, default_exits,
                                                            train_exits)
from effinfer.plugins.model.dynamic_inference.layers import exit_step
from effinfer.plugins.system.engine import UnsupportedModel, shared_engine
from effinfer.plugins.system.engine.forward import lm_logits


class EarlyExitError(EffinferError, ValueError):
    """Early exit cannot run on this model."""


def static_engine(model: nn.Module, technique: str) -> Any:
    try:
        return shared_engine(model)
    except UnsupportedModel as error:
        raise EarlyExitError(f"{technique} decodes on the static engine's block arithmetic, which cannot run this "
                             f"model ({error}); use a Llama, Qwen2 or Gemma 3 model with stock attention") from error


class EarlyExitDecoding:
    """Greedy or sampled decoding, one sequence at a time, each token exiting at the first confident exit."""

    name = "early_exit"

    def __init__(self, heads: ExitHeads, threshold: float, confidence: str) -> None:
        self.heads = heads
        self.threshold = threshold
        self.confidence = confidence
        #: blocks executed per generated token (after the first, which the prefill predicts), last run
        self.layers_per_token: list[int] = []

    def stop_rule(self, layout: Any) -> Callable[[int, torch.Tensor], torch.Tensor | None]:
        heads, threshold, exits = self.heads, self.threshold, set(self.heads.exits)

        def stop(index: int, hidden: torch.Tensor) -> torch.Tensor | None:
            if index not in exits or threshold >= 1.0:
                return None
            normed = heads.normed(index, hidden)
            if self.confidence == "classifier":
                score = float(heads.confidence(index, normed).reshape(-1)[-1])
            else:
                score = float(lm_logits(layout, normed[:, -1]).softmax(-1).max())
            return normed if score > threshold else None

        return stop

    @torch.inference_mode()
    def generate(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 config: GenerationConfig, stop_ids: set[int],
                 cache_factory: Callable[[nn.Module], Any] | None = None) -> GenerationResult:
        engine = static_engine(model, self.name)
        layout = engine.layout
        stop = self.stop_rule(layout)
        self.layers_per_token = []
        sequences, prefill_seconds, decode_seconds, steps = [], 0.0, 0.0, 0
        for row in range(input_ids.shape[0]):
            prompt = input_ids[row:row + 1][:, attention_mask[row].bool()]
            cache = engine.cache_for(1, prompt.shape[1] + config.max_new_tokens + 1, name="early_exit")
            if cache_factory is not None and row == 0:  # a recording factory counts the static buffers
                cache_factory(model).static_kv = cache
            generator = make_generator(config, prompt.device)
            started = time.perf_counter()
            logits = engine.prefill(cache, prompt, torch.ones_like(prompt)).logits[:, -1]
            prefilled = time.perf_counter()
            tokens: list[int] = []
            for step in range(config.max_new_tokens):
                token = int(select_tokens(logits, config, generator)[0])
                tokens.append(token)
                if token in stop_ids or step == config.max_new_tokens - 1:
                    break
                hidden, used = exit_step(layout, cache, token, cache.length, stop)
                cache.length += 1
                self.layers_per_token.append(used)
                logits = lm_logits(layout, hidden[:, -1])
                steps += 1
            decode_seconds += time.perf_counter() - prefilled
            prefill_seconds += prefilled - started
            sequences.append(tokens)
        return GenerationResult(sequences, prefill_seconds, decode_seconds, steps)

    def mean_layers(self) -> float | None:
        return sum(self.layers_per_token) / len(self.layers_per_token) if self.layers_per_token else None


class EarlyExit(Technique):
    name = "early_exit"
    node = "model.compression.dynamic_inference.token_level"
    paper = Paper(title="Confident Adaptive Language Modeling", year=2022, arxiv="2207.07061")
    summary = ("Per token, leaves the decoder at the first intermediate layer whose trained exit classifier is "
               "confident, through the shared LM head; skipped layers' KV are filled from the exit state. "
               "threshold 1.0 never exits (the full model).")
    requires = frozenset({Requirement.TRAINING})
    #: the exits are shared with layerskip's bench_config (one cached training) and benchmarks/early_exit.py
    bench_config = {"threshold": 0.3, "train_prompts": 48, "train_new_tokens": 64, "train_steps": 80}

    class Config(ExitTraining):
        threshold: float = Field(0.9, ge=0.0, le=1.0, description="exit when the confidence exceeds this "
                                                                  "(1.0: never exit, the full model)")
        confidence: Literal["classifier", "softmax"] = Field(
            "classifier", description="CALM's confidence measure: the trained early-exit classifier, or the exit's "
                                      "top-1 softmax probability")
        exit_layers: list[int] | None = Field(None, description="blocks (0-based) after which a token may exit; "
                                                                "None: every 3rd from 40% of the depth on")

    def check_model_config(self, config: Any) -> list[str]:
        layers = getattr(config, "num_hidden_layers", None)
        return check_exits(layers, self.config.exit_layers) if layers is not None else []

    def exits(self, model: nn.Module) -> list[int]:
        layers = model.config.num_hidden_layers
        problems = check_exits(layers, self.config.exit_layers)
        if problems:
            raise EarlyExitError(problems[0])
        return self.config.exit_layers or default_exits(layers)

    @hookimpl
    def effinfer_decoding_strategy(self, stage: SystemStage) -> EarlyExitDecoding:
        static_engine(stage.model, self.name)  # refuse an unsupported model before training
        heads, report = train_exits(stage.model, stage.tokenizer, self.exits(stage.model),
                                    ExitTraining(**self.config.model_dump(include=set(ExitTraining.model_fields))))
        self.report = report
        self.note(report.describe())
        self.note(f"exits after blocks {[e + 1 for e in heads.exits]} of {stage.model.config.num_hidden_layers}, "
                  f"{self.config.confidence} confidence > {self.config.threshold:g}")
        self.strategy = EarlyExitDecoding(heads, self.config.threshold, self.config.confidence)
        return self.strategy
