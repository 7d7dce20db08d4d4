"""Errors that name the problem and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def close_matches(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The closest candidates to ``word``: difflib's best, then those containing ``word``."""
    candidates = list(candidates)
    fuzzy = difflib.get_close_matches(word, candidates, n=n, cutoff=0.6)
    contains = [c for c in candidates if word and word in c]
    return list(dict.fromkeys(fuzzy + contains))[:n]


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    matches = close_matches(word, candidates)
    return f"; did you mean: {', '.join(matches)}?" if matches else ""


class EffinferError(Exception):
    """Base class of effinfer's user-facing errors."""


class UnknownTechniqueError(EffinferError, KeyError):
    def __init__(self, name: str, known: Iterable[str]) -> None:
        known = sorted(known)
        super().__init__(
            f"unknown technique {name!r}{did_you_mean(name, known)} "
            f"(run `effinfer plugins` to list all {len(known)})"
        )

    def __str__(self) -> str:  # KeyError would add quotes around the message
        return str(self.args[0])


class UnknownEngineError(EffinferError, KeyError):
    def __init__(self, name: str, known: Iterable[str]) -> None:
        known = sorted(known)
        super().__init__(f"unknown engine {name!r}{did_you_mean(name, known)} (registered: {', '.join(known)})")

    def __str__(self) -> str:
        return str(self.args[0])


class ExperimentError(EffinferError, ValueError):
    """An experiment failed validation; ``problems`` lists every problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"the experiment is not valid ({len(problems)} problem(s)):\n{lines}")


class ModelSourceError(EffinferError, ValueError):
    """A model source could not be resolved or loaded."""
