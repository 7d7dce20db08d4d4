"""The engine: prefill, a (compilable) one-token decode step, and tree forwards, on a static cache.

In the spirit of gpt-fast (https://github.com/pytorch-labs/gpt-fast): the whole decode
path is a few functions over pre-allocated tensors. Three operations:

- :meth:`Engine.prefill` — the (left-padded) prompts, eager, last-position logits;
- :meth:`Engine.decode` — one token per row at the next cache column, fixed shapes, so it
  can be compiled once per (batch, capacity, layer subset) and reused;
- :meth:`Engine.forward` — ``k`` tokens arranged as a chain or a token tree (``parents``)
  after the committed prefix, *not* committed: speculative strategies verify a draft with
  it and then keep the accepted entries with :meth:`StaticKVCache.commit`.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from effinfer.core.engines import StepOutput, tree_geometry
from effinfer.core.generation import positions_from_mask
from effinfer.plugins.system.engine.cache import StaticKVCache, round_capacity
from effinfer.plugins.system.engine.compile import CompiledStep
from effinfer.plugins.system.engine.forward import DecoderLayout, decoder_forward, lm_logits
from effinfer.plugins.system.engine.native_step import NativeStep, native_problem, weight_pointers


#: decode-step implementations: ``auto`` = the native CPU step where it runs (float32 CPU model, eager), else
#: torch's; ``native`` = the same, warning when it cannot run; ``torch`` = always the torch step
KERNEL_CHOICES = ("auto", "native", "torch")
#: rows one native decode call takes (larger batches use the torch step)
MAX_NATIVE_BATCH = 8
#: node counts a compiled tree forward is padded to (one compiled graph per bucket)
TREE_BUCKETS = (16, 32, 64, 128)


def tree_width(nodes: int) -> int:
    """Columns a forward of ``nodes`` nodes may occupy (its padding bucket when compiled)."""
    return next((b for b in TREE_BUCKETS if b >= nodes), nodes)


class Engine:
    """A Llama, Qwen2 or Gemma 3 model decoded over a static KV cache (see the module docstring)."""

    def __init__(self, model: nn.Module, compile: bool = False, compile_mode: str | None = None,
                 kernels: str = "auto") -> None:
        # a weak reference: the process-wide engine table is keyed weakly by the model, so an
        # engine must not keep its model (and the model's static buffers) alive
        self._model = weakref.ref(model)
        self.layout = DecoderLayout.of(model)
        parameter = next(model.parameters())
        self.dtype, self.device = parameter.dtype, parameter.device
        self.compile = compile
        self.compile_mode = compile_mode
        self._steps: dict[tuple[int, ...] | None, CompiledStep] = {}
        self._tree_steps: dict[tuple[int, ...] | None, CompiledStep] = {}
        self._caches: dict[str, StaticKVCache] = {}
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels={kernels!r}: use one of {KERNEL_CHOICES}")
        self.kernels = kernels
        #: why the native decode step does not run (``None`` while it does or has not been tried)
        self.native_reason: str | None = None
        self._native: NativeStep | None = None
        self._native_tried = False

    @property
    def model(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this engine has been freed")
        return model

    # ------------------------------------------------------------------ cache

    def cache_for(self, batch: int, tokens: int, name: str = "default") -> StaticKVCache:
        """The cache called ``name``, for ``batch`` rows of up to ``tokens`` tokens.

        It is reused while it fits (so compiled steps keep their shapes); users that must not
        share buffers (a target and its draft on the same model) use different names.
        """
        cache = self._caches.get(name)
        if cache is None or not cache.fits(batch, tokens):
            self._caches.pop(name, None)  # free the old buffers before allocating
            cache = StaticKVCache.allocate(self.layout.num_layers, batch, self.layout.num_kv_heads,
                                           round_capacity(tokens), self.layout.head_dim, self.dtype, self.device)
            self._caches[name] = cache
        return cache

    # ------------------------------------------------------------------ prefill

    @torch.inference_mode()
    def prefill(self, cache: StaticKVCache, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> StepOutput:
        """Run left-padded prompts into a fresh ``cache``; last-position logits and hidden (``B × 1 × …``)."""
        prompt = input_ids.shape[1]
        cache.reset(attention_mask)
        cache.check_room(prompt)
        columns = torch.arange(cache.capacity, device=self.device)
        rows = torch.arange(prompt, device=self.device)
        causal = columns[None, :] <= rows[:, None]
        # a padding query sees only itself, so no row of the mask is empty (no NaN)
        mask = (causal[None] & cache.not_pad[:, None, :]) | (columns[None, None, :] == rows[None, :, None])
        hidden = decoder_forward(self.layout, input_ids, positions_from_mask(attention_mask), rows, mask,
                                 cache.keys, cache.values, matmul=self.prefill_matmul(),
                                 key_positions=columns[None, :] - cache.pad[:, None])
        cache.length = prompt
        if self._native is not None and self._native.pointers != weight_pointers(self.layout):
            self._native, self._native_tried = None, False  # a technique replaced weights since it was built
        last = hidden[:, -1:]
        return StepOutput(lm_logits(self.layout, last, self.small_matmul()), last)

    # ------------------------------------------------------------------ decode step

    @torch.inference_mode()
    def decode(self, cache: StaticKVCache, tokens: torch.Tensor, layers: Sequence[int] | None = None,
               start: int | None = None) -> torch.Tensor:
        """Logits (``B × V``) after feeding one token per row at column ``start`` (default: the next).

        With the default ``start`` the token is committed (``cache.length`` grows); an
        explicit ``start`` writes a speculative entry (self-speculative drafting).
        """
        slot = cache.length if start is None else start
        cache.check_room(slot + 1 - cache.length)
        native = self.native_step()
        if native is not None and tokens.numel() == cache.batch <= MAX_NATIVE_BATCH and slot >= 0:
            logits = native(tokens, slot, cache.keys, cache.values, cache.pad, layers)
            if start is None:
                cache.length += 1
            return logits
        step = self.decode_step(layers)
        logits = step(tokens.view(-1, 1), torch.tensor([slot], device=self.device), cache.keys, cache.values,
                      cache.not_pad, cache.pad)
        if start is None:
            cache.length += 1
        return logits

    def native_step(self) -> NativeStep | None:
        """The native CPU decode step when it runs this model (built on first use), else ``None``."""
        if not self._native_tried:
            self._native_tried = True
            if self.kernels == "torch" or self.compile:
                self.native_reason = "kernels='torch'" if self.kernels == "torch" else "the compiled step runs"
            else:
                self.native_reason = native_problem(self.layout, self.model)
                if self.native_reason is None:
                    self._native = NativeStep(self.layout, self.model)
                elif self.kernels == "native":
                    warnings.warn(f"the native decode step cannot run: {self.native_reason}; using the torch step",
                                  RuntimeWarning, stacklevel=3)
        return self._native

    def small_matmul(self) -> str:
        """How the torch forwards multiply calls of up to 8 rows (speculative verification, short prompts):
        ``native`` when the native step runs this model (same autotuned kernels), else ``library``."""
        return "native" if self.native_step() is not None and self.native_step().dense_path == "native" \
            else "library"

    def prefill_matmul(self) -> str:
        """How a prefill multiplies its prompt: ``native_gemm`` when the native step runs this model and the
        autotune measured the native blocked GEMM fastest for a prompt here, else as :meth:`small_matmul`."""
        step = self.native_step()
        return "native_gemm" if step is not None and step.prefill_path == "native" else self.small_matmul()

    def decode_step(self, layers: Sequence[int] | None = None) -> CompiledStep:
        key = None if layers is None else tuple(layers)
        if key not in self._steps:
            name = "decode step" + ("" if key is None else f" (layers {list(key)})")
            self._steps[key] = CompiledStep(partial(self._decode, layers=key, matmul="library"),
                                            partial(self._decode, layers=key, matmul="sum"),
                                            self.compile, name, self.compile_mode)
        return self._steps[key]

    def _decode(self, tokens: torch.Tensor, slot: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                not_pad: torch.Tensor, pad: torch.Tensor, layers: tuple[int, ...] | None, matmul: str
                ) -> torch.Tensor:
        columns = torch.arange(keys.shape[3], device=keys.device)
        mask = (not_pad & (columns <= slot))[:, None, :]
        positions = slot[None, :] - pad[:, None]
        hidden = decoder_forward(self.layout, tokens, positions, slot, mask, keys, values, layers, matmul,
                                 key_positions=columns[None, :] - pad[:, None])
        return lm_logits(self.layout, hidden[:, -1], matmul)

    # ------------------------------------------------------------------ chains and trees

    @torch.inference_mode()
    def forward(self, cache: StaticKVCache, tokens: torch.Tensor, parents: Sequence[int] | None = None,
                start: int | None = None, layers: Sequence[int] | None = None) -> StepOutput:
        """Feed ``tokens`` (``B × k``) as a chain or tree after column ``start``; nothing is committed.

        When compiling, the input is padded to a bucket of :data:`TREE_BUCKETS` nodes (padding
        nodes attend only to themselves and are never committed), so one compiled graph
        serves every tree up to that size.
        """
        start = cache.length if start is None else start
        batch, k = tokens.shape
        if self._native_chain(cache, tokens, parents, start):
            logits, hidden = self._native.chain(tokens, start, cache.keys, cache.values, cache.pad, layers)
            return StepOutput(logits, hidden)
        width = tree_width(k) if self.compile else k
        if start + width > cache.capacity:
            raise RuntimeError(f"static KV cache full: {start} + {width} tokens > capacity {cache.capacity}")
        depth, tree = tree_geometry(parents, k, self.device)
        if width > k:
            tokens = torch.cat([tokens, tokens.new_zeros(batch, width - k)], dim=1)
            depth = torch.cat([depth, depth.new_zeros(width - k)])
            tree = torch.block_diag(tree, torch.eye(width - k, dtype=torch.bool, device=self.device))
        mask = cache.prefix_mask(start)[:, None, :].expand(batch, width, cache.capacity).clone()
        mask[:, :, start:start + width] = tree
        positions = (start - cache.pad)[:, None] + depth[None, :]
        slots = torch.arange(start, start + width, device=self.device)
        key_positions = torch.arange(cache.capacity, device=self.device)[None, :] - cache.pad[:, None]
        key_positions[:, start:start + width] = positions
        logits, hidden = self.tree_step(layers)(tokens, positions, slots, mask, cache.keys, cache.values,
                                                key_positions)
        return StepOutput(logits[:, :k], hidden[:, :k])

    def _native_chain(self, cache: StaticKVCache, tokens: torch.Tensor, parents: Sequence[int] | None,
                      start: int) -> bool:
        """Whether :meth:`forward` runs ``tokens`` through the native program's chain step: one row, a chain of at
        most :data:`MAX_NATIVE_BATCH` tokens that fits the cache, and a native step with a program."""
        batch, k = tokens.shape
        if batch != 1 or cache.batch != 1 or not 1 <= k <= MAX_NATIVE_BATCH or start < 0 or \
                start + k > cache.capacity or (parents is not None and list(parents) != list(range(-1, k - 1))):
            return False
        native = self.native_step()
        return native is not None and native.program is not None

    def tree_step(self, layers: Sequence[int] | None = None) -> CompiledStep:
        key = None if layers is None else tuple(layers)
        if key not in self._tree_steps:
            step = partial(self._tree, layers=key)
            self._tree_steps[key] = CompiledStep(step, step, self.compile, "tree step", self.compile_mode)
        return self._tree_steps[key]

    def _tree(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor,
              keys: torch.Tensor, values: torch.Tensor, key_positions: torch.Tensor, layers: tuple[int, ...] | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        matmul = self.small_matmul()
        hidden = decoder_forward(self.layout, tokens, positions, slots, mask, keys, values, layers, matmul,
                                 key_positions=key_positions)
        return lm_logits(self.layout, hidden, matmul), hidden

    # ------------------------------------------------------------------ reporting

    def compile_report(self) -> dict[str, object]:
        """Compile wall time per step function and shape, and any failure."""
        return {
            "enabled": self.compile,
            "seconds": sum(step.total_compile_seconds for step in [*self._steps.values(),
                                                                     *self._tree_steps.values()]),
            "steps": {step.name: {"active": step.active, "failure": step.failure,
                                  "compile_seconds": round(step.total_compile_seconds, 2),
                                  "shapes": len(step.compile_seconds)}
                      for step in [*self._steps.values(), *self._tree_steps.values()]},
        }
