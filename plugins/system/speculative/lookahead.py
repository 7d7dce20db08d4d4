"""Lookahead decoding: Jacobi iterations feed an n-gram pool that drafts for the verifier.

Fu et al., "Break the Sequential Dependency of LLM Inference Using Lookahead Decoding",
arXiv:2402.02057. Each step runs *one* forward pass over a token tree made of

- the **lookahead branch**: a window of ``W`` guessed tokens for the next positions, fed as
  a chain; the target's outputs along it are the next Jacobi iterate (each position's
  guess becomes the model's prediction given the previous guesses);
- the **verification branch**: up to ``G`` n-grams from the pool that start with the
  pending token, as a trie.

The Jacobi trajectory of the last ``N − 1`` iterations yields new n-grams along its
diagonals (a token, the guess that was produced right after it one iteration later, …,
and the newest output), as in the paper's 2-D window; they go to the pool, keyed by their
first token. The lookahead chain is itself a candidate of the tree, so plain Jacobi
decoding's acceptances come for free. The shared verifier keeps the output identical to
plain greedy (or distributed as the target under sampling).

Differences from the paper, on purpose: the window holds one level (older levels are kept
for n-gram collection only, not fed), and after ``e`` tokens are accepted the window slides
by ``e`` positions so guesses stay aligned with the positions they were made for.
"""

from __future__ import annotations

from collections import deque

from pydantic import BaseModel, ConfigDict, Field

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.stages import SystemStage
from effinfer.plugins.system.speculative.api import (DecodeEngine, Session, SpeculativeDecoding, StepOutput,
                                                     TokenTree, Verdict)


class NgramPool:
    """N-grams keyed by their first token; the most recent first, at most ``per_key`` each."""

    def __init__(self, per_key: int) -> None:
        self.per_key = per_key
        self.entries: dict[int, list[tuple[int, ...]]] = {}

    def add(self, ngram: tuple[int, ...]) -> None:
        first, rest = ngram[0], ngram[1:]
        bucket = self.entries.setdefault(first, [])
        if rest in bucket:
            bucket.remove(rest)
        bucket.insert(0, rest)
        del bucket[self.per_key:]

    def lookup(self, token: int, limit: int) -> list[tuple[int, ...]]:
        return self.entries.get(token, [])[:limit]


def diagonal_ngrams(levels: list[dict[int, int]], outputs: dict[int, int], n: int) -> list[tuple[int, ...]]:
    """N-grams ending in a new output: ``(levels[-n+1][x-n+1], …, levels[-1][x-1], outputs[x])``.

    ``levels`` are past Jacobi iterates (oldest first), each mapping position → token.
    """
    grams = []
    for position, token in outputs.items():
        prefix = []
        for back in range(1, n):
            if back > len(levels) or position - back not in levels[-back]:
                break
            prefix.append(levels[-back][position - back])
        if len(prefix) == n - 1:
            grams.append((*reversed(prefix), token))
    return grams


class LookaheadDecoding(SpeculativeDecoding):
    name = "lookahead"

    def __init__(self, config: Lookahead.Config, engine: DecodeEngine | None = None) -> None:
        super().__init__(engine)
        self.config = config
        self.max_tree_nodes = 1 + config.window + config.max_candidates * (config.ngram - 1)

    def begin(self, session: Session) -> None:
        start = len(session.context)  # position after the pending token
        seed = session.context[-self.config.window - 1:-1] or session.context
        window = {start + i: seed[i % len(seed)] for i in range(self.config.window)}
        session.state.update(window=window, levels=deque(maxlen=self.config.ngram - 1),
                             pool=NgramPool(self.config.pool_per_key))

    def propose(self, session: Session) -> TokenTree:
        window: dict[int, int] = session.state["window"]
        guesses = [window[p] for p in sorted(window)]
        candidates = session.state["pool"].lookup(session.pending, self.config.max_candidates)
        session.state["guesses"] = guesses
        return TokenTree.from_paths(session.pending, [*map(list, candidates), guesses])

    def observe(self, session: Session, tree: TokenTree, out: StepOutput, verdict: Verdict) -> None:
        state = session.state
        root_position = min(state["window"]) - 1
        nodes = [0, *chain_nodes(tree, state["guesses"])]  # the tree may have been pruned
        choices = out.logits[nodes].argmax(-1).tolist()
        outputs = {root_position + 1 + i: token for i, token in enumerate(choices)}
        levels: deque[dict[int, int]] = state["levels"]
        levels.append(state["window"])
        for gram in diagonal_ngrams(list(levels), outputs, self.config.ngram):
            state["pool"].add(gram)
        start = len(session.context)
        last = outputs[max(outputs)]
        state["window"] = {start + i: outputs.get(start + i, last) for i in range(self.config.window)}


def chain_nodes(tree: TokenTree, chain: list[int]) -> list[int]:
    """Node indices of ``chain``'s tokens in ``tree``, as far as that path exists in it."""
    children = tree.children()
    nodes, node = [], 0
    for token in chain:
        node = next((c for c in children[node] if tree.tokens[c] == token), None)
        if node is None:
            break
        nodes.append(node)
    return nodes


class Lookahead(Technique):
    name = "lookahead"
    node = "system.inference_engine.speculative_decoding"
    paper = Paper(title="Break the Sequential Dependency of LLM Inference Using Lookahead Decoding", year=2024,
                  arxiv="2402.02057")
    summary = ("Jacobi iterations on a window of guessed future tokens run in the same forward pass as "
               "the verification of n-grams harvested from their trajectory; no draft model, no "
               "training, no datastore. Lossless.")
    lossless = True
    bench_config = {"window": 5, "ngram": 3, "max_candidates": 4}

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        window: int = Field(5, ge=1, le=32, description="W: guessed future tokens per Jacobi iteration")
        ngram: int = Field(3, ge=2, le=8, description="N: length of harvested n-grams (N − 1 drafted tokens)")
        max_candidates: int = Field(4, ge=0, le=32, description="G: pool n-grams verified per step")
        pool_per_key: int = Field(8, ge=1, le=128, description="n-grams kept per first token (newest first)")

    @hookimpl
    def effinfer_decoding_strategy(self, stage: SystemStage) -> LookaheadDecoding:
        self.note(f"lookahead W={self.config.window}, N={self.config.ngram}, G={self.config.max_candidates}")
        return LookaheadDecoding(self.config, stage.engine)


@hookimpl
def effinfer_register_techniques(register):
    register(Lookahead)
