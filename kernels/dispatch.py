"""One dispatcher for every operator: the Triton implementation on CUDA, the CPU one elsewhere.

``EFFINFER_KERNELS=reference|cpu|triton`` forces one backend for every call (tests force
``triton`` on a CPU machine: the kernels then run in Triton's interpreter, which
``TRITON_INTERPRET=1`` selects; :func:`triton_kernels` sets it before the kernels are defined
when no GPU is present). A ``backend=`` argument on an operator call wins over both.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from types import ModuleType

import torch

BACKENDS = ("reference", "cpu", "triton")
ENV = "EFFINFER_KERNELS"


@functools.cache
def triton_problem() -> str | None:
    """Why Triton cannot run here (``None`` when it can: on a GPU, or in its CPU interpreter)."""
    # find_spec, not import: triton must first be imported after TRITON_INTERPRET is set (triton_kernels)
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed; install it with `pip install triton==3.9.0` (a Linux x86_64/aarch64 wheel)"
    return None


def interpreted() -> bool:
    """Whether Triton kernels run in the CPU interpreter (no CUDA device, or TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or not torch.cuda.is_available()


@functools.cache
def triton_kernels() -> ModuleType:
    """The Triton kernels module, imported on first use (in the interpreter when there is no GPU)."""
    problem = triton_problem()
    if problem:
        raise RuntimeError(f"the Triton kernels cannot run: {problem}")
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # read by @triton.jit when a function is defined
        # triton's own library functions (tl.cdiv, tl.zeros, ...) are @triton.jit too: if triton was imported
        # before the interpreter was chosen (torch.compile and transformers import it), they were defined for
        # the GPU, so import triton's Python modules afresh (its native module cannot load twice)
        standard = sys.modules.get("triton.language.standard")
        if standard is not None and type(standard.cdiv).__name__ != "InterpretedFunction":
            for name in [name for name in sys.modules if (name == "triton" or name.startswith("triton."))
                         and not name.startswith("triton._C")]:
                del sys.modules[name]
    try:
        return importlib.import_module("effinfer.kernels.triton_ops")
    except ImportError as error:
        raise RuntimeError(f"the Triton kernels cannot run: triton does not import ({error}); "
                           "install it with `pip install triton==3.9.0`") from error


def backend_for(device: torch.device | str, backend: str | None = None) -> str:
    """The backend that runs an operator on ``device``: ``backend`` if given, else ``$EFFINFER_KERNELS``,
    else ``triton`` on CUDA (when Triton imports) and ``cpu`` elsewhere."""
    chosen = backend or os.environ.get(ENV) or None
    if chosen is not None:
        if chosen not in BACKENDS:
            raise ValueError(f"unknown kernel backend {chosen!r} (from {'backend=' if backend else ENV}); "
                             f"use one of {BACKENDS}")
        return chosen
    if torch.device(device).type == "cuda" and triton_problem() is None:
        return "triton"
    return "cpu"
