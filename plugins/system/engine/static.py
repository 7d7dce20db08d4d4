"""The ``"static"`` decode engine, and when it has to step aside for the Hugging Face path.

:class:`StaticEngine` is the :class:`~effinfer.core.engines.DecodeEngine` this plugin
registers: its plain decoding is :class:`~effinfer.plugins.system.engine.decoding.StaticDecoding`
and its runners are :class:`~effinfer.plugins.system.engine.runner.StaticRunner` over the
compute :class:`~effinfer.plugins.system.engine.engine.Engine`. It runs a supported
decoder (Llama, Qwen2, Gemma 3 layouts) with its own attention over its own cache, so it
steps aside, with a warning, for the core's Hugging Face path when

- the model is not a supported architecture, or a technique replaced its attention; or
- the stack's cache factory returns a cache object other than the default ``DynamicCache``
  that is not a KV policy (:class:`~effinfer.core.kv_cache.PolicyCache`); or
- a speculative strategy drives a runner over a KV policy (the policy's cache is then an HF
  cache object driven by :class:`~effinfer.core.engines.HFRunner`).

Plain decoding runs a KV policy itself (:mod:`.policy`): the engine's own forward, each
layer attending over what the policy returns (compact for sparse policies, dequantized
packed codes for quantized ones).

Measurement wrappers that only *record* caches (the evaluator's ``CacheRecorder``) return
the default cache: the engine then hands its static buffers to that object (attribute
``static_kv``) so the KV bytes it holds are counted.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

from torch import nn
from transformers import DynamicCache

from effinfer.core.engines import CacheFactory, DecodeEngine, HFRunner, Runner
from effinfer.core.kv_cache import PolicyCache
from effinfer.plugins.system.engine.engine import Engine
from effinfer.plugins.system.engine.forward import UnsupportedModel


def probe_cache(model: nn.Module, cache_factory: CacheFactory) -> tuple[bool, Any]:
    """Call the factory once: ``(static engine allowed, the cache object it returned)``."""
    if cache_factory is None:
        return True, None
    probe = cache_factory(model)
    return type(probe) is DynamicCache and probe.get_seq_length() == 0, probe


_ENGINES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[bool, str | None, str], Engine]] = \
    weakref.WeakKeyDictionary()


def shared_engine(model: nn.Module, compile: bool = False, compile_mode: str | None = None,
                  kernels: str = "auto") -> Engine:
    """One compute engine per model and setting in this process, so compiled steps are reused
    by every strategy (rebuilt when a technique has swapped the model's modules since)."""
    engines = _ENGINES.setdefault(model, {})
    key = (compile, compile_mode, kernels)
    engine = engines.get(key)
    if engine is None or not engine.layout.matches(model):
        engine = engines[key] = Engine(model, compile, compile_mode, kernels)
    return engine


class StaticEngine(DecodeEngine):
    """Static KV cache, compilable one-token decode step, tree forwards (see the module docstring)."""

    name = "static"

    def __init__(self, compile: bool = False, compile_mode: str | None = None, kernels: str = "auto") -> None:
        super().__init__(compile)
        self.compile_mode = compile_mode
        #: the decode step: ``auto`` (the native CPU step where it runs), ``native`` or ``torch``
        #: (see :data:`~effinfer.plugins.system.engine.engine.KERNEL_CHOICES`)
        self.kernels = kernels
        #: the compute engine of the last model this engine ran (for :meth:`compile_report`)
        self.last: Engine | None = None
        #: why the HF path ran instead (each reason warned once)
        self.reasons: list[str] = []

    def decoding(self) -> Any:
        from effinfer.plugins.system.engine.decoding import StaticDecoding

        return StaticDecoding(self)

    def runner(self, model: nn.Module, tokens: int, max_nodes: int, cache_factory: CacheFactory = None,
               name: str = "target") -> Runner:
        from effinfer.plugins.system.engine.runner import StaticRunner

        engine, probe = self.engine_for(model, cache_factory)
        if engine is None:
            return HFRunner(model, probe)
        runner = StaticRunner(engine, tokens, max_nodes, name)
        if probe is not None:
            probe.static_kv = runner.cache  # lets a recording cache factory count the static buffers
        return runner

    def engine_for(self, model: nn.Module, cache_factory: CacheFactory = None, policy: bool = False
                   ) -> tuple[Engine | None, Any]:
        """``(compute engine or None for the HF path, the probed cache object)`` for one generation.

        ``policy``: the caller runs a :class:`~effinfer.core.kv_cache.PolicyCache` itself
        (plain decoding does, :mod:`.policy`); otherwise such a cache takes the HF path.
        """
        allowed, probe = probe_cache(model, cache_factory)
        if not allowed and not (policy and isinstance(probe, PolicyCache)):
            self._fallback(f"runners over the {probe.name} KV-cache policy use the HF runner" if isinstance(
                probe, PolicyCache) else f"the stack's KV cache ({type(probe).__name__}) is not a KV-cache policy "
                "the static engine runs; it runs on the HF path")
            return None, probe
        try:
            self.last = shared_engine(model, self.compile, self.compile_mode, self.kernels)
        except UnsupportedModel as error:
            self._fallback(f"static engine unavailable ({error}); using the HF path")
            return None, probe
        return self.last, probe

    def compile_report(self) -> dict[str, object]:
        """Compile wall time per step function and shape, and any failure (of the last model run)."""
        return self.last.compile_report() if self.last is not None else {"enabled": self.compile, "seconds": 0.0,
                                                                         "steps": {}}

    def _fallback(self, reason: str) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)
            warnings.warn(reason, RuntimeWarning, stacklevel=4)
