"""A whole decode step's decoder blocks in one native call (``ef_decode_step`` in ``csrc/cpu_decode.cpp``).

:class:`NativeStep <effinfer.plugins.system.engine.native_step.NativeStep>` runs a decode step as
about eight native calls per layer. Between two of them Python builds views, allocates outputs
and converts ctypes arguments: some 20 µs a call, a few milliseconds of a 20–30 ms step. A
:class:`DecodeProgram` describes every layer once (its weight groups, norms and attention type,
as C structs pointing at the model's own tensors) and runs all of them, same kernels and
arithmetic, in one call per step.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from effinfer.kernels import native

#: weights one program group holds (Q/K/V is the largest)
GROUP_WEIGHTS = 3
#: kinds of calls ``ef_decode_step`` / ``ef_decode_tokens`` time (the order of their timer slots)
TIMED_KINDS = ("norms", "matmuls", "attention", "activation", "embedding + rotary tables", "output head")
#: attention kinds (rotary tables) a token step gathers for
MAX_KINDS = 4
DENSE_BITS = 32

_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float


class _Group(ctypes.Structure):
    _fields_ = [("count", _I), ("in_features", _I), ("bits", _I), ("group", _I),
                ("weight", _P * GROUP_WEIGHTS), ("scale", _P * GROUP_WEIGHTS), ("gbias", _P * GROUP_WEIGHTS),
                ("bias", _P * GROUP_WEIGHTS), ("out", _I * GROUP_WEIGHTS)]


class _Norm(ctypes.Structure):
    _fields_ = [("weight", _P), ("eps", _F), ("offset", _F)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Group), ("o", _Group), ("gate_up", _Group), ("down", _Group),
                ("input", _Norm), ("post_attention", _Norm), ("pre_ffn", _Norm), ("post_ffn", _Norm),
                ("q_norm", _Norm), ("k_norm", _Norm), ("kind", _I), ("scale", _F)]


class _Step(ctypes.Structure):
    _fields_ = [("hidden", _I), ("hq", _I), ("hkv", _I), ("dim", _I), ("inter", _I), ("act", _I), ("sandwich", _I),
                ("layers", ctypes.POINTER(_Layer)), ("final_norm", _Norm),
                *[(name, _P) for name in ("x", "q", "k", "v", "attn", "o", "gate", "up", "down", "xsum", "xscale",
                                          "xs")]]


class _Inputs(ctypes.Structure):
    _fields_ = [("embedding", _P), ("vocab", _I), ("embed_scale", _F), ("kinds", _I), ("cos", _P * MAX_KINDS),
                ("sin", _P * MAX_KINDS), ("rope_rows", _I), ("window", _I * MAX_KINDS), ("head", _Group),
                *[(name, _P) for name in ("hidden", "final", "cos_rows", "sin_rows", "first")]]


_SIGNATURE = (ctypes.POINTER(_Step), _P, _I, _I, _P, _P, _P, _P, _P, _P, _I, _I, _I, _P, _P, _P)
_TOKENS_SIGNATURE = (ctypes.POINTER(_Step), ctypes.POINTER(_Inputs), _P, _I, _I, _P, _P, _P, _P, _I, _I, _P, _P, _P)

Norm = tuple[torch.Tensor, float, float]  # (weight, eps, offset) as native.add_rmsnorm takes them


@dataclass
class BlockSpec:
    """One decoder block as the program runs it: native weight groups, norms (``None``: absent), attention type."""

    qkv: native.DenseGroup | native.PackedGroup
    o: native.DenseGroup | native.PackedGroup
    gate_up: native.DenseGroup | native.PackedGroup
    down: native.DenseGroup | native.PackedGroup
    input_norm: Norm
    post_attention_norm: Norm
    kind: int
    scale: float
    pre_ffn_norm: Norm | None = None
    post_ffn_norm: Norm | None = None
    q_norm: Norm | None = None
    k_norm: Norm | None = None


def program_problem(group: object) -> str | None:
    """Why a projection cannot be part of a program (``None`` when it can)."""
    if not isinstance(group, (native.DenseGroup, native.PackedGroup)):
        return "a projection runs as its own module (not a native float32 or packed weight group)"
    if len(group.out) > GROUP_WEIGHTS:
        return f"a group of {len(group.out)} weights (a program group holds up to {GROUP_WEIGHTS})"
    return None


def _check_block(index: int, block: BlockSpec, hidden: int, inter: int, q_width: int, kv_width: int) -> None:
    """Every block must have the first block's sizes: the program's scratch buffers are sized by them."""
    expected = {"qkv": (hidden, [q_width, kv_width, kv_width]), "o": (q_width, [hidden]),
                "gate_up": (hidden, [inter, inter]), "down": (inter, [hidden])}
    for name, (in_features, outs) in expected.items():
        group = getattr(block, name)
        if group.in_features != in_features or list(group.out) != outs:
            raise ValueError(f"block {index}'s {name} is {group.in_features} → {list(group.out)}, not "
                             f"{in_features} → {outs} as the program's buffers are sized")


def _group(group: native.DenseGroup | native.PackedGroup) -> _Group:
    weights, biases = group.tensors
    described = _Group(count=len(weights), in_features=group.in_features)
    for j, (weight, bias) in enumerate(zip(weights, biases)):
        described.out[j] = group.out[j]
        described.bias[j] = None if bias is None else bias.data_ptr()
        if isinstance(group, native.DenseGroup):
            described.weight[j] = weight.data_ptr()
        else:
            described.weight[j], described.scale[j] = weight.packed.data_ptr(), weight.scales.data_ptr()
            described.gbias[j] = weight.bias.data_ptr()
    if isinstance(group, native.DenseGroup):
        described.bits, described.group = DENSE_BITS, group.in_features
    else:
        described.bits, described.group = group.bits, group.group_size
    return described


def _norm(norm: Norm | None) -> _Norm:
    if norm is None:
        return _Norm()
    weight, eps, offset = norm
    return _Norm(weight.data_ptr(), eps, offset)


class DecodeProgram:
    """Every decoder block of a model, run for ≤ :data:`native.MAX_TOKENS` rows of one token each per call.

    Holds the model's tensors through the groups it is given (build a new program when a weight is replaced)
    and its own scratch buffers, so calls allocate nothing but their outputs; one thread drives a program at a
    time (those buffers are shared by its calls).
    """

    def __init__(self, blocks: Sequence[BlockSpec], final_norm: Norm, *, num_heads: int, num_kv_heads: int,
                 head_dim: int, activation: str, sandwich: bool) -> None:
        for block in blocks:
            reason = next(filter(None, map(program_problem, (block.qkv, block.o, block.gate_up, block.down))), None)
            if reason:
                raise ValueError(reason)
        if head_dim % native.vector_width() or not 0 < head_dim <= native.MAX_HEAD_DIM or num_heads % num_kv_heads:
            raise ValueError(f"head dim {head_dim} must be a multiple of {native.vector_width()} up to "
                             f"{native.MAX_HEAD_DIM}, and {num_heads} query heads a multiple of {num_kv_heads}")
        self.blocks = list(blocks)
        self.hidden = blocks[0].qkv.in_features
        inter = blocks[0].down.in_features
        for index, block in enumerate(blocks):
            _check_block(index, block, self.hidden, inter, num_heads * head_dim, num_kv_heads * head_dim)
        rows = native.MAX_TOKENS
        widest = max(self.hidden, inter, num_heads * head_dim)

        def buffer(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, dtype=torch.float32)
        self._buffers = {
            "x": buffer(rows, self.hidden), "q": buffer(rows, num_heads * head_dim),
            "k": buffer(rows, num_kv_heads * head_dim), "v": buffer(rows, num_kv_heads * head_dim),
            "attn": buffer(rows, num_heads * head_dim), "o": buffer(rows, self.hidden),
            "gate": buffer(rows, inter), "up": buffer(rows, inter), "down": buffer(rows, self.hidden),
            "xsum": buffer(rows, widest), "xscale": buffer(rows), "xs": buffer(rows, widest)}
        self._layers = (_Layer * len(blocks))(*[self._layer(block) for block in blocks])
        self._step = _Step(hidden=self.hidden, hq=num_heads, hkv=num_kv_heads, dim=head_dim, inter=inter,
                           act=native.ACTIVATIONS[activation], sandwich=int(sandwich), layers=self._layers,
                           final_norm=_norm(final_norm),
                           **{name: buffer.data_ptr() for name, buffer in self._buffers.items()})
        self._norms = [final_norm] + [n for b in blocks for n in (b.input_norm, b.post_attention_norm, b.pre_ffn_norm,
                                                                  b.post_ffn_norm, b.q_norm, b.k_norm) if n]
        self.num_heads = num_heads
        self.head_dim = head_dim
        self._all_layers = (ctypes.c_int64 * len(blocks))(*range(len(blocks)))
        self._probs = torch.empty(0, dtype=torch.float32)
        self._function = native.library().ef_decode_step
        self._function.argtypes, self._function.restype = _SIGNATURE, None
        self._tokens_function = native.library().ef_decode_tokens
        self._tokens_function.argtypes, self._tokens_function.restype = _TOKENS_SIGNATURE, ctypes.c_int

    def tokens(self, inputs: TokenInputs, tokens: torch.Tensor, pad: torch.Tensor, keys: torch.Tensor,
               values: torch.Tensor, slot: int, layers: Sequence[int] | None = None,
               timers: ctypes.Array | None = None) -> torch.Tensor:
        """Logits ``[B, vocab]`` of a whole one-token step in one native call: ``tokens`` (int64, one per cache row)
        embedded at column ``slot`` of rows left-padded by ``pad`` (int64 ``[B]``), the blocks ``layers`` (default
        all), the final norm and the output head of ``inputs``."""
        batch = tokens.numel()
        capacity = keys.shape[3]
        if not 1 <= batch <= native.MAX_TOKENS or tokens.dtype != torch.int64 or not tokens.is_contiguous() \
                or pad.dtype != torch.int64 or pad.numel() != batch or not pad.is_contiguous() or not 0 <= slot \
                or slot >= capacity or keys.shape[1] != batch or not keys.is_contiguous() \
                or not values.is_contiguous():
            raise ValueError(f"a token step takes 1..{native.MAX_TOKENS} int64 tokens, one per row of contiguous "
                             f"caches with room for column {slot}, and int64 left padding per row")
        self._grow_probs(batch * self.num_heads * capacity)
        order = self._all_layers if layers is None else self._order(layers)
        logits = torch.empty(batch, inputs.vocab)
        status = self._tokens_function(ctypes.byref(self._step), ctypes.byref(inputs.struct), order, len(order), batch,
                                       tokens.data_ptr(), pad.data_ptr(), keys.data_ptr(), values.data_ptr(), capacity,
                                       slot, self._probs.data_ptr(), logits.data_ptr(), timers)
        if status == 1:
            raise IndexError(f"a token of {tokens.view(-1).tolist()} is outside the embedding's "
                             f"{inputs.struct.vocab} rows")
        if status == 2:
            raise IndexError(f"position {slot} minus the padding {pad.tolist()} is past the rotary tables' "
                             f"{inputs.rope_rows} rows")
        return logits

    def _grow_probs(self, floats: int) -> None:
        """The attention's probability scratch, grown to ``floats`` when smaller (kept between calls)."""
        if self._probs.numel() < floats:
            self._probs = torch.empty(floats, dtype=torch.float32)

    def _order(self, layers: Sequence[int]) -> ctypes.Array:
        """The blocks to run as C indices (negative ones count from the end, as in Python); out of range: refused
        here, before the C side would read past its layers and write past the caches."""
        count = len(self.blocks)
        indices = [index + count if index < 0 else index for index in layers]
        bad = [layer for layer, index in zip(layers, indices) if not 0 <= index < count]
        if bad:
            raise IndexError(f"layers {bad} out of range for {count} blocks")
        return (ctypes.c_int64 * len(indices))(*indices)

    @staticmethod
    def _layer(block: BlockSpec) -> _Layer:
        return _Layer(qkv=_group(block.qkv), o=_group(block.o), gate_up=_group(block.gate_up), down=_group(block.down),
                      input=_norm(block.input_norm), post_attention=_norm(block.post_attention_norm),
                      pre_ffn=_norm(block.pre_ffn_norm), post_ffn=_norm(block.post_ffn_norm),
                      q_norm=_norm(block.q_norm), k_norm=_norm(block.k_norm), kind=block.kind, scale=block.scale)

    def __call__(self, hidden: torch.Tensor, rope: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 first: Sequence[torch.Tensor], keys: torch.Tensor, values: torch.Tensor, slot: int,
                 layers: Sequence[int] | None = None, timers: ctypes.Array | None = None, chain: bool = False
                 ) -> torch.Tensor:
        """The final-normed hidden state ``[B, hidden]`` after the blocks ``layers`` (default all, in order).

        ``hidden``: the embedded tokens ``[B, hidden]``, contiguous float32 (updated in place into the residual
        stream); ``rope``/``first``: ``(cos, sin)`` ``[B, head_dim]`` and the first attended column ``[B]`` (int64)
        per attention kind; ``keys``/``values``: the static caches ``[layers, rows, kv heads, capacity, head_dim]``.
        By default the ``B`` tokens are one per cache row, all at column ``slot``; with ``chain`` they are ``B``
        consecutive tokens of a one-row cache from column ``slot`` on, each attending causally (verification of a
        drafted chain)."""
        batch = hidden.shape[0]
        capacity = keys.shape[3]
        rows, end = (1, slot + batch) if chain else (batch, slot + 1)
        if not 1 <= batch <= native.MAX_TOKENS or hidden.shape[1] != self.hidden or not hidden.is_contiguous() \
                or not 0 <= slot or end > capacity or keys.shape[1] != rows or not keys.is_contiguous() \
                or not values.is_contiguous():
            raise ValueError(f"a program step takes 1..{native.MAX_TOKENS} contiguous rows of {self.hidden} floats "
                             f"and contiguous caches of {rows} row(s) with room for columns {slot}..{end - 1}")
        self._grow_probs(batch * self.num_heads * capacity)
        order = self._all_layers if layers is None else self._order(layers)
        out = torch.empty_like(hidden)
        self._function(ctypes.byref(self._step), order, len(order), batch, hidden.data_ptr(),
                       native._pointers([cos for cos, _ in rope]), native._pointers([sin for _, sin in rope]),
                       native._pointers(first), keys.data_ptr(), values.data_ptr(), capacity, slot, int(chain),
                       self._probs.data_ptr(), out.data_ptr(), timers)
        return out


