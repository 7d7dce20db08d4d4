"""The draft → verify → commit loop every speculative strategy runs.

A strategy only says how to draft: it subclasses :class:`SpeculativeDecoding` and
implements :meth:`~SpeculativeDecoding.propose` (a :class:`TokenTree` rooted at the
pending token), optionally :meth:`~SpeculativeDecoding.begin` (per prompt) and
:meth:`~SpeculativeDecoding.observe` (after each verification). The loop feeds the tree
to the target runner in one forward pass, lets the shared verifier decide, commits the
accepted path in the KV cache and records accepted/drafted tokens per step in the
:class:`~effinfer.core.generation.GenerationResult` (the evaluator's mean accepted
tokens and acceptance rate come from those lists).

Prompts of a batch are decoded one after the other (batch size 1 per sequence, as in
Spec-Bench); the target (and any draft) runs on the strategy's engine — the one the
runtime chose, ``SystemStage.engine`` — through its :class:`~effinfer.core.engines.Runner`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from effinfer.core.engines import DecodeEngine, Runner, StepOutput
from effinfer.core.generation import (GenerationConfig, GenerationResult, make_generator, sampling_probs,
                                      select_tokens)
from effinfer.plugins.system.speculative.tree import TokenTree
from effinfer.plugins.system.speculative.verifier import Verdict, verify


@dataclass
class Session:
    """The state of one sequence being decoded."""

    runner: Runner
    #: prompt and emitted tokens; the last one is the pending root, not yet in the KV cache
    context: list[int]
    prompt_length: int
    config: GenerationConfig
    generator: torch.Generator | None
    #: final-norm hidden state of the last committed position (it predicted the pending token)
    hidden: torch.Tensor
    #: tokens that may still be emitted
    budget: int
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def pending(self) -> int:
        return self.context[-1]

    @property
    def model(self) -> nn.Module:
        """The target model."""
        return self.runner.model


def draft_token(logits: torch.Tensor, session: Session, threshold: float = 0.0
                ) -> tuple[int, torch.Tensor | None] | None:
    """One token from a drafter's logits: argmax, or a sample from ``q`` (returned for the verifier's
    ``min(1, p/q)``) when sampling; ``None`` when ``q(token) < threshold`` (drafting stops there)."""
    sample = session.config.do_sample
    q = sampling_probs(logits[None], session.config)[0] if sample else logits.softmax(-1)
    token = int(torch.multinomial(q, 1, generator=session.generator)) if sample else int(logits.argmax())
    if float(q[token]) < threshold:
        return None
    return token, (q if sample else None)


def sync_draft(runner: Runner, session: Session, key: str = "fed") -> torch.Tensor:
    """Bring a separate draft runner in step with the target: roll it back to the longest common
    prefix of what it was fed (``session.state[key]``) and the context, feed the rest; its last logits.

    The pending token is fed too, so the logits predict the first token to draft.
    """
    fed: list[int] = session.state.get(key, [])
    common = 0
    limit = min(len(fed), len(session.context) - 1, runner.length)
    while common < limit and fed[common] == session.context[common]:
        common += 1
    runner.truncate(common)
    missing = session.context[common:]
    out = runner.forward(missing)
    runner.commit(range(len(missing)))
    session.state[key] = list(session.context)
    return out.logits[-1]


def draft_chain(runner: Runner, session: Session, count: int, threshold: float = 0.0, key: str = "fed"
                ) -> TokenTree:
    """Up to ``count`` tokens drafted autoregressively by a separate draft runner (kept in step with
    :func:`sync_draft`); drafting stops where the draft's confidence falls below ``threshold``."""
    logits = sync_draft(runner, session, key)
    draft: list[int] = []
    probs: list[torch.Tensor | None] = []
    for index in range(count):
        drafted = draft_token(logits, session, threshold)
        if drafted is None:
            break
        token, q = drafted
        draft.append(token)
        probs.append(q)
        if index + 1 < count:
            logits = runner.step(token)
            session.state[key].append(token)
    return TokenTree.chain(session.pending, draft, probs)


@dataclass
class RowResult:
    tokens: list[int]
    prefill_seconds: float
    decode_seconds: float
    draft_seconds: float
    steps: int
    accepted: list[int]
    drafted: list[int]


