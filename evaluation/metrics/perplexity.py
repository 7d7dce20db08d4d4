"""Windowed, optionally strided perplexity, token- and word-level.

The text is tokenized once and cut into windows of ``window`` tokens starting every
``stride`` tokens (``stride == window``: disjoint windows). Each window predicts only the
tokens no earlier window predicted, so every target token is scored once, with up to
``window - stride`` tokens of extra left context (the Hugging Face "perplexity of
fixed-length models" recipe). A token with no context is never scored: the first token of
the text, and with disjoint windows the first token of every window (as in that recipe).

Token perplexity is ``exp(total NLL / scored tokens)``; word perplexity is
``exp(total NLL / words)``, words being the whitespace-separated words of the scored text.
The standard error treats windows as independent samples of the mean NLL (delta method
for the exponential).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from effinfer.core.generation import new_cache


@dataclass(frozen=True)
class Window:
    """Token range ``[begin, end)``; targets are the positions ``[first_target, end)``."""

    begin: int
    end: int
    first_target: int


def plan_windows(n_tokens: int, window: int, stride: int | None = None,
                 max_windows: int | None = None) -> list[Window]:
    """The windows covering ``n_tokens`` tokens (at most ``max_windows``)."""
    if window < 2:
        raise ValueError(f"a perplexity window needs at least 2 tokens (got {window})")
    stride = stride or window
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be between 1 and the window ({window}); got {stride}")
    windows: list[Window] = []
    scored_until = 1  # token 0 has no context
    begin = 0
    while scored_until < n_tokens and (max_windows is None or len(windows) < max_windows):
        end = min(begin + window, n_tokens)
        windows.append(Window(begin, end, max(scored_until, begin + 1)))
        scored_until = end
        begin += stride
    return windows


@torch.inference_mode()
def window_log_probs(model: nn.Module, ids: torch.Tensor,
                     cache_factory: Callable[[nn.Module], Any] | None = None, chunk: int = 256) -> torch.Tensor:
    """Log-probabilities (``len(ids) × vocab``, fp32) of the next token at every position.

    Without ``cache_factory`` one forward pass; with it, the window is fed in chunks through a
    cache built by the factory, so a KV-cache policy (eviction, quantized cache) acts on the
    scores as it would during generation.
    """
    device = next(model.parameters()).device
    ids = ids.to(device)[None]
    if cache_factory is None:
        logits = model(input_ids=ids, use_cache=False).logits[0]
        return logits.float().log_softmax(-1)
    cache = new_cache(model, cache_factory)
    parts = []
    for start in range(0, ids.shape[1], chunk):
        piece = ids[:, start:start + chunk]
        mask = torch.ones(1, start + piece.shape[1], dtype=torch.long, device=device)
        positions = torch.arange(start, start + piece.shape[1], device=device)[None]
        out = model(input_ids=piece, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True)
        parts.append(out.logits[0].float().log_softmax(-1))
    return torch.cat(parts)


@dataclass
class PerplexityResult:
    """Per-window sums; :meth:`token_ppl` and :meth:`word_ppl` aggregate them."""

    nll: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    words: list[int] = field(default_factory=list)

    def add(self, nll: float, tokens: int, words: int) -> None:
        self.nll.append(nll)
        self.tokens.append(tokens)
        self.words.append(words)

    def token_ppl(self) -> tuple[float, float]:
        """``(perplexity, standard error)`` per token."""
        return self._ppl(self.tokens)

    def word_ppl(self) -> tuple[float, float]:
        """``(perplexity, standard error)`` per whitespace-separated word."""
        return self._ppl(self.words)

    def _ppl(self, units: list[int]) -> tuple[float, float]:
        total = sum(units)
        if total == 0:
            raise ValueError("no scored tokens: the text is shorter than two tokens")
        mean = sum(self.nll) / total
        per_window = [n / u for n, u in zip(self.nll, units) if u]
        if len(per_window) > 1:
            centre = sum(per_window) / len(per_window)
            var = sum((x - centre) ** 2 for x in per_window) / (len(per_window) - 1)
            se = math.sqrt(var / len(per_window))
        else:
            se = float("nan")
        return math.exp(mean), math.exp(mean) * se


OnWindow = Callable[[torch.Tensor, torch.Tensor], None]


def perplexity(model: nn.Module, tokenizer: Any, ids: torch.Tensor, windows: list[Window],
               cache_factory: Callable[[nn.Module], Any] | None = None,
               on_window: OnWindow | None = None, progress: Callable[[], None] | None = None) -> PerplexityResult:
    """Score ``ids`` (1-D) window by window.

    ``on_window(log_probs, targets)`` receives, per window, the next-token log-probabilities
    at the scored positions (``k × vocab``) and the ``k`` target ids (fidelity uses them).
    """
    result = PerplexityResult()
    for w in windows:
        log_probs = window_log_probs(model, ids[w.begin:w.end], cache_factory)
        # the prediction for token t comes from position t - 1
        rows = log_probs[w.first_target - 1 - w.begin: w.end - 1 - w.begin]
        targets = ids[w.first_target:w.end].to(rows.device)
        nll = -rows.gather(-1, targets[:, None]).sum().item()
        words = len(tokenizer.decode(targets.tolist()).split())
        result.add(nll, len(targets), words)
        if on_window is not None:
            on_window(rows, targets)
        if progress is not None:
            progress()
    return result
