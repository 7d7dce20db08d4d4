"""EAGLE: a one-layer draft head autoregresses on the target's features.

Li et al., "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty",
arXiv:2401.15077. The head (:mod:`effinfer.plugins.system.speculative.eagle_head`: ``fc`` over
``concat(feature, embedding of the next token)`` and one decoder layer of the target's own
class, trained on the target's own output and cached) keeps a KV cache of its own over the
target's features. Each step it takes the features the last verification produced, then
drafts a chain of ``num_draft_tokens`` tokens by feeding its own predicted feature and drafted
token back in; tokens come from the target's frozen final norm and LM head. The chain is
verified by the shared verifier (exact under greedy, speculative sampling otherwise), so the
output is lossless; the drafted positions are then dropped from the head's cache and the
target's true features of the accepted tokens take their place.

Features are the target's final-norm hidden states, what the runner returns with every
forward. After the prefill the head needs the features of the prompt's last
``prompt_features`` positions: the runner re-computes them by rolling its cache back that far
and forwarding those tokens again (the prefill returns only the last position's); one is the
last position alone, at no cost. This is a chain, not the paper's dynamic token tree.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import DynamicCache

from effinfer.core import Paper, Requirement, Technique, hookimpl
from effinfer.core.stages import SystemStage
from effinfer.plugins.system.speculative.api import (DecodeEngine, Session, SpeculativeDecoding, TokenTree,
                                                     draft_token)
from effinfer.plugins.system.speculative.eagle_head import EagleHead, EagleReport, train_eagle


def prompt_features(session: Session, count: int, chunk: int) -> tuple[list[torch.Tensor], int]:
    """The target's features of the prompt's last ``count`` positions and the first of them.

    Rolls the runner back ``count`` positions and forwards those tokens again, ``chunk`` at a
    time (the runner's node budget), committing them: the cache ends as the prefill left it.
    """
    length = len(session.context) - 1
    count = min(count, length)
    if count <= 1:
        return [session.hidden], length - 1
    runner, features = session.runner, []
    runner.truncate(length - count)
    for start in range(length - count, length, chunk):
        tokens = session.context[start:min(start + chunk, length)]
        out = runner.forward(tokens)
        runner.commit(range(len(tokens)))
        features += list(out.hidden)
    return features, length - count


class EagleDecoding(SpeculativeDecoding):
    name = "eagle"

    def __init__(self, config: Eagle.Config, head: EagleHead, engine: DecodeEngine | None = None) -> None:
        super().__init__(engine)
        self.config = config
        self.head = head
        self.max_tree_nodes = config.num_draft_tokens + 1

    def begin(self, session: Session) -> None:
        features, first = prompt_features(session, self.config.prompt_features, self.max_tree_nodes)
        session.state.update(cache=DynamicCache(config=self.head.decoder.config), start=first, fed=first,
                             features=features)

    @torch.inference_mode()
    def step_head(self, session: Session, features: torch.Tensor, tokens: list[int], first: int) -> torch.Tensor:
        """Feed ``(features[i], tokens[i])`` at positions ``first, first+1, …`` to the head's cache;
        the predicted feature after the last one (``H``)."""
        model, device = session.model, self.head.fc.weight.device
        embeddings = model.get_input_embeddings()(torch.tensor([tokens], device=device))
        positions = torch.arange(first, first + len(tokens), device=device)[None]
        out = self.head(features[None].to(device), embeddings, positions, session.state["cache"])
        return self.head.features(model, out[0, -1])

    def propose(self, session: Session) -> TokenTree:
        state, pending_at = session.state, len(session.context) - 1
        fed = state["fed"]
        # the target's features not yet in the head's cache, each with the token it predicted
        feature = self.step_head(session, torch.stack(state["features"]), session.context[fed + 1:], fed)
        state.update(fed=pending_at, features=[])
        lm_head = session.model.get_output_embeddings()
        draft: list[int] = []
        probs: list[torch.Tensor | None] = []
        for index in range(self.config.num_draft_tokens):
            with torch.inference_mode():
                logits = lm_head(feature).float()
            token, q = draft_token(logits, session)
            draft.append(token)
            probs.append(q)
            if index + 1 < self.config.num_draft_tokens:
                feature = self.step_head(session, feature[None], [token], pending_at + index)
        drafted_entries = state["cache"].get_seq_length() - (pending_at - state["start"])
        if drafted_entries:  # the drafted positions leave the head's cache; true features replace them
            state["cache"].crop(-drafted_entries)
        return TokenTree.chain(session.pending, draft, probs)

    def observe(self, session: Session, tree: TokenTree, out: Any, verdict: Any) -> None:
        """The target's features along the accepted path go to the head next step."""
        session.state["features"] = list(out.hidden[verdict.path])


class Eagle(Technique):
    name = "eagle"
    node = "system.inference_engine.speculative_decoding"
    paper = Paper(title="EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty", year=2024,
                  arxiv="2401.15077")
    summary = ("A draft head of one decoder layer (the target's own block type) autoregresses on the target's "
               "features: fc(feature, next token's embedding) → next feature, tokens read through the target's "
               "frozen norm and LM head. Trained on CPU on the target's own generations (feature smooth-L1 + "
               "token cross-entropy) and cached; drafts a chain verified by the shared verifier, so lossless.")
    lossless = True
    requires = frozenset({Requirement.TRAINING})
    # bench: the defaults (16 answers × 96 tokens, 12 epochs: about a minute or two on SmolLM2, 2 cores)
    bench_config = None

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        num_draft_tokens: int = Field(4, ge=1, le=16, description="tokens the head drafts per step (a chain)")
        prompt_features: int = Field(16, ge=1, le=4096,
                                     description="prompt positions whose target features the head sees, "
                                                 "re-computed after the prefill (1: the last only, free)")
        train_prompts: int = Field(16, ge=2, le=4096, description="self-generated training answers")
        train_new_tokens: int = Field(96, ge=8, le=2048, description="tokens per training answer")
        epochs: int = Field(12, ge=1, le=1000, description="passes over the training answers (one per step)")
        lr: float = Field(1e-3, gt=0.0, le=1.0, description="AdamW learning rate (cosine-decayed to 10%)")
        token_loss_positions: int = Field(32, ge=1, le=8192,
                                          description="positions per step whose token cross-entropy is computed "
                                                      "(sampled; the feature loss covers every position)")
        seed: int = Field(0, ge=0)
        corpora: list[str] = Field(default_factory=lambda: ["wikipedia", "shakespeare"],
                                   description="calibration-split corpora the training prompts quote")

    training_report: EagleReport | None = None

    @hookimpl
    def effinfer_decoding_strategy(self, stage: SystemStage) -> EagleDecoding:
        head, report = train_eagle(stage.model, stage.tokenizer, self.config, stage.engine)
        self.training_report = report
        self.note(report.describe())
        self.note(f"drafting a chain of {self.config.num_draft_tokens} tokens per step")
        return EagleDecoding(self.config, head, stage.engine)


@hookimpl
def effinfer_register_techniques(register):
    register(Eagle)
