"""Speculative decoding with a draft model: a small model proposes, the target verifies.

Leviathan et al., "Fast Inference from Transformers via Speculative Decoding",
arXiv:2211.17192, and Chen et al., "Accelerating Large Language Model Decoding with
Speculative Sampling", arXiv:2302.01318. The draft decodes ``num_draft_tokens`` tokens
autoregressively (greedy, or sampled from its own distribution ``q``); the target checks
them in one forward pass through the shared verifier, which accepts a sampled token with
probability ``min(1, p/q)`` and otherwise resamples from ``norm(max(0, p − q))``, so the
output follows the target's distribution exactly (and equals plain greedy under greedy).

The draft is any model source sharing the target's vocabulary, or a *compressed copy of
the target* made by other registered techniques applied to a copy (``techniques:
["rtn:bits=4"]``, ``["drop_layers:drop=20"]``) — composition through the same registry and
stages as any experiment.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from effinfer.core import Paper, Requirement, Technique, hookimpl
from effinfer.core.preflight import model_source_problems
from effinfer.core.stages import SystemStage
from effinfer.plugins.system.speculative.api import DecodeEngine, Session, SpeculativeDecoding, TokenTree, draft_chain


def check_draft_stack(specs: list[Any]) -> list[Any]:
    """Validate the draft's technique specs against the registry (before any model loads)."""
    from effinfer.core.experiment import Runtime, TechniqueSpec, resolve_stack
    from effinfer.core.registry import get_registry

    parsed = [TechniqueSpec.model_validate(spec) for spec in specs]
    techniques = resolve_stack(parsed, Runtime(), get_registry())
    strategies = [t.name for t in techniques if t.is_decoding_strategy()]
    if strategies:
        raise ValueError(f"the draft's techniques must transform the model, not decode: drop {strategies}")
    return parsed


def build_draft(target: nn.Module, tokenizer: Any, config: DraftModel.Config) -> tuple[nn.Module, list[str]]:
    """Load the draft source (or copy the target) and apply the draft's techniques to it, through
    the same set-up path as any experiment (:func:`effinfer.core.compose.compose_stack`)."""
    from effinfer.core.compose import compose_stack
    from effinfer.core.models import DTYPES, load_model

    parameter = next(target.parameters())
    if config.source is None:
        draft = copy.deepcopy(target)
        origin = "a copy of the target"
    else:
        dtype = next(name for name, value in DTYPES.items() if value == parameter.dtype)
        draft, _ = load_model(config.source, dtype, str(parameter.device))
        origin = config.source
    target_vocab, draft_vocab = target.config.vocab_size, draft.config.vocab_size
    if draft_vocab != target_vocab:
        raise ValueError(f"draft {origin} has a vocabulary of {draft_vocab} tokens, the target {target_vocab}; "
                         "speculative decoding needs the same tokenizer")
    composed = compose_stack(draft, tokenizer, check_draft_stack(config.techniques), keep_originals=False)
    composed.apply()
    notes = [f"draft: {origin}"] + [f"draft {name}: {note}" for _, name, note in composed.report.entries]
    return composed.model.eval(), notes


class DraftModelDecoding(SpeculativeDecoding):
    """The draft runs on the same engine as the target (its own runner, named ``"draft"``)."""

    name = "draft_model"

    def __init__(self, config: DraftModel.Config, engine: DecodeEngine | None = None,
                 draft: nn.Module | None = None, tokenizer: Any = None) -> None:
        super().__init__(engine)
        self.config = config
        self.max_tree_nodes = config.num_draft_tokens + 1
        self.draft = draft
        self.tokenizer = tokenizer

    def begin(self, session: Session) -> None:
        if self.draft is None:  # built lazily when the strategy was made without a system stage
            self.draft, _ = build_draft(session.model, self.tokenizer, self.config)
        runner = self.engine.runner(self.draft, len(session.context) + session.budget + self.max_tree_nodes,
                                    self.max_tree_nodes, name="draft")
        prompt = torch.tensor([session.context[:-1]], device=next(self.draft.parameters()).device)
        runner.prefill(prompt)
        session.state["draft"] = runner
        session.state["fed"] = session.context[:-1]

    def propose(self, session: Session) -> TokenTree:
        return draft_chain(session.state["draft"], session, self.config.num_draft_tokens,
                           self.config.confidence_threshold)


class DraftModel(Technique):
    name = "draft_model"
    node = "system.inference_engine.speculative_decoding"
    paper = Paper(title="Fast Inference from Transformers via Speculative Decoding", year=2022,
                  arxiv="2211.17192")
    summary = ("Classic speculative decoding: a draft model (any model source with the target's "
               "vocabulary, or a compressed copy of the target made by other techniques, e.g. int4 "
               "rtn or dropped layers) drafts a few tokens autoregressively; the target verifies them in "
               "one pass with the speculative-sampling rule (Chen et al., arXiv:2302.01318), which keeps "
               "the target's output distribution.")
    lossless = True
    requires = frozenset({Requirement.DRAFT_MODEL})
    #: what `effinfer bench` runs by default: an int4 RTN copy of the target (built-ins only; a
    #: layer-dropped copy, `drop_layers`, drafts faster where that plugin is installed)
    bench_config = {"techniques": ["rtn:bits=4"], "num_draft_tokens": 4}

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        source: str | None = Field(None, description="draft model source (alias, folder, .gguf, hub id); "
                                                     "None = a copy of the target")
        techniques: list[Any] = Field(default_factory=list,
                                      description="techniques applied to the draft, e.g. ['rtn:bits=4'] or "
                                                  "['drop_layers:drop=20'] (model-level only)")
        num_draft_tokens: int = Field(4, ge=1, le=32, description="tokens the draft proposes per step")
        confidence_threshold: float = Field(
            0.0, ge=0.0, lt=1.0,
            description="stop drafting when the draft's probability of its token falls below this")

        @field_validator("source")
        @classmethod
        def _source_can_be_a_model(cls, source: str | None) -> str | None:
            """A path that is not a model (missing, a folder without config.json, a missing .gguf) is
            refused here, before loading, with the main model's message (``model_source_problems``)."""
            problems = [] if source is None else model_source_problems(source)
            if problems:
                raise ValueError("; ".join(p.removeprefix("model: ") for p in problems))
            return source

        @model_validator(mode="after")
        def _has_a_draft(self) -> DraftModel.Config:
            if self.source is None and not self.techniques:
                raise ValueError("the draft would be the target itself: set `source` to a draft model "
                                 "or `techniques` to compress a copy of the target (e.g. ['rtn:bits=4'])")
            if self.techniques:
                check_draft_stack(self.techniques)
            return self

    @hookimpl
    def effinfer_decoding_strategy(self, stage: SystemStage) -> DraftModelDecoding:
        draft, notes = build_draft(stage.model, stage.tokenizer, self.config)
        for note in notes:
            self.note(note)
        self.note(f"drafting {self.config.num_draft_tokens} tokens per step")
        return DraftModelDecoding(self.config, stage.engine, draft, stage.tokenizer)


@hookimpl
def effinfer_register_techniques(register):
    register(DraftModel)
