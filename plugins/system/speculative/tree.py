"""Token trees: what every drafter proposes and the verifier checks in one forward pass.

Node 0 is the *root*: the last token the target model chose, not yet in the KV cache.
Every other node is a drafted token hanging under its parent; a chain (one draft
sequence) is the special case of one child per node. Several candidate continuations
(REST, Medusa, lookahead) share their common prefixes in a trie, as in SpecInfer
(Miao et al., arXiv:2305.09781), so one forward pass with a tree attention mask
verifies them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class TokenTree:
    tokens: list[int]
    parents: list[int]
    #: per node, the draft distribution its token was sampled from (``None``: chosen deterministically)
    draft_probs: list[torch.Tensor | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents) or not self.tokens or self.parents[0] != -1:
            raise ValueError("a token tree needs a root (parents[0] == -1) and one parent per token")
        if any(not 0 <= p < i for i, p in enumerate(self.parents[1:], start=1)):
            raise ValueError(f"parents must precede their children, got {self.parents}")
        if not self.draft_probs:
            self.draft_probs = [None] * len(self.tokens)

    @classmethod
    def chain(cls, root: int, draft: Sequence[int], probs: Sequence[torch.Tensor | None] | None = None
              ) -> TokenTree:
        """The root followed by one drafted sequence."""
        return cls([root, *draft], list(range(-1, len(draft))), [None, *(probs or [None] * len(draft))])

    @classmethod
    def from_paths(cls, root: int, paths: Sequence[Sequence[int]]) -> TokenTree:
        """A trie of candidate continuations; earlier paths come first among siblings."""
        tokens, parents = [root], [-1]
        index: dict[tuple[int, int], int] = {}
        for path in paths:
            node = 0
            for token in path:
                key = (node, int(token))
                if key not in index:
                    index[key] = len(tokens)
                    tokens.append(int(token))
                    parents.append(node)
                node = index[key]
        return cls(tokens, parents)

    @property
    def size(self) -> int:
        return len(self.tokens)

    @property
    def drafted(self) -> int:
        """Drafted tokens the target verifies (all nodes but the root)."""
        return len(self.tokens) - 1

    def children(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.tokens]
        for node, parent in enumerate(self.parents[1:], start=1):
            out[parent].append(node)
        return out

    def depths(self) -> list[int]:
        depth = [0] * len(self.tokens)
        for node, parent in enumerate(self.parents[1:], start=1):
            depth[node] = depth[parent] + 1
        return depth

    def pruned(self, max_depth: int, max_nodes: int | None = None) -> TokenTree:
        """The nodes at depth ≤ ``max_depth`` (and the first ``max_nodes``), renumbered."""
        depth = self.depths()
        keep = [i for i in range(self.size) if depth[i] <= max_depth]
        if max_nodes is not None:
            keep = keep[:max_nodes]
        if len(keep) == self.size:
            return self
        new = {old: i for i, old in enumerate(keep)}
        return TokenTree([self.tokens[i] for i in keep], [new.get(self.parents[i], -1) for i in keep],
                         [self.draft_probs[i] for i in keep])
