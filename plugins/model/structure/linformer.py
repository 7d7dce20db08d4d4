"""Linformer-style low-rank attention, made causal as a bounded memory of ``r`` slots (ABC), with an
optional exact sliding window.

Wang, Li, Khabsa, Fang & Ma, "Linformer: Self-Attention with Linear Complexity", arXiv:2006.04768,
project the ``n`` keys and values along the sequence to a fixed ``r`` rows, ``K̃ = EK``, ``Ṽ = FV``
(``E, F ∈ R^{r×n}`` learned, or a mean pooling), and attend over those ``r`` rows. A causal decoder
cannot use a fixed ``E`` over the whole sequence: row ``s`` of ``EK`` mixes future keys. Peng,
Kasai, Pappas, Yogatama, Wu, Kong, Schwartz & Smith, "ABC: Attention with Bounded-memory Control",
arXiv:2110.02488 (ACL 2022), §3, write such methods as a memory of ``r`` slots written token by
token — slot weights ``φⱼ ∈ R^r`` per token, ``K̃ᵢ = Σⱼ≤ᵢ φⱼ kⱼᵀ``, ``Ṽᵢ = Σⱼ≤ᵢ φⱼ vⱼᵀ`` — and show
Linformer as the case of fixed, position-based ``φ``. That causal form is what this module runs:

- ``projection: pooled`` — Linformer's pooling projection made causal: token ``j`` (its position
  counted over the row's real tokens) is written to slot ``min(⌊j / pool_block⌋, r − 1)`` (after the
  ``sinks`` below: ``sinks + ⌊(j − sinks) / pool_block⌋``), so a slot is the mean of the keys (values)
  of ``pool_block`` consecutive positions and the last slot takes every later one;
- ``projection: learned`` — ``φⱼ = softmax(W k̂ⱼ + b)`` over the ``r − sinks`` other slots per KV
  head (``k̂ⱼ``: the unit-normalised key before the rotary embedding; ``W`` random at the start,
  trained), ABC's learned control in the place of Linformer's learned ``E``;
- ``sinks`` (default 1): the first tokens of each row keep a slot each, so their keys stay exact —
  the attention sinks of Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
  arXiv:2309.17453. Averaged into a block, SmolLM2's first token (which many heads attend to
  heavily) becomes an ordinary mean key: on layer 20 with 256-token windows the pooled layer's
  relative output error is 1.95 without a sink slot, 0.05 with one (before any fit).

The memory keeps the mass of each slot, ``mᵢ = Σⱼ≤ᵢ φⱼ``, next to the sums, so a slot reads as the
*mean* key ``K̃ᵢ/mᵢ`` and mean value ``Ṽᵢ/mᵢ`` of what was written to it, and stands for ``mᵢ``
tokens in the softmax: ``yᵢ = Σₛ mᵢₛ e^{ŝᵢₛ} Ṽᵢₛ/mᵢₛ / Σₛ mᵢₛ e^{ŝᵢₛ}`` with
``ŝᵢₛ = qᵢ·K̃ᵢₛ/(mᵢₛ√d) + βₕ`` (``βₕ`` a learned per-head bias of the memory, 0 at the start). With
one token per slot (``pool_block`` 1, ``r`` ≥ the length, ``β = 0``) this is softmax attention exactly. With
``window > 0`` the last ``window`` keys stay exact and only older ones are in the memory, in one
softmax with them (as LoLCATs' window, arXiv:2410.10254, does for linear attention): with
``window`` ≥ the context the layer *is* the softmax attention it replaces. The state per replaced
layer is ``K̃, Ṽ`` (``r × d`` each per KV head), ``m`` and the window's keys/values: constant in the
context length. The conversion copies the layer's q/k/v/o (rotary embedding and Gemma 3's q/k
norms kept) and fits the new parameters (``W, b, β``) layer-wise, then repairs end to end with KD,
through :mod:`~effinfer.plugins.model.structure.repair`; the state mechanism (chunked parallel
prefill, recurrent decode, state in the HF cache) is :mod:`~effinfer.plugins.model.structure.recurrent`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from effinfer.core import Paper
from effinfer.plugins.model.structure.alternates import AlternateTechnique, AlternateTechniqueConfig
from effinfer.plugins.model.structure.recurrent import RecurrentMixer, apply_rope, masked, repeat_heads


class LowRankAttention(RecurrentMixer):
    """Attention over an exact window plus ``slots`` compressed key/value rows (see the module docstring)."""

    kind = "linformer"

    def __init__(self, attention: nn.Module, config: Any, layer_idx: int, slots: int = 64,
                 projection: str = "learned", window: int = 64, pool_block: int = 128, sinks: int = 1,
                 chunk_size: int = 128, init_scale: float = 2.0, seed: int = 0) -> None:
        super().__init__(attention, config, layer_idx, chunk_size)
        if projection not in ("learned", "pooled"):
            raise ValueError(f"projection must be 'learned' or 'pooled', got {projection!r}")
        if not 0 <= sinks < slots:
            raise ValueError(f"sinks={sinks} must be in 0 … slots − 1 = {slots - 1}")
        self.slots, self.projection, self.window, self.pool_block = slots, projection, window, pool_block
        self.sinks = sinks
        if projection == "learned":
            generator = torch.Generator().manual_seed(seed + layer_idx)
            self.slot_weight = nn.Parameter(torch.randn(self.num_kv_heads, self.head_dim, slots - sinks,
                                                        generator=generator) * init_scale)
            self.slot_bias = nn.Parameter(torch.zeros(self.num_kv_heads, 1, slots - sinks))
        #: β per query head: the log weight of the memory against the exact window
        self.memory_bias = nn.Parameter(torch.zeros(self.num_heads, 1, 1))

    def new_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if n.startswith(("slot_", "memory_"))}

    def slot_weights(self, k: torch.Tensor, valid: torch.Tensor | None, state: dict[str, torch.Tensor]
                     ) -> torch.Tensor:
        """``φ`` (``B × Hkv × T × r``) of keys ``k`` before the rotary embedding; zero for hidden keys.
        Positions are counted over each row's real tokens in ``state["n"]`` (pooled, or sink slots)."""
        batch, _, length, _ = k.shape
        real = (torch.ones(batch, length, dtype=torch.long, device=k.device) if valid is None
                else valid.to(torch.long))
        position = None
        if self.projection == "pooled" or self.sinks:
            seen = state.get("n", torch.zeros(batch, 1, dtype=torch.long, device=k.device))
            state["n"] = seen + real.sum(1, keepdim=True)
            position = (seen + real.cumsum(1) - 1).clamp_min(0)
        if self.projection == "learned":
            unit = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            logits = torch.einsum("bhtd,hdr->bhtr", unit, self.slot_weight.to(k.dtype)) + self.slot_bias.to(k.dtype)
            phi = torch.nn.functional.pad(logits.softmax(-1), (self.sinks, 0))
            if self.sinks:  # the first `sinks` tokens of a row each get a slot of their own
                own = torch.nn.functional.one_hot(position.clamp_max(self.sinks - 1), self.slots).to(k.dtype)
                phi = torch.where((position < self.sinks)[:, None, :, None], own[:, None], phi)
            return masked(phi, valid)
        later = self.sinks + torch.div(position - self.sinks, self.pool_block, rounding_mode="floor")
        slot = torch.where(position < self.sinks, position, later).clamp_max(self.slots - 1)
        phi = torch.nn.functional.one_hot(slot, self.slots).to(k.dtype) * real[..., None].to(k.dtype)
        return phi[:, None].expand(-1, self.num_kv_heads, -1, -1)

    def features(self, x: torch.Tensor, rope: Any, valid: torch.Tensor | None, state: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
        q, k, v = self.heads(x, None)
        ones = torch.ones(x.shape[0], 1, x.shape[1], dtype=x.dtype, device=x.device)
        return {"q": apply_rope(q, rope), "k": apply_rope(k, rope), "v": v,
                "phi": self.slot_weights(k, valid, state), "valid": masked(ones, valid)}

    def parallel(self, feats: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        q = feats["q"]
        batch, heads, length, dim = q.shape
        names = ("k", "v", "phi", "valid")
        if "wk" in state:  # the exact window carried over from the tokens before this chunk
            keys, values, phi, valid = (torch.cat([state["w" + n], feats[n]], dim=2) for n in names)
        else:
            keys, values, phi, valid = (feats[n] for n in names)
        total = keys.shape[2]
        device, dtype = q.device, q.dtype
        rel = (total - length + torch.arange(length, device=device))[:, None] - torch.arange(total, device=device)
        keys_h, values_h, phi_h = (repeat_heads(t, self.groups) for t in (keys, values, phi))
        dots = q @ keys_h.transpose(-1, -2)  # B × H × T × total
        # the exact window: softmax logits of the last `window` keys
        exact = (rel >= 0) & (rel < self.window) & (valid[:, :, None, :] > 0)
        s_window = (dots * self.scaling).masked_fill(~exact, float("-inf"))
        # the memory: every key at least `window` behind the query, in its slots (φ is 0 for hidden keys)
        older = (rel >= self.window).to(dtype)
        mass = older @ phi_h  # B × H × T × r
        slot_dot = (dots * older) @ phi_h  # qᵢ·K̃ᵢₛ
        k0, v0, m0 = state.get("mk"), state.get("mv"), state.get("m")
        if k0 is not None:
            mass = mass + repeat_heads(m0, self.groups).unsqueeze(2)
            slot_dot = slot_dot + q @ repeat_heads(k0, self.groups).transpose(-1, -2)
        filled = mass > 0
        s_memory = torch.where(filled, slot_dot * self.scaling / torch.where(filled, mass, torch.ones_like(mass))
                               + self.memory_bias.to(dtype), torch.full_like(mass, float("-inf")))
        top = torch.maximum(s_window.amax(-1, keepdim=True), s_memory.amax(-1, keepdim=True))
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        e_window, e_memory = (s_window - top).exp(), (s_memory - top).exp()
        # Σₛ e^{ŝ} Ṽᵢₛ with Ṽᵢ = Ṽ₀ + Σⱼ older·φⱼ vⱼᵀ, without forming Ṽᵢ per query
        num = e_window @ values_h + ((e_memory @ phi_h.transpose(-1, -2)) * older) @ values_h
        den = e_window.sum(-1) + (e_memory * mass).sum(-1)
        if v0 is not None:
            num = num + e_memory @ repeat_heads(v0, self.groups)
        den = den.unsqueeze(-1)
        y = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))
        # the outgoing state: keys that fall out of the window are written to the memory
        keep = min(self.window, total)
        leaving = total - keep
        kv_heads = keys.shape[1]
        new = {"n": state["n"]} if "n" in state else {}
        mk = k0 if k0 is not None else keys.new_zeros(batch, kv_heads, self.slots, dim)
        mv = v0 if v0 is not None else keys.new_zeros(batch, kv_heads, self.slots, dim)
        m = m0 if m0 is not None else keys.new_zeros(batch, kv_heads, self.slots)
        if leaving:
            written = phi[:, :, :leaving].transpose(-1, -2)  # B × Hkv × r × leaving
            mk = mk + written @ keys[:, :, :leaving]
            mv = mv + written @ values[:, :, :leaving]
            m = m + written.sum(-1)
        new["mk"], new["mv"], new["m"] = mk, mv, m
        if keep:
            for n, t in zip(names, (keys, values, phi, valid)):
                new["w" + n] = t[:, :, leaving:]
        return y, new

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, slots={self.slots}, projection={self.projection}, window={self.window}, "
                f"sinks={self.sinks}" + (f", pool_block={self.pool_block}" if self.projection == "pooled" else ""))


