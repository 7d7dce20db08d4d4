"""Request schedulers with one interface: FCFS, shortest-job-first on a learned length, priority with preemption.

The continuous-batching engine asks its scheduler three things every iteration:

- :meth:`Scheduler.order` — in which order waiting requests are admitted;
- :meth:`Scheduler.victim` — which running request gives its KV blocks back (preempted by
  recompute: its blocks are freed and it re-enters the queue with its tokens so far)
  when memory runs out, or to make room for a more urgent waiting request;
- :meth:`Scheduler.observe` — a request finished (what a learned policy trains on).

Policies:

- :class:`FCFS` — arrival order; memory pressure preempts the latest admitted (vLLM's default).
- :class:`ShortestJobFirst` — ascending *predicted* output length (Jin et al., S³,
  arXiv:2306.06000; Qiu et al., "Efficient Interactive LLM Serving with Proxy Model-based
  Sequence Length Prediction", arXiv:2404.08509): a ridge regressor
  (:class:`OutputLengthPredictor`) on prompt features, trained on the requests this server
  has completed (refit every ``refit_every`` completions), with an age bonus so long jobs
  do not starve.
- :class:`PriorityPreemptive` — lowest ``priority`` value first; a waiting request that
  outranks a running one preempts it when there is no free slot or memory (FastServe-style
  preemption, Wu et al., arXiv:2305.05920, by recompute).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from effinfer.plugins.system.serving.engine import ServeRequest


class Scheduler:
    """FCFS (the base policy): admit by arrival; under memory pressure preempt the newest admitted."""

    name = "fcfs"
    #: whether a waiting request may preempt a running one that is not out of memory
    preemptive = False

    def order(self, waiting: Sequence[ServeRequest], now: float) -> list[ServeRequest]:
        return sorted(waiting, key=lambda r: (r.arrival, r.serial))

    def victim(self, running: Sequence[ServeRequest], for_request: ServeRequest | None = None
               ) -> ServeRequest | None:
        """The running request to preempt; ``for_request`` is a waiting one asking for room
        (``None``: memory ran out for the running batch itself)."""
        if for_request is not None or not running:
            return None
        return max(running, key=lambda r: (r.admitted, r.serial))

    def observe(self, request: ServeRequest) -> None:
        """A request finished."""


class FCFS(Scheduler):
    name = "fcfs"


class OutputLengthPredictor:
    """Ridge regression of log(output tokens) on prompt features, fit on completed requests.

    Features: a bias, log prompt length, log ``max_tokens`` and a hashed bag of the first
    ``prefix_tokens`` prompt token ids (``buckets`` buckets). Until ``min_samples``
    completions are seen it predicts ``max_tokens``.
    """

    def __init__(self, buckets: int = 64, prefix_tokens: int = 32, ridge: float = 0.1, min_samples: int = 8,
                 refit_every: int = 8) -> None:
        self.buckets, self.prefix_tokens, self.ridge = buckets, prefix_tokens, ridge
        self.min_samples, self.refit_every = min_samples, refit_every
        self.samples: list[tuple[torch.Tensor, float]] = []
        self.weights: torch.Tensor | None = None

    def features(self, prompt: Sequence[int], max_tokens: int) -> torch.Tensor:
        x = torch.zeros(3 + self.buckets, dtype=torch.float64)
        x[0], x[1], x[2] = 1.0, math.log1p(len(prompt)), math.log1p(max_tokens)
        head = prompt[:self.prefix_tokens]
        for token in head:
            x[3 + zlib.crc32(str(token).encode()) % self.buckets] += 1.0 / len(head)
        return x

    def add(self, prompt: Sequence[int], max_tokens: int, output_tokens: int) -> None:
        self.samples.append((self.features(prompt, max_tokens), math.log1p(output_tokens)))
        if len(self.samples) >= self.min_samples and len(self.samples) % self.refit_every == 0:
            self.fit()

    def fit(self) -> None:
        x = torch.stack([s[0] for s in self.samples])
        y = torch.tensor([s[1] for s in self.samples], dtype=torch.float64)
        gram = x.T @ x + self.ridge * torch.eye(x.shape[1], dtype=torch.float64)
        self.weights = torch.linalg.solve(gram, x.T @ y)

    def predict(self, prompt: Sequence[int], max_tokens: int) -> float:
        if self.weights is None:
            return float(max_tokens)
        value = float(self.features(prompt, max_tokens) @ self.weights)
        return min(max(math.expm1(value), 1.0), float(max_tokens))


class ShortestJobFirst(Scheduler):
    """Ascending predicted output length, minus ``aging`` tokens per second waited."""

    name = "sjf"

    def __init__(self, predictor: OutputLengthPredictor | None = None, aging: float = 0.0) -> None:
        self.predictor = predictor or OutputLengthPredictor()
        self.aging = aging

    def predicted(self, request: ServeRequest) -> float:
        if request.predicted_tokens is None:
            request.predicted_tokens = self.predictor.predict(request.prompt, request.max_tokens)
        return request.predicted_tokens

    def order(self, waiting: Sequence[ServeRequest], now: float) -> list[ServeRequest]:
        return sorted(waiting, key=lambda r: (self.predicted(r) - len(r.output) - self.aging * (now - r.arrival),
                                              r.arrival, r.serial))

    def observe(self, request: ServeRequest) -> None:
        if request.finish_reason in ("stop", "length"):
            self.predictor.add(request.prompt, request.max_tokens, len(request.output))


class PriorityPreemptive(Scheduler):
    """Lowest ``priority`` first (ties by arrival); preempts lower-priority running requests."""

    name = "priority"

    def __init__(self, preempt: bool = True) -> None:
        self.preemptive = preempt

    def order(self, waiting: Sequence[ServeRequest], now: float) -> list[ServeRequest]:
        return sorted(waiting, key=lambda r: (r.priority, r.arrival, r.serial))

    def victim(self, running: Sequence[ServeRequest], for_request: ServeRequest | None = None
               ) -> ServeRequest | None:
        candidates = [r for r in running if for_request is None or r.priority > for_request.priority]
        if not candidates or (for_request is not None and not self.preemptive):
            return None
        return max(candidates, key=lambda r: (r.priority, r.admitted, r.serial))