class SpeculativeDecoding:
    """Base class of the speculative strategies (see the module docstring)."""

    name = "speculative"
    #: the most nodes :meth:`propose` returns (reserved in the KV cache)
    max_tree_nodes = 64

    def __init__(self, engine: DecodeEngine | None = None) -> None:
        """``engine``: the decode engine to run on (a technique passes ``stage.engine``; ``None``:
        the default of ``runtime.engine``)."""
        if engine is None:
            from effinfer.core.compose import make_engine

            engine = make_engine()
        self.engine = engine

    # ------------------------------------------------------------------ what strategies implement

    def begin(self, session: Session) -> None:
        """Called once per prompt, after the prefill."""

    def propose(self, session: Session) -> TokenTree:
        raise NotImplementedError

    def observe(self, session: Session, tree: TokenTree, out: StepOutput, verdict: Verdict) -> None:
        """Called after each verification (``session.context`` already holds the emitted tokens)."""

    # ------------------------------------------------------------------ the loop

    def generate(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 config: GenerationConfig, stop_ids: set[int],
                 cache_factory: Callable[[nn.Module], Any] | None = None) -> GenerationResult:
        rows = []
        for row in range(input_ids.shape[0]):
            prompt = input_ids[row:row + 1][:, attention_mask[row].bool()]
            runner = self.target_runner(model, cache_factory, prompt.shape[1] + config.max_new_tokens)
            rows.append(self.decode_one(runner, prompt, config, stop_ids))
        return GenerationResult(
            sequences=[r.tokens for r in rows],
            prefill_seconds=sum(r.prefill_seconds for r in rows),
            decode_seconds=sum(r.decode_seconds for r in rows),
            forward_steps=sum(r.steps for r in rows),
            accepted_per_step=[a for r in rows for a in r.accepted],
            drafted_per_step=[d for r in rows for d in r.drafted],
            draft_seconds=sum(r.draft_seconds for r in rows),
        )

    def target_runner(self, model: nn.Module, cache_factory: Any, tokens: int) -> Runner:
        return self.engine.runner(model, tokens, self.max_tree_nodes, cache_factory)

    def decode_one(self, runner: Runner, prompt: torch.Tensor, config: GenerationConfig,
                   stop_ids: set[int]) -> RowResult:
        generator = make_generator(config, prompt.device)
        started = time.perf_counter()
        out = runner.prefill(prompt)
        first = int(select_tokens(out.logits[-1:], config, generator)[0])
        session = Session(runner, prompt[0].tolist() + [first], prompt.shape[1], config, generator,
                          out.hidden[-1], config.max_new_tokens - 1)
        # the strategy's own pass over the prompt (a draft model's prefill, a lookup index) is prompt processing:
        # timed with the prefill, as HF's assisted generate counts its assistant's prefill in its first token
        self.begin(session)
        prefill_done = time.perf_counter()
        result = RowResult([first], prefill_done - started, 0.0, 0.0, 0, [], [])
        while result.tokens[-1] not in stop_ids and session.budget > 0:
            self.step(session, result, stop_ids)
        result.decode_seconds = time.perf_counter() - prefill_done
        return result

    def step(self, session: Session, result: RowResult, stop_ids: set[int]) -> None:
        """One draft → verify → commit round."""
        drafting = time.perf_counter()
        tree = self.propose(session).pruned(max_depth=session.budget - 1, max_nodes=self.max_tree_nodes)
        result.draft_seconds += time.perf_counter() - drafting
        out = session.runner.forward(tree.tokens, tree.parents)
        verdict = verify(tree, out.logits, session.config, session.generator)
        session.runner.commit(verdict.path)
        result.steps += 1
        if tree.drafted:
            result.accepted.append(verdict.accepted)
            result.drafted.append(tree.drafted)
        emitted = verdict.tokens[:session.budget]
        stop = next((i for i, token in enumerate(emitted) if token in stop_ids), None)
        emitted = emitted if stop is None else emitted[:stop + 1]
        result.tokens += emitted
        session.context += emitted
        session.budget -= len(emitted)
        session.hidden = out.hidden[verdict.path[-1]]
        drafting = time.perf_counter()
        self.observe(session, tree, out, verdict)
        result.draft_seconds += time.perf_counter() - drafting
