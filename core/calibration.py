"""Calibration data: what core hands to techniques that declare ``Requirement.CALIBRATION_DATA``.

``calibration_source(tokenizer, seed)`` returns ``batches(n_samples, seq_len)``, which
draws ``n_samples`` windows of ``seq_len`` tokens at seeded random offsets of a corpus's
``calibration`` split (disjoint from the ``test`` split perplexity is measured on), with
replacement, as GPTQ (arXiv:2210.17323) and AWQ (arXiv:2306.00978) draw theirs. The
tokenized corpus and each drawn batch are cached in-process, keyed by a fingerprint of
the tokenizer, so several techniques (and a bench evaluating many stacks) read the same,
reproducible tokens and tokenize once (one tokenized split per tokenizer, the eight most
recently drawn batch shapes: bounded whatever the number of stacks). Caches of *activations* belong to the plugins that
need them (:mod:`effinfer.plugins.model.calibration`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch

Batches = Callable[[int, int], torch.Tensor]

_CORPUS_TOKENS: dict[tuple[str, str, str], torch.Tensor] = {}
_BATCHES: dict[tuple[Any, ...], torch.Tensor] = {}
_MAX_CACHED_BATCHES = 8


def tokenizer_key(tokenizer: Any) -> str:
    """A fingerprint of a tokenizer: class, source, vocabulary size and a sample encoding."""
    sample = tokenizer("Calibration text, 1234 — naïve café.", add_special_tokens=False)["input_ids"]
    payload = f"{type(tokenizer).__name__}|{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}|{sample}"
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def corpus_tokens(tokenizer: Any, corpus: str = "wikipedia", split: str = "calibration") -> torch.Tensor:
    """The token ids of one corpus split (tokenized once per process and tokenizer)."""
    key = (tokenizer_key(tokenizer), corpus, split)
    if key not in _CORPUS_TOKENS:
        from effinfer.data import corpus_text  # lazy: only experiments that calibrate pay

        text = corpus_text(corpus, split=split)
        _CORPUS_TOKENS[key] = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    return _CORPUS_TOKENS[key]


def sample_windows(ids: torch.Tensor, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n_samples × seq_len`` windows at seeded random offsets of ``ids``."""
    if n_samples < 1 or seq_len < 1:
        raise ValueError(f"need n_samples ≥ 1 and seq_len ≥ 1 (got {n_samples}, {seq_len})")
    if len(ids) <= seq_len + 1:
        raise ValueError(f"the calibration text has {len(ids)} tokens; windows of {seq_len} need more "
                         f"(use a shorter seq_len)")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len - 1, (n_samples,), generator=generator)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def calibration_source(tokenizer: Any, seed: int, corpus: str = "wikipedia") -> Batches:
    """``batches(n_samples, seq_len)``: seeded, cached windows of the corpus's calibration split."""

    def batches(n_samples: int, seq_len: int) -> torch.Tensor:
        key = (tokenizer_key(tokenizer), corpus, seed, n_samples, seq_len)
        if key not in _BATCHES:
            if len(_BATCHES) >= _MAX_CACHED_BATCHES:
                _BATCHES.pop(next(iter(_BATCHES)))  # oldest first: a long bench keeps a bounded few
            _BATCHES[key] = sample_windows(corpus_tokens(tokenizer, corpus), n_samples, seq_len, seed)
        return _BATCHES[key].clone()

    return batches


def clear_caches() -> None:
    """Forget the tokenized corpora and drawn batches (the evaluator calls this between stacks:
    tokenizing again costs seconds, keeping them costs memory for the whole bench)."""
    _CORPUS_TOKENS.clear()
    _BATCHES.clear()


def text_source(tokenizer: Any, text: str, seed: int = 0) -> Batches:
    """Like :func:`calibration_source` on a given text (tests, custom domains)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    return lambda n_samples, seq_len: sample_windows(ids, n_samples, seq_len, seed)
