"""MoEfication: each FFN of a pretrained model split into experts, top-k experts per token.

Zhang, Lin, Liu, Li, Sun & Zhou, "MoEfication: Transformer Feed-forward Layers are
Mixtures of Experts", arXiv:2110.01786. A dense FFN ``y = W_down (act(W_gate x) ⊙ W_up x)``
is, exactly, the sum over any partition of its ``I`` intermediate neurons into ``E`` groups
of ``m = I / E`` neurons of each group's own small FFN. The conversion:

1. **Split** (per decoder layer): a balanced clustering of the neurons into ``E`` equal
   experts — of their weights (``clustering='weights'``: the normalised gate and up rows,
   MoEfication's parameter clustering) or of their co-activations on calibration text
   (``'coactivation'``: each neuron's ``|act(g)·u|`` over the calibration tokens, so
   neurons that fire together share an expert and a token's activation mass concentrates
   in few experts). Balanced k-means: Lloyd iterations on cosine similarity whose
   assignment step fills each expert to exactly ``m`` neurons (most confident neurons
   first). The neurons are **permuted once** so that each expert is a contiguous slice:
   gate/up rows stored as ``E × 2m × hidden``, down columns as ``E × m × hidden``.
2. **Route**: a router per layer (linear, or a two-layer MLP with ``router_hidden`` units
   as in the paper) trained on the layer's calibration FFN inputs to predict each expert's
   share of the activation energy ``‖h_e(x)‖² / Σ_e ‖h_e(x)‖²`` (soft cross-entropy),
   through the shared training loop; the run record gives its top-k recall (the fraction
   of the activation energy held by the experts it picks) on the calibration tokens.
3. **Run top-k**: per token the ``top_k`` experts of highest router score are computed and
   summed (MoEfication does not weight experts: they are pieces of one FFN). One token
   (decode): the chosen experts, sorted and merged into runs of neighbours, are read in place
   (no gather copy: ``index_select`` of the weights cost as much as the dense FFN on this CPU),
   two matrix-vector products per run, so FFN compute and weight reads fall to
   ``top_k / E`` plus the router. Several tokens (prefill, batches): one small GEMM per expert over the tokens that
   chose it.

Optionally the experts' weights are then repaired end to end against the original model
(the shared service :mod:`~effinfer.plugins.model.structure.repair`, ``repair_steps > 0``);
the routers stay fixed (top-k is not differentiable). ``experts=1`` or ``top_k=experts`` is
the dense FFN exactly (no router is built).
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from effinfer.core import Feature, Paper, Requirement, Technique, hookimpl
from effinfer.core.stages import ModelStage
from effinfer.plugins.model.quantization.config import CalibrationConfig
from effinfer.plugins.model.quantization.layerwise import decoder_layers, first_layer_inputs, run_layer, watch_inputs
from effinfer.plugins.model.structure.repair import Conversion, RepairConfig, repair_technique
from effinfer.plugins.model.training import train

__all__ = ["MoEFFN", "MoEfication", "balanced_kmeans", "ffn_parts"]

GATED_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")


def ffn_parts(mlp: nn.Module, where: str = "") -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Module]:
    """``(gate, up, down, act)`` of a gated FFN (Llama, Qwen2, Gemma 3); a clear error for others."""
    missing = [name for name in GATED_PARTS if not hasattr(mlp, name)]
    if missing or not all(isinstance(getattr(mlp, n), nn.Linear) for n in GATED_PARTS[:3]):
        raise ValueError(f"moefication needs a gated FFN with nn.Linear gate_proj/up_proj/down_proj and act_fn "
                         f"(Llama, Qwen2, Gemma 3); {where or 'this'} FFN {type(mlp).__name__} "
                         + (f"lacks {', '.join(missing)}" if missing else "has non-linear (quantized?) projections")
                         + " — apply moefication before quantizers")
    return mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn


def divisors_near(n: int, around: int, count: int = 6) -> list[int]:
    divisors = [d for d in range(1, min(n, 1024) + 1) if n % d == 0]
    return sorted(sorted(divisors, key=lambda d: (abs(d - around), d))[:count])


# --------------------------------------------------------------------------- splitting


def balanced_assign(scores: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign each row to a column, each column taking exactly ``capacity`` rows, greedily.

    Rows with the largest margin between their best and second-best column go first, each to
    its best column that still has room. ``scores`` is ``n × k`` with ``n = k · capacity``.
    """
    n, k = scores.shape
    if n != k * capacity:
        raise ValueError(f"balanced assignment of {n} rows to {k} columns of {capacity} each is impossible")
    if k == 1:
        return torch.zeros(n, dtype=torch.long)
    top2 = scores.topk(2, dim=1).values
    order = torch.argsort(top2[:, 0] - top2[:, 1], descending=True).tolist()
    preference = torch.argsort(scores, dim=1, descending=True).tolist()
    room = [capacity] * k
    assignment = [0] * n
    for row in order:
        for column in preference[row]:
            if room[column]:
                room[column] -= 1
                assignment[row] = column
                break
    return torch.tensor(assignment, dtype=torch.long)


