"""The core decode loop: prefill, then one token per step over a KV cache.

It is deliberately short so that it can be read top to bottom. Decoding-strategy
plugins (speculative decoding and friends) replace :class:`PlainDecoding` and reuse
:func:`prefill`, :func:`forward_tokens` and :func:`select_tokens`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import DynamicCache

from effinfer.core.errors import EffinferError
from effinfer.kernels import greedy_tokens


class GenerationConfig(BaseModel):
    """How tokens are chosen and when generation stops."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(64, ge=1, le=8192, description="tokens to generate per prompt")
    do_sample: bool = Field(False, description="sample instead of greedy argmax")
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="softmax temperature when sampling")
    top_k: int | None = Field(None, ge=1, description="keep only the k most likely tokens when sampling")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    seed: int = Field(0, ge=0, description="seed of the sampling generator")
    stop_token_ids: list[int] = Field(default_factory=list, description="extra stop tokens besides EOS")
    chat_template: bool = Field(True, description="wrap prompts in the tokenizer's chat template")


@dataclass
class GenerationResult:
    """New tokens per prompt (a stop token, when hit, is the last one) and timings."""

    sequences: list[list[int]]
    prefill_seconds: float
    decode_seconds: float
    forward_steps: int
    #: tokens accepted per verification step (speculative strategies only)
    accepted_per_step: list[int] = field(default_factory=list)
    #: tokens proposed per verification step (speculative strategies only)
    drafted_per_step: list[int] = field(default_factory=list)
    #: part of ``decode_seconds`` spent drafting (speculative strategies only)
    draft_seconds: float = 0.0

    @property
    def new_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


class DecodingStrategy(Protocol):
    """What ``effinfer_decoding_strategy`` returns."""

    name: str

    def generate(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 config: GenerationConfig, stop_ids: set[int],
                 cache_factory: Callable[[nn.Module], Any] | None = None) -> GenerationResult: ...


def new_cache(model: nn.Module, cache_factory: Callable[[nn.Module], Any] | None = None) -> Any:
    return cache_factory(model) if cache_factory else DynamicCache(config=model.config)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding (pads get position 1, as HF does)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


@torch.inference_mode()
def prefill(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            cache: Any) -> torch.Tensor:
    """Run the prompt through the model, filling ``cache``; return last-position logits."""
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=positions_from_mask(attention_mask), past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :].float()


@torch.inference_mode()
def forward_tokens(model: nn.Module, tokens: torch.Tensor, attention_mask: torch.Tensor,
                   cache: Any, all_logits: bool = False) -> torch.Tensor:
    """Feed ``tokens`` (``B × k``) after what ``cache`` holds; ``attention_mask`` covers both.

    Returns logits for every new position when ``all_logits`` (speculative verification),
    else only the last one's.
    """
    k = tokens.shape[1]
    positions = positions_from_mask(attention_mask)[:, -k:]
    out = model(input_ids=tokens, attention_mask=attention_mask, position_ids=positions,
                past_key_values=cache, use_cache=True, logits_to_keep=0 if all_logits else 1)
    logits = out.logits.float()
    return logits if all_logits else logits[:, -1, :]


