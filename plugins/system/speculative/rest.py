"""REST: retrieval-based speculative decoding from a datastore built on a corpus.

He et al., "REST: Retrieval-Based Speculative Decoding", arXiv:2311.08252. The longest
suffix of the current context (up to ``max_suffix`` tokens, down to ``min_suffix``) is
looked up exactly in a suffix array over a tokenized corpus
(:mod:`effinfer.plugins.system.speculative.datastore`); the continuations of its
occurrences are merged into a trie and its ``max_nodes`` most frequent prefixes form the
draft tree, verified in one forward pass with a tree attention mask by the shared
verifier. No draft model, no training; quality depends on how much the output resembles
the datastore.

Datastore default: the *calibration* splits of the Wikipedia and Shakespeare corpora of
:mod:`effinfer.data`, disjoint from the test split the evaluation prompts are
built from (``split: all`` adds them, at the price of that leak).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.stages import SystemStage
from effinfer.plugins.system.speculative.api import DecodeEngine, Session, SpeculativeDecoding, TokenTree
from effinfer.plugins.system.speculative.datastore import Datastore, build_datastore, frequent_prefixes


class RestDecoding(SpeculativeDecoding):
    name = "rest"

    def __init__(self, config: Rest.Config, datastore: Datastore | None, engine: DecodeEngine | None = None,
                 tokenizer: Any = None) -> None:
        super().__init__(engine)
        self.config = config
        self.datastore = datastore
        self.tokenizer = tokenizer
        self.max_tree_nodes = config.max_nodes + 1

    def begin(self, session: Session) -> None:
        if self.datastore is None:
            if self.tokenizer is None:
                raise RuntimeError("rest needs a datastore or a tokenizer to build one")
            self.datastore = build_datastore(self.tokenizer, self.config.corpora, self.config.split)[0]

    def propose(self, session: Session) -> TokenTree:
        continuations = self.datastore.continuations(session.context, self.config.min_suffix,
                                                     self.config.max_suffix, self.config.max_matches,
                                                     self.config.draft_length)
        return TokenTree.from_paths(session.pending, frequent_prefixes(continuations, self.config.max_nodes))


class Rest(Technique):
    name = "rest"
    node = "system.inference_engine.speculative_decoding"
    paper = Paper(title="REST: Retrieval-Based Speculative Decoding", year=2023, arxiv="2311.08252")
    summary = ("Drafts by exact-match retrieval: the continuations of the context's longest suffix in a "
               "suffix-array datastore over a corpus form a token tree (most frequent prefixes), verified "
               "in one pass with a tree attention mask. Training-free, lossless.")
    lossless = True
    bench_config = {  # the datastore is built once, then cached
"corpora": ["wikipedia", "shakespeare"], "max_nodes": 12}

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        corpora: list[str] = Field(default_factory=lambda: ["wikipedia", "shakespeare"],
                                   description="corpora of effinfer.data in the datastore")
        split: Literal["calibration", "test", "all"] = Field(
            "calibration", description="corpus split (the evaluation prompts come from 'test')")
        max_suffix: int = Field(16, ge=1, le=64, description="longest context suffix looked up")
        min_suffix: int = Field(2, ge=1, le=64, description="shortest context suffix looked up")
        max_matches: int = Field(200, ge=1, le=10000, description="occurrences whose continuations are used")
        draft_length: int = Field(6, ge=1, le=32, description="tokens taken after each occurrence")
        max_nodes: int = Field(12, ge=1, le=128, description="drafted tokens in the tree (most frequent prefixes)")

        @model_validator(mode="after")
        def _ordered(self) -> Rest.Config:
            if self.min_suffix > self.max_suffix:
                raise ValueError(f"min_suffix ({self.min_suffix}) must be ≤ max_suffix ({self.max_suffix})")
            if not self.corpora:
                raise ValueError("the datastore needs at least one corpus")
            from effinfer.data import CORPORA

            unknown = [c for c in self.corpora if c not in CORPORA]
            if unknown:
                raise ValueError(f"unknown corpora {unknown}; available: {sorted(CORPORA)}")
            return self

    @hookimpl
    def effinfer_decoding_strategy(self, stage: SystemStage) -> RestDecoding:
        started = time.perf_counter()
        store, path, cached = build_datastore(stage.tokenizer, self.config.corpora, self.config.split)
        self.note(f"datastore of {len(store):,} tokens ({'+'.join(self.config.corpora)}, {self.config.split}) "
                  f"{'loaded' if cached else 'built'} in {time.perf_counter() - started:.1f} s: {path}")
        return RestDecoding(self.config, store, stage.engine)


@hookimpl
def effinfer_register_techniques(register):
    register(Rest)
