"""What the prompt compressors share: the budget, the context of a request, LM token scores.

Every compressor of this family works on the request's ``documents`` (or, without documents,
on the last user message) and keeps the question/instruction intact. Its budget is
``rate × context tokens`` (or ``target_tokens``), counted with the experiment's tokenizer as the
sum of each compressed document's own token count; :func:`fit_to_budget` makes the budget exact
(compressing, then re-tokenizing joined pieces, can add a token at a seam). ``rate=1.0`` and no
``target_tokens`` leave the request unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from effinfer.core.engines import crop_to, sliding_window
from effinfer.core.stages import Request


class BudgetConfig(BaseModel):
    """Fields every compressor's config shares."""

    model_config = ConfigDict(extra="forbid")

    rate: float = Field(0.33, gt=0.0, le=1.0, description="fraction of context tokens kept (1.0: unchanged)")
    target_tokens: int | None = Field(None, ge=1, description="absolute token budget of the context "
                                                               "(overrides rate when smaller)")
    min_tokens: int = Field(16, ge=0, description="contexts shorter than this are left alone")


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


def context_texts(request: Request) -> tuple[list[str], bool]:
    """The texts a compressor works on: the documents, else the last user message (flag False)."""
    if request.documents:
        return list(request.documents), True
    last = max(i for i, m in enumerate(request.messages) if m["role"] == "user")
    return [request.messages[last]["content"]], False


def write_back(request: Request, texts: list[str], documents: bool) -> None:
    if documents:
        request.documents = [t for t in texts if t.strip()]
    else:
        last = max(i for i, m in enumerate(request.messages) if m["role"] == "user")
        request.messages[last]["content"] = texts[0]


def question_of(request: Request) -> str:
    """The question a question-aware method conditions on: ``metadata['question']`` or the last user message."""
    if request.metadata.get("question"):
        return str(request.metadata["question"])
    last = max(i for i, m in enumerate(request.messages) if m["role"] == "user")
    return request.messages[last]["content"]


def budget_of(config: BudgetConfig, total: int) -> int:
    """The token budget of a context of ``total`` tokens."""
    budget = math.floor(config.rate * total + 1e-9)
    if config.target_tokens is not None:
        budget = min(budget, config.target_tokens)
    return max(0, min(budget, total))


def unchanged(config: BudgetConfig, total: int) -> bool:
    """Whether the context is left as it is (rate 1.0 and no smaller target, or too short)."""
    return total < config.min_tokens or budget_of(config, total) >= total


def fit_to_budget(tokenizer: Any, texts: list[str], budget: int, priority: list[int] | None = None) -> list[str]:
    """Trim ``texts`` (lowest priority first, from its end) until their token counts sum to ≤ ``budget``."""
    texts = list(texts)
    order = list(reversed(priority)) if priority is not None else list(range(len(texts)))[::-1]
    counts = [count_tokens(tokenizer, t) for t in texts]
    for index in order:
        allowed = max(0, counts[index] - (sum(counts) - budget))
        if counts[index] > allowed:
            texts[index], counts[index] = _prefix_within(tokenizer, texts[index], allowed)
        if sum(counts) <= budget:
            break
    return texts


def _prefix_within(tokenizer: Any, text: str, allowed: int) -> tuple[str, int]:
    """The longest token prefix of ``text`` whose re-tokenized length is ≤ ``allowed``, and that length.

    Decoding then re-encoding a prefix can merge or split tokens, so the prefix shrinks one token at a
    time until it fits; the length strictly falls each step, so this always ends (at "" in the worst case).
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = min(len(ids), allowed)
    while keep > 0:
        candidate = tokenizer.decode(ids[:keep])
        count = count_tokens(tokenizer, candidate)
        if count <= allowed:
            return candidate, count
        keep -= 1
    return "", 0


def decode_kept(tokenizer: Any, ids: list[int], keep: list[bool]) -> str:
    """The text of the kept tokens, in order."""
    return tokenizer.decode([t for t, k in zip(ids, keep) if k], skip_special_tokens=True)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def token_information(model: nn.Module, ids: list[int], prefix: list[int] | None = None) -> torch.Tensor:
    """Self-information ``-log p(x_i | prefix, x_<i)`` of each token of ``ids`` (nats).

    Without a prefix the first token has nothing to condition on; it gets +inf (always kept).
    """
    prefix = list(prefix or [])
    device = model_device(model)
    full = torch.tensor([prefix + ids], device=device)
    logits = model(input_ids=full).logits[0].float()
    logp = logits[:-1].log_softmax(-1).gather(-1, full[0, 1:, None])[:, 0]
    info = -logp[len(prefix) - 1:] if prefix else torch.cat([torch.tensor([math.inf], device=device), -logp])
    return info.cpu()


class PrefixScorer:
    """Token self-information conditional on a compressed prefix kept in a KV cache (LLMLingua's ITPC).

    :meth:`score` runs a segment after the kept prefix and returns each token's
    self-information; :meth:`keep` rolls the cache back and appends only the kept tokens, so
    the next segment is conditioned on the compressed text the target model will see.
    """

    def __init__(self, model: nn.Module, start: list[int] | None = None) -> None:
        from transformers import DynamicCache

        self.model = model
        self.device = model_device(model)
        # sliding-window layers (gemma3) cannot roll back once their window is full: keep full layers
        # (the model still masks to its window); otherwise the model's own cache layout
        self.cache = DynamicCache() if sliding_window(model) is not None else DynamicCache(config=model.config)
        self.length = 0
        self.last_logits: torch.Tensor | None = None
        if start:
            self._feed(start)

    @torch.inference_mode()
    def _feed(self, ids: list[int]) -> torch.Tensor:
        tokens = torch.tensor([ids], device=self.device)
        positions = torch.arange(self.length, self.length + len(ids), device=self.device)[None]
        mask = torch.ones(1, self.length + len(ids), dtype=torch.long, device=self.device)
        logits = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions,
                            past_key_values=self.cache, use_cache=True).logits[0].float()
        self.length += len(ids)
        self.last_logits = logits[-1]
        return logits

    @torch.inference_mode()
    def score(self, ids: list[int]) -> torch.Tensor:
        before, previous = self.length, self.last_logits
        logits = self._feed(ids)
        logp = logits.log_softmax(-1)
        target = torch.tensor(ids, device=self.device)
        info = torch.empty(len(ids))
        if previous is not None:
            info[0] = -float(previous.log_softmax(-1)[ids[0]])
        else:
            info[0] = math.inf
        if len(ids) > 1:
            info[1:] = -logp[:-1].gather(-1, target[1:, None])[:, 0].cpu()
        crop_to(self.cache, before)
        self.length, self.last_logits = before, previous
        return info

    def keep(self, ids: list[int]) -> None:
        if ids:
            self._feed(ids)
