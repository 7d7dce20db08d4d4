"""The public API for writing a decoding strategy: everything a strategy author needs, in one module.

Built-in strategies import only from here; a third-party strategy should too (the
modules behind it may move). A speculative strategy says how to *draft*; the loop
drafts → verifies → commits::

    from effinfer.core import Paper, Technique, hookimpl
    from effinfer.plugins.system.speculative.api import Session, SpeculativeDecoding, TokenTree

    class EchoDecoding(SpeculativeDecoding):
        name = "echo"
        max_tree_nodes = 4

        def propose(self, session: Session) -> TokenTree:
            return TokenTree.chain(session.pending, session.context[-4:-1])   # guess a repeat

    class Echo(Technique):
        name = "echo"
        node = "system.inference_engine.speculative_decoding"
        ...
        @hookimpl
        def effinfer_decoding_strategy(self, stage):
            return EchoDecoding(stage.engine)   # decode on the engine the runtime chose

What is here:

**The loop.** :class:`SpeculativeDecoding` — subclass it and implement
``propose(session) -> TokenTree``; optionally ``begin(session)`` (once per prompt, after
the prefill) and ``observe(session, tree, out, verdict)`` (after each verification).
:class:`Session` — one sequence being decoded: ``context`` (prompt + emitted tokens; the
last, ``pending``, is not in the KV cache yet), ``runner``, ``model``, ``hidden`` (final-norm
hidden state that predicted the pending token), ``budget``, ``config``, ``generator``,
and ``state`` (the strategy's per-sequence scratch dict).

**Drafting helpers.** :func:`draft_token` (one token from a drafter's logits: argmax, or
a sample whose distribution goes to the verifier); :func:`draft_chain` and
:func:`sync_draft` (a separate draft runner kept in step with the target: roll back to
the accepted prefix, feed what it has not seen, draft a chain).

**Token trees.** :class:`TokenTree` — node 0 is the pending root, ``parents[i] < i``;
``TokenTree.chain(root, draft, probs)`` and ``TokenTree.from_paths(root, paths)`` (a trie).

**Verification.** :func:`verify` (greedy exact, or speculative sampling with SpecInfer's
multi-candidate rule) returning a :class:`Verdict` (accepted ``path`` and emitted ``tokens``).

**The engine.** :class:`DecodeEngine` — ``stage.engine``, the runtime's engine:
``engine.runner(model, tokens, max_nodes, cache_factory, name)`` gives a :class:`Runner`
(``prefill``, ``forward(tokens, parents)`` without committing, ``commit(kept)``,
``truncate``, ``step``, and optionally ``step_layers``); ``engine.decoding()`` its plain
loop. :class:`StepOutput` is what ``prefill``/``forward`` return (logits and hidden states
per node). :func:`make_engine` builds a registered engine by name.
"""

from effinfer.core.compose import make_engine
from effinfer.core.engines import DecodeEngine, HFEngine, Runner, StepOutput
from effinfer.plugins.system.speculative.loop import (RowResult, Session, SpeculativeDecoding, draft_chain,
                                                      draft_token, sync_draft)
from effinfer.plugins.system.speculative.tree import TokenTree
from effinfer.plugins.system.speculative.verifier import Verdict, verify

__all__ = ["DecodeEngine", "HFEngine", "RowResult", "Runner", "Session", "SpeculativeDecoding", "StepOutput",
           "TokenTree", "Verdict", "draft_chain", "draft_token", "make_engine", "sync_draft", "verify"]