class Linformer(AlternateTechnique):
    name = "linformer"
    node = "model.structure.efficient_attention.low_complexity.low_rank"
    paper = Paper(title="Linformer: Self-Attention with Linear Complexity", year=2020, arxiv="2006.04768")
    summary = ("Replaces softmax attention in chosen layers by Linformer-style low-rank attention made causal as "
               "ABC's bounded memory: older keys and values are written into r slots (mean-pooled by position, or "
               "routed by a learned softmax projection) and each query attends over the slots plus an exact "
               "sliding window; decoding keeps a constant-size state instead of a growing KV cache.")
    bench_config = {"count": 2, "slots": 16, "window": 16, "fit_steps": 20, "fit_samples": 4, "repair_steps": 0}

    class Config(AlternateTechniqueConfig):
        slots: int = Field(64, ge=1, le=4096, description="r: compressed key/value rows per KV head (Linformer's "
                                                          "projected length, ABC's memory size)")
        projection: Literal["learned", "pooled"] = Field(
            "learned", description="how tokens are written to the slots: 'learned' (φ = softmax(W k̂ + b) over the "
                                   "slots, trained) or 'pooled' (slot ⌊position / pool_block⌋, a running mean pool)")
        window: int = Field(64, ge=0, le=4096, description="most recent keys kept exact (softmax) before the "
                                                           "compressed memory (0: memory only)")
        pool_block: int = Field(128, ge=1, le=65536, description="positions per slot of the pooled projection "
                                                                 "(slots × pool_block positions are covered; later "
                                                                 "ones go to the last slot); unused when learned")
        sinks: int = Field(1, ge=0, le=4095, description="first tokens of each row that keep a slot of their own "
                                                         "(exact keys: attention sinks, as in StreamingLLM); "
                                                         "must be < slots")

        @model_validator(mode="after")
        def _sinks_below_slots(self) -> Linformer.Config:
            if self.sinks >= self.slots:
                raise ValueError(f"sinks={self.sinks} must be < slots={self.slots} (the other slots hold the rest)")
            return self

    def build(self, attention: nn.Module, model_config: Any, index: int) -> RecurrentMixer:
        config = self.config
        return LowRankAttention(attention, model_config, index, config.slots, config.projection, config.window,
                                config.pool_block, config.sinks, config.chunk_size)

    def describe_state(self, mixer: RecurrentMixer) -> str:
        return (f"state per replaced layer: {mixer.slots} {mixer.projection} slots of keys and values "
                f"({mixer.sinks} of them for the first tokens) × "
                f"{mixer.num_kv_heads} KV heads" + (f" + an exact window of {mixer.window} keys/values"
                                                     if mixer.window else ""))
