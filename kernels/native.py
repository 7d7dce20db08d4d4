"""The project's native CPU kernels for small-batch decoding (``csrc/cpu_decode.cpp``).

MKL's float32 one-row matmul streams weights at about half the memory bandwidth on the AMD
machines of this project (~12 of ~27 GB/s measured), and every extra torch op of a decode step
costs microseconds. These kernels read a weight once per step at close to the bandwidth, for
every token of the call together (``n ≤ 8``), fuse the projections that share an input (Q/K/V,
gate/up), and do the rotary embedding, KV write and attention of a decode step in one call.

The source is plain C++ over raw pointers, compiled on first use with the system's C++ compiler
(``$CXX`` or ``c++``) and ``-O3 -march=native -fopenmp`` into the effinfer cache (keyed by source,
compiler, flags and CPU), and loaded with :mod:`ctypes`: no torch headers, so a build takes a
second or two. When no compiler is found or the build fails, :func:`problem` says why and
callers stay on their torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from effinfer.kernels.packed import PackedWeight, unpack_codes

SOURCES = (Path(__file__).parent / "csrc" / "cpu_decode.cpp", Path(__file__).parent / "csrc" / "cpu_gemm.cpp")
ABI_VERSION = 10
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-shared", "-fPIC", "-std=c++17")
#: most tokens one native matmul call takes (the C++ ``MAXN``)
MAX_TOKENS = 8
#: most weights one fused call takes
MAX_GROUP = 16
#: largest head dimension of the attention kernel
MAX_HEAD_DIM = 512
#: activation codes of :func:`gated_act`
ACTIVATIONS = {"silu": 0, "gelu_pytorch_tanh": 1, "gelu_tanh": 1}

_P = ctypes.c_void_p
_I = ctypes.c_int64
_PP = ctypes.POINTER(ctypes.c_void_p)
_SIGNATURES = {
    "ef_linear_f32": (_P, _I, _I, _I, _PP, _P, _PP, _PP),
    "ef_packed_input": (_P, _I, _I, ctypes.c_int, _I, _P, _P, _P),
    "ef_linear_packed": (_P, _P, _P, _I, _I, ctypes.c_int, _I, _I, _PP, _PP, _PP, _P, _PP, _PP),
    "ef_packed_integer_path": (),
    "ef_dequantize": (_P, _P, _P, _I, _I, ctypes.c_int, _I, _P),
    "ef_gemm_f32": (_P, _I, _I, _P, _I, _P, _P),
    "ef_gemm_packed": (_P, _I, _I, _P, _P, _P, ctypes.c_int, _I, _I, _P, _P),
    "ef_add_rmsnorm": (_P, _P, _I, _I, _P, ctypes.c_float, ctypes.c_float, _P),
    "ef_gated_act": (_P, _P, _I, ctypes.c_int),
    "ef_decode_attention": (_P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _P, ctypes.c_float, _P, _P),
    "ef_argmax_rows": (_P, _I, _I, _P),
}


def cpu_identity() -> str:
    """The CPU model and feature flags (what ``-march=native`` compiles for)."""
    model, flags = platform.processor(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}|{flags}"


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def _library_path(cxx: str) -> Path:
    from effinfer.data.cache import cache_dir

    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    texts = [source.read_text() for source in SOURCES]
    key = hashlib.sha256("\n".join([*texts, cxx, *version, *FLAGS, cpu_identity()]).encode()).hexdigest()
    return cache_dir() / "kernels" / f"cpu_decode-{key[:16]}.so"


def _build(cxx: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        result = subprocess.run([cxx, *FLAGS, *map(str, SOURCES), "-o", str(built)], capture_output=True, text=True)
        if result.returncode != 0:
            names = ", ".join(source.name for source in SOURCES)
            raise RuntimeError(f"{cxx} failed on {names}: {result.stderr.strip()[-2000:]}")
        os.replace(built, target)  # atomic: a concurrent build of the same key writes the same bytes


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        return None, f"the native kernels are built for Linux x86_64/aarch64, not {platform.system()} {platform.machine()}"
    if os.environ.get("EFFINFER_NATIVE", "1") == "0":
        return None, "EFFINFER_NATIVE=0 turned the native kernels off"
    cxx = compiler()
    if cxx is None:
        return None, "no C++ compiler found (set $CXX or install g++, e.g. `apt-get install g++`)"
    try:
        path = _library_path(cxx)
        if not path.exists():
            _build(cxx, path)
        library = ctypes.CDLL(str(path))
    except (OSError, RuntimeError) as error:
        return None, f"the native kernels did not build or load: {error}"
    if library.ef_abi_version() != ABI_VERSION:
        return None, f"stale native library {path} (ABI {library.ef_abi_version()} ≠ {ABI_VERSION}); delete it"
    for name, arguments in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = arguments, None
    library.ef_packed_integer_path.restype = ctypes.c_int
    library.ef_stream_read.argtypes, library.ef_stream_read.restype = (_P, _I), ctypes.c_double
    return library, None


def library() -> ctypes.CDLL:
    """The loaded kernels (built on first use); raises ``RuntimeError`` with :func:`problem`'s reason."""
    loaded, reason = _load()
    if loaded is None:
        raise RuntimeError(reason)
    return loaded


