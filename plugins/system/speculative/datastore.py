"""A token datastore with a suffix array, for retrieval-based drafting (REST).

The suffix array of the token sequence (Manber & Myers, 1993) is built by prefix doubling
with NumPy sorts (O(n log² n), a few seconds for a million tokens); every occurrence of a
pattern is then one contiguous range of the array, found by two binary searches. The
built store is cached on disk, keyed by the corpora, split and tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np


def suffix_array(tokens: np.ndarray) -> np.ndarray:
    """Start offsets of all suffixes of ``tokens`` in lexicographic order (prefix doubling)."""
    n = len(tokens)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    rank = np.unique(tokens, return_inverse=True)[1].astype(np.int64)
    width = 1
    while True:
        second = np.full(n, -1, dtype=np.int64)
        second[:n - width] = rank[width:]
        order = np.lexsort((second, rank))
        first_sorted, second_sorted = rank[order], second[order]
        boundary = np.empty(n, dtype=bool)
        boundary[0] = True
        boundary[1:] = (first_sorted[1:] != first_sorted[:-1]) | (second_sorted[1:] != second_sorted[:-1])
        new_rank = np.cumsum(boundary) - 1
        rank = np.empty(n, dtype=np.int64)
        rank[order] = new_rank
        if new_rank[-1] == n - 1 or width >= n:
            return order
        width *= 2


class Datastore:
    """Tokens plus their suffix array; finds the continuations of a token pattern."""

    def __init__(self, tokens: np.ndarray, suffixes: np.ndarray | None = None) -> None:
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.suffixes = suffix_array(self.tokens) if suffixes is None else suffixes

    def __len__(self) -> int:
        return len(self.tokens)

    def _prefix(self, rank: int, length: int) -> list[int]:
        start = int(self.suffixes[rank])
        return self.tokens[start:start + length].tolist()

    def find(self, pattern: list[int]) -> tuple[int, int]:
        """The suffix-array range ``[lo, hi)`` of suffixes starting with ``pattern``."""
        m = len(pattern)
        lo, hi = 0, len(self.suffixes)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._prefix(mid, m) < pattern:
                lo = mid + 1
            else:
                hi = mid
        start, hi = lo, len(self.suffixes)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._prefix(mid, m) <= pattern:
                lo = mid + 1
            else:
                hi = mid
        return start, lo

    def continuations(self, context: list[int], min_suffix: int, max_suffix: int, max_matches: int,
                      length: int) -> list[list[int]]:
        """Continuations after the longest suffix of ``context`` (≥ ``min_suffix`` tokens) found here."""
        for n in range(min(max_suffix, len(context)), min_suffix - 1, -1):
            lo, hi = self.find(context[-n:])
            if hi > lo:
                starts = self.suffixes[lo:min(hi, lo + max_matches)] + n
                return [self.tokens[s:s + length].tolist() for s in starts.tolist() if s < len(self.tokens)]
        return []

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.npz")
        np.savez(partial, tokens=self.tokens, suffixes=self.suffixes)
        partial.rename(path)

    @classmethod
    def load(cls, path: Path) -> Datastore:
        with np.load(path) as data:
            return cls(data["tokens"], data["suffixes"])


def frequent_prefixes(continuations: list[list[int]], max_nodes: int) -> list[list[int]]:
    """The ``max_nodes`` most frequent prefixes of the continuations (a prefix-closed set).

    REST's trie selection: every prefix is counted once per continuation it starts; sorting by
    count (then by length) puts a prefix before its extensions, so the chosen set is a tree.
    """
    counts = Counter(tuple(c[:i]) for c in continuations for i in range(1, len(c) + 1))
    ranked = sorted(counts, key=lambda prefix: (-counts[prefix], len(prefix), prefix))
    return [list(prefix) for prefix in ranked[:max_nodes]]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash identifying the tokenizer's vocabulary."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab[:5000] + [len(vocab)]).encode()).hexdigest()[:12]


def build_datastore(tokenizer: Any, corpora: list[str], split: str) -> tuple[Datastore, Path, bool]:
    """The datastore of ``corpora`` (``split``), from the cache or built now; ``(store, path, cached)``."""
    from effinfer.data.cache import cache_dir
    from effinfer.data import load_corpus

    key = hashlib.sha256(json.dumps([corpora, split, tokenizer_fingerprint(tokenizer)]).encode()).hexdigest()[:16]
    path = cache_dir() / "rest" / f"{'-'.join(corpora)}-{split}-{key}.npz"
    if path.exists():
        return Datastore.load(path), path, True
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    pieces: list[list[int]] = []
    for name in corpora:
        for document in load_corpus(name, split=split)["text"]:
            pieces.append(tokenizer(document, add_special_tokens=False)["input_ids"] + [eos])
    store = Datastore(np.fromiter((t for piece in pieces for t in piece), dtype=np.int64))
    store.save(path)
    return store, path, False
