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
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from effinfer.core import Paper, Requirement, Technique, hookimpl
from effinfer.core.stages import SystemStage
from effinfer.plugins.system.engine.runner import HFRunner, Runner, StaticRunner
from effinfer.plugins.system.engine.settings import EngineChoice, EngineSettings
from effinfer.plugins.system.speculative.loop import Session, SpeculativeDecoding, draft_token
from effinfer.plugins.system.speculative.tree import TokenTree


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
    """Load the draft source (or copy the target) and apply the draft's techniques to it."""
    from effinfer.core.compose import ComposedModel
    from effinfer.core.experiment import Runtime, resolve_stack
    from effinfer.core.models import DTYPES, load_model
    from effinfer.core.registry import get_registry
    from effinfer.core.runner import calibration_source
    from effinfer.core.technique import Requirement as Needs

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
    techniques = resolve_stack(check_draft_stack(config.techniques), Runtime(), get_registry())
    calibration = (calibration_source(tokenizer, 0)
                   if any(Needs.CALIBRATION_DATA in t.requires for t in techniques) else None)
    composed = ComposedModel(draft, tokenizer, techniques, calibration=calibration, keep_originals=False)
    composed.apply()
    notes = [f"draft: {origin}"] + [f"draft {name}: {note}" for _, name, note in composed.report.entries]
    return composed.model.eval(), notes


class DraftModelDecoding(SpeculativeDecoding):
    name = "draft_model"

    def __init__(self, config: DraftModel.Config, settings: EngineSettings | None = None,
                 draft: nn.Module | None = None, tokenizer: Any = None) -> None:
        super().__init__(settings)
        self.config = config
        self.max_tree_nodes = config.num_draft_tokens + 1
        self.draft = draft
        self.tokenizer = tokenizer
        self.draft_choice = EngineChoice(self.settings)

    def begin(self, session: Session) -> None:
        if self.draft is None:  # built lazily when the strategy was made without a system stage
            self.draft, _ = build_draft(self.model_of(session), self.tokenizer, self.config)
        runner = self.draft_runner(len(session.context) + session.budget + self.max_tree_nodes)
        prompt = torch.tensor([session.context[:-1]], device=next(self.draft.parameters()).device)
        runner.prefill(prompt)
        session.state["draft"] = runner
        session.state["fed"] = session.context[:-1]

    def draft_runner(self, tokens: int) -> Runner:
        engine, _ = self.draft_choice.engine_for(self.draft)
        return HFRunner(self.draft) if engine is None else StaticRunner(engine, tokens, self.max_tree_nodes, name="draft")

    def propose(self, session: Session) -> TokenTree:
        runner: Runner = session.state["draft"]
        logits = self.catch_up(runner, session)
        draft: list[int] = []
        probs: list[torch.Tensor | None] = []
        for index in range(self.config.num_draft_tokens):
            drafted = draft_token(logits, session, self.config.confidence_threshold)
            if drafted is None:
                break
            token, q = drafted
            draft.append(token)
            probs.append(q)
            if index + 1 < self.config.num_draft_tokens:
                logits = runner.step(token)
                session.state["fed"].append(token)
        return TokenTree.chain(session.pending, draft, probs)

    def catch_up(self, runner: Runner, session: Session) -> torch.Tensor:
        """Roll the draft back to what the target accepted, feed what it has not seen; last logits."""
        fed: list[int] = session.state["fed"]
        common = 0
        limit = min(len(fed), len(session.context) - 1)
        while common < limit and fed[common] == session.context[common]:
            common += 1
        runner.truncate(common)
        missing = session.context[common:]
        out = runner.forward(missing)
        runner.commit(range(len(missing)))
        session.state["fed"] = list(session.context)
        return out.logits[-1]

    def model_of(self, session: Session) -> nn.Module:
        return getattr(session.runner, "model", None) or session.runner.engine.model


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
        settings = EngineSettings.from_stage(stage)
        if stage is None:
            return DraftModelDecoding(self.config, settings)
        draft, notes = build_draft(stage.model, stage.tokenizer, self.config)
        for note in notes:
            self.note(note)
        self.note(f"drafting {self.config.num_draft_tokens} tokens per step")
        return DraftModelDecoding(self.config, settings, draft, stage.tokenizer)


@hookimpl
def effinfer_register_techniques(register):
    register(DraftModel)
