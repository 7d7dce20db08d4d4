"""The timing harness: warm-up runs excluded, repeated timed runs, median and spread.

All durations come from a monotonic high-resolution clock (:func:`time.perf_counter` by
default; a test may inject a fake one). The decoding strategies of the core measure their
own prefill and decode phases with the same clock.

Speed-ups are measured **side by side**: :func:`interleaved_runs` times a baseline and a
candidate in alternating rounds (A B, B A, A B, …: the order flips every round so a linear
drift of the machine's speed hits both alike), :func:`paired_ratios` turns each round into
one ratio of adjacent measurements and summarizes them (median and spread), and
:func:`drift` says whether the baseline itself moved during the rounds or away from an
earlier reference by more than a tolerance — the case where a ratio cannot be trusted
(Georges et al., "Statistically Rigorous Java Performance Evaluation", OOPSLA 2007;
Mytkowicz et al., "Producing Wrong Data Without Doing Anything Obviously Wrong!", ASPLOS 2009).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
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


def interleaved_runs(baseline: Callable[[], T], candidate: Callable[[], T], warmup: int, rounds: int,
                     clock: Clock | None = None) -> tuple[list[Timed[T]], list[Timed[T]]]:
    """Time ``baseline`` and ``candidate`` in ``rounds`` adjacent pairs, the order flipping each round.

    Both get ``warmup`` untimed calls first (baseline, candidate, baseline, …). Returns the
    timed calls of each, round ``i`` of one next to round ``i`` of the other.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds ≥ 1 and warmup ≥ 0 (got rounds={rounds}, warmup={warmup})")
    clock = clock or default_clock()
    for _ in range(warmup):
        baseline()
        candidate()
    base_runs: list[Timed[T]] = []
    cand_runs: list[Timed[T]] = []
    for index in range(rounds):
        order = ((baseline, base_runs), (candidate, cand_runs))
        for fn, runs in (order if index % 2 == 0 else order[::-1]):
            runs.extend(time_runs(fn, 0, 1, clock))
    return base_runs, cand_runs


def round_robin(calls: Mapping[str, Callable[[], T]], rounds: int) -> dict[str, list[T]]:
    """Call every entry once per round, ``rounds`` times; the order reverses every round
    (A B C, C B A, A B C, …), so each method always runs next to the others and a drift of
    the machine's speed hits all of them alike. The calls time themselves (they may time a
    phase, such as decoding, rather than the whole call)."""
    if rounds < 1:
        raise ValueError(f"need rounds ≥ 1 (got {rounds})")
    names = list(calls)
    out: dict[str, list[T]] = {name: [] for name in names}
    for index in range(rounds):
        for name in (names if index % 2 == 0 else names[::-1]):
            out[name].append(calls[name]())
    return out


def paired_ratios(candidate: list[float], baseline: list[float]) -> Summary:
    """Median and spread of the per-round ratios ``candidate[i] / baseline[i]`` (adjacent pairs)."""
    if len(candidate) != len(baseline):
        raise ValueError(f"paired samples need equal lengths (got {len(candidate)} and {len(baseline)})")
    ratios = [c / b for c, b in zip(candidate, baseline) if b and math.isfinite(c / b)]
    return Summary.of(ratios)


def drift(samples: list[float], reference: float | None, tolerance: float) -> str | None:
    """Why the baseline ``samples`` cannot back a ratio, or ``None`` when they are steady.

    Drifted: their median differs from ``reference`` (the bench's first baseline
    measurement) by more than ``tolerance`` (relative), or the median of their second
    half differs from that of their first half by more than ``tolerance`` (the load
    changed while the stack was measured).
    """
    if not samples:
        return None
    median = statistics.median(samples)
    if reference and abs(median / reference - 1) > tolerance:
        return f"baseline {median:.4g} vs {reference:.4g} at the bench's start ({median / reference - 1:+.0%})"
    half = len(samples) // 2
    if half:
        first, last = statistics.median(samples[:half]), statistics.median(samples[-half:])
        if first and abs(last / first - 1) > tolerance:
            return f"baseline moved from {first:.4g} to {last:.4g} during the rounds ({last / first - 1:+.0%})"
    return None


def load_average() -> float | None:
    """The machine's 1-minute load average (``os.getloadavg``), ``None`` where unavailable."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):  # pragma: no cover - Windows
        return None


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
