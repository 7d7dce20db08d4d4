"""Which float32 matmul is fastest on this CPU, for decode and for prefill: measured once, cached on disk.

MKL picks its code path by CPU vendor, oneDNN by ISA, and the project's native kernels are
compiled for the machine they run on; which of them streams a decode GEMV fastest, and which
multiplies a prompt's tokens fastest, differs between the Intel (AMX) and AMD machines of this
project, so it is measured rather than assumed. :func:`dense_decode_path` times each candidate on
the model's own projection weights with one token (a few passes: well under a second for
SmolLM2), :func:`dense_prefill_path` with :data:`PREFILL_TOKENS` tokens over the first
:data:`PROBE_BYTES` of them; each keeps the fastest and stores the choice in
``<effinfer cache>/kernels/autotune.json`` under a key naming the CPU, torch version, thread count,
token count and weight shapes. ``EFFINFER_DENSE_DECODE`` / ``EFFINFER_DENSE_PREFILL`` (``mkl``,
``onednn`` or ``native``) override them.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from effinfer.kernels import native

PATHS = ("mkl", "onednn", "native")
ENV = "EFFINFER_DENSE_DECODE"
PREFILL_ENV = "EFFINFER_DENSE_PREFILL"
#: tokens of the prefill measurement (a typical prompt)
PREFILL_TOKENS = 128
#: slowest ÷ fastest candidate above which a measurement is not stored (see :func:`dense_decode_path`)
SUSPECT_SPREAD = 4.0
#: bytes of weights one timing pass streams (well past a CPU's last-level cache)
PROBE_BYTES = 64 * 2**20


def _onednn_available() -> bool:
    return hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available()


def dense_linear(path: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """``f(x, weight, bias)`` computing ``x @ weight.T + bias`` through ``path`` (``native``: the GEMV kernel up
    to :data:`~effinfer.kernels.native.MAX_TOKENS` tokens, the blocked GEMM above)."""
    if path == "mkl":
        return F.linear
    if path == "onednn":
        return lambda x, w, b: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    if path == "native":
        return native.linear
    raise ValueError(f"unknown dense decode path {path!r}; use one of {PATHS}")


def candidates() -> list[str]:
    """The paths that can run here."""
    return [p for p in PATHS if (p != "onednn" or _onednn_available()) and (p != "native" or native.problem() is None)]


def _key(weights: Sequence[torch.Tensor] | None, tokens: int) -> str:
    shapes = "probe" if weights is None else hashlib.sha256(
        repr([tuple(w.shape) for w in weights]).encode()).hexdigest()[:16]
    return (f"{native.cpu_identity()}|torch {torch.__version__}|threads {torch.get_num_threads()}|tokens {tokens}"
            f"|shapes {shapes}")


def probe_weights() -> list[torch.Tensor]:
    """:data:`PROBE_BYTES` of weights shaped like SmolLM2's projections (for a decision without a model)."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
    weights, total, index = [], 0, 0
    while total < PROBE_BYTES:
        weights.append(torch.randn(*shapes[index % len(shapes)], generator=generator))
        total, index = total + weights[-1].numel() * 4, index + 1
    return weights


def _first_bytes(weights: Sequence[torch.Tensor], limit: int) -> list[torch.Tensor]:
    """The leading weights up to ``limit`` bytes (at least one): every projection shape of a model's first blocks."""
    chosen, total = [], 0
    for w in weights:
        if chosen and total >= limit:
            break
        chosen.append(w)
        total += w.numel() * w.element_size()
    return chosen


def measure(weights: Sequence[torch.Tensor] | None = None, rounds: int = 3, tokens: int = 1) -> dict[str, float]:
    """Seconds of one pass over ``weights`` (``tokens`` rows each; default :func:`probe_weights`) per candidate
    path, best of ``rounds`` passes taken round-robin after a warm-up pass."""
    weights = probe_weights() if weights is None else weights
    inputs = {w.shape[1]: torch.randn(tokens, w.shape[1]) for w in weights}
    best = {path: float("inf") for path in candidates()}
    functions = {path: dense_linear(path) for path in best}
    with torch.inference_mode():
        for _ in range(rounds + 1):  # the first round warms up (page faults, library loading)
            for path, linear in functions.items():
                start = time.perf_counter()
                for w in weights:
                    linear(inputs[w.shape[1]], w, None)
                best[path] = min(best[path], time.perf_counter() - start)
    return best


def _store_path():
    from effinfer.data.cache import cache_dir

    return cache_dir() / "kernels" / "autotune.json"


def dense_decode_path(weights: Sequence[torch.Tensor] | None = None) -> str:
    """The fastest float32 decode matmul here (``mkl``, ``onednn`` or ``native``) for ``weights`` (a model's
    projections; default: :func:`probe_weights`), measured once per CPU and set of shapes, cached on disk."""
    return _fastest(weights, 1, ENV)


def dense_prefill_path(weights: Sequence[torch.Tensor] | None = None) -> str:
    """The fastest float32 matmul for :data:`PREFILL_TOKENS` tokens here, measured on the first
    :data:`PROBE_BYTES` of ``weights`` (default: :func:`probe_weights`), once per CPU and set of shapes."""
    probe = None if weights is None else _first_bytes(weights, PROBE_BYTES)
    return _fastest(probe, PREFILL_TOKENS, PREFILL_ENV)


def _fastest(weights: Sequence[torch.Tensor] | None, tokens: int, env: str) -> str:
    forced = os.environ.get(env)
    if forced:
        if forced not in PATHS:
            raise ValueError(f"{env}={forced!r}: use one of {PATHS}")
        return forced
    store = _store_path()
    try:
        table = json.loads(store.read_text())
    except (OSError, ValueError):
        table = {}
    key = _key(weights, tokens)
    entry = table.get(key)
    if entry and entry.get("path") in candidates():
        return entry["path"]
    timings = measure(weights, tokens=tokens)
    path = min(timings, key=timings.get)
    if max(timings.values()) > SUSPECT_SPREAD * min(timings.values()):
        # the candidates do the same work: a spread this wide means the CPU was busy with something else
        # (one such entry had oneDNN and native 10x slower than MKL), so the choice holds for this process only
        return path
    table[key] = {"path": path, "seconds_per_pass": timings, "measured": time.strftime("%Y-%m-%d %H:%M")}
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        temporary = store.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        temporary.write_text(json.dumps(table, indent=1))
        os.replace(temporary, store)
    except OSError as error:  # a read-only cache: the choice holds for this process only
        warnings.warn(f"could not store the autotune result in {store}: {error}", RuntimeWarning, stacklevel=2)
    return path
