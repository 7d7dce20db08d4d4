"""Selective Context: drop the least informative parts of the context.

Li et al., "Compressing Context to Enhance Inference Efficiency of Large Language
Models", arXiv:2310.06201. Each token's self-information ``-log p(token | prefix)`` is
computed with a causal LM (here: the experiment's own model); tokens are grouped into
lexical units (tokens, words or sentences; the paper's phrase level uses a parser we
do not depend on); the units with the least total self-information are removed until
the requested fraction of context tokens is gone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.stages import DataStage, Request

UNIT_PATTERNS = {"word": r"\S+\s*", "sentence": r"[^.!?\n]+(?:[.!?]+|\n+|$)\s*"}


@dataclass
class Unit:
    start: int
    end: int
    tokens: int
    information: float


@torch.inference_mode()
def token_self_information(model: nn.Module, tokenizer, text: str) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Character spans of ``text``'s tokens and each token's self-information in nats.

    The first token has no prefix to condition on; it gets +inf so it is always kept.
    """
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = torch.tensor([encoded["input_ids"]], device=next(model.parameters()).device)
    logits = model(input_ids=ids).logits[0].float()
    log_probs = logits[:-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    information = torch.cat([torch.tensor([float("inf")], device=ids.device), -log_probs])
    return [tuple(span) for span in encoded["offset_mapping"]], information.cpu()


def lexical_units(text: str, spans: list[tuple[int, int]], information: torch.Tensor, unit: str) -> list[Unit]:
    """Group tokens into units and sum their self-information."""
    if unit == "token":
        bounds = [(start, spans[i + 1][0] if i + 1 < len(spans) else len(text)) for i, (start, _) in enumerate(spans)]
    else:
        bounds = [m.span() for m in re.finditer(UNIT_PATTERNS[unit], text) if m.group().strip()]
    units = []
    token_starts = torch.tensor([s for s, _ in spans])
    for start, end in bounds:
        inside = ((token_starts >= start) & (token_starts < end)).nonzero().flatten()
        if len(inside):
            units.append(Unit(start, end, len(inside), float(information[inside].sum())))
    return units


def compress(text: str, units: list[Unit], ratio: float) -> tuple[str, int, int]:
    """Remove the least informative units until ``ratio`` of the tokens is gone."""
    total = sum(u.tokens for u in units)
    budget = ratio * total
    dropped, removed = set(), 0
    for index in sorted(range(len(units)), key=lambda i: units[i].information):
        if removed + units[index].tokens > budget:
            continue
        dropped.add(index)
        removed += units[index].tokens
    kept = "".join(text[u.start:u.end] for i, u in enumerate(units) if i not in dropped)
    return kept.strip(), total, total - removed


class SelectiveContext(Technique):
    name = "selective_context"
    node = "data.input_compression.prompt_pruning"
    paper = Paper(title="Compressing Context to Enhance Inference Efficiency of Large Language Models",
                  year=2023, arxiv="2310.06201")
    summary = ("Scores every context token by its self-information under a causal LM and removes "
               "the least informative tokens, words or sentences until a target fraction of the "
               "context is gone. Shorter prompts mean faster prefill and a smaller KV cache.")
    lossless = False

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        ratio: float = Field(0.3, ge=0.0, le=0.9, description="fraction of context tokens to remove")
        unit: Literal["token", "word", "sentence"] = Field("word", description="lexical unit dropped at once")
        min_tokens: int = Field(16, ge=0, description="contexts shorter than this are left alone")

    @hookimpl
    def effinfer_transform_request(self, request: Request, stage: DataStage) -> None:
        if request.documents:
            request.documents = [self._compress(doc, stage) for doc in request.documents]
        else:
            last_user = max(i for i, m in enumerate(request.messages) if m["role"] == "user")
            request.messages[last_user]["content"] = self._compress(request.messages[last_user]["content"], stage)

    def _compress(self, text: str, stage: DataStage) -> str:
        spans, information = token_self_information(stage.model, stage.tokenizer, text)
        if len(spans) < self.config.min_tokens:
            self.note(f"left a {len(spans)}-token context alone (min_tokens={self.config.min_tokens})")
            return text
        compressed, before, after = compress(text, lexical_units(text, spans, information, self.config.unit),
                                             self.config.ratio)
        self.note(f"compressed a context from {before} to {after} tokens "
                  f"(removed {1 - after / before:.0%} by {self.config.unit}; target {self.config.ratio:.0%})")
        return compressed


@hookimpl
def effinfer_register_techniques(register):
    register(SelectiveContext)
