"""Weights and read-probe buffers in transparent huge pages (Linux THP, 2 MiB pages).

A decode step streams every weight once: ~540 MB for SmolLM2-135M in float32, which in 4 KiB pages
is ~130,000 TLB misses per step, each a page-table walk beside the weight stream. In 2 MiB pages it
is a few hundred. Measured on the AMD EPYC machines of this project (same process, interleaved
16-step windows): the float32 native decode step 1.074× and 1.036× faster in two runs with its
weights in huge pages. Every read gains, the probe's too (``benchmarks/gemv_streams.py``: the
four-stream read 33.4 → 36.2 GB/s, the engine's GEMV 29.6 → 31.6), so the read-bandwidth probes
read huge-page buffers as well, and the roofline stays the fastest read this machine offers.

Linux gives an anonymous mapping huge pages when ``/sys/kernel/mm/transparent_hugepage/enabled`` is
``always``, or ``madvise`` and the mapping was advised ``MADV_HUGEPAGE`` — what :func:`buffer`
does, on a mapping aligned to 2 MiB. Elsewhere (THP ``never``, other systems, or
``EFFINFER_HUGE_PAGES=0``) :func:`problem` says why, :func:`buffer` returns ordinary memory and
:func:`relocate` moves nothing.
"""

from __future__ import annotations

import mmap
import os
import platform
from collections.abc import Iterable
from pathlib import Path

import torch

HUGE_PAGE = 2 * 2**20
ENV = "EFFINFER_HUGE_PAGES"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
#: tensors below this stay where they are (a huge page would hold mostly padding)
SMALLEST = 64 * 2**10

#: attribute holding where a moved parameter's data went (a copy of the parameter, whose data lies elsewhere, is moved
#: again; a plain attribute because tensors compare elementwise, so sets of them do not work)
MARK = "_effinfer_huge_pages"


def problem() -> str | None:
    """Why weights are not put in huge pages here, or ``None`` when they are."""
    if os.environ.get(ENV, "1") == "0":
        return f"{ENV}=0 turned huge pages off"
    if platform.system() != "Linux" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return f"transparent huge pages are a Linux feature (this is {platform.system()})"
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return f"{THP_SETTING} is not readable: no transparent huge pages"
    if "[never]" in setting:
        return f"transparent huge pages are off ({THP_SETTING}: never)"
    return None


def buffer(nbytes: int) -> torch.Tensor:
    """``nbytes`` of zeroed uint8 memory whose start is 2 MiB aligned and advised ``MADV_HUGEPAGE``
    (ordinary memory where :func:`problem` says no). The tensor keeps its mapping alive."""
    if problem() is not None:
        return torch.zeros(nbytes, dtype=torch.uint8)
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start:start + nbytes]


def ones(numel: int) -> torch.Tensor:
    """A float32 buffer of ``numel`` ones in huge pages (the read-bandwidth probes' buffer)."""
    return buffer(numel * 4).view(torch.float32).fill_(1.0)


def relocate(tensors: Iterable[torch.Tensor]) -> int:
    """Move the CPU ``tensors`` (parameters and buffers: float32 weights, packed codes and their scales; each once,
    however often listed, so tied weights stay tied) into one huge-page :func:`buffer`, values unchanged:
    ``t.data`` becomes a view of it. Returns the bytes moved (0 where :func:`problem` says no). Tensors taken from
    a moved tensor's old ``.data`` before no longer alias it."""
    if problem() is not None:
        return 0
    with torch.inference_mode(False):  # the engine builds its step lazily, often in inference mode; the weights must
        return _relocate(tensors)       # stay ordinary tensors (a technique may train heads on them later)


def _relocate(tensors: Iterable[torch.Tensor]) -> int:
    chosen: dict[int, torch.Tensor] = {}
    for tensor in tensors:
        if tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.nbytes >= SMALLEST \
                and getattr(tensor, MARK, None) != tensor.data_ptr():
            chosen.setdefault(id(tensor), tensor)
    sizes = [-(-t.nbytes // 64) * 64 for t in chosen.values()]  # each start 64-byte aligned
    if not sizes:
        return 0
    arena = buffer(sum(sizes))
    offset = 0
    for tensor, size in zip(chosen.values(), sizes, strict=True):
        view = arena[offset:offset + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
        with torch.no_grad():
            view.copy_(tensor.data)
        tensor.data = view
        setattr(tensor, MARK, tensor.data_ptr())
        offset += size
    return offset