class TokenInputs:
    """What a whole one-token step needs besides the blocks: the embedding table (times its scale), the rotary
    tables per attention kind (rows = positions) with each kind's sliding window, and the output head. Lets
    :meth:`DecodeProgram.tokens` gather the embedded tokens, rotary rows and first attended columns and run the
    head in the same native call as the blocks: a dozen torch ops and a second call less per step."""

    def __init__(self, program: DecodeProgram, embedding: torch.Tensor, embed_scale: float,
                 head: native.DenseGroup | native.PackedGroup, windows: Sequence[int | None]) -> None:
        problem = program_problem(head)
        if problem or embedding.dtype != torch.float32 or not embedding.is_contiguous() or embedding.dim() != 2 \
                or embedding.shape[1] != program.hidden or head.in_features != program.hidden \
                or not 1 <= len(windows) <= MAX_KINDS:
            raise ValueError(problem or "a token step takes a contiguous float32 [vocab, hidden] embedding, a head "
                             f"over the hidden size and 1..{MAX_KINDS} attention kinds")
        rows, dim = native.MAX_TOKENS, program.head_dim
        self.vocab = head.out[0]
        self._tensors = (embedding, head)  # the memory the C struct points at stays alive with it
        self._buffers = [torch.empty(rows, program.hidden), torch.empty(rows, program.hidden),
                         torch.empty(MAX_KINDS, rows, dim), torch.empty(MAX_KINDS, rows, dim),
                         torch.empty(MAX_KINDS, rows, dtype=torch.int64)]
        self._tables: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()
        self.struct = _Inputs(embedding=embedding.data_ptr(), vocab=embedding.shape[0], embed_scale=embed_scale,
                              kinds=len(windows), head=_group(head),
                              **dict(zip(("hidden", "final", "cos_rows", "sin_rows", "first"),
                                         (b.data_ptr() for b in self._buffers))))
        for kind, window in enumerate(windows):
            self.struct.window[kind] = window or 0

    def set_rope(self, tables: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The rotary tables ``(cos, sin)`` (contiguous float32 ``[positions, head_dim]``) per attention kind."""
        self._tables = tables
        self.struct.rope_rows = min(cos.shape[0] for cos, _ in tables)
        for kind, (cos, sin) in enumerate(tables):
            self.struct.cos[kind], self.struct.sin[kind] = cos.data_ptr(), sin.data_ptr()

    @property
    def rope_rows(self) -> int:
        return self.struct.rope_rows
