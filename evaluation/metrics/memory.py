"""Memory: weight bytes as stored, KV-cache bytes, peak RSS, CUDA peak.

- **weight bytes**: every parameter *and* buffer (packed quantized weights live in buffers),
  counted once per storage, so tied embeddings / lm_head count once;
- **KV-cache bytes**: the tensors held by the cache objects a generation created
  (:class:`CacheRecorder` wraps the cache factory), unique storages;
- **peak RSS**: Linux's ``VmHWM`` from ``/proc/self/status``, reset before a phase by writing
  ``5`` to ``/proc/self/clear_refs``; elsewhere ``resource.getrusage`` (a process-lifetime
  peak, flagged as not resettable);
- **CUDA peak**: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``;
- **current RSS** (``VmRSS``) after :func:`release_memory`: garbage collection, then glibc's
  ``malloc_trim(0)``, which hands the free pages of the heap arenas back to the kernel (without
  it a process that frees a model copy keeps most of its pages resident: freed chunks stay in
  the allocator's arenas, fragmented by the small objects allocated between them).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from effinfer.core.generation import new_cache
from effinfer.core.memory import cuda_peak_bytes, peak_rss_bytes, reset_cuda_peak, reset_peak_rss, status_bytes

__all__ = ["CacheRecorder", "cache_tensors", "cuda_peak_bytes", "peak_rss_bytes", "release_memory",
           "hollow_module", "reset_cuda_peak", "reset_peak_rss", "rss_bytes", "trim_heap", "unique_tensor_bytes",
           "weight_bytes"]

def rss_bytes() -> int | None:
    """The process's current resident set size (``VmRSS``), ``None`` where ``/proc`` is missing."""
    return status_bytes("VmRSS")


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:  # pragma: no cover - no C library to load
        return None


_LIBC = _libc()


def trim_heap() -> bool:
    """Return free heap pages to the kernel (glibc ``malloc_trim(0)``); ``False`` where unavailable."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    return bool(trim(0))


def hollow_module(model: nn.Module) -> int:
    """Swap every parameter's and buffer's data of a finished model for an empty tensor.

    A model is done with when its stack is measured, but a cache somewhere (a compiled step,
    an engine registry, a closure) may still hold the module object; emptied, what such a
    reference keeps alive is a few Python objects instead of the weights. Returns the bytes
    released (unique storages).
    """
    released = weight_bytes(model)
    with torch.no_grad():
        for module in model.modules():
            for name, param in module._parameters.items():
                if param is not None:
                    param.data = torch.empty(0, dtype=param.dtype, device=param.device)
            for name, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[name] = torch.empty(0, dtype=buffer.dtype, device=buffer.device)
    return released


def release_memory() -> int | None:
    """Collect garbage (cycles hold models: modules reference their parents through hooks),
    free CUDA's cached blocks, trim the C heap; return the RSS afterwards."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_heap()
    return rss_bytes()


def unique_tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and tied tensors count once)."""
    seen: dict[tuple[str, int], int] = {}
    for tensor in tensors:
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        seen[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored (unique storages)."""
    return unique_tensor_bytes([*model.parameters(), *model.buffers()])


def cache_tensors(cache: Any, depth: int = 6) -> list[torch.Tensor]:
    """Every tensor reachable from a cache object (attributes, lists, dicts), a few levels deep."""
    if isinstance(cache, torch.Tensor):
        return [cache]
    if depth == 0 or cache is None or isinstance(cache, (str, bytes, int, float, bool, nn.Module)):
        return []
    if isinstance(cache, dict):
        children: Iterable[Any] = cache.values()
    elif isinstance(cache, (list, tuple, set)):
        children = cache
    elif hasattr(cache, "__dict__"):
        children = vars(cache).values()
    else:
        return []
    return [t for child in children for t in cache_tensors(child, depth - 1)]


class CacheRecorder:
    """A cache factory that remembers the caches it builds (for :func:`kv_bytes`)."""

    def __init__(self, factory: Callable[[nn.Module], Any] | None) -> None:
        self.factory = factory
        self.caches: list[Any] = []

    def __call__(self, model: nn.Module) -> Any:
        cache = new_cache(model, self.factory)
        self.caches.append(cache)
        return cache

    def reset(self) -> None:
        self.caches.clear()

    def kv_bytes(self) -> int:
        """Bytes held by every cache built since the last :meth:`reset`."""
        return unique_tensor_bytes(t for cache in self.caches for t in cache_tensors(cache))

    def allocated_token_slots(self) -> int | None:
        """Token positions the recorded caches allocated up front (batch × capacity of a static
        engine's buffers, attribute ``static_kv``); ``None`` when a cache grows with its tokens."""
        slots = 0
        for cache in self.caches:
            static = getattr(cache, "static_kv", None)
            keys = getattr(static, "keys", None)
            if keys is None or keys.dim() != 5:  # layers × batch × kv_heads × capacity × head_dim
                return None
            slots += keys.shape[1] * keys.shape[3]
        return slots or None
