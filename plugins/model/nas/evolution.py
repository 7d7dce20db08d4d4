"""Evolutionary search over per-layer keep-or-drop and sparsity, under a bytes budget.

A small, honest instance of the search in Real, Aggarwal, Huang & Le, "Regularized
Evolution for Image Classifier Architecture Search", AAAI 2019, arXiv:1802.01548, over
the space the pruning plugins define: every decoder layer is dropped (``layer_drop``'s
:func:`~effinfer.plugins.model.pruning.layer_drop.keep_layers`) or kept with its linear
layers pruned by magnitude to one of ``sparsities`` (``magnitude``'s masks, stored as a
bitmask + values). A candidate's bytes are the decoder's stored bytes (0 for a dropped
layer, bitmask + values for a pruned one, dense otherwise); candidates over
``bytes_budget`` (a fraction of the dense decoder's bytes) are repaired by raising
sparsity or dropping layers. The objective is the perplexity of the candidate on
``eval_samples`` calibration windows (the last ones of a larger seeded draw). Selection is by tournament with aging (the oldest member leaves the
population), offspring by one gene mutation. Every evaluated candidate is kept: the note
reports the best one under the budget, the Pareto front of (bytes, perplexity) it found,
and the search cost (evaluations and seconds).
"""

from __future__ import annotations

import math
import random
import time
from typing import Any, Literal
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from effinfer.core import Feature, Paper, Requirement, Technique, hookimpl
from effinfer.core.stages import ModelStage, ModulePatcher
from effinfer.plugins.model.pruning.layer_drop import keep_layers
from effinfer.plugins.model.pruning.sparse import format_bytes, install, prune_lowest
from effinfer.plugins.model.quantization.layerwise import decoder_layers, linears_of

DROP = -1.0


class NASConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bytes_budget: float = Field(0.7, gt=0.0, le=1.0, description="the decoder layers' stored bytes may be at most "
                                                                 "this fraction of the dense decoder's")
    sparsities: list[float] = Field(default_factory=lambda: [0.0, 0.3, 0.5, 0.7],
                                    description="per-layer magnitude sparsities the search may choose (0 = dense)")
    allow_drop: bool = Field(True, description="a layer may also be dropped entirely")
    population: int = Field(8, ge=2, le=256, description="candidates alive at once")
    evaluations: int = Field(24, ge=2, le=10_000, description="candidates evaluated in all (the search cost)")
    tournament: int = Field(3, ge=1, le=64, description="candidates sampled per parent selection")
    eval_samples: int = Field(4, ge=1, le=512, description="calibration windows scored per candidate")
    seq_len: int = Field(128, ge=16, le=8192, description="tokens per scored window")
    seed: int = Field(0, ge=0, description="search seed")
    execution: Literal["dense", "bitmask"] = Field("bitmask", description="how the chosen candidate's pruned layers "
                                                                          "are stored: 'bitmask' = the bytes the "
                                                                          "budget counted, 'dense' = zeros in float "
                                                                          "(faster on CPU, no bytes saved)")

    @field_validator("sparsities")
    @classmethod
    def _in_range(cls, values: list[float]) -> list[float]:
        if not values or any(not 0.0 <= v < 1.0 for v in values):
            raise ValueError(f"sparsities={values}: give one or more values with 0 ≤ value < 1")
        return sorted(set(values))


class Search:
    """The search state: genomes (one gene per decoder layer) and their (bytes, perplexity)."""

    def __init__(self, stage: ModelStage, config: NASConfig, tokens: torch.Tensor) -> None:
        self.stage, self.config, self.tokens = stage, config, tokens
        self.path, layers = decoder_layers(stage.model)
        self.linears = [linears_of(layer, f"{self.path}.{i}", []) for i, layer in enumerate(layers)]
        self.dense = [sum(m.weight.numel() * m.weight.element_size() for m in ls.values()) for ls in self.linears]
        self.genes = ([DROP] if config.allow_drop else []) + list(config.sparsities)
        self.masks: dict[tuple[int, float], dict[str, torch.Tensor]] = {}
        self.seen: dict[tuple[float, ...], tuple[int, float]] = {}

    def layer_bytes(self, index: int, gene: float) -> int:
        if gene == DROP:
            return 0
        if gene == 0.0:
            return self.dense[index]
        return sum(format_bytes(w)["bitmask"] for w in self.pruned(index, gene).values())

    def pruned(self, index: int, sparsity: float) -> dict[str, torch.Tensor]:
        key = (index, sparsity)
        if key not in self.masks:
            self.masks[key] = {name: m.weight.detach() * prune_lowest(m.weight.detach().abs(), sparsity)
                               for name, m in self.linears[index].items()}
        return self.masks[key]

    def size(self, genome: tuple[float, ...]) -> int:
        return sum(self.layer_bytes(i, g) for i, g in enumerate(genome))

    def repair(self, genome: list[float], rng: random.Random) -> tuple[float, ...]:
        """Raise a random layer's gene (sparser, then dropped) until the genome fits the budget."""
        order = sorted(self.genes, key=lambda g: (g == DROP, g))
        while self.size(tuple(genome)) > self.config.bytes_budget * sum(self.dense):
            movable = [i for i, g in enumerate(genome) if order.index(g) < len(order) - 1
                       and not (order[order.index(g) + 1] == DROP and genome.count(DROP) >= len(genome) - 1)]
            if not movable:
                raise ValueError(f"bytes_budget={self.config.bytes_budget} cannot be met with sparsities "
                                 f"{self.config.sparsities} (allow_drop={self.config.allow_drop}); raise the budget "
                                 "or allow higher sparsities")
            i = rng.choice(movable)
            genome[i] = order[order.index(genome[i]) + 1]
        return tuple(genome)

    @torch.no_grad()
    def perplexity(self, genome: tuple[float, ...]) -> float:
        if genome in self.seen:
            return self.seen[genome][1]
        model = self.stage.model
        patcher = ModulePatcher()
        try:
            for index, gene in enumerate(genome):
                if gene not in (DROP, 0.0):
                    for name, weight in self.pruned(index, gene).items():
                        patcher.set_attr(self.linears[index][name], "weight", nn.Parameter(weight, requires_grad=False))
            kept = [i for i, g in enumerate(genome) if g != DROP]
            scratch = ModelStage(model, self.stage.tokenizer, patcher)
            keep_layers(scratch, kept)
            device = next(model.parameters()).device
            losses = [float(model(input_ids=chunk.to(device), labels=chunk.to(device), use_cache=False).loss)
                      for chunk in self.tokens.split(2)]
        finally:
            patcher.restore()
        value = math.exp(sum(losses) / len(losses))
        self.seen[genome] = (self.size(genome), value)
        return value


