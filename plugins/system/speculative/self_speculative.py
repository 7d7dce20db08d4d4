"""Self-speculative decoding: the target drafts with a subset of its own layers.

Zhang et al., "Draft & Verify: Lossless Large Language Model Acceleration via
Self-Speculative Decoding", arXiv:2309.08168. No second model and no training: the
draft is the target with some intermediate layers skipped. It shares the target's KV
cache: a drafted token's keys and values are written, for the kept layers only, in the
columns after the committed prefix; the verification pass then rewrites those columns
for every layer, so no draft state ever needs rolling back. Drafting stops early when the
draft's confidence in its token falls below a threshold (the paper's adaptive draft
length, with a fixed threshold). Needs the static engine (its own attention reads and
writes the cache per layer).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.stages import SystemStage
from effinfer.plugins.system.engine.runner import StaticRunner
from effinfer.plugins.system.engine.settings import EngineSettings
from effinfer.plugins.system.speculative.loop import Session, SpeculativeDecoding, draft_token
from effinfer.plugins.system.speculative.tree import TokenTree


def draft_layers(num_layers: int, skip_layers: list[int] | None, skip_ratio: float) -> tuple[int, ...]:
    """The layers the draft runs: all but ``skip_layers``, or ``skip_ratio`` of them spread evenly
    over the middle (the first two and last two layers are always kept)."""
    if skip_layers is not None:
        bad = [i for i in skip_layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"skip_layers {bad} are out of range for a model with {num_layers} layers")
        skipped = set(skip_layers)
    else:
        middle = list(range(2, num_layers - 2))
        count = min(len(middle), round(skip_ratio * num_layers))
        skipped = {middle[int(i * len(middle) / count)] for i in range(count)} if count else set()
    kept = tuple(i for i in range(num_layers) if i not in skipped)
    if not kept:
        raise ValueError("the draft would skip every layer")
    return kept


class SelfSpeculativeDecoding(SpeculativeDecoding):
    name = "self_speculative"
    needs_static_engine = True

    def __init__(self, config: SelfSpeculative.Config, settings: EngineSettings | None = None) -> None:
        super().__init__(settings)
        self.config = config
        self.max_tree_nodes = config.num_draft_tokens + 1

    def begin(self, session: Session) -> None:
        runner = session.runner
        assert isinstance(runner, StaticRunner)
        session.state["layers"] = draft_layers(runner.engine.layout.num_layers, self.config.skip_layers,
                                               self.config.skip_ratio)

    def propose(self, session: Session) -> TokenTree:
        runner: StaticRunner = session.runner  # type: ignore[assignment]
        layers = session.state["layers"]
        token, start = session.pending, runner.length
        draft: list[int] = []
        probs: list[torch.Tensor | None] = []
        for index in range(min(self.config.num_draft_tokens, session.budget - 1)):
            logits = runner.step(token, layers=layers, start=start + index)
            drafted = draft_token(logits, session, self.config.confidence_threshold)
            if drafted is None:
                break
            token, q = drafted
            draft.append(token)
            probs.append(q)
        return TokenTree.chain(session.pending, draft, probs)


class SelfSpeculative(Technique):
    name = "self_speculative"
    node = "system.inference_engine.speculative_decoding"
    paper = Paper(title="Draft & Verify: Lossless Large Language Model Acceleration via Self-Speculative "
                        "Decoding", year=2023, arxiv="2309.08168")
    summary = ("Drafts with the target itself, skipping some of its layers, and verifies with all of "
               "them; the draft shares the target's KV cache. No extra model, no training, lossless.")
    lossless = True
    #: what `effinfer bench` runs by default (no set-up)
    bench_config = {"skip_ratio": 0.4, "num_draft_tokens": 4}

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        skip_layers: list[int] | None = Field(None, description="layer indices the draft skips; None = "
                                                                "choose from skip_ratio")
        skip_ratio: float = Field(0.4, ge=0.0, le=0.9, description="fraction of the layers the draft skips, "
                                                                   "spread over the middle of the stack")
        num_draft_tokens: int = Field(4, ge=1, le=32, description="most tokens drafted per step")
        confidence_threshold: float = Field(
            0.0, ge=0.0, lt=1.0, description="stop drafting when the draft's probability of its token "
                                             "falls below this")

    @hookimpl
    def effinfer_decoding_strategy(self, stage: SystemStage) -> SelfSpeculativeDecoding:
        if stage is not None:
            layers = draft_layers(stage.model.config.num_hidden_layers, self.config.skip_layers,
                                  self.config.skip_ratio)
            self.note(f"draft runs {len(layers)} of {stage.model.config.num_hidden_layers} layers; up to "
                      f"{self.config.num_draft_tokens} drafted tokens per step")
        return SelfSpeculativeDecoding(self.config, EngineSettings.from_stage(stage))


@hookimpl
def effinfer_register_techniques(register):
    register(SelfSpeculative)
