"""The static engine's decode step through effinfer's native CPU kernels (``effinfer.kernels.native``).

Graph-level fusion of a one-token step, with the same arithmetic as :func:`.forward.decoder_forward`:

- projections that share an input run as one call (Q/K/V, gate/up), each weight read once for
  every row of the batch, at close to the memory bandwidth;
- the residual add and the next RMSNorm are one call;
- rotary embedding, KV write and attention over the valid cache columns (padding and a sliding
  window skipped, not masked) are one call;
- the gated activation is one call.

When every projection is a native group, all blocks of a step run as one native call
(:class:`~effinfer.kernels.native_program.DecodeProgram`): the same kernels, with no Python between
them; :meth:`NativeStep.chain` runs a drafted chain of up to 8 tokens the same way (verification).

A projection that is not a plain float32 ``nn.Linear`` nor a :class:`QuantizedLinear` stored in
the project's packed layout (a technique's own module) runs as the module itself, so
model-level techniques stay honoured; :func:`native_problem` refuses what this step cannot run
(the engine then uses the torch step).
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from effinfer.kernels import autotune, hugepages, native
from effinfer.kernels.native_program import TIMED_KINDS, BlockSpec, DecodeProgram, TokenInputs, program_problem
from effinfer.kernels.packed import PackedWeight
from effinfer.plugins.system.engine.forward import SLIDING, DecoderLayout

Projection = Callable[[torch.Tensor], list[torch.Tensor]]

GEMMA_NORMS = {"Gemma3RMSNorm"}
PLAIN_NORMS = {"LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm"} | GEMMA_NORMS
#: gated MLPs whose forward is down(act(gate(x)) * up(x)) with the config's activation
STOCK_MLPS = {"LlamaMLP", "Qwen2MLP", "MistralMLP", "Gemma3MLP"}
#: embedding modules a whole-step native call gathers rows of: class name -> the attribute holding the factor its
#: forward multiplies the rows by (``None``: no factor)
EMBEDDING_SCALES = {"Embedding": None, "Gemma3TextScaledWordEmbedding": "embed_scale"}


def packed_weight(module: nn.Module) -> PackedWeight | None:
    """The packed weight of a quantization-family layer in ``native`` mode (sharing its buffers), else ``None``."""
    if type(module).__name__ != "QuantizedLinear" or getattr(module, "packed", None) is None:
        return None
    # only execution='native' layers: a 'dequant' layer is the float reference path and stays one
    return module.packed_weight() if getattr(module, "mode", None) == "native" else None


def is_dense(module: nn.Module) -> bool:
    return type(module) is nn.Linear and module.weight.dtype == torch.float32


def projection(modules: Sequence[nn.Module], path: str = "native") -> Projection:
    """One call computing every module of ``modules`` (which share their input) on it; plain float32 linears
    through the dense decode ``path`` (:mod:`effinfer.kernels.autotune`)."""
    if all(is_dense(m) for m in modules):
        if path == "native":
            return native.DenseGroup([m.weight.detach().contiguous() for m in modules],
                                     [None if m.bias is None else m.bias.detach() for m in modules])
        linear = autotune.dense_linear(path)
        return lambda x: [linear(x, m.weight, m.bias) for m in modules]
    packed = [packed_weight(m) for m in modules]
    if all(p is not None and native.packed_problem(p) is None for p in packed):
        kinds = {(p.bits, p.group_size) for p in packed}
        if len(kinds) == 1:
            return native.PackedGroup(packed, [None if m.bias is None else m.bias.detach().float() for m in modules])
    if len(modules) > 1:
        parts = [projection([m], path) for m in modules]
        return lambda x: [part(x)[0] for part in parts]
    module = modules[0]
    return lambda x: [module(x).float().contiguous()]  # the next native call reads it as raw float32


def norm_parameters(norm: nn.Module) -> tuple[torch.Tensor, float, float]:
    """``(weight, eps, offset)`` of a Llama/Qwen2/Gemma 3 RMSNorm (Gemma scales by ``1 + weight``)."""
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    return norm.weight.detach(), float(eps), 1.0 if type(norm).__name__ in GEMMA_NORMS else 0.0


def native_problem(layout: DecoderLayout, model: nn.Module) -> str | None:
    """Why the native step cannot run ``model`` (``None`` when it can)."""
    reason = native.problem()
    if reason:
        return reason
    other = next((p for p in model.parameters() if p.dtype != torch.float32 or p.device.type != "cpu"), None)
    if other is not None:
        return f"the native step runs float32 CPU models (a parameter is {other.dtype} on {other.device})"
    if type(layout.norm).__name__ not in PLAIN_NORMS:
        return f"the final norm is {type(layout.norm).__name__}, not a stock RMSNorm"
    if layout.head_dim % native.vector_width() or layout.head_dim > native.MAX_HEAD_DIM:
        return f"head dim {layout.head_dim} is not a multiple of {native.vector_width()} up to {native.MAX_HEAD_DIM}"
    activation = getattr(model.config, "hidden_activation", None) or getattr(model.config, "hidden_act", None)
    if activation not in native.ACTIVATIONS:
        return f"activation {activation!r} is not one of {sorted(native.ACTIVATIONS)}"
    for index, layer in enumerate(layout.layers):
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        if layout.sandwich_norms:
            norms += [layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm]
        if hasattr(layer.self_attn, "q_norm"):
            norms += [layer.self_attn.q_norm, layer.self_attn.k_norm]
        odd = [type(n).__name__ for n in norms if type(n).__name__ not in PLAIN_NORMS]
        if odd:
            return f"layer {index} has norms {odd}, not a stock RMSNorm"
        if type(layer.mlp).__name__ not in STOCK_MLPS:
            return f"layer {index}'s MLP is {type(layer.mlp).__name__}, not the stock gated MLP ({sorted(STOCK_MLPS)})"
    return None


class NativeLayer:
    """The fused calls of one decoder block."""

    def __init__(self, layout: DecoderLayout, layer: nn.Module, path: str) -> None:
        attention = layer.self_attn
        self.qkv = projection([attention.q_proj, attention.k_proj, attention.v_proj], path)
        self.o = projection([attention.o_proj], path)
        self.gate_up = projection([layer.mlp.gate_proj, layer.mlp.up_proj], path)
        self.down = projection([layer.mlp.down_proj], path)
        self.input_norm = norm_parameters(layer.input_layernorm)
        self.post_attention_norm = norm_parameters(layer.post_attention_layernorm)
        self.sandwich = layout.sandwich_norms
        if self.sandwich:
            self.pre_ffn_norm = norm_parameters(layer.pre_feedforward_layernorm)
            self.post_ffn_norm = norm_parameters(layer.post_feedforward_layernorm)
        self.qk_norms = (norm_parameters(attention.q_norm), norm_parameters(attention.k_norm)) \
            if hasattr(attention, "q_norm") else None
        self.scale = float(attention.scaling)

    def spec(self, kind: int) -> BlockSpec:
        """This block as a :class:`DecodeProgram` runs it (raises ``ValueError`` when a projection cannot)."""
        for group in (self.qkv, self.o, self.gate_up, self.down):
            reason = program_problem(group)
            if reason:
                raise ValueError(reason)
        return BlockSpec(self.qkv, self.o, self.gate_up, self.down, self.input_norm, self.post_attention_norm, kind,
                         self.scale, self.pre_ffn_norm if self.sandwich else None,
                         self.post_ffn_norm if self.sandwich else None,
                         *(self.qk_norms if self.qk_norms is not None else (None, None)))


def weight_pointers(layout: DecoderLayout) -> tuple[int, ...]:
    """Where every projection's weight lives: a technique that replaces a weight after the step was built
    changes one of these, and the step is built again."""
    modules = [layout.embed, *layout.layers, layout.norm, layout.lm_head, layout.rotary]  # rotary: its rope table
    return tuple(t.data_ptr() for m in modules for t in (*m.parameters(), *m.buffers()))


class NativeStep:
    """A one-token decode step (``tokens`` ``B × 1``) over the static cache, through native kernels."""

    def __init__(self, layout: DecoderLayout, model: nn.Module) -> None:
        self.layout = layout
        #: bytes of the model's weights (float32 or packed codes and scales) moved into huge pages for this step
        #: (0: none moved now; ``hugepages.problem()`` says why where none can be): a step streams every weight,
        #: and in 4 KiB pages that is a page-table walk every 4 KiB
        modules = (layout.embed, *layout.layers, layout.norm, layout.lm_head)
        self.huge_page_bytes = hugepages.relocate([*(p for m in modules for p in m.parameters()),
                                                   *(b for m in modules for b in m.buffers())])
        self.pointers = weight_pointers(layout)
        dense = [m.weight for layer in layout.layers for m in layer.modules() if is_dense(m)]
        dense += [layout.lm_head.weight] if is_dense(layout.lm_head) else []
        #: the float32 decode matmul measured fastest here on these weights (``mkl``, ``onednn`` or ``native``)
        self.dense_path = autotune.dense_decode_path(dense) if dense else "native"
        #: the float32 matmul measured fastest here for a prompt's tokens (what the engine's prefill uses)
        self.prefill_path = autotune.dense_prefill_path(dense) if dense else "native"
        self.blocks = [NativeLayer(layout, layer, self.dense_path) for layer in layout.layers]
        self.final_norm = norm_parameters(layout.norm)
        self.head = projection([layout.lm_head], self.dense_path)
        config = model.config
        self.activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
        #: seconds per kind of call summed over steps while a dict (see :meth:`profile`); ``None`` = not timed
        self.breakdown: dict[str, float] | None = None
        #: attention kinds in the order the program indexes their rotary tables
        self.kinds = tuple(sorted(set(layout.layer_types)))
        rope_types = str(getattr(layout.rotary, "rope_type", "default"))
        self._static_rope = "dynamic" not in rope_types and "longrope" not in rope_types
        self._rope_length = 0
        self._rope_tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        #: every block in one native call per step, where each projection is a native group (else ``None``, and
        #: the step runs the per-call loop; setting it to ``None`` forces that loop)
        self.program: DecodeProgram | None = None
        self.program_reason: str | None = None
        try:
            self.program = DecodeProgram([block.spec(self.kinds.index(kind)) for block, kind in
                                          zip(self.blocks, layout.layer_types)], self.final_norm,
                                         num_heads=layout.num_heads, num_kv_heads=layout.num_kv_heads,
                                         head_dim=layout.head_dim, activation=self.activation,
                                         sandwich=layout.sandwich_norms)
        except ValueError as error:
            self.program_reason = str(error)
        #: the embedding, rotary tables and output head for whole steps in one native call (``None``: the step
        #: gathers its inputs and runs the head from Python; :attr:`token_reason` says why)
        self.token_inputs: TokenInputs | None = None
        self.token_reason = self._token_problem()
        if self.token_reason is None:
            try:
                self.token_inputs = TokenInputs(self.program, layout.embed.weight, self._embed_scale(),
                                                self.head, [layout.sliding_window if kind == SLIDING else None
                                                            for kind in self.kinds])
            except ValueError as error:
                self.token_reason = str(error)

    def _token_problem(self) -> str | None:
        if self.program is None:
            return f"no program ({self.program_reason})"
        if not self._static_rope:
            return "the rotary tables depend on the sequence length"
        if type(self.layout.embed).__name__ not in EMBEDDING_SCALES or self.layout.embed.max_norm is not None:
            return f"the embedding is a {type(self.layout.embed).__name__}, not a plain or Gemma-scaled table"
        return None

    def _embed_scale(self) -> float:
        attribute = EMBEDDING_SCALES[type(self.layout.embed).__name__]
        return 1.0 if attribute is None else float(getattr(self.layout.embed, attribute).float())

    def profile(self) -> dict[str, float]:
        """Start timing each kind of call (matmuls, attention, norms, ...) per step; returns the dict that fills.

        The part of ``total`` no kind accounts for is Python and torch dispatch between the calls; ``calls``
        counts the timed calls and ``steps`` the steps (a verified chain of drafted tokens counts as one).
        """
        self.breakdown = {}
        return self.breakdown

    def __call__(self, tokens: torch.Tensor, slot: int, keys: torch.Tensor, values: torch.Tensor,
                 pad: torch.Tensor, layers: Sequence[int] | None = None) -> torch.Tensor:
        started = time.perf_counter() if self.breakdown is not None else 0.0
        inputs = self.token_inputs
        if inputs is not None and tokens.dtype == pad.dtype == torch.int64 and self.program is not None:
            if slot >= inputs.rope_rows:
                self._grow_rope(slot + 1)
            timers = (ctypes.c_double * len(TIMED_KINDS))() if self.breakdown is not None else None
            logits = self.program.tokens(inputs, tokens, pad, keys, values, slot, layers, timers)
            if timers is not None:
                self._add_timers(timers, started)
            return logits
        run = self._run
        layout = self.layout
        batch = tokens.shape[0]
        hidden, rope, first = run("embedding + rotary tables", self._inputs, tokens.view(-1),
                                  torch.full((batch,), slot), pad)
        if self.program is not None:
            return self._finish(self._run_program(hidden, rope, first, keys, values, slot, pad, layers), started)
        pending: torch.Tensor | None = None  # the last block's output, not yet added to `hidden`
        for index in range(layout.num_layers) if layers is None else layers:
            block, kind = self.blocks[index], layout.layer_types[index]
            x, hidden = run("norms", native.add_rmsnorm, pending if pending is not None else hidden,
                            hidden if pending is not None else None, *block.input_norm)
            q, k, v = run("matmuls", block.qkv, x)
            q = q.view(batch, layout.num_heads, layout.head_dim)
            k = k.view(batch, layout.num_kv_heads, layout.head_dim)
            if block.qk_norms is not None:  # Gemma 3
                q, _ = run("norms", native.add_rmsnorm, q, None, *block.qk_norms[0])
                k, _ = run("norms", native.add_rmsnorm, k, None, *block.qk_norms[1])
            out = run("attention", native.decode_attention, q.contiguous(), k.contiguous(),
                      v.view(batch, layout.num_kv_heads, layout.head_dim).contiguous(), *rope[kind], keys[index],
                      values[index], slot, first.get(kind, pad), block.scale)
            attended = run("matmuls", block.o, out.view(batch, -1))[0]
            if block.sandwich:
                attended, _ = run("norms", native.add_rmsnorm, attended, None, *block.post_attention_norm)
                x, hidden = run("norms", native.add_rmsnorm, attended, hidden, *block.pre_ffn_norm)
            else:
                x, hidden = run("norms", native.add_rmsnorm, attended, hidden, *block.post_attention_norm)
            gate, up = run("matmuls", block.gate_up, x)
            pending = run("matmuls", block.down, run("activation", native.gated_act, gate, up, self.activation))[0]
            if block.sandwich:
                pending, _ = run("norms", native.add_rmsnorm, pending, None, *block.post_ffn_norm)
        final, _ = run("norms", native.add_rmsnorm, pending if pending is not None else hidden,
                       hidden if pending is not None else None, *self.final_norm)
        return self._finish(final, started)

    def chain(self, tokens: torch.Tensor, start: int, keys: torch.Tensor, values: torch.Tensor, pad: torch.Tensor,
              layers: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and final-norm hidden states (``1 × k × …``) of a chain of ``k ≤ 8`` tokens (``1 × k``) fed into a
        one-row cache from column ``start``, each attending causally (speculative verification). Needs
        :attr:`program`."""
        started = time.perf_counter() if self.breakdown is not None else 0.0
        k = tokens.shape[-1]
        hidden, rope, first = self._run("embedding + rotary tables", self._inputs, tokens.view(-1),
                                        start + torch.arange(k), pad.reshape(1).expand(k))
        timers = (ctypes.c_double * len(TIMED_KINDS))() if self.breakdown is not None else None
        final = self.program(hidden, *self._by_kind(rope, first), keys, values, start, layers, timers, chain=True)
        if timers is not None:
            self._add_timers(timers)
        logits = self._finish(final, started)  # a chain counts as one step of the profile
        return logits.view(1, k, -1), final.view(1, k, -1)

    def _run_program(self, hidden: torch.Tensor, rope: dict, first: dict, keys: torch.Tensor, values: torch.Tensor,
                     slot: int, pad: torch.Tensor, layers: Sequence[int] | None) -> torch.Tensor:
        timers = (ctypes.c_double * len(TIMED_KINDS))() if self.breakdown is not None else None
        final = self.program(hidden, *self._by_kind(rope, first), keys, values, slot, layers, timers)
        if timers is not None:
            self._add_timers(timers)
        return final

    def _add_timers(self, timers: ctypes.Array, started: float | None = None) -> None:
        """Add the native timers to :attr:`breakdown`; with ``started``, count a whole step (total, steps, calls)."""
        for kind, seconds in zip(TIMED_KINDS, timers):
            if seconds:
                self.breakdown[kind] = self.breakdown.get(kind, 0.0) + seconds
        if started is not None:  # a whole step in one native call
            self.breakdown["total"] = self.breakdown.get("total", 0.0) + time.perf_counter() - started
            self.breakdown["steps"] = self.breakdown.get("steps", 0) + 1
            self.breakdown["calls"] = self.breakdown.get("calls", 0) + 1

    def _finish(self, final: torch.Tensor, started: float) -> torch.Tensor:
        logits = self._run("output head", self.head, final)[0]
        if self.breakdown is not None:
            self.breakdown["total"] = self.breakdown.get("total", 0.0) + time.perf_counter() - started
            self.breakdown["steps"] = self.breakdown.get("steps", 0) + 1
        return logits

    def rope(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``(cos, sin)`` (``[positions, head_dim]``, contiguous) per attention kind: rows of tables computed once for
        every position up to the longest seen (the model's own rotary module over ``arange``), except for rotary
        types that depend on the sequence length (``dynamic``, ``longrope``), computed per call."""
        flat = positions.reshape(-1)
        probe = torch.zeros(1, 1, 1, dtype=torch.float32)  # the rotary module reads only its dtype and device
        if not self._static_rope:
            return {kind: (cos[0].contiguous(), sin[0].contiguous())
                    for kind, (cos, sin) in self.layout.rope(probe, flat.view(1, -1)).items()}
        longest = int(flat.max()) + 1
        if longest > self._rope_length:
            self._grow_rope(longest)
        return {kind: (cos.index_select(0, flat), sin.index_select(0, flat))
                for kind, (cos, sin) in self._rope_tables.items()}

    def _grow_rope(self, longest: int) -> None:
        """Rotary tables for every position below ``longest`` at least (doubling, so growth is rare)."""
        probe = torch.zeros(1, 1, 1, dtype=torch.float32)  # the rotary module reads only its dtype and device
        self._rope_length = max(longest, 2 * self._rope_length, 256)
        self._rope_tables = {kind: (cos[0].contiguous(), sin[0].contiguous()) for kind, (cos, sin) in
                             self.layout.rope(probe, torch.arange(self._rope_length).view(1, -1)).items()}
        if self.token_inputs is not None:
            self.token_inputs.set_rope([self._rope_tables[kind] for kind in self.kinds])

    def _inputs(self, tokens: torch.Tensor, columns: torch.Tensor, pad: torch.Tensor):
        """For ``n`` tokens, their cache columns and their rows' left padding (each ``[n]``): the embedded tokens,
        the rotary rows per attention kind and each token's first attended column per attention kind."""
        layout, n = self.layout, tokens.numel()
        hidden = layout.embed(tokens.view(1, n)).view(n, -1).float().contiguous()
        first = {"full_attention": pad.contiguous()}
        if layout.sliding_window is not None:  # a query at column c sees keys after c - window
            first[SLIDING] = torch.maximum(pad, columns - layout.sliding_window + 1).contiguous()
        return hidden, self.rope(columns - pad), first

    def _by_kind(self, rope: dict, first: dict) -> tuple[list, list]:
        """Rotary tables and first columns in the program's kind order (full attention's columns for a kind
        without its own)."""
        return [rope[kind] for kind in self.kinds], [first.get(kind, first["full_attention"]) for kind in self.kinds]

    def _run(self, kind: str, function: Callable, *args):
        if self.breakdown is None:
            return function(*args)
        started = time.perf_counter()
        result = function(*args)
        self.breakdown[kind] = self.breakdown.get(kind, 0.0) + time.perf_counter() - started
        self.breakdown["calls"] = self.breakdown.get("calls", 0) + 1
        return result