def select_tokens(logits: torch.Tensor, config: GenerationConfig,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Greedy argmax, or a sample after temperature, top-k and top-p filtering."""
    if not config.do_sample:
        return greedy_tokens(logits)
    return torch.multinomial(sampling_probs(logits, config), 1, generator=generator).squeeze(-1)


def sampling_probs(logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """The distribution a sample is drawn from (also used by speculative sampling)."""
    logits = logits / config.temperature
    if config.top_k is not None and config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= config.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


def make_generator(config: GenerationConfig, device: torch.device) -> torch.Generator | None:
    if not config.do_sample:
        return None
    return torch.Generator(device=device).manual_seed(config.seed)


class PlainDecoding:
    """One forward pass per new token; the default when no technique offers a strategy."""

    name = "plain"

    def generate(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 config: GenerationConfig, stop_ids: set[int],
                 cache_factory: Callable[[nn.Module], Any] | None = None) -> GenerationResult:
        generator = make_generator(config, input_ids.device)
        batch = input_ids.shape[0]
        cache = new_cache(model, cache_factory)
        stop = torch.tensor(sorted(stop_ids) or [-1], device=input_ids.device)

        started = time.perf_counter()
        logits = prefill(model, input_ids, attention_mask, cache)
        prefill_done = time.perf_counter()

        sequences: list[list[int]] = [[] for _ in range(batch)]
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        steps = 0
        for step in range(config.max_new_tokens):
            tokens = select_tokens(logits, config, generator)
            for row in (~finished).nonzero().flatten().tolist():
                sequences[row].append(int(tokens[row]))
            finished |= torch.isin(tokens, stop)
            if bool(finished.all()) or step == config.max_new_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
            logits = forward_tokens(model, tokens[:, None], attention_mask, cache)
            steps += 1
        done = time.perf_counter()
        return GenerationResult(sequences, prefill_done - started, done - prefill_done, steps)


class PromptTooLongError(EffinferError, ValueError):
    """A prompt (with its chat template and documents) does not fit in the model's context."""


#: a tokenizer ``model_max_length`` above this is transformers' "no limit known" placeholder
_NO_LIMIT = 10**8


def context_limit(tokenizer: Any, model: nn.Module | None = None) -> int | None:
    """The longest input the model takes: its ``max_position_embeddings``, else the tokenizer's
    ``model_max_length`` when it is a real limit; ``None`` when neither says."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) if model is not None else None
    if isinstance(limit, int) and limit > 0:
        return limit
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit < _NO_LIMIT else None


def adopt_context_limit(tokenizer: Any, model: nn.Module) -> None:
    """Give a tokenizer that declares no ``model_max_length`` (transformers' placeholder, as in
    GGUF conversions) the model's ``max_position_embeddings``, so that :func:`encode_prompts`
    refuses a prompt the model cannot take."""
    limit = context_limit(tokenizer, model)
    current = getattr(tokenizer, "model_max_length", None)
    if limit is not None and not (isinstance(current, int) and 0 < current < _NO_LIMIT):
        tokenizer.model_max_length = limit


def encode_prompts(tokenizer: Any, conversations: Sequence[list[dict[str, str]]] | Sequence[str],
                   chat_template: bool = True, device: str | torch.device = "cpu", *,
                   max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask for a batch, left-padded, chat template applied.

    A prompt longer than ``max_tokens`` (default: :func:`context_limit` of the tokenizer) is
    refused with :class:`PromptTooLongError`, rather than decoded into garbage after minutes
    of prefill; an empty batch is refused too.
    """
    if not conversations:
        raise ValueError("no prompt to encode; give at least one")
    texts = []
    for item in conversations:
        if chat_template:
            messages = [{"role": "user", "content": item}] if isinstance(item, str) else item
            texts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        else:
            texts.append(item if isinstance(item, str) else "\n\n".join(m["content"] for m in item))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat_template)
    check_prompt_lengths(encoded["attention_mask"].sum(-1).tolist(),
                         max_tokens if max_tokens is not None else context_limit(tokenizer))
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)


def check_prompt_lengths(lengths: Sequence[int], limit: int | None) -> None:
    """Raise :class:`PromptTooLongError` naming every prompt longer than ``limit`` tokens."""
    if limit is None:
        return
    too_long = [(i, n) for i, n in enumerate(lengths) if n > limit]
    if too_long:
        listed = ", ".join(f"prompt {i} has {n} tokens" for i, n in too_long)
        raise PromptTooLongError(
            f"{listed}; the model's context is {limit} tokens. Shorten the prompt or its documents "
            "(a data-level technique such as selective_context compresses documents), or use a "
            "model with a longer context")


def stop_token_ids(tokenizer: Any, model: nn.Module, config: GenerationConfig) -> set[int]:
    """EOS ids of the tokenizer and the model's generation config, plus configured ones."""
    ids = set(config.stop_token_ids)
    candidates: list[Any] = [tokenizer.eos_token_id]
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        candidates.append(generation_config.eos_token_id)
    for candidate in candidates:
        if isinstance(candidate, int):
            ids.add(candidate)
        elif isinstance(candidate, (list, tuple)):
            ids.update(int(c) for c in candidate)
    return ids
