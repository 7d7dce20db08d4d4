"""Prompt lookup decoding: draft tokens by matching the last n-gram earlier in the text.

Saxena, "Prompt Lookup Decoding" (2023), https://github.com/apoorvumang/prompt-lookup-decoding.
The draft is the continuation of the most recent earlier occurrence of the sequence's
final n-gram (longest n first); the model verifies all drafted tokens in one forward
pass. Greedy verification keeps the longest prefix that equals the model's own argmax
choices plus one token from the model, so the output is exactly plain greedy's.
With sampling, each drafted token is accepted with the target probability and
otherwise resampled from the rest of the distribution (Leviathan et al.,
arXiv:2211.17192, with a draft that puts all its mass on one token), which preserves
the sampling distribution.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.generation import (GenerationConfig, GenerationResult, forward_tokens, make_generator,
                                      new_cache, prefill, sampling_probs, select_tokens)
from effinfer.core.stages import SystemStage


def find_draft(tokens: list[int], max_ngram: int, min_ngram: int, num_draft: int) -> list[int]:
    """Continuation of the latest earlier match of the final n-gram, longest n first."""
    for n in range(min(max_ngram, len(tokens) - 1), min_ngram - 1, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == tail:
                return tokens[start + n:start + n + num_draft]
    return []


def verify_greedy(draft: list[int], logits: torch.Tensor) -> list[int]:
    """Accepted drafted tokens followed by the model's own next token."""
    choices = logits.argmax(-1).tolist()
    accepted = 0
    while accepted < len(draft) and draft[accepted] == choices[accepted]:
        accepted += 1
    return draft[:accepted] + [choices[accepted]]


def verify_sampling(draft: list[int], logits: torch.Tensor, config: GenerationConfig,
                    generator: torch.Generator | None) -> list[int]:
    """Speculative sampling for a one-token-per-position (point-mass) draft."""
    probs = sampling_probs(logits, config)
    out: list[int] = []
    for i, token in enumerate(draft):
        p = probs[i, token]
        if torch.rand((), generator=generator) < p:
            out.append(token)
            continue
        residual = probs[i].clone()
        residual[token] = 0.0
        out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(probs[len(draft)], 1, generator=generator)))
    return out


class PromptLookupDecoding:
    name = "prompt_lookup"

    def __init__(self, config: PromptLookup.Config) -> None:
        self.config = config

    def generate(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 config: GenerationConfig, stop_ids: set[int],
                 cache_factory: Callable[[nn.Module], Any] | None = None) -> GenerationResult:
        results = [self._generate_one(model, input_ids[row:row + 1][:, attention_mask[row].bool()],
                                      config, stop_ids, cache_factory)
                   for row in range(input_ids.shape[0])]
        return GenerationResult(
            sequences=[r.sequences[0] for r in results],
            prefill_seconds=sum(r.prefill_seconds for r in results),
            decode_seconds=sum(r.decode_seconds for r in results),
            forward_steps=sum(r.forward_steps for r in results),
            accepted_per_step=[a for r in results for a in r.accepted_per_step],
            drafted_per_step=[d for r in results for d in r.drafted_per_step],
        )

    def _generate_one(self, model: nn.Module, prompt: torch.Tensor, config: GenerationConfig,
                      stop_ids: set[int], cache_factory: Any) -> GenerationResult:
        generator = make_generator(config, prompt.device)
        cache = new_cache(model, cache_factory)
        started = time.perf_counter()
        logits = prefill(model, prompt, torch.ones_like(prompt), cache)
        prefill_done = time.perf_counter()

        tokens = prompt[0].tolist()
        pending = int(select_tokens(logits, config, generator)[0])
        new: list[int] = [pending]
        accepted_per_step, drafted_per_step = [], []
        steps = 0
        while new[-1] not in stop_ids and len(new) < config.max_new_tokens:
            draft = find_draft(tokens + new, self.config.max_ngram, self.config.min_ngram,
                               min(self.config.num_draft_tokens, config.max_new_tokens - len(new)))
            step_input = torch.tensor([[pending] + draft], device=prompt.device)
            cached = len(tokens) + len(new) - 1
            mask = torch.ones(1, cached + step_input.shape[1], dtype=torch.long, device=prompt.device)
            step_logits = forward_tokens(model, step_input, mask, cache, all_logits=True)[0]
            steps += 1
            if config.do_sample:
                emitted = verify_sampling(draft, step_logits, config, generator)
            else:
                emitted = verify_greedy(draft, step_logits)
            rejected = step_input.shape[1] - len(emitted)  # the cache keeps pending + accepted
            if rejected:
                cache.crop(-rejected)
            if draft:
                accepted_per_step.append(len(emitted) - 1)
                drafted_per_step.append(len(draft))
            for token in emitted:
                new.append(token)
                if token in stop_ids or len(new) >= config.max_new_tokens:
                    break
            pending = new[-1]
        done = time.perf_counter()
        return GenerationResult([new], prefill_done - started, done - prefill_done, steps,
                                accepted_per_step, drafted_per_step)


class PromptLookup(Technique):
    name = "prompt_lookup"
    node = "system.inference_engine.speculative_decoding"
    paper = Paper(title="Prompt Lookup Decoding", year=2023,
                  url="https://github.com/apoorvumang/prompt-lookup-decoding")
    summary = ("Speculative decoding without a draft model: the tokens that followed an earlier "
               "occurrence of the last n-gram (in the prompt or the output so far) are proposed "
               "and verified in one forward pass. Lossless under greedy decoding; strong on "
               "summarization, QA over a passage and code editing, where outputs copy the input.")
    lossless = True

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        max_ngram: int = Field(3, ge=1, le=16, description="longest n-gram to match")
        min_ngram: int = Field(1, ge=1, le=16, description="shortest n-gram to match")
        num_draft_tokens: int = Field(10, ge=1, le=64, description="tokens proposed per step")

        @model_validator(mode="after")
        def _ordered(self) -> PromptLookup.Config:
            if self.min_ngram > self.max_ngram:
                raise ValueError(f"min_ngram ({self.min_ngram}) must be ≤ max_ngram ({self.max_ngram})")
            return self

    @hookimpl
    def effinfer_decoding_strategy(self, stage: SystemStage) -> PromptLookupDecoding:
        self.note(f"decoding with prompt lookup (n-grams {self.config.min_ngram}–{self.config.max_ngram}, "
                  f"up to {self.config.num_draft_tokens} drafted tokens per step)")
        return PromptLookupDecoding(self.config)


@hookimpl
def effinfer_register_techniques(register):
    register(PromptLookup)
