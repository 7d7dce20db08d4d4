"""``torch.compile`` for the decode step: cost reported, cached on disk, clean fallback.

Compiling is optional (off by default and in tests: it takes tens of seconds on a 2-core
CPU). When on, the first call with new shapes pays the compile; that wall time is
recorded in :attr:`CompiledStep.compile_seconds`. Inductor's FX-graph cache is pointed
at ``<effinfer cache>/inductor`` (unless ``TORCHINDUCTOR_CACHE_DIR`` is set), so a later
process with the same model and shapes mostly reuses the generated kernels. If compiling
or running the compiled step fails, a warning says why and the eager step is used from
then on: results stay correct, only slower.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch


def use_effinfer_inductor_cache() -> None:
    """Point Inductor's on-disk caches at the effinfer cache (a user's setting wins)."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        from effinfer.data.cache import cache_dir

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")


def shape_key(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)


class CompiledStep:
    """Calls ``to_compile`` compiled (when ``enabled``), else ``eager``; falls back to eager on failure.

    The two functions compute the same thing; ``to_compile`` may be written for Inductor
    (e.g. fused projections that would be slow in eager mode).
    """

    def __init__(self, eager: Callable[..., Any], to_compile: Callable[..., Any], enabled: bool, name: str,
                 mode: str | None = None) -> None:
        self.eager = eager
        self.name = name
        self.compile_seconds: dict[tuple[Any, ...], float] = {}
        self.failure: str | None = None
        self.compiled: Callable[..., Any] | None = None
        if enabled:
            use_effinfer_inductor_cache()
            self.compiled = torch.compile(to_compile, mode=mode, fullgraph=True, dynamic=False)

    @property
    def active(self) -> bool:
        """Whether calls currently go to the compiled function."""
        return self.compiled is not None

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            return self.eager(*args)
        key = shape_key(args)
        started = time.perf_counter()
        try:
            out = self.compiled(*args)
        except Exception as error:  # noqa: BLE001 - any compile/runtime failure → eager
            self.fallback(error)
            return self.eager(*args)
        if key not in self.compile_seconds:
            self.compile_seconds[key] = time.perf_counter() - started
        return out

    def fallback(self, error: BaseException) -> None:
        self.failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        self.compiled = None
        warnings.warn(f"torch.compile of the {self.name} failed ({self.failure}); "
                      "continuing with the eager step (correct, slower)", RuntimeWarning, stacklevel=3)

    @property
    def total_compile_seconds(self) -> float:
        return sum(self.compile_seconds.values())
