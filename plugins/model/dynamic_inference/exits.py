"""Intermediate exits of a decoder: a small trained norm and a confidence classifier per exit layer.

An exit after block ``i`` turns that block's output (the residual stream) into next-token
logits through a *copy of the model's final norm*, trained, and the model's own LM head
(shared, frozen) — the set-up of CALM (Schuster et al., "Confident Adaptive Language
Modeling", arXiv:2207.07061) and LayerSkip (Elhoushi et al., arXiv:2404.16710), where
the head is shared by every exit. Each exit also has CALM's *early-exit classifier*: a linear
layer on the exit's normed hidden state that predicts whether the exit's top-1 token equals
the full model's, so deciding to exit costs one dot product, not a vocabulary-sized product.

Training needs no data beyond the model itself: it answers calibration-corpus instructions
greedily (self-generated text); the norms learn the full model's greedy token at every
answer position (cross-entropy through the frozen head, via the shared service
:mod:`effinfer.plugins.model.training`), then the classifiers learn, by logistic regression,
where each exit agrees with the full model. The trained exits are cached on disk, keyed by a
fingerprint of the model and the options.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from effinfer.plugins.model.calibration import model_fingerprint
from effinfer.plugins.model.training import checkpoint_path, run_key, train


class ExitTraining(BaseModel):
    """How the exits are trained (shared by the token-level techniques)."""

    model_config = ConfigDict(extra="forbid")

    train_prompts: int = Field(24, ge=1, le=10_000, description="self-generated answers the exits learn from")
    train_new_tokens: int = Field(96, ge=4, le=4096, description="tokens per self-generated answer")
    train_steps: int = Field(150, ge=1, le=100_000, description="AdamW steps of the exit norms")
    train_batch: int = Field(64, ge=1, le=8192, description="positions per step")
    lr: float = Field(1e-2, gt=0.0, le=1.0, description="learning rate of the exit norms")
    seed: int = Field(0, ge=0, description="seed of the data order")


def default_exits(num_layers: int) -> list[int]:
    """Exits after every 3rd block from 40% of the depth on (never after the last block)."""
    exits = list(range(max(0, round(0.4 * num_layers) - 1), num_layers - 1, 3))
    return exits or ([num_layers - 2] if num_layers >= 2 else [])


def check_exits(num_layers: int, exits: list[int] | None) -> list[str]:
    if num_layers < 2:
        return [f"early exit needs at least 2 decoder layers (the model has {num_layers})"]
    if exits is None:
        return []
    bad = [i for i in exits if not 0 <= i < num_layers - 1]
    if bad:
        return [f"exit layers {bad} are out of range: an exit goes after block 0 … {num_layers - 2} of this "
                f"{num_layers}-layer model (after the last block is the model itself)"]
    return []


class ExitHeads(nn.Module):
    """Per exit layer: a trained copy of the final norm and a linear confidence classifier."""

    def __init__(self, model: nn.Module, exits: list[int]) -> None:
        super().__init__()
        self.exits = sorted(set(exits))
        final_norm = model.get_decoder().norm
        self.norms = nn.ModuleList(copy.deepcopy(final_norm) for _ in self.exits)
        parameter = next(model.parameters())
        self.classifiers = nn.ModuleList(nn.Linear(model.config.hidden_size, 1) for _ in self.exits).to(
            parameter.device, torch.float32)
        for norm in self.norms:
            norm.to(parameter.device).requires_grad_(True)  # the model's own norm may be frozen
        self.slot = {layer: index for index, layer in enumerate(self.exits)}

    def normed(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.norms[self.slot[layer]](hidden)

    def confidence(self, layer: int, normed: torch.Tensor) -> torch.Tensor:
        """Probability that the exit's top-1 token is the full model's (CALM's classifier)."""
        return torch.sigmoid(self.classifiers[self.slot[layer]](normed.float())).squeeze(-1)


@dataclass
class ExitReport:
    prompts: int
    generated_tokens: int
    positions: int
    generate_seconds: float
    train_seconds: float
    #: per exit: the fraction of positions where its top-1 equals the full model's, after training
    agreement: dict[int, float]
    #: per exit: accuracy of its classifier at 0.5
    classifier_accuracy: dict[int, float]
    cached: bool = False

    def describe(self) -> str:
        agree = ", ".join(f"{layer + 1}:{value:.2f}" for layer, value in self.agreement.items())
        return (f"exits trained on {self.generated_tokens} self-generated tokens ({self.prompts} prompts): "
                f"{self.generate_seconds:.1f} s generating + {self.train_seconds:.1f} s training"
                f"{' (cached)' if self.cached else ''}; top-1 agreement with the full model by layers run: {agree}")


def self_generate(model: nn.Module, tokenizer: Any, count: int, new_tokens: int) -> tuple[list[list[int]], list[int]]:
    from effinfer.plugins.model.distillation.black_box import instruction_prompts, teacher_texts

    return teacher_texts(model, tokenizer, instruction_prompts(count, False), True, new_tokens, False, 1.0, 0)


@torch.no_grad()
def exit_features(model: nn.Module, exits: list[int], sequences: list[list[int]], prompt_lengths: list[int]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Block outputs at the exits (``exits × N × H``) and the full model's greedy token (``N``) at every
    answer position (the position that predicts the first answer token onwards)."""
    device = next(model.parameters()).device
    features, targets = [], []
    for sequence, start in zip(sequences, prompt_lengths):
        out = model(input_ids=torch.tensor([sequence], device=device), output_hidden_states=True, use_cache=False)
        span = slice(max(start - 1, 0), len(sequence) - 1)
        features.append(torch.stack([out.hidden_states[i + 1][0, span] for i in exits]))
        targets.append(out.logits[0, span].argmax(-1))
    return torch.cat(features, 1), torch.cat(targets)


def train_exits(model: nn.Module, tokenizer: Any, exits: list[int], options: ExitTraining
                ) -> tuple[ExitHeads, ExitReport]:
    """Exit heads for ``model`` at ``exits``: from the cache, or trained now on self-generated text."""
    heads = ExitHeads(model, exits)
    key = run_key("exits", model_fingerprint(model), heads.exits, options.model_dump())
    path = checkpoint_path("exits", key)
    if Path(path).exists():
        saved = torch.load(path, map_location="cpu", weights_only=False)
        heads.load_state_dict(saved["state"])
        heads.requires_grad_(False)
        report = ExitReport(**saved["report"])
        report.cached = True
        return heads.eval(), report
    started = time.perf_counter()
    sequences, lengths = self_generate(model, tokenizer, options.train_prompts, options.train_new_tokens)
    generated = time.perf_counter()
    features, targets = exit_features(model, heads.exits, sequences, lengths)
    head = model.get_output_embeddings()
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for parameter, _ in frozen:
        parameter.requires_grad_(False)
    generator = torch.Generator().manual_seed(options.seed)

    def positions():
        while True:
            yield torch.randint(0, len(targets), (min(options.train_batch, len(targets)),), generator=generator)

    def norm_loss(batch: torch.Tensor) -> torch.Tensor:
        losses = [F.cross_entropy(head(heads.norms[e](features[e, batch])).float(), targets[batch])
                  for e in range(len(heads.exits))]
        return torch.stack(losses).sum()

    try:
        train({f"norm{e}.{n}": p for e, norm in enumerate(heads.norms) for n, p in norm.named_parameters()},
              norm_loss, positions(), options.train_steps, lr=options.lr, grad_clip=None,
              description="exit norms")
        with torch.no_grad():
            normed = torch.stack([heads.norms[e](features[e]) for e in range(len(heads.exits))])
            labels = torch.stack([(head(normed[e]).argmax(-1) == targets).float() for e in range(len(heads.exits))])

        def classifier_loss(_: Any) -> torch.Tensor:
            logits = torch.stack([heads.classifiers[e](normed[e].float()).squeeze(-1)
                                  for e in range(len(heads.exits))])
            return F.binary_cross_entropy_with_logits(logits, labels)

        train({f"classifier{e}.{n}": p for e, c in enumerate(heads.classifiers) for n, p in c.named_parameters()},
              classifier_loss, iter(int, 1), 200, lr=1e-2, grad_clip=None, description="exit classifiers")
    finally:
        for parameter, flag in frozen:
            parameter.requires_grad_(flag)
    with torch.no_grad():
        scores = torch.stack([heads.confidence(layer, normed[e]) for e, layer in enumerate(heads.exits)])
        accuracy = ((scores > 0.5).float() == labels).float().mean(-1)
    report = ExitReport(len(sequences), sum(len(s) for s in sequences) - sum(lengths), len(targets),
                        generated - started, time.perf_counter() - generated,
                        {layer: round(float(labels[e].mean()), 4) for e, layer in enumerate(heads.exits)},
                        {layer: round(float(accuracy[e]), 4) for e, layer in enumerate(heads.exits)})
    heads.requires_grad_(False)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": heads.state_dict(), "report": asdict(report)}, path)
    return heads.eval(), report
