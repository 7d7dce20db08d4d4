"""One forward over a mixed batch of prefill chunks and decode tokens, on the paged KV cache.

The weights stay in the Hugging Face modules (read through the static engine's
:class:`~effinfer.plugins.system.engine.forward.DecoderLayout`, so Llama, Qwen2 and Gemma 3
layouts run, and a model-level technique that swapped linear layers is honoured); the
attention is re-written to read and write the paged pool. All new tokens of the step are
packed in one row (``1 × N``) through the projections and MLPs — one GEMM per weight for
the whole batch, which is what continuous batching buys — and attention is computed per
group: every decode token of the step in one padded batch, every prefill chunk on its own
(its queries see the sequence's cached prefix and the chunk causally).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from effinfer import kernels
from effinfer.kernels import BACKENDS, backend_for
from effinfer.plugins.system.engine.forward import (SLIDING, DecoderLayout, UnsupportedModel, apply_rotary,
                                                    mlp_forward, project)
from effinfer.plugins.system.serving.paged import PagedKVCache, paged_attention

__all__ = ["StepBatch", "Segment", "PagedForward", "UnsupportedModel"]


@dataclass
class Segment:
    """Rows ``start … start+length-1`` of the packed step: new tokens of one sequence."""

    seq: object
    start: int
    length: int
    #: position of the first new token (= tokens already in the cache)
    position: int


@dataclass
class StepBatch:
    tokens: list[int]
    segments: list[Segment]


class PagedForward:
    """The decoder of ``model`` over a :class:`PagedKVCache` (see the module docstring).

    ``attention_kernel`` picks how decode tokens attend over the pool: ``"torch"`` gathers their
    slots and runs SDPA (the plain-torch reference); a backend of :mod:`effinfer.kernels`
    (``"triton"``, ``"cpu"``, ``"reference"``) runs its ``paged_decode_attention`` on the pool seen as
    ``[blocks, kv_heads, block_size, head_dim]`` pages, in place; ``"auto"`` is the Triton kernel on CUDA
    and the plain-torch path elsewhere. Prefill chunks and sliding-window layers always take the
    plain-torch path (the kernel has neither a causal chunk nor a window).
    """

    def __init__(self, model: nn.Module, attention_kernel: str = "auto") -> None:
        self.layout = DecoderLayout.of(model)
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        if attention_kernel == "auto":
            attention_kernel = "triton" if backend_for(self.device) == "triton" else "torch"
        if attention_kernel not in ("torch", *BACKENDS):
            raise ValueError(f"attention_kernel={attention_kernel!r}: use auto, torch or one of {BACKENDS}")
        self.attention_kernel = attention_kernel

    def new_cache(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> PagedKVCache:
        layout = self.layout
        return PagedKVCache(layout.num_layers, layout.num_kv_heads, layout.head_dim, num_blocks, block_size,
                            self.dtype, self.device, prefix_caching)

    @torch.inference_mode()
    def __call__(self, cache: PagedKVCache, batch: StepBatch, write_slots: torch.Tensor,
                 rows: list[int]) -> torch.Tensor:
        """Float32 logits (``len(rows) × V``) of the packed rows ``rows``; K/V of every new token
        go to ``write_slots`` (already reserved in ``cache``)."""
        layout, device = self.layout, self.device
        positions = torch.cat([torch.arange(s.position, s.position + s.length) for s in batch.segments])
        positions = positions.to(device)
        groups = self._groups(cache, batch)
        hidden = layout.embed(torch.tensor([batch.tokens], device=device))
        rope = layout.rope(hidden, positions[None])
        for index, layer in enumerate(layout.layers):
            kind = layout.layer_types[index]
            cos, sin = rope[kind]
            x = layer.input_layernorm(hidden)
            attended = self._attention(layer.self_attn, index, x, cos, sin, cache, write_slots, groups,
                                       kind == SLIDING)
            if layout.sandwich_norms:
                hidden = hidden + layer.post_attention_layernorm(attended)
                hidden = hidden + layer.post_feedforward_layernorm(
                    mlp_forward(layer.mlp, layer.pre_feedforward_layernorm(hidden), False))
            else:
                hidden = hidden + attended
                hidden = hidden + mlp_forward(layer.mlp, layer.post_attention_layernorm(hidden), False)
        last = layout.norm(hidden[0, rows])
        return project(layout.lm_head, last, False).float()

    def _groups(self, cache: PagedKVCache, batch: StepBatch) -> list[dict]:
        """Attention groups: decodes padded together, each prefill chunk alone; slots and masks
        (full and sliding-window) computed once per step, shared by the layers."""
        device, window = self.device, self.layout.sliding_window
        groups = []
        decodes = [s for s in batch.segments if s.length == 1]
        if decodes:
            longest = max(s.position + 1 for s in decodes)
            slots = torch.zeros(len(decodes), longest, dtype=torch.long, device=device)
            for i, s in enumerate(decodes):
                slots[i, :s.position + 1] = cache.slots_of(s.seq, 0, s.position + 1)
            key_pos = torch.arange(longest, device=device)[None]
            query_pos = torch.tensor([s.position for s in decodes], device=device)[:, None]
            allowed = (key_pos <= query_pos)[:, None]  # B × 1 × T
            near = allowed & (key_pos > query_pos - window)[:, None] if window else allowed
            group = {"rows": torch.tensor([s.start for s in decodes], device=device), "slots": slots,
                     "allowed": allowed, "near": near, "k": 1}
            if self.attention_kernel != "torch":
                group |= self._block_table(cache, decodes)
            groups.append(group)
        for s in batch.segments:
            if s.length == 1:
                continue
            end = s.position + s.length
            key_pos = torch.arange(end, device=device)[None]
            query_pos = torch.arange(s.position, end, device=device)[:, None]
            allowed = (key_pos <= query_pos)[None]  # 1 × k × T
            near = allowed & (key_pos > query_pos - window)[None] if window else allowed
            groups.append({"rows": torch.arange(s.start, s.start + s.length, device=device),
                           "slots": cache.slots_of(s.seq, 0, end)[None], "allowed": allowed, "near": near,
                           "k": s.length})
        return groups

    def _block_table(self, cache: PagedKVCache, decodes: list[Segment]) -> dict[str, torch.Tensor]:
        """The decodes' block tables (``B × max_blocks``, int32, padded with block 0) and context lengths."""
        lengths = [s.position + 1 for s in decodes]
        table = torch.zeros(len(decodes), max(map(cache.blocks_needed, lengths)), dtype=torch.int32)
        for i, (s, n) in enumerate(zip(decodes, lengths)):
            blocks = cache.tables[s.seq].blocks[:cache.blocks_needed(n)]
            table[i, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        return {"table": table.to(self.device), "lengths": torch.tensor(lengths, dtype=torch.int32, device=self.device)}

    def _kernel_decode(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, group: dict,
                       block_size: int, scale: float) -> torch.Tensor:
        """``B × heads × d`` attention of decode queries by :func:`effinfer.kernels.paged_decode_attention`, over
        the pool viewed (no copy) as ``[blocks, kv_heads, block_size, d]`` pages."""
        def pages(pool: torch.Tensor) -> torch.Tensor:
            return pool.view(-1, block_size, *pool.shape[1:]).permute(0, 2, 1, 3)

        return kernels.paged_decode_attention(queries, pages(keys), pages(values), group["table"], group["lengths"],
                                              scale, backend=self.attention_kernel)

    def _attention(self, attention: nn.Module, index: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   cache: PagedKVCache, write_slots: torch.Tensor, groups: list[dict], sliding: bool) -> torch.Tensor:
        layout = self.layout
        n = x.shape[1]
        heads, kv_heads, dim = layout.num_heads, layout.num_kv_heads, layout.head_dim
        q = project(attention.q_proj, x, False).view(1, n, heads, dim).transpose(1, 2)
        key = project(attention.k_proj, x, False).view(1, n, kv_heads, dim).transpose(1, 2)
        value = project(attention.v_proj, x, False).view(1, n, kv_heads, dim).transpose(1, 2)
        if hasattr(attention, "q_norm"):  # Gemma 3
            q, key = attention.q_norm(q), attention.k_norm(key)
        q, key = apply_rotary(q, cos, sin), apply_rotary(key, cos, sin)
        keys, values = cache.keys[index], cache.values[index]
        keys.index_copy_(0, write_slots, key[0].transpose(0, 1).to(keys.dtype))
        values.index_copy_(0, write_slots, value[0].transpose(0, 1).to(values.dtype))
        out = torch.empty(n, heads, dim, dtype=q.dtype, device=q.device)
        queries = q[0].transpose(0, 1)  # N × heads × d
        for group in groups:
            rows = group["rows"]
            if group["k"] == 1 and "table" in group and not sliding:
                out[rows] = self._kernel_decode(queries[rows], keys, values, group, cache.block_size,
                                                attention.scaling).to(out.dtype)
            elif group["k"] == 1:
                group_q = queries[rows][:, :, None]  # B × heads × 1 × d
                result = paged_attention(group_q, keys, values, group["slots"],
                                         group["near" if sliding else "allowed"], attention.scaling)
                out[rows] = result[:, :, 0].to(out.dtype)
            else:
                group_q = queries[rows].transpose(0, 1)[None]  # 1 × heads × k × d
                result = paged_attention(group_q, keys, values, group["slots"],
                                         group["near" if sliding else "allowed"], attention.scaling)
                out[rows] = result[0].transpose(0, 1).to(out.dtype)
        return project(attention.o_proj, out.reshape(1, n, heads * dim), False)
