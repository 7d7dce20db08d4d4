"""The compact cache shared by the eviction policies: a bounded buffer, entries moved into freed slots.

Every eviction policy of this family stores at most ``budget`` entries per layer and KV head
in a pre-allocated buffer; decode attends over ``budget + 1`` entries, not over every position
seen, so it really reads less. Keys keep the rotary position they were written with (RoPE is
relative, so attention between a query and a kept key is the same as in the full cache);
the order of the slots is free, so evicting moves only the kept newcomers into the slots of
the evicted entries instead of compacting the whole cache.

A policy says which entries matter through :meth:`EvictionPolicy.priority` (higher is kept)
and, when it scores entries by attention, :meth:`EvictionPolicy.observe`. The last ``window``
positions are always kept. Eviction of the entries over budget happens at the start of the
next forward, so the forward that appended them still attends to them.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from effinfer.core.kv_cache import KVPolicy, use_kv_policy

#: slots allocated beyond the budget, so decode steps append without reallocating
SLACK = 64


class BudgetConfig(BaseModel):
    """The KV budget every eviction technique takes."""

    model_config = ConfigDict(extra="forbid")
    budget: int = Field(1024, ge=16, le=1_048_576, description="KV entries kept per layer and KV head")


class EvictionPolicy(KVPolicy):
    """A bounded cache of ``budget`` entries (see the module docstring)."""

    name = "eviction"
    evicts = True

    def __init__(self, budget: int, window: int = 0) -> None:
        super().__init__()
        if not 0 <= window <= budget:
            raise ValueError(f"the recent window ({window}) must lie within the budget ({budget})")
        self.budget, self.window = budget, window
        self.positions: torch.Tensor | None = None  # B × H × capacity, int32
        self.scores: torch.Tensor | None = None     # B × H × capacity, fp32
        self.n = 0                                  # filled slots (≤ budget + the last forward's tokens)

    def __len__(self) -> int:
        return min(self.n, self.budget)

    # ------------------------------------------------------------------ what subclasses define

    def priority(self, total: int) -> torch.Tensor:
        """``B × H × total``: how much each stored entry is worth keeping (higher is kept)."""
        return self.scores[..., :total]

    def observe(self, queries: torch.Tensor | None, keys: torch.Tensor, new: int) -> None:
        """Update ``self.scores[..., :n]`` from the forward's queries over the ``n`` keys it attends to
        (the last ``new`` are this forward's)."""

    def would_evict(self, new: int) -> bool:
        """Whether the entries over budget go before a forward of ``new`` tokens (a policy that compresses
        only once the prompt is complete says no while it is still coming). No side effects."""
        return True

    def before_evict(self) -> None:
        """Called right before the entries over budget go."""

    def stored_before(self, new: int) -> int:
        return self.n if self.n <= self.budget or not self.would_evict(new) else self.budget

    # ------------------------------------------------------------------ the cache

    def update(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n > self.budget and self.would_evict(keys.shape[-2]):
            self.before_evict()
            self.evict()
        new = keys.shape[-2]
        self._reserve(keys, values, self.n + new)
        start, total = self.n, self.n + new
        self.keys[..., start:total, :] = keys
        self.values[..., start:total, :] = values
        self.positions[..., start:total] = torch.arange(self.seen, self.seen + new, device=keys.device,
                                                        dtype=torch.int32)
        self.scores[..., start:total] = 0
        self.n, self.seen = total, self.seen + new
        stored_keys, stored_values = self.keys[..., :total, :], self.values[..., :total, :]
        self.observe(queries, stored_keys, new)
        return stored_keys, stored_values

    def _reserve(self, keys: torch.Tensor, values: torch.Tensor, need: int) -> None:
        capacity = 0 if self.keys is None else self.keys.shape[-2]
        wanted = max(need, self.budget + SLACK)
        decoding = need - self.n <= SLACK  # a few tokens: give back a prefill's room beyond the slack
        if capacity >= need and capacity <= (wanted + SLACK if decoding else 2 * wanted):
            return
        batch, heads, _, dim = keys.shape
        fresh = {
            "keys": keys.new_zeros(batch, heads, wanted, dim),
            "values": values.new_zeros(batch, heads, wanted, values.shape[-1]),
            "positions": torch.zeros(batch, heads, wanted, dtype=torch.int32, device=keys.device),
            "scores": torch.zeros(batch, heads, wanted, dtype=torch.float32, device=keys.device),
        }
        for name, buffer in fresh.items():
            old = getattr(self, name)
            if old is not None and self.n:
                buffer[:, :, :self.n] = old[:, :, :self.n]
            setattr(self, name, buffer)

    def evict(self) -> None:
        """Keep the ``budget`` entries of highest priority (the recent window always): the kept entries
        past the budget move into the slots of the evicted ones."""
        with torch.inference_mode(self.keys.is_inference()):
            self._evict()

    def _evict(self) -> None:
        total, budget = self.n, self.budget
        priority = self.priority(total).clone()
        if self.window:
            priority.masked_fill_(self.positions[..., :total] >= self.seen - self.window, float("inf"))
        keep = torch.zeros(priority.shape, dtype=torch.bool, device=priority.device)
        keep.scatter_(-1, priority.topk(budget, dim=-1).indices, True)
        index = torch.arange(total, device=priority.device)
        holes = torch.where(keep[..., :budget], total, index[:budget]).sort(-1).values
        movers = torch.where(keep[..., budget:], index[budget:], total).sort(-1).values
        moves = min(budget, total - budget)
        holes, movers = holes[..., :moves], movers[..., :moves]
        valid = holes < total
        target = torch.where(valid, holes, budget).long()
        source = torch.where(valid, movers, budget).long()
        for name in ("keys", "values", "positions", "scores"):
            buffer = getattr(self, name)
            if buffer.dim() == 4:
                t = target[..., None].expand(-1, -1, -1, buffer.shape[-1])
                s = source[..., None].expand(-1, -1, -1, buffer.shape[-1])
            else:
                t, s = target, source
            buffer.scatter_(2, t, buffer.gather(2, s))
        self.n = budget

    def crop(self, count: int) -> None:
        """Drop the ``count`` newest entries, while they are still the last slots (not yet evicted around)."""
        if count <= 0:
            return
        if self.n - count < 0 or self.positions is None or bool(
                (self.positions[..., self.n - count:self.n] < self.seen - count).any()):
            raise NotImplementedError(f"the {self.name} cache already evicted around its newest {count} entries; "
                                      "it cannot roll them back (speculative decoding needs a cache that can)")
        self.n -= count
        self.seen -= count

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Kept ``(positions, keys, values)`` per head, sorted by position (``B × H × n …``): for tests."""
        if self.n > self.budget:
            self.evict()
        order = self.positions[..., :self.n].argsort(-1)
        gather = order[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        return (self.positions[..., :self.n].gather(2, order), self.keys[..., :self.n, :].gather(2, gather),
                self.values[..., :self.n, :].gather(2, gather))

    def reset(self) -> None:
        super().reset()
        self.n = 0


def check_budget(budget: int, window: int, what: str) -> None:
    if window > budget:
        raise ValueError(f"{what}: the recent window ({window}) is larger than the budget ({budget}); "
                         f"lower window or raise budget")


def install(stage, technique, make) -> None:
    """Give the stack ``make()`` as the policy of every global-attention layer; note it."""
    use_kv_policy(stage, lambda layer, config: make(), owner=technique.name)
    technique.note(f"KV cache: {technique.name} ({technique.config.model_dump()})")
