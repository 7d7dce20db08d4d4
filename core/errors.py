"""Errors that name the problem and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping


def close_matches(word: str, candidates: Iterable[str], n: int = 3, cutoff: float = 0.6,
                  aliases: Mapping[str, Iterable[str]] | None = None) -> list[str]:
    """The candidates closest to ``word`` (the one close-match helper of effinfer).

    Similarity is difflib's ratio, of the whole strings or of their last dotted segments
    (``quantisation`` finds ``model.compression.quantization``); ``aliases`` gives some
    candidates other names they also match by (a taxonomy node's aliases). Candidates
    containing ``word`` follow the fuzzy matches.
    """
    names = {c: [c, *(aliases or {}).get(c, ())] for c in candidates}
    query = word.strip().lower()

    def score(keys: list[str]) -> float:
        pairs = [(query, key.lower()) for key in keys] + [(query.rpartition(".")[2], keys[0].rpartition(".")[2])]
        return max(difflib.SequenceMatcher(None, a, b).ratio() for a, b in pairs)

    scored = sorted(((score(keys), c) for c, keys in names.items()), key=lambda pair: (-pair[0], pair[1]))
    fuzzy = [c for value, c in scored if value >= cutoff][:n]
    contains = [c for c in names if query and query in c.lower()]
    return list(dict.fromkeys(fuzzy + contains))[:n]


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    matches = close_matches(word, candidates)
    return f"; did you mean: {', '.join(matches)}?" if matches else ""


class EffinferError(Exception):
    """Base class of effinfer's user-facing errors."""


class UnknownTechniqueError(EffinferError, KeyError):
    """``failed`` maps plugins that failed to load (and may have provided ``name``) to their error."""

    def __init__(self, name: str, known: Iterable[str], failed: Mapping[str, str] | None = None) -> None:
        known = sorted(known)
        if failed:
            why = "; ".join(f"plugin {plugin!r} failed to load: {error}" for plugin, error in failed.items())
            message = (f"technique {name!r} is not available: {why} (fix or uninstall that plugin; "
                       "`effinfer plugins` lists every broken plugin)")
        else:
            message = f"unknown technique {name!r}{did_you_mean(name, known)} (run `effinfer plugins` to list all {len(known)})"
        super().__init__(message)

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
