"""The timing harness: warm-up runs excluded, repeated timed runs, median and spread.

All durations come from a monotonic high-resolution clock (:func:`time.perf_counter` by
default; a test may inject a fake one). The decoding strategies of the core measure their
own prefill and decode phases with the same clock.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

T = TypeVar("T")
Clock = Callable[[], float]


def default_clock() -> Clock:
    """:func:`time.perf_counter`, after checking that the platform says it is monotonic."""
    if not time.get_clock_info("perf_counter").monotonic:  # pragma: no cover - every supported OS
        raise RuntimeError("time.perf_counter is not monotonic on this platform; timings would be unreliable")
    return time.perf_counter


@dataclass(frozen=True)
class Timed(Generic[T]):
    """One timed call: its wall-clock seconds and its return value."""

    seconds: float
    value: T


def time_runs(fn: Callable[[], T], warmup: int, repeats: int, clock: Clock | None = None) -> list[Timed[T]]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; return the timed calls."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats ≥ 1 and warmup ≥ 0 (got repeats={repeats}, warmup={warmup})")
    clock = clock or default_clock()
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        started = clock()
        value = fn()
        elapsed = clock() - started
        if elapsed < 0:
            raise RuntimeError("the clock went backwards; use a monotonic clock such as time.perf_counter")
        runs.append(Timed(elapsed, value))
    return runs


@dataclass(frozen=True)
class Summary:
    """Median with the inter-quartile range (min/max when fewer than 4 samples)."""

    median: float
    low: float
    high: float
    n: int
    spread: str  # "iqr" or "minmax"

    @classmethod
    def of(cls, samples: list[float]) -> Summary:
        if not samples:
            raise ValueError("no samples to summarize")
        if len(samples) >= 4:
            q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
            return cls(statistics.median(samples), q1, q3, len(samples), "iqr")
        return cls(statistics.median(samples), min(samples), max(samples), len(samples), "minmax")


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` torch intra-op threads, then restore the previous count.

    Tiny models run fastest on one thread, and on a shared, busy machine two contending
    threads can be ten times slower than one.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
