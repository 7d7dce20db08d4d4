"""Paged KV cache: fixed-size blocks, a block table per sequence, copy-on-write prefix sharing.

PagedAttention (Kwon et al., "Efficient Memory Management for Large Language Model Serving
with PagedAttention", arXiv:2309.06180) keeps the keys and values of every sequence in
fixed-size *blocks* of one shared pool instead of one contiguous buffer reserved for the
longest possible output, so memory is taken as tokens arrive and the waste is at most
one partly filled block per sequence. Identical prompt prefixes share their blocks
(a hash chain over full blocks, like vLLM's automatic prefix caching and SGLang's
RadixAttention, arXiv:2312.07104); a shared block that must be written is copied first
(copy-on-write).

- :class:`BlockAllocator` — free list and reference counts; ``allocate``, ``fork`` (one more
  reference), ``free`` (one reference less; the block returns to the free list at zero).
- :class:`PagedKVCache` — the pool (``layers × slots × kv_heads × head_dim`` keys and values,
  ``slots = blocks × block_size``), the block table of each sequence, the prefix cache, and
  the slot arithmetic the attention uses (:meth:`slots_of`).
- :func:`paged_attention` — plain-torch reference attention that gathers a sequence's keys
  and values through its block table.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


class OutOfBlocks(RuntimeError):
    """The pool has no free block left (the scheduler preempts or waits)."""


class BlockAllocator:
    """Blocks ``0 … n-1`` with reference counts; a block is free exactly when its count is 0."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be ≥ 1 (got {num_blocks})")
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0 first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfBlocks(f"all {self.num_blocks} KV blocks are in use")
        block = self._free.pop()
        self.refs[block] = 1
        return block

    def fork(self, block: int) -> int:
        """One more holder of an allocated block (prefix sharing); returns the block."""
        if self.refs[block] <= 0:
            raise ValueError(f"block {block} is free; only an allocated block can be shared")
        self.refs[block] += 1
        return block

    def free(self, block: int) -> None:
        if self.refs[block] <= 0:
            raise ValueError(f"block {block} is already free (double free)")
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self._free.append(block)

    def check(self) -> None:
        """Raise AssertionError unless the free list is exactly the blocks with count 0, each once."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        assert free == {b for b, r in enumerate(self.refs) if r == 0}, "free list and reference counts disagree"
        assert all(r >= 0 for r in self.refs), "negative reference count"


@dataclass
class BlockTable:
    """The blocks of one sequence, in order, and how many of its tokens they hold."""

    blocks: list[int] = field(default_factory=list)
    tokens: int = 0
    #: prefix-cache keys of the leading full blocks already registered (or found) in the cache
    hashes: list[Hashable] = field(default_factory=list)


class PagedKVCache:
    """A pool of KV blocks shared by all sequences, with block tables and a prefix cache.

    ``prefix_caching`` keeps full prompt blocks after their sequence ends (one extra
    reference held by the cache, dropped least-recently-used first when blocks run out),
    so a later prompt with the same prefix skips their prefill.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 prefix_caching: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be ≥ 1 (got {block_size})")
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        shape = (layers, num_blocks * block_size, kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.tables: dict[Hashable, BlockTable] = {}
        self.prefix_caching = prefix_caching
        self._prefix: OrderedDict[Hashable, int] = OrderedDict()  # chain hash → block (LRU order)
        self.prefix_hits = 0  # prompt tokens served from the prefix cache

    # ------------------------------------------------------------------ bookkeeping
    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    def bytes_per_token(self) -> int:
        return 2 * self.keys.shape[0] * self.keys.shape[2] * self.keys.shape[3] * self.keys.element_size()

    def blocks_needed(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def can_allocate(self, blocks: int) -> bool:
        return self.allocator.num_free + self._evictable() >= blocks

    def _evictable(self) -> int:
        return sum(1 for block in self._prefix.values() if self.allocator.refs[block] == 1)

    def _allocate(self) -> int:
        if self.allocator.num_free == 0:
            self._evict_one()
        return self.allocator.allocate()

    def _evict_one(self) -> None:
        for key, block in self._prefix.items():  # least recently used first
            if self.allocator.refs[block] == 1:
                del self._prefix[key]
                self.allocator.free(block)
                return
        raise OutOfBlocks(f"all {self.num_blocks} KV blocks are in use by running sequences")

    # ------------------------------------------------------------------ sequences
    def add_sequence(self, seq: Hashable, prompt: Sequence[int]) -> int:
        """Start a sequence; returns how many leading prompt tokens already have cached KV.

        At least one prompt token is always left to compute (its logits start the output),
        so a fully cached prompt reports ``len(prompt) - 1`` (the last block is shared and
        will be copied before that token is written into it).
        """
        if seq in self.tables:
            raise ValueError(f"sequence {seq!r} already has a block table")
        table = self.tables[seq] = BlockTable()
        if not self.prefix_caching:
            return 0
        parent: Hashable = None
        for start in range(0, len(prompt) - self.block_size + 1, self.block_size):
            key = (parent, tuple(prompt[start:start + self.block_size]))
            block = self._prefix.get(key)
            if block is None:
                break
            self._prefix.move_to_end(key)
            table.blocks.append(self.allocator.fork(block))
            table.hashes.append(key)
            table.tokens += self.block_size
            parent = key
        cached = min(table.tokens, len(prompt) - 1)
        table.tokens = cached
        self.prefix_hits += cached
        return cached

    def fork_sequence(self, parent: Hashable, child: Hashable) -> None:
        """``child`` shares every block of ``parent`` (e.g. parallel samples of one prompt)."""
        source = self.tables[parent]
        self.tables[child] = BlockTable([self.allocator.fork(b) for b in source.blocks], source.tokens,
                                        list(source.hashes))

    def reserve(self, seq: Hashable, new_tokens: int) -> torch.Tensor:
        """Make room for ``new_tokens`` after the sequence's tokens; return their slots.

        Allocates blocks as needed and copies a shared last block before it is written
        (copy-on-write). Raises :class:`OutOfBlocks` (with nothing changed) when the pool
        cannot hold them.
        """
        table = self.tables[seq]
        first, end = table.tokens, table.tokens + new_tokens
        index = first // self.block_size
        cow = index < len(table.blocks) and self.allocator.refs[table.blocks[index]] > 1
        needed = max(self.blocks_needed(end) - len(table.blocks), 0) + int(cow)
        if not self.can_allocate(needed):
            raise OutOfBlocks(f"{new_tokens} more tokens need {needed} blocks; {self.allocator.num_free} free")
        if cow:
            old = table.blocks[index]
            new = self._allocate()
            self._copy_block(old, new)
            self.allocator.free(old)
            table.blocks[index] = new
            del table.hashes[index:]
        while len(table.blocks) < self.blocks_needed(end):
            table.blocks.append(self._allocate())
        table.tokens = end
        return self.slots_of(seq, first, end)

    def _copy_block(self, source: int, target: int) -> None:
        size = self.block_size
        self.keys[:, target * size:(target + 1) * size] = self.keys[:, source * size:(source + 1) * size]
        self.values[:, target * size:(target + 1) * size] = self.values[:, source * size:(source + 1) * size]

    def slots_of(self, seq: Hashable, start: int, end: int) -> torch.Tensor:
        """Pool slots of the sequence's positions ``start … end-1``."""
        table = self.tables[seq]
        positions = torch.arange(start, end)
        blocks = torch.tensor(table.blocks, dtype=torch.long)[positions // self.block_size]
        return (blocks * self.block_size + positions % self.block_size).to(self.keys.device)

    def register_prefix(self, seq: Hashable, tokens: Sequence[int], computed: int) -> None:
        """Offer the sequence's full blocks among its first ``computed`` tokens to the prefix cache."""
        if not self.prefix_caching:
            return
        table = self.tables[seq]
        parent = table.hashes[-1] if table.hashes else None
        for index in range(len(table.hashes), computed // self.block_size):
            start = index * self.block_size
            key = (parent, tuple(tokens[start:start + self.block_size]))
            if key not in self._prefix:
                self._prefix[key] = self.allocator.fork(table.blocks[index])
            table.hashes.append(key)
            parent = key

    def free_sequence(self, seq: Hashable) -> None:
        """Drop the sequence's references (blocks also held by the prefix cache stay cached)."""
        table = self.tables.pop(seq, None)
        if table is not None:
            for block in table.blocks:
                self.allocator.free(block)

    def clear_prefix_cache(self) -> None:
        for block in self._prefix.values():
            self.allocator.free(block)
        self._prefix.clear()

    def waste(self) -> dict[str, int]:
        """Allocated − used slots of the running sequences (tokens)."""
        used = sum(t.tokens for t in self.tables.values())
        allocated = sum(len(t.blocks) for t in self.tables.values()) * self.block_size
        return {"allocated_tokens": allocated, "used_tokens": used, "waste_tokens": allocated - used}


def paged_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                    allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of queries over keys/values gathered from a paged pool (plain torch).

    ``q``: ``B × heads × k × d``; ``keys``/``values``: one layer's pool, ``slots × kv_heads × d``;
    ``slots``: ``B × T`` pool slots of each row's context (any slot where ``allowed`` is all
    False); ``allowed``: ``B × k × T`` (True = may attend). Grouped-query attention when
    ``heads`` is a multiple of ``kv_heads``. Returns ``B × heads × k × d``.
    """
    key = keys[slots].permute(0, 2, 1, 3)  # B × kv_heads × T × d
    value = values[slots].permute(0, 2, 1, 3)
    return F.scaled_dot_product_attention(q, key, value, attn_mask=allowed[:, None], scale=scale,
                                          enable_gqa=key.shape[1] != q.shape[1])
