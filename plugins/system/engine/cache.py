"""The static KV cache: one pre-allocated key and one value tensor for all layers.

Keys and values live in ``layers × batch × kv_heads × capacity × head_dim`` tensors
allocated once, so a decode step has fixed shapes (and can be compiled once). Rows of a
batch are left-padded: ``not_pad`` marks the cache columns that hold real tokens and
``pad`` counts the padding of each row, so the position of column ``s`` in row ``b`` is
``s - pad[b]``. ``length`` is the number of committed columns; columns past it may hold
uncommitted speculative entries, which are never attended to until committed
(:meth:`commit` moves the accepted ones into place).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: capacities are rounded up to a multiple of this, so compiled steps are reused across prompts
CAPACITY_STEP = 256


def round_capacity(tokens: int) -> int:
    return -(-tokens // CAPACITY_STEP) * CAPACITY_STEP


@dataclass
class StaticKVCache:
    keys: torch.Tensor
    values: torch.Tensor
    not_pad: torch.Tensor
    pad: torch.Tensor
    length: int = 0

    @classmethod
    def allocate(cls, layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> StaticKVCache:
        shape = (layers, batch, kv_heads, capacity, head_dim)
        return cls(keys=torch.zeros(shape, dtype=dtype, device=device),
                   values=torch.zeros(shape, dtype=dtype, device=device),
                   not_pad=torch.ones(batch, capacity, dtype=torch.bool, device=device),
                   pad=torch.zeros(batch, dtype=torch.long, device=device))

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    @property
    def batch(self) -> int:
        return self.keys.shape[1]

    def reset(self, attention_mask: torch.Tensor) -> None:
        """Start a new batch whose prompts are left-padded as in ``attention_mask``."""
        prompt = attention_mask.shape[1]
        self.not_pad.fill_(True)
        self.not_pad[:, :prompt] = attention_mask.bool()
        self.pad.copy_(prompt - attention_mask.long().sum(-1))
        self.length = 0

    def fits(self, batch: int, tokens: int) -> bool:
        return self.batch == batch and self.capacity >= tokens

    def check_room(self, tokens: int) -> None:
        if self.length + tokens > self.capacity:
            raise RuntimeError(f"static KV cache full: {self.length} + {tokens} tokens > capacity {self.capacity}")

    def prefix_mask(self, start: int) -> torch.Tensor:
        """``B × T``: the columns before ``start`` holding real tokens."""
        columns = torch.arange(self.capacity, device=self.not_pad.device)
        return self.not_pad & (columns < start)

    def commit(self, kept: list[int], start: int | None = None) -> None:
        """Keep the entries ``start + kept[i]`` (written by the last forward) as columns ``start + i``."""
        start = self.length if start is None else start
        if kept != list(range(len(kept))):
            device = self.keys.device
            source = torch.tensor(kept, device=device) + start
            target = torch.arange(start, start + len(kept), device=device)
            self.keys.index_copy_(3, target, self.keys.index_select(3, source))
            self.values.index_copy_(3, target, self.values.index_select(3, source))
        self.length = start + len(kept)

    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2
