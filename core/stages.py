"""What each stage hook receives: the model, the generation set-up, a request."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from effinfer.core.engines import CacheFactory, DecodeEngine, HFEngine


class ModulePatcher:
    """Swaps attributes and submodules and undoes every swap, newest first.

    ``keep_originals=False`` drops the originals instead (the model is consumed, which
    frees their memory; :meth:`restore` then refuses to run).
    """

    def __init__(self, keep_originals: bool = True) -> None:
        self.keep_originals = keep_originals
        self._undo: list[tuple[object, str, Any]] = []
        self.count = 0

    def set_attr(self, owner: object, name: str, value: Any) -> None:
        if self.keep_originals:
            self._undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)
        self.count += 1

    def replace_module(self, root: nn.Module, path: str, new: nn.Module) -> nn.Module:
        """Put ``new`` at dotted ``path`` under ``root``; return the module it replaced."""
        parent_path, _, child = path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        old = parent.get_submodule(child)
        self.set_attr(parent, child, new)
        return old

    def restore(self) -> None:
        if not self.keep_originals and self.count:
            raise RuntimeError("this patcher was created with keep_originals=False; nothing to restore")
        while self._undo:
            owner, name, value = self._undo.pop()
            setattr(owner, name, value)
        self.count = 0


@dataclass
class ModelStage:
    """Model level: ``model`` may be transformed in place or replaced."""

    model: nn.Module
    tokenizer: Any
    patcher: ModulePatcher
    calibration: Callable[[int, int], torch.Tensor] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def calibration_batches(self, n_samples: int, seq_len: int) -> torch.Tensor:
        """``n_samples × seq_len`` token ids of calibration text (seeded, reproducible)."""
        if self.calibration is None:
            raise RuntimeError(
                "this experiment has no calibration data source; techniques that declare "
                "Requirement.CALIBRATION_DATA get one from the experiment runner"
            )
        return self.calibration(n_samples, seq_len)


@dataclass
class SystemStage:
    """System level: generation components contributed by techniques.

    ``engine`` is the decode engine the runtime chose (``runtime.engine``): a decoding
    strategy runs its forwards through it (``engine.decoding()``, ``engine.runner(...)``).
    Built without a composition it is the core's reference :class:`HFEngine`.
    ``cache_factory`` is a KV-cache policy a technique contributes (``None``: the default cache).
    """

    model: nn.Module
    tokenizer: Any
    cache_factory: CacheFactory = None
    engine: DecodeEngine = field(default_factory=HFEngine)
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class Request:
    """One generation request in chat form.

    ``documents`` hold the context (passages to summarize or answer from, retrieved
    text); data-level techniques compress or extend them. :meth:`render` places them
    before the last user message's text.
    """

    messages: list[dict[str, str]]
    documents: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_text(cls, prompt: str, documents: list[str] | None = None) -> Request:
        return cls(messages=[{"role": "user", "content": prompt}], documents=list(documents or []))

    def render(self) -> list[dict[str, str]]:
        """The chat messages with the documents inlined into the last user turn."""
        if not self.documents:
            return [dict(m) for m in self.messages]
        messages = [dict(m) for m in self.messages]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        context = "\n\n".join(self.documents)
        messages[last_user]["content"] = f"{context}\n\n{messages[last_user]['content']}"
        return messages

    def text(self) -> str:
        return "\n\n".join(m["content"] for m in self.render())


@dataclass
class DataStage:
    """Data level: the (transformed) model and tokenizer, for model-based compressors."""

    model: nn.Module
    tokenizer: Any
    extras: dict[str, Any] = field(default_factory=dict)
