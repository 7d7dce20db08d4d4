"""The memory roofline of decoding: bytes read per decoded token ÷ measured bandwidth.

Plain decoding reads every weight and the whole KV cache once per step, so on a
memory-bound machine a step cannot take less than ``bytes_per_token / bandwidth``. The
bandwidth is measured on this machine (read: the faster of torch's reduction over a large buffer
and effinfer's four-streams-per-thread read, :func:`effinfer.kernels.native.read_probes`; copy =
read + write), medians of several runs, and recorded in the environment.
``fraction`` = measured decode tokens/s ÷ roofline tokens/s: how close the decode loop is to
the hardware limit (speculative decoding can exceed 1, since one weight pass yields
several tokens).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from effinfer.kernels import hugepages, native


@dataclass(frozen=True)
class Bandwidth:
    """Measured memory bandwidth in bytes per second."""

    read: float
    copy: float
    buffer_bytes: int
    threads: int

    def as_dict(self) -> dict[str, float]:
        return {"read_bytes_per_s": self.read, "copy_bytes_per_s": self.copy,
                "buffer_bytes": self.buffer_bytes, "threads": self.threads}


def measure_bandwidth(buffer_mib: int = 256, repeats: int = 5, device: str = "cpu") -> Bandwidth:
    """Read (the fastest of :func:`~effinfer.kernels.native.read_probes`) and copy bandwidth over a ``buffer_mib``
    MiB fp32 buffer (one warm-up each)."""
    n = buffer_mib * 2**20 // 4
    # on CPU in huge pages, as the native decode step keeps its weights
    source = hugepages.ones(n) if device == "cpu" else torch.ones(n, dtype=torch.float32, device=device)
    target = torch.empty_like(source)

    def timed(op) -> float:
        op()
        samples = []
        for _ in range(repeats):
            _sync(device)
            started = time.perf_counter()
            op()
            _sync(device)
            samples.append(time.perf_counter() - started)
        return statistics.median(samples)

    read_s = min(timed(read) for read in native.read_probes(source).values())
    copy_s = timed(lambda: target.copy_(source))
    nbytes = source.numel() * source.element_size()
    return Bandwidth(read=nbytes / read_s, copy=2 * nbytes / copy_s, buffer_bytes=nbytes,
                     threads=torch.get_num_threads())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Roofline:
    bytes_per_token: float
    roofline_tok_s: float
    fraction: float | None


def roofline(weight_bytes: int, kv_bytes: int, bandwidth: float, decode_tok_s: float | None) -> Roofline:
    """Roofline of one decode step reading all weights and ``kv_bytes`` of cache at ``bandwidth``."""
    per_token = float(weight_bytes + kv_bytes)
    limit = bandwidth / per_token
    return Roofline(per_token, limit, decode_tok_s / limit if decode_tok_s else None)