def pareto(points: list[tuple[int, float, tuple[float, ...]]]) -> list[tuple[int, float, tuple[float, ...]]]:
    """The points no other point beats on both bytes and perplexity, by increasing bytes."""
    front, best = [], math.inf
    for point in sorted(points, key=lambda p: (p[0], p[1])):
        if point[1] < best:
            front.append(point)
            best = point[1]
    return front


def describe(genome: tuple[float, ...]) -> str:
    return "[" + " ".join("x" if g == DROP else "·" if g == 0.0 else f"{round(g * 100)}" for g in genome) + "]"


class EvolutionaryNAS(Technique):
    name = "nas_evolution"
    node = "model.compression.structure_optimization.nas"
    paper = Paper(title="Regularized Evolution for Image Classifier Architecture Search", year=2018,
                  arxiv="1802.01548")
    summary = ("Regularized-evolution search over per-layer keep-or-drop and magnitude sparsity (the pruning "
               "plugins' operations) for the lowest perplexity on calibration windows under a bytes budget; reports the Pareto "
               "front it found and its search cost, and applies the best candidate.")
    requires = frozenset({Requirement.CALIBRATION_DATA})
    needs_features = frozenset({Feature.DENSE_WEIGHTS})
    removes_features = frozenset({Feature.ALL_LAYERS})
    bench_config = {"evaluations": 12, "population": 4, "eval_samples": 2, "seq_len": 128}

    Config = NASConfig

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        if self.config.execution == "bitmask":
            self.removes_features = frozenset({Feature.ALL_LAYERS, Feature.DENSE_WEIGHTS})

    @hookimpl
    def effinfer_transform_model(self, stage: ModelStage) -> None:
        config = self.config
        started = time.perf_counter()
        # the last windows of a larger seeded draw
        tokens = stage.calibration_batches(config.eval_samples + 64, config.seq_len)[-config.eval_samples:]
        search = Search(stage, config, tokens)
        rng = random.Random(config.seed)
        layers = len(search.dense)
        alive: list[tuple[float, ...]] = []
        while len(alive) < min(config.population, config.evaluations):
            genome = search.repair([rng.choice(search.genes) for _ in range(layers)], rng)
            search.perplexity(genome)
            alive.append(genome)
        evaluations = len(alive)
        while evaluations < config.evaluations:
            parent = min(rng.sample(alive, min(config.tournament, len(alive))), key=search.perplexity)
            child = list(parent)
            i = rng.randrange(layers)
            child[i] = rng.choice([g for g in search.genes if g != child[i]] or search.genes)
            if list(child).count(DROP) >= layers:
                continue
            genome = search.repair(child, rng)
            search.perplexity(genome)
            alive.append(genome)
            alive.pop(0)  # aging: the oldest leaves
            evaluations += 1
        budget = config.bytes_budget * sum(search.dense)
        points = [(b, p, g) for g, (b, p) in search.seen.items()]
        best = min((p for p in points if p[0] <= budget), key=lambda p: p[1])
        self.apply(stage, search, best[2])
        front = pareto(points)
        dense = sum(search.dense)
        self.note(f"best under {config.bytes_budget:.0%} of the decoder's {dense / 2**20:.1f} MiB: {describe(best[2])} "
                  f"(· dense, x dropped, n% sparsity) — {best[0] / dense:.1%} of the bytes, perplexity "
                  f"{best[1]:.2f}")
        self.note("Pareto front (bytes, perplexity): " + "; ".join(f"{b / dense:.0%} → {p:.2f}" for b, p, _ in front))
        self.note(f"search cost: {len(search.seen)} distinct candidates evaluated on {config.eval_samples}×"
                  f"{config.seq_len} calibration tokens in {time.perf_counter() - started:.1f} s")
        self.front = front

    def apply(self, stage: ModelStage, search: Search, genome: tuple[float, ...]) -> None:
        _, layers = decoder_layers(stage.model)
        for index, gene in enumerate(genome):
            if gene not in (DROP, 0.0):
                for name, weight in search.pruned(index, gene).items():
                    install(stage, layers[index], name, search.linears[index][name], weight, self.config.execution)
        keep_layers(stage, [i for i, g in enumerate(genome) if g != DROP])
