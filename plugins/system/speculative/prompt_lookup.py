"""Prompt lookup decoding: draft tokens by matching the last n-gram earlier in the text.

Saxena, "Prompt Lookup Decoding" (2023), https://github.com/apoorvumang/prompt-lookup-decoding.
The draft is the continuation of the most recent earlier occurrence of the sequence's
final n-gram (longest n first); the target verifies it in one forward pass through the
shared verifier (:mod:`effinfer.plugins.system.speculative.verifier`): exact under greedy
decoding, speculative sampling with a point-mass draft (Leviathan et al.,
arXiv:2211.17192) under sampling, so the output distribution is the target's.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.stages import SystemStage
from effinfer.plugins.system.speculative.api import DecodeEngine, Session, SpeculativeDecoding, TokenTree


def find_draft(tokens: list[int], max_ngram: int, min_ngram: int, num_draft: int) -> list[int]:
    """Continuation of the latest earlier match of the final n-gram, longest n first."""
    for n in range(min(max_ngram, len(tokens) - 1), min_ngram - 1, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == tail:
                return tokens[start + n:start + n + num_draft]
    return []


class PromptLookupDecoding(SpeculativeDecoding):
    name = "prompt_lookup"

    def __init__(self, config: PromptLookup.Config, engine: DecodeEngine | None = None) -> None:
        super().__init__(engine)
        self.config = config
        self.max_tree_nodes = config.num_draft_tokens + 1

    def propose(self, session: Session) -> TokenTree:
        draft = find_draft(session.context, self.config.max_ngram, self.config.min_ngram,
                           self.config.num_draft_tokens)
        return TokenTree.chain(session.pending, draft)


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
    bench_config = {"num_draft_tokens": 10, "max_ngram": 3}

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
        return PromptLookupDecoding(self.config, stage.engine)


@hookimpl
def effinfer_register_techniques(register):
    register(PromptLookup)
