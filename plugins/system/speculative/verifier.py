"""The one verifier every speculative strategy shares.

Input: a :class:`~effinfer.plugins.system.speculative.tree.TokenTree` and the target
model's logits at every node (one forward pass with the tree attention mask); node ``i``'s
logits give the target's distribution of the token *after* node ``i``.

- **Greedy** (exact): walk down from the root; at each node take the target's argmax and
  move to the child holding it, if any. The accepted path plus the target's own choice at
  its end is exactly what plain greedy decoding emits.
- **Speculative sampling** (Leviathan et al., arXiv:2211.17192; Chen et al.,
  arXiv:2302.01318): a drafted token ``x`` drawn from ``q`` is accepted with probability
  ``min(1, p(x)/q(x))``; on rejection the target samples from ``norm(max(0, p − q))``.
  For deterministic drafts ``q`` is a point mass, so ``x`` is accepted with ``p(x)``.
- **Trees** (SpecInfer's multi-step speculative sampling, Miao et al., arXiv:2305.09781):
  the children of a node are tried in order, each with the rule above against the
  *residual* left by the rejected siblings; the first accepted child is descended into;
  when all are rejected the residual is sampled. Every step leaves the emitted token
  distributed exactly as the target's ``p`` (tested statistically in the test suite).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effinfer.core.generation import GenerationConfig, sampling_probs
from effinfer.plugins.system.speculative.tree import TokenTree


@dataclass(frozen=True)
class Verdict:
    #: accepted node indices, root (0) first; these are the entries the KV cache keeps
    path: list[int]
    #: the accepted drafted tokens followed by the target's own next token
    tokens: list[int]

    @property
    def accepted(self) -> int:
        return len(self.path) - 1


def verify(tree: TokenTree, logits: torch.Tensor, config: GenerationConfig,
           generator: torch.Generator | None = None) -> Verdict:
    """Greedy or sampling verification of ``tree`` given ``logits`` (``nodes × vocab``)."""
    if logits.shape[0] != tree.size:
        raise ValueError(f"{logits.shape[0]} rows of logits for a tree of {tree.size} nodes")
    if config.do_sample:
        return verify_sampling(tree, sampling_probs(logits.float(), config), generator)
    return verify_greedy(tree, logits)


def verify_greedy(tree: TokenTree, logits: torch.Tensor) -> Verdict:
    choices = logits.argmax(-1).tolist()
    children = tree.children()
    path, tokens = [0], []
    while True:
        node = path[-1]
        choice = choices[node]
        tokens.append(choice)
        child = next((c for c in children[node] if tree.tokens[c] == choice), None)
        if child is None:
            return Verdict(path, tokens)
        path.append(child)


def verify_sampling(tree: TokenTree, probs: torch.Tensor, generator: torch.Generator | None) -> Verdict:
    """``probs`` are the target's sampling distributions per node (after temperature/top-k/top-p)."""
    children = tree.children()
    path, tokens = [0], []
    while True:
        residual = probs[path[-1]].clone()
        accepted = None
        for child in children[path[-1]]:
            token, q = tree.tokens[child], tree.draft_probs[child]
            if accept(residual, token, q, generator):
                accepted = child
                break
            residual = reject(residual, token, q)
        if accepted is None:
            tokens.append(int(torch.multinomial(residual, 1, generator=generator)))
            return Verdict(path, tokens)
        path.append(accepted)
        tokens.append(tree.tokens[accepted])


def accept(p: torch.Tensor, token: int, q: torch.Tensor | None, generator: torch.Generator | None) -> bool:
    """Accept ``token`` (drawn from ``q``; ``None`` = point mass) with probability ``min(1, p/q)``."""
    target = float(p[token])
    draft = 1.0 if q is None else float(q[token])
    if draft <= 0.0:
        return False
    return float(torch.rand((), generator=generator)) < min(1.0, target / draft)


def reject(p: torch.Tensor, token: int, q: torch.Tensor | None) -> torch.Tensor:
    """The residual ``norm(max(0, p − q))`` after rejecting ``token`` drawn from ``q``."""
    if q is None:
        residual = p.clone()
        residual[token] = 0.0
    else:
        residual = (p - q).clamp_min(0.0)
    total = residual.sum()
    if total <= 0:  # p ≤ q everywhere only when p == q, where rejection has probability 0
        return p
    return residual / total
