"""LayerSkip-style self-speculative decoding: the early-exit draft, verified by the full model.

Elhoushi et al., "LayerSkip: Enabling Early Exit Inference and Self-Speculative Decoding",
arXiv:2404.16710. The draft is the model's first ``draft_layers`` blocks followed by a
trained exit (:mod:`~effinfer.plugins.model.dynamic_inference.exits`: a copy of the final
norm trained on self-generated text) and the shared LM head; it drafts inside the target's
own KV cache (the static engine's runner), and the full model verifies each chain in one
forward pass through the speculative family's shared loop and verifier
(:mod:`effinfer.plugins.system.speculative.api`) — so the output is exactly plain greedy
decoding's (and, when sampling, distributed as the target's). The verification pass rewrites
the drafted columns for every block, so no draft state needs rolling back.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from effinfer.core import Paper, Requirement, Technique, hookimpl
from effinfer.core.stages import SystemStage
from effinfer.plugins.model.dynamic_inference.early_exit import EarlyExitError, static_engine
from effinfer.plugins.model.dynamic_inference.exits import ExitHeads, ExitTraining, default_exits, train_exits
from effinfer.plugins.model.dynamic_inference.layers import exit_step
from effinfer.plugins.system.engine.forward import lm_logits
from effinfer.plugins.system.speculative.api import DecodeEngine, Session, SpeculativeDecoding, TokenTree, draft_token


class LayerSkipDecoding(SpeculativeDecoding):
    name = "layerskip"

    def __init__(self, heads: ExitHeads, draft_layers: int, num_draft_tokens: int, threshold: float,
                 engine: DecodeEngine | None = None) -> None:
        super().__init__(engine)
        self.heads = heads
        self.exit = draft_layers - 1
        self.num_draft_tokens = num_draft_tokens
        self.threshold = threshold
        self.max_tree_nodes = num_draft_tokens + 1

    def begin(self, session: Session) -> None:
        runner = session.runner
        if not (hasattr(runner, "engine") and hasattr(runner, "cache") and hasattr(runner.engine, "layout")):
            raise EarlyExitError(f"layerskip drafts inside the static engine's KV cache, but this run decodes on "
                                 f"{type(runner).__name__}; use runtime.engine: static (the default) with a Llama, "
                                 "Qwen2 or Gemma 3 model without a KV-cache policy")

    @torch.inference_mode()
    def propose(self, session: Session) -> TokenTree:
        runner = session.runner
        layout, cache = runner.engine.layout, runner.cache
        heads, exit_layer = self.heads, self.exit

        def stop(index: int, hidden: Any) -> Any:
            return heads.normed(index, hidden) if index == exit_layer else None

        count = min(self.num_draft_tokens, session.budget - 1)
        token, start = session.pending, runner.length
        draft, probs = [], []
        for index in range(count):
            hidden, _ = exit_step(layout, cache, token, start + index, stop, last=exit_layer, fill=False)
            drafted = draft_token(lm_logits(layout, hidden[0, -1]), session, self.threshold)
            if drafted is None:
                break
            token, q = drafted
            draft.append(token)
            probs.append(q)
        return TokenTree.chain(session.pending, draft, probs)


class LayerSkip(Technique):
    name = "layerskip"
    node = "model.compression.dynamic_inference.token_level"
    paper = Paper(title="LayerSkip: Enabling Early Exit Inference and Self-Speculative Decoding", year=2024,
                  arxiv="2404.16710")
    summary = ("Drafts with the first layers of the model and a trained exit norm through the shared LM head, in "
               "the model's own KV cache; the full model verifies (shared speculative verifier): lossless.")
    lossless = True
    requires = frozenset({Requirement.TRAINING})
    bench_config = {"draft_layers": 24, "num_draft_tokens": 3, "confidence_threshold": 0.3, "train_prompts": 48,
                    "train_new_tokens": 64, "train_steps": 80}

    class Config(ExitTraining):
        draft_layers: int | None = Field(None, ge=1, le=1024, description="blocks the draft runs before its exit "
                                                                          "(None: half of the model's)")
        num_draft_tokens: int = Field(4, ge=1, le=32, description="most tokens drafted per step")
        confidence_threshold: float = Field(0.0, ge=0.0, lt=1.0, description="stop drafting when the draft's "
                                                                             "probability of its token is below this")

    def draft_layers(self, num_layers: int) -> int:
        return self.config.draft_layers or max(1, num_layers // 2)

    def check_model_config(self, config: Any) -> list[str]:
        layers = getattr(config, "num_hidden_layers", None)
        if layers is not None and self.draft_layers(layers) >= layers:
            return [f"draft_layers={self.draft_layers(layers)} is not fewer than the model's {layers} layers; use "
                    f"draft_layers ≤ {layers - 1}"]
        return []

    @hookimpl
    def effinfer_decoding_strategy(self, stage: SystemStage) -> LayerSkipDecoding:
        model = stage.model
        problems = self.check_model_config(model.config)
        if problems:
            raise EarlyExitError(problems[0])
        static_engine(model, self.name)
        layers = self.draft_layers(model.config.num_hidden_layers)
        # trained with early_exit's default exits (one cached set serves both techniques)
        heads, report = train_exits(model, stage.tokenizer,
                                    sorted(set(default_exits(model.config.num_hidden_layers)) | {layers - 1}),
                                    ExitTraining(**self.config.model_dump(include=set(ExitTraining.model_fields))))
        self.report = report
        self.note(report.describe())
        self.note(f"draft: the first {layers} of {model.config.num_hidden_layers} layers + trained exit norm, up to "
                  f"{self.config.num_draft_tokens} tokens per step, verified by the full model")
        return LayerSkipDecoding(heads, layers, self.config.num_draft_tokens, self.config.confidence_threshold,
                                 stage.engine)
