"""Short probes of this CPU's figures for the roofline model: stream read bandwidth, float32 GEMM FLOP/s,
the effective bandwidth of each decode-time matmul kernel, and the cost of one dispatched op.

Each probe takes a second or two; run them with the CPU to yourself (``flock -x``) when the numbers matter.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from effinfer.kernels import hugepages, native


def best_seconds(call: Callable[[], object], repeats: int = 5, inner: int = 1) -> float:
    """Median seconds of one ``call`` over ``repeats`` timed batches of ``inner`` calls, after a warm-up."""
    call()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(inner):
            call()
        samples.append((time.perf_counter() - started) / inner)
    return statistics.median(samples)


def read_bandwidth(mib: int = 256) -> float:
    """Bytes/s of streaming reads of a ``mib`` MiB float32 buffer: the fastest of
    :func:`effinfer.kernels.native.read_probes` (torch's reduction, effinfer's four-stream read)."""
    return read_bandwidth_probe(mib)()


def read_bandwidth_probe(mib: int = 256, repeats: int = 5) -> Callable[[], float]:
    """:func:`read_bandwidth` as a call to repeat: the buffer is allocated once, each call reads it again (to pair
    readings with measurements taken beside them on a host whose bandwidth drifts)."""
    buffer = hugepages.ones(mib * 2**20 // 4)  # as the engine's weights
    reads = native.read_probes(buffer)
    return lambda: buffer.numel() * 4 / min(best_seconds(read, repeats=repeats) for read in reads.values())


def gemm_flops(n: int = 1024, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of an ``n × n × n`` matmul in ``dtype``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / best_seconds(lambda: a @ b, repeats=3)


def op_overhead(calls: int = 2000) -> float:
    """Seconds of one tiny dispatched op (an 8-element add): the per-op cost of eager decoding."""
    x = torch.ones(8)
    return best_seconds(lambda: x.add(1.0), repeats=5, inner=calls)


def native_call_overhead(calls: int = 2000) -> float:
    """Seconds of one tiny call into effinfer's native kernels (an 8-element RMSNorm: output allocation,
    ctypes marshalling, the call): the per-call cost of the engine's native decode step."""
    from effinfer.kernels import native

    x, weight = torch.ones(1, 8), torch.ones(8)
    return best_seconds(lambda: native.add_rmsnorm(x, None, weight, 1e-6), repeats=5, inner=calls)


def matmul_bandwidth(call: Callable[[], object], weight_bytes: int) -> float:
    """Effective bytes/s of a one-token matmul that reads ``weight_bytes`` of weights."""
    return weight_bytes / best_seconds(call, repeats=5, inner=5)