def balanced_kmeans(features: torch.Tensor, clusters: int, iterations: int = 10, seed: int = 0) -> torch.Tensor:
    """Cluster the rows of ``features`` into ``clusters`` groups of equal size (cosine k-means).

    Returns each row's cluster. ``len(features)`` must be a multiple of ``clusters``.
    """
    n = features.shape[0]
    if clusters < 1 or n % clusters:
        raise ValueError(f"{n} rows do not split into {clusters} equal clusters")
    if clusters == 1:
        return torch.zeros(n, dtype=torch.long)
    x = F.normalize(features.float(), dim=1)
    generator = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=generator)[:clusters]]
    assignment = torch.zeros(n, dtype=torch.long)
    for _ in range(iterations):
        new = balanced_assign(x @ centroids.t(), n // clusters)
        if torch.equal(new, assignment):
            break
        assignment = new
        centroids = F.normalize(torch.zeros_like(centroids).index_add_(0, assignment, x), dim=1)
    return assignment


def neuron_features(gate: nn.Linear, up: nn.Linear, activations: torch.Tensor | None) -> torch.Tensor:
    """What neurons are clustered on: co-activation patterns (``tokens`` columns) or their gate/up rows."""
    if activations is not None:
        return activations.abs().t()
    return torch.cat([F.normalize(gate.weight.detach().float(), dim=1),
                      F.normalize(up.weight.detach().float(), dim=1)], dim=1)


# --------------------------------------------------------------------------- the converted FFN


class MoEFFN(nn.Module):
    """A gated FFN as ``experts`` contiguous neuron groups, ``top_k`` of them run per token.

    ``w_in``: ``E × 2m × hidden`` (each expert's gate rows, then its up rows); ``w_out``:
    ``E × m × hidden`` (its down-projection columns, transposed); ``router``: ``hidden → E``
    scores (``None`` when every expert runs).
    """

    def __init__(self, w_in: torch.Tensor, w_out: torch.Tensor, activation: nn.Module, router: nn.Module | None,
                 top_k: int, b_in: torch.Tensor | None = None, b_out: torch.Tensor | None = None) -> None:
        super().__init__()
        self.experts, double, self.hidden = w_in.shape
        self.expert_size = double // 2
        if router is None and top_k != self.experts:
            raise ValueError("a router is needed unless every expert runs (top_k == experts)")
        self.top_k = top_k
        self.w_in = nn.Parameter(w_in.contiguous(), requires_grad=False)
        self.w_out = nn.Parameter(w_out.contiguous(), requires_grad=False)
        self.b_in = None if b_in is None else nn.Parameter(b_in.contiguous(), requires_grad=False)
        self.b_out = None if b_out is None else nn.Parameter(b_out.contiguous(), requires_grad=False)
        self.activation = activation
        self.router = router

    def extra_repr(self) -> str:
        return f"experts={self.experts}, expert_size={self.expert_size}, top_k={self.top_k}, hidden={self.hidden}"

    def _gated(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.split(self.expert_size, dim=-1)
        return self.activation(gate) * up

    def choose(self, flat: torch.Tensor) -> torch.Tensor:
        """The ``T × top_k`` experts each token runs."""
        return self.router(flat).topk(self.top_k, dim=-1).indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.hidden)
        if self.router is None:  # every expert: the dense FFN, neurons permuted
            out = self._all(flat)
        elif flat.shape[0] == 1:
            out = self._one_token(flat, self.choose(flat)[0])
        else:
            out = self._grouped(flat, self.choose(flat))
        if self.b_out is not None:
            out = out + self.b_out
        return out.reshape(shape)

    def _all(self, flat: torch.Tensor) -> torch.Tensor:
        h = (flat @ self.w_in.reshape(-1, self.hidden).t()).view(-1, self.experts, 2 * self.expert_size)
        if self.b_in is not None:
            h = h + self.b_in
        return self._gated(h).reshape(flat.shape[0], -1) @ self.w_out.reshape(-1, self.hidden)

    def _one_token(self, flat: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """One token: a matrix-vector product per chosen expert, read in place from ``w_in`` (no gather copy),
        and the down projection as one weighted row sum of ``w_out`` (``embedding_bag``), so the op count stays
        ``top_k + O(1)`` — small ops, not bytes, are what a decode step pays for at this size."""
        experts = self._expert_views()
        h = torch.stack([torch.mv(experts[e], flat[0]) for e in chosen.tolist()])  # top_k × 2m
        if self.b_in is not None:
            h = h + self.b_in.index_select(0, chosen)
        gated = self._gated(h).reshape(1, -1)
        neurons = (chosen[:, None] * self.expert_size + self._neuron_offsets(chosen.device)).reshape(1, -1)
        return F.embedding_bag(neurons, self.w_out.view(-1, self.hidden), per_sample_weights=gated, mode="sum")

    def _expert_views(self) -> tuple[torch.Tensor, ...]:
        """``w_in``'s per-expert views, made once per weight storage (views are not free at decode rates)."""
        if torch.is_grad_enabled():
            return self.w_in.unbind(0)
        key = (self.w_in.data_ptr(), self.w_in._version)
        if getattr(self, "_views_key", None) != key:
            self._views, self._views_key = self.w_in.detach().unbind(0), key
        return self._views

    def _neuron_offsets(self, device: torch.device) -> torch.Tensor:
        offsets = getattr(self, "_offsets", None)
        if offsets is None or offsets.device != device:
            offsets = self._offsets = torch.arange(self.expert_size, device=device)
        return offsets

    def _grouped(self, flat: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(flat)
        for expert in range(self.experts):
            rows = (chosen == expert).any(-1).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            h = flat.index_select(0, rows) @ self.w_in[expert].t()
            if self.b_in is not None:
                h = h + self.b_in[expert]
            out.index_add_(0, rows, self._gated(h) @ self.w_out[expert])
        return out

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same output computed densely with non-chosen experts masked (for tests)."""
        flat = x.reshape(-1, self.hidden)
        h = (flat @ self.w_in.reshape(-1, self.hidden).t()).view(-1, self.experts, 2 * self.expert_size)
        if self.b_in is not None:
            h = h + self.b_in
        gated = self._gated(h)
        if self.router is not None:
            mask = torch.zeros(flat.shape[0], self.experts, dtype=gated.dtype, device=gated.device)
            mask.scatter_(1, self.choose(flat), 1.0)
            gated = gated * mask[..., None]
        out = gated.reshape(flat.shape[0], -1) @ self.w_out.reshape(-1, self.hidden)
        return (out if self.b_out is None else out + self.b_out).reshape(x.shape)

    def macs_per_token(self) -> int:
        """Multiply-accumulates per token: the chosen experts' three projections and the router."""
        router = sum(m.weight.numel() for m in self.router.modules() if isinstance(m, nn.Linear)) \
            if self.router is not None else 0
        return 3 * self.hidden * self.expert_size * self.top_k + router


def build_router(hidden: int, experts: int, width: int, like: torch.Tensor) -> nn.Module:
    layers: list[nn.Module] = ([nn.Linear(hidden, experts)] if width == 0 else
                               [nn.Linear(hidden, width), nn.ReLU(), nn.Linear(width, experts)])
    return nn.Sequential(*layers).to(device=like.device, dtype=like.dtype)


def expert_energy(h: torch.Tensor, experts: int) -> torch.Tensor:
    """``T × E``: each expert's share of a token's activation energy (``h`` in expert order)."""
    energy = h.float().pow(2).view(h.shape[0], experts, -1).sum(-1)
    return energy / energy.sum(-1, keepdim=True).clamp_min(1e-30)


def topk_recall(router: nn.Module, x: torch.Tensor, share: torch.Tensor, k: int) -> float:
    """Mean activation-energy share of the experts the router picks."""
    with torch.no_grad():
        picked = router(x).topk(k, dim=-1).indices
    return float(share.gather(1, picked).sum(-1).mean())


# --------------------------------------------------------------------------- the technique


class MoEfication(Technique):
    name = "moefication"
    node = "model.structure.efficient_ffn"
    paper = Paper(title="MoEfication: Transformer Feed-forward Layers are Mixtures of Experts", year=2022,
                  arxiv="2110.01786")
    summary = ("Splits each FFN's neurons into equal experts (balanced clustering of co-activations or weights), "
               "trains a small router per layer on calibration activations, and runs only the top-k experts per "
               "token, gathering their weights: FFN compute falls to top_k/experts plus the router. Optional KD "
               "repair of the experts through the shared repair service.")
    requires = frozenset({Requirement.CALIBRATION_DATA})
    needs_features = frozenset({Feature.DENSE_WEIGHTS})
    bench_config = {"experts": 32, "top_k": 15, "n_samples": 8, "seq_len": 256, "router_steps": 100}

    class Config(CalibrationConfig, RepairConfig):
        experts: int = Field(32, ge=1, le=1024, description="experts per FFN (must divide intermediate_size)")
        top_k: int = Field(15, ge=1, le=1024, description="experts run per token (top_k = experts: the dense FFN; "
                                                               "the default 15 of 32 is 48% of the FFN with the router)")
        clustering: Literal["coactivation", "weights"] = Field(
            "coactivation", description="what the balanced k-means groups neurons by: their |activation| over the "
                                        "calibration tokens, or their normalised gate/up weight rows")
        kmeans_iterations: int = Field(15, ge=1, le=200, description="Lloyd iterations of the balanced k-means")
        coactivation_tokens: int = Field(2048, ge=16, le=65_536, description="calibration tokens whose activations "
                                                                             "describe each neuron (coactivation)")
        router_hidden: int = Field(64, ge=0, le=8192, description="hidden units of the two-layer router (0: a "
                                                                  "linear router)")
        router_steps: int = Field(200, ge=1, le=100_000, description="router training steps per layer")
        router_lr: float = Field(3e-3, gt=0.0, le=1.0, description="router AdamW peak learning rate")
        router_batch: int = Field(256, ge=1, le=65_536, description="calibration tokens per router step")
        seed: int = Field(0, ge=0, description="seed of the clustering and the router's data order")

        @model_validator(mode="after")
        def _k_fits(self) -> Any:
            if self.top_k > self.experts:
                raise ValueError(f"top_k={self.top_k} is more than experts={self.experts}; use top_k ≤ experts")
            return self

    def check_model_config(self, config: Any) -> list[str]:
        size = getattr(config, "intermediate_size", None)
        if isinstance(size, int) and size % self.config.experts:
            return [f"experts={self.config.experts} does not divide intermediate_size={size}; use one of "
                    f"{divisors_near(size, self.config.experts)}"]
        return []

    @hookimpl
    def effinfer_transform_model(self, stage: ModelStage) -> None:
        c = self.config
        problems = self.check_model_config(stage.model.config)
        if problems:
            raise ValueError("moefication: " + "; ".join(problems))
        started = time.perf_counter()
        _, layers = decoder_layers(stage.model)
        for index, layer in enumerate(layers):
            ffn_parts(getattr(layer, "mlp", nn.Identity()), f"layer {index}'s")
        dense = c.top_k == c.experts
        tokens = stage.calibration_batches(c.n_samples, c.seq_len)
        batches = first_layer_inputs(stage.model, tokens, c.batch_size)
        conversion = Conversion(stage.patcher)
        recalls, dense_macs, moe_macs = [], 0, 0
        experts_modules: dict[str, MoEFFN] = {}
        for index, layer in enumerate(layers):
            mlp = layer.mlp
            seen: list[torch.Tensor] = []
            with watch_inputs({"mlp": mlp}, lambda _name, x: seen.append(x.reshape(-1, x.shape[-1]))):
                run_layer(layer, batches)
            x = torch.cat(seen)
            moe, recall = self.convert(mlp, x, index, dense)
            conversion.replace_module(layer, "mlp", moe)
            experts_modules[f"layer{index}"] = moe
            if recall is not None:
                recalls.append(recall)
            dense_macs += 3 * moe.hidden * moe.expert_size * moe.experts
            moe_macs += moe.macs_per_token()
            batches = run_layer(layer, batches)  # later layers calibrate on the converted FFN's outputs
        del batches
        fraction = moe_macs / dense_macs
        self.ffn_fraction = fraction
        self.note(f"MoEfied {len(layers)} FFNs: {c.experts} experts of {moe.expert_size} neurons, top-{c.top_k} per "
                  f"token ({c.clustering} clustering, {'no router' if dense else f'router hidden {c.router_hidden}'}); "
                  f"FFN compute per token {fraction:.1%} of dense (router included)"
                  + (f"; router top-k recall of activation energy on calibration tokens {sum(recalls) / len(recalls):.3f}"
                     f" (mean over layers, min {min(recalls):.3f})" if recalls else "")
                  + f"; converted on {tokens.shape[0]}×{tokens.shape[1]} tokens in {time.perf_counter() - started:.1f} s")
        if c.repair_steps:
            parameters = {f"{name}.{p}": getattr(m, p) for name, m in experts_modules.items()
                          for p in ("w_in", "w_out")}
            repair_technique(self, stage.model, stage.tokenizer, parameters, conversion)
        conversion.release()

    def convert(self, mlp: nn.Module, x: torch.Tensor, index: int, dense: bool) -> tuple[MoEFFN, float | None]:
        """One FFN as a :class:`MoEFFN`, and its router's top-k recall (``None`` without a router)."""
        c = self.config
        gate, up, down, act = ffn_parts(mlp)
        size = gate.out_features
        with torch.no_grad():
            h = act(gate(x)) * up(x)  # T × I
        if c.experts == 1 or dense:
            order = torch.arange(size)
        else:
            sample = x.shape[0] if c.clustering == "weights" else min(c.coactivation_tokens, x.shape[0])
            picked = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(c.seed))[:sample]
            features = neuron_features(gate, up, h[picked].cpu() if c.clustering == "coactivation" else None)
            assignment = balanced_kmeans(features.cpu(), c.experts, c.kmeans_iterations, c.seed + index)
            order = torch.argsort(assignment, stable=True)
        order = order.to(gate.weight.device)
        m = size // c.experts
        with torch.no_grad():
            g, u = gate.weight[order].view(c.experts, m, -1), up.weight[order].view(c.experts, m, -1)
            w_in = torch.cat([g, u], dim=1)
            w_out = down.weight[:, order].t().reshape(c.experts, m, -1)
            b_in = None
            if gate.bias is not None or up.bias is not None:
                zeros = torch.zeros(size, dtype=w_in.dtype, device=w_in.device)
                gb = (gate.bias if gate.bias is not None else zeros)[order].view(c.experts, m)
                ub = (up.bias if up.bias is not None else zeros)[order].view(c.experts, m)
                b_in = torch.cat([gb, ub], dim=1)
            b_out = None if down.bias is None else down.bias.detach().clone()
        router, recall = None, None
        if not dense:
            router = build_router(x.shape[1], c.experts, c.router_hidden, gate.weight)
            share = expert_energy(h[:, order], c.experts)
            recall = self.train_router(router, x, share, index)
        return MoEFFN(w_in.clone(), w_out.clone(), act, router, c.top_k, b_in, b_out), recall

    def train_router(self, router: nn.Module, x: torch.Tensor, share: torch.Tensor, index: int) -> float:
        """Soft cross-entropy of the router's scores to the experts' energy shares; its top-k recall."""
        c = self.config
        generator = torch.Generator().manual_seed(c.seed + 1000 + index)
        x = x.detach()

        def batches():
            while True:
                yield torch.randint(0, x.shape[0], (min(c.router_batch, x.shape[0]),), generator=generator).to(x.device)

        def loss_fn(rows: torch.Tensor) -> torch.Tensor:
            logits = router(x.index_select(0, rows)).float()
            return -(share.index_select(0, rows) * F.log_softmax(logits, -1)).sum(-1).mean()

        for parameter in router.parameters():
            parameter.requires_grad_(True)
        train(dict(router.named_parameters()), loss_fn, batches(), c.router_steps, lr=c.router_lr,
              warmup=max(1, c.router_steps // 10), description=f"moefication: router of layer {index}")
        router.eval()
        for parameter in router.parameters():
            parameter.requires_grad_(False)
        return topk_recall(router, x, share, c.top_k)

