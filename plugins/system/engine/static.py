"""Which engine a generation uses, and when the static engine has to step aside.

The composition puts the experiment's runtime choice in ``SystemStage.extras["engine"]``
(``{"engine": <registered engine name>, "compile": bool}``); decoding strategies read it with
:meth:`EngineSettings.from_stage` and run on the static engine when it is ``"static"``, on
the Hugging Face path for any other engine. The static engine runs a Llama-family model with its
own attention over its own cache, so it steps aside (and the Hugging Face path runs) when

- the model is not a supported architecture, or a technique replaced its attention; or
- the stack contributes a KV-cache policy (a cache factory returning anything but the
  default ``DynamicCache``): that policy lives in the HF cache object.

Measurement wrappers that only *record* caches (the evaluator's ``CacheRecorder``) return
the default cache: the engine then hands its static buffers to that object (attribute
``static_kv``) so the KV bytes it holds are counted.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import DynamicCache

from effinfer.plugins.system.engine.engine import Engine
from effinfer.plugins.system.engine.forward import UnsupportedModel

CacheFactory = Callable[[nn.Module], Any] | None


@dataclass(frozen=True)
class EngineSettings:
    #: a registered engine name; speculative strategies use the static engine only for "static"
    engine: str = "static"
    compile: bool = False
    compile_mode: str | None = None

    @classmethod
    def from_stage(cls, stage: Any) -> EngineSettings:
        options = getattr(stage, "extras", {}).get("engine") if stage is not None else None
        return cls(**options) if options else cls()


def probe_cache(model: nn.Module, cache_factory: CacheFactory) -> tuple[bool, Any]:
    """Call the factory once: ``(static engine allowed, the cache object it returned)``."""
    if cache_factory is None:
        return True, None
    probe = cache_factory(model)
    return type(probe) is DynamicCache and probe.get_seq_length() == 0, probe


_ENGINES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[bool, str | None], Engine]] = weakref.WeakKeyDictionary()


def shared_engine(model: nn.Module, settings: EngineSettings) -> Engine:
    """One engine per model and compile setting in this process, so compiled steps are reused
    by every strategy (rebuilt when a technique has swapped the model's modules since)."""
    engines = _ENGINES.setdefault(model, {})
    key = (settings.compile, settings.compile_mode)
    engine = engines.get(key)
    if engine is None or not engine.layout.matches(model):
        engine = engines[key] = Engine(model, settings.compile, settings.compile_mode)
    return engine


class EngineChoice:
    """Finds the static engine for a model, or says (once, with a warning) why the HF path must run."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.engine: Engine | None = None
        self.reasons: list[str] = []

    def engine_for(self, model: nn.Module, cache_factory: CacheFactory = None) -> tuple[Engine | None, Any]:
        """``(engine or None, the probed cache object)`` for one generation call."""
        allowed, probe = probe_cache(model, cache_factory)
        if self.settings.engine != "static":
            return None, probe
        if not allowed:
            self._fallback(f"the stack's KV-cache policy ({type(probe).__name__}) runs on the HF path")
            return None, probe
        try:
            self.engine = shared_engine(model, self.settings)
        except UnsupportedModel as error:
            self._fallback(f"static engine unavailable ({error}); using the HF path")
            return None, probe
        return self.engine, probe

    def _fallback(self, reason: str) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)
            warnings.warn(reason, RuntimeWarning, stacklevel=4)
