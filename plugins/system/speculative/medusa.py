"""Medusa: extra decoding heads draft a token tree from the last hidden state.

Cai et al., "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding
Heads", arXiv:2401.10774. Heads trained on the model's own output
(:mod:`effinfer.plugins.system.speculative.medusa_heads`) give, from the hidden state that
predicted the pending token, distributions for the 1st, 2nd, … token after it. Their
top-k tokens span a Cartesian-product tree; its ``max_nodes`` most probable prefixes
(product of head probabilities) are verified in one forward pass with the tree attention
mask. Verification is the shared verifier's (exact under greedy, speculative sampling
otherwise — not the paper's lossy "typical acceptance"), so the output is lossless.
"""

from __future__ import annotations

import itertools
import math

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from effinfer.core import Paper, Requirement, Technique, hookimpl
from effinfer.core.stages import SystemStage
from effinfer.plugins.system.speculative.api import DecodeEngine, Session, SpeculativeDecoding, TokenTree
from effinfer.plugins.system.speculative.medusa_heads import MedusaHeads, TrainingReport, train_medusa


def candidate_prefixes(probs: torch.Tensor, topk: list[int], max_nodes: int) -> list[list[int]]:
    """The ``max_nodes`` most probable prefixes of the top-k Cartesian product (prefix-closed)."""
    choices = [torch.topk(probs[depth], k) for depth, k in enumerate(topk)]
    scored: dict[tuple[int, ...], float] = {}
    for depth in range(1, len(topk) + 1):
        for picks in itertools.product(*(range(k) for k in topk[:depth])):
            tokens = tuple(int(choices[d].indices[i]) for d, i in enumerate(picks))
            score = 1.0
            for d, i in enumerate(picks):
                score *= float(choices[d].values[i])
            scored[tokens] = max(score, scored.get(tokens, 0.0))
    ranked = sorted(scored, key=lambda prefix: (-scored[prefix], len(prefix)))
    return [list(prefix) for prefix in ranked[:max_nodes]]


class MedusaDecoding(SpeculativeDecoding):
    name = "medusa"

    def __init__(self, config: Medusa.Config, heads: MedusaHeads, engine: DecodeEngine | None = None) -> None:
        super().__init__(engine)
        self.config = config
        self.heads = heads
        self.max_tree_nodes = config.max_nodes + 1

    def propose(self, session: Session) -> TokenTree:
        lm_head = session.model.get_output_embeddings()
        with torch.inference_mode():
            probs = self.heads(session.hidden[None], lm_head)[:, 0]
        probs = probs.float().softmax(-1)
        prefixes = candidate_prefixes(probs, self.config.topk, self.config.max_nodes)
        return TokenTree.from_paths(session.pending, prefixes)


class Medusa(Technique):
    name = "medusa"
    node = "system.inference_engine.speculative_decoding"
    paper = Paper(title="Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding Heads",
                  year=2024, arxiv="2401.10774")
    summary = ("Extra decoding heads (one residual block each, sharing the LM head) predict several "
               "future tokens from the last hidden state; their top-k products form a token tree verified "
               "in one pass. Heads are trained on CPU on the model's own generations (Medusa-1, "
               "self-distillation) and cached. Lossless with the shared verifier.")
    lossless = True
    requires = frozenset({Requirement.TRAINING})
    # bench: smaller, quicker-to-train heads (16 answers × 96 tokens, 2 epochs: about a minute on 2 cores)
    bench_config = {"train_prompts": 16, "train_new_tokens": 96, "epochs": 2}

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        heads: int = Field(3, ge=1, le=5, description="Medusa heads (tokens 2…heads+1 ahead)")
        topk: list[int] = Field(default_factory=lambda: [4, 2, 2],
                                description="candidates per head (one entry per head), spanning the tree")
        max_nodes: int = Field(10, ge=1, le=128, description="drafted tokens in the tree (most probable prefixes)")
        train_prompts: int = Field(48, ge=4, le=4096, description="self-generated training answers")
        train_new_tokens: int = Field(128, ge=16, le=2048, description="tokens per training answer")
        epochs: int = Field(3, ge=1, le=100)
        lr: float = Field(1e-3, gt=0.0, le=1.0, description="AdamW learning rate")
        batch_size: int = Field(128, ge=1, le=8192, description="positions per training step")
        seed: int = Field(0, ge=0)
        corpora: list[str] = Field(default_factory=lambda: ["wikipedia", "shakespeare"],
                                   description="calibration-split corpora the training prompts quote")

        @model_validator(mode="after")
        def _topk_per_head(self) -> Medusa.Config:
            if len(self.topk) != self.heads:
                raise ValueError(f"topk needs one entry per head: {self.heads} heads, got topk={self.topk}")
            if any(k < 1 or k > 64 for k in self.topk):
                raise ValueError(f"topk entries must be between 1 and 64, got {self.topk}")
            if math.prod(self.topk) > 4096:
                raise ValueError(f"topk {self.topk} spans {math.prod(self.topk)} leaves; keep the product ≤ 4096")
            return self

    training_report: TrainingReport | None = None

    @hookimpl
    def effinfer_decoding_strategy(self, stage: SystemStage) -> MedusaDecoding:
        heads, report = train_medusa(stage.model, stage.tokenizer, self.config, stage.engine)
        self.training_report = report
        how = "loaded from cache" if report.cached else "trained"
        self.note(f"{self.config.heads} heads {how}: {report.positions} positions from {report.prompts} "
                  f"self-generated answers ({report.generated_tokens} tokens); cost {report.total_seconds:.0f} s "
                  f"(generate {report.generate_seconds:.0f} s, features {report.feature_seconds:.0f} s, "
                  f"train {report.train_seconds:.0f} s); head top-1 {report.head_top1}")
        return MedusaDecoding(self.config, heads, stage.engine)


@hookimpl
def effinfer_register_techniques(register):
    register(Medusa)