def problem() -> str | None:
    """Why the native kernels cannot run here, or ``None`` when they can."""
    return _load()[1]


@functools.cache  # a ctypes call per packed matmul otherwise (checked on every call)
def vector_width() -> int:
    """Float32 lanes of the built kernels' vectors (8 with AVX2, 16 with AVX-512)."""
    return int(library().ef_vector_width())


@functools.cache
def packed_integer_path() -> bool:
    """Whether the packed matmuls multiply in integers (AVX2: int16 activations with a per-token scale, codes
    widened to int16) rather than widening codes to float32."""
    return bool(library().ef_packed_integer_path())


def _check_float32(*tensors: torch.Tensor) -> None:
    bad = [f"{t.dtype} on {t.device}" for t in tensors if t.dtype != torch.float32 or t.device.type != "cpu"]
    if bad:
        raise ValueError(f"the native kernels take float32 CPU tensors, got {bad[0]}")


def _pointers(tensors: Sequence[torch.Tensor | None]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])


def _sizes(values: Sequence[int]) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*values)


def _check_input(x: torch.Tensor, in_features: int) -> torch.Tensor:
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"the native kernels take float32 CPU inputs, not {x.dtype} on {x.device}")
    flat = x.reshape(-1, in_features)
    if not 1 <= flat.shape[0] <= MAX_TOKENS:
        raise ValueError(f"the native matmuls take 1 to {MAX_TOKENS} tokens per call, got {flat.shape[0]}")
    return flat.contiguous()


def _check_group_size(count: int) -> None:
    if not 1 <= count <= MAX_GROUP:
        raise ValueError(f"a group holds 1..{MAX_GROUP} weights, got {count}")


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` (int64, the first index of the largest; a NaN counts as largest) of float32 CPU rows.

    torch's argmax scans a 49k-entry row of logits in 60-190 µs on the AMD EPYC machines of this project (the upper
    end right after a decode step, its caches cold), about 1 % of a step; this vector scan takes ~5 µs."""
    _check_float32(logits)
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"argmax over the last dimension of a tensor of shape {tuple(logits.shape)}")
    flat = logits.dim() != 2
    rows = (logits.reshape(-1, logits.shape[-1]) if flat else logits).contiguous()
    out = torch.empty(rows.shape[0], dtype=torch.int64)
    library().ef_argmax_rows(rows.data_ptr(), rows.shape[0], rows.shape[1], out.data_ptr())
    return out.view(logits.shape[:-1]) if flat else out


class DenseGroup:
    """Float32 weights that share one input (e.g. Q/K/V), multiplied in one call: ``group(x) -> [x @ W_j.T + b_j]``.

    The group holds its tensors, so their memory stays valid while it lives; build a new group
    when a weight is replaced.
    """

    def __init__(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]) -> None:
        _check_group_size(len(weights))
        self.in_features = weights[0].shape[1]
        for w, b in zip(weights, biases, strict=True):
            if w.dtype != torch.float32 or w.dim() != 2 or w.shape[1] != self.in_features or not w.is_contiguous():
                raise ValueError("a dense group takes contiguous float32 [out, in] weights of one input size")
            if b is not None and (b.dtype != torch.float32 or b.shape != (w.shape[0],)):
                raise ValueError("a bias must be float32 [out]")
        self.tensors = (tuple(weights), tuple(biases))
        self.out = [w.shape[0] for w in weights]
        self._weights, self._biases, self._out = _pointers(weights), _pointers(biases), _sizes(self.out)
        self._call = library().ef_linear_f32

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * 4 for t in self.tensors[0])

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        flat = _check_input(x, self.in_features)
        outputs = [torch.empty(flat.shape[0], o, dtype=torch.float32) for o in self.out]
        self._call(flat.data_ptr(), flat.shape[0], self.in_features, len(self.out), self._weights, self._out,
                   self._biases, _pointers(outputs))
        return [y.view(*x.shape[:-1], y.shape[-1]) for y in outputs]


def packed_problem(weight: PackedWeight) -> str | None:
    """Why the native packed matmul cannot take ``weight`` (``None`` when it can)."""
    lanes = 16 if packed_integer_path() else vector_width()
    block = 2 * lanes if weight.bits == 4 else lanes
    if weight.bits not in (4, 8):
        return f"the native packed matmul reads 4- and 8-bit codes, not {weight.bits}-bit"
    if weight.group_size % block or weight.in_features % block:
        return f"its {weight.bits}-bit blocks are {block} inputs: group size {weight.group_size} must be a multiple"
    if weight.packed.device.type != "cpu":
        return "the native kernels run on CPU tensors"
    return None


class PackedGroup:
    """Packed W8A16 / W4A16 weights (one bit-width and group size) sharing one input, in one call."""

    def __init__(self, weights: Sequence[PackedWeight], biases: Sequence[torch.Tensor | None]) -> None:
        _check_group_size(len(weights))
        first = weights[0]
        for weight in weights:
            reason = packed_problem(weight)
            if reason:
                raise ValueError(reason)
            if (weight.bits, weight.group_size, weight.in_features) != (first.bits, first.group_size,
                                                                         first.in_features):
                raise ValueError("a packed group takes weights of one bit-width, group size and input size")
        self.bits, self.group_size, self.in_features = first.bits, first.group_size, first.in_features
        self.tensors = (tuple(weights), tuple(biases))
        self.out = [w.out_features for w in weights]
        self._codes = _pointers([w.packed for w in weights])
        self._scales = _pointers([w.scales for w in weights])
        self._bias_per_group = _pointers([w.bias for w in weights])
        self._biases, self._out = _pointers(biases), _sizes(self.out)
        self._lib = library()

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.tensors[0])

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        flat = _check_input(x, self.in_features)
        n = flat.shape[0]
        arranged = torch.empty_like(flat)  # float32, or int16 in its first half on the integer path
        sums = torch.empty(n, self.in_features // self.group_size, dtype=torch.float32)
        steps = torch.empty(n, dtype=torch.float32)
        self._lib.ef_packed_input(flat.data_ptr(), n, self.in_features, self.bits, self.group_size,
                                  arranged.data_ptr(), sums.data_ptr(), steps.data_ptr())
        outputs = [torch.empty(n, o, dtype=torch.float32) for o in self.out]
        self._lib.ef_linear_packed(arranged.data_ptr(), sums.data_ptr(), steps.data_ptr(), n, self.in_features,
                                   self.bits, self.group_size, len(self.out), self._codes, self._scales,
                                   self._bias_per_group, self._out, self._biases, _pointers(outputs))
        return [y.view(*x.shape[:-1], y.shape[-1]) for y in outputs]


def packed_error_bound(x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    """``[tokens, out]``: how far :func:`dequant_matmul` may be from the float32 product, besides float rounding.

    On the integer path each token's activations are rounded to int16 steps of ``max|x| / 32767``, so an output
    may move by half a step times the sum of its weights' code parts ``|code * scale|``; on the float path
    nothing but rounding."""
    flat = x.reshape(-1, weight.in_features).float()
    if not packed_integer_path():
        return torch.zeros(flat.shape[0], weight.out_features)
    codes = unpack_codes(weight.packed, weight.bits, weight.in_features).float()
    code_part = (codes * weight.scales.repeat_interleave(weight.group_size, 1)).abs().sum(1)
    return flat.abs().amax(1, keepdim=True) / 32767 / 2 * code_part[None, :]


def dequant_matmul(x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    """``x @ W.T`` for ≤ :data:`MAX_TOKENS` float32 tokens through the native packed matmul (int16 activations
    on the integer path: see :func:`packed_error_bound`)."""
    return PackedGroup([weight], [None])(x)[0]


def stream_read(buffer: torch.Tensor) -> float:
    """The sum of a contiguous float32 CPU ``buffer``, every thread reading its share as four sequential streams far
    apart: a read-bandwidth probe (see :func:`read_probes`)."""
    _check_float32(buffer)
    if not buffer.is_contiguous():
        raise ValueError("stream_read reads a contiguous buffer")
    return float(library().ef_stream_read(buffer.data_ptr(), buffer.numel()))


def read_probes(buffer: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Ways to read all of ``buffer`` once: torch's ``sum`` (one stream per thread), and on CPU where these kernels
    build :func:`stream_read` (four per thread). A read-bandwidth measurement keeps the fastest: on the AMD EPYC
    machines several streams per core read 10-20 % faster than one, and the far-rows GEMV reads that way, so a
    roofline from ``sum`` alone would sit below a kernel that beats it."""
    probes: dict[str, Callable[[], object]] = {"torch sum": buffer.sum}
    if buffer.device.type == "cpu" and buffer.dtype == torch.float32 and buffer.is_contiguous() and problem() is None:
        probes["native 4 streams"] = lambda: stream_read(buffer)
    return probes


def gemm(x: torch.Tensor, weight: torch.Tensor | PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + b`` for any number of float32 tokens (prefill) through the native blocked GEMM
    (``csrc/cpu_gemm.cpp``). ``weight`` is a float32 ``[out, in]`` tensor or a packed 4-/8-bit weight; a packed
    one is dequantized panel by panel inside the GEMM, so no dense copy of it is ever written."""
    packed = isinstance(weight, PackedWeight)
    out_features, in_features = (weight.out_features, weight.in_features) if packed else tuple(weight.shape)
    if x.shape[-1] != in_features:
        raise ValueError(f"the input has {x.shape[-1]} features, the weight takes {in_features}")
    _check_float32(x, *(() if packed else (weight,)), *(() if bias is None else (bias,)))
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"the bias must be [{out_features}], got {list(bias.shape)}")
    flat = x.reshape(-1, in_features).contiguous()
    y = torch.empty(flat.shape[0], out_features, dtype=torch.float32)
    if flat.shape[0] == 0:
        return y.view(*x.shape[:-1], out_features)
    bias = None if bias is None else bias.contiguous()  # held in locals: the C call reads their memory
    bias_pointer = None if bias is None else bias.data_ptr()
    if packed:
        if weight.bits not in (4, 8) or in_features % 2 or weight.packed.device.type != "cpu":
            raise ValueError(f"the native GEMM reads 4- and 8-bit CPU codes, not {weight.bits}-bit "
                             f"on {weight.packed.device}")
        codes, scales, group_bias = (t.contiguous() for t in (weight.packed, weight.scales, weight.bias))
        library().ef_gemm_packed(flat.data_ptr(), flat.shape[0], in_features, codes.data_ptr(), scales.data_ptr(),
                                 group_bias.data_ptr(), weight.bits, weight.group_size, out_features, bias_pointer,
                                 y.data_ptr())
    else:
        dense = weight.contiguous()
        library().ef_gemm_f32(flat.data_ptr(), flat.shape[0], in_features, dense.data_ptr(), out_features,
                              bias_pointer, y.data_ptr())
    return y.view(*x.shape[:-1], out_features)


def dequantize(weight: PackedWeight, rows: slice = slice(None), out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense float32 weight of output ``rows`` of a packed 4- or 8-bit one (for a prefill GEMM), written into
    ``out`` (``[rows, in]`` contiguous float32) when given."""
    if weight.bits not in (4, 8) or weight.in_features % 2:
        raise ValueError(f"the native dequantize reads 4- and 8-bit codes, not {weight.bits}-bit")
    start, stop, _ = rows.indices(weight.out_features)
    dense = torch.empty(stop - start, weight.in_features, dtype=torch.float32) if out is None else out
    if dense.shape != (stop - start, weight.in_features) or not dense.is_contiguous() or \
            dense.dtype != torch.float32:
        raise ValueError(f"out must be a contiguous [{stop - start}, {weight.in_features}] float32 tensor")
    packed, scales, bias = weight.packed[start:stop], weight.scales[start:stop], weight.bias[start:stop]
    library().ef_dequantize(packed.data_ptr(), scales.data_ptr(), bias.data_ptr(), stop - start, weight.in_features,
                            weight.bits, weight.group_size, dense.data_ptr())
    return dense


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + b`` for float32 tokens: the native dense matmul up to :data:`MAX_TOKENS` tokens, the blocked
    GEMM (:func:`gemm`) above."""
    if x.numel() // max(x.shape[-1], 1) > MAX_TOKENS:
        return gemm(x, weight, bias)
    return DenseGroup([weight.contiguous()], [bias])(x)[0]


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual`` (written into ``residual``, which must be contiguous float32), ``rmsnorm(h) * (w + offset)``."""
    dim = x.shape[-1]
    x = x.contiguous()
    _check_float32(x, weight, *(() if residual is None else (residual,)))
    if residual is not None and (not residual.is_contiguous() or residual.shape != x.shape):
        raise ValueError("the residual must be a contiguous float32 tensor of the input's shape")
    out = torch.empty_like(x)
    library().ef_add_rmsnorm(x.data_ptr(), None if residual is None else residual.data_ptr(), x.numel() // dim, dim,
                             weight.data_ptr(), eps, offset, out.data_ptr())
    return out, (x if residual is None else residual)


def gated_act(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up`` written into ``gate`` (contiguous float32); ``activation`` is a key of :data:`ACTIVATIONS`."""
    _check_float32(gate, up)
    if not (gate.is_contiguous() and up.is_contiguous()) or gate.shape != up.shape:
        raise ValueError("gate and up must be contiguous float32 tensors of one shape")
    library().ef_gated_act(gate.data_ptr(), up.data_ptr(), gate.numel(), ACTIVATIONS[activation])
    return gate


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, slot: int, first: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Rotary of ``q`` ``[B, Hq, D]`` and ``k`` ``[B, Hkv, D]`` (in place; ``cos``/``sin`` ``[B, D]``), k/v written at
    column ``slot`` of the ``[B, Hkv, T, D]`` caches, then attention of each row ``b`` over columns
    ``first[b]..slot``; returns ``[B, Hq, D]``. Every tensor contiguous float32, ``first`` int64."""
    batch, heads, dim = q.shape
    capacity = k_cache.shape[2]
    _check_float32(q, k, v, cos, sin, k_cache, v_cache)
    if not all(t.is_contiguous() for t in (q, k, v, cos, sin, k_cache, v_cache, first)) or first.dtype != torch.int64:
        raise ValueError("decode_attention takes contiguous tensors and int64 `first`")
    if dim % vector_width() or dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim {dim} must be a multiple of {vector_width()} up to {MAX_HEAD_DIM}")
    if not 0 <= slot < capacity or k_cache.shape[:2] != (batch, k.shape[1]) or first.shape != (batch,) or \
            cos.shape != (batch, dim):
        raise ValueError(f"slot {slot} must lie in 0..{capacity - 1} and the caches, cos/sin and `first` must "
                         f"match the batch of {batch}")
    out = torch.empty_like(q)
    scratch = torch.empty(batch, heads, capacity, dtype=torch.float32)
    library().ef_decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                  k_cache.data_ptr(), v_cache.data_ptr(), batch, heads, k.shape[1], dim, capacity,
                                  slot, first.data_ptr(), scale, out.data_ptr(), scratch.data_ptr())
    return out
