"""Intermediate exits of a decoder: a small trained norm and a confidence classifier per exit layer.

An exit after block ``i`` turns that block's output (the residual stream) into next-token
logits through a *copy of the model's final norm*, trained, and the model's own LM head
(shared, frozen) — the set-up of CALM (Schuster et al., "Confident Adaptive Language
Modeling", arXiv:2207.07061) and LayerSkip (Elhoushi et al., arXiv:2404.16710), where
the head is shared by every exit. With ``translator`` (the default) the block output first
goes through a learned affine map, the *tuned lens* of Belrose et al. ("Eliciting Latent
Predictions from Transformers with the Tuned Lens", arXiv:2303.08112): fit in closed form by
ridge regression (shrunk towards the identity, i.e. towards the plain "logit lens") from the
exit's hidden state to the last block's output at the same position, rescaled to the exit's
norm. It costs one ``hidden × hidden`` product per exit tried (about a tenth of a block's
weights on a Llama-style block) and lets middle layers agree with the full model far more
often than a norm alone. Each exit also has CALM's *early-exit classifier*: a linear
layer on the exit's normed hidden state that predicts whether the exit's top-1 token equals
the full model's, so deciding to exit costs one dot product, not a vocabulary-sized product.

Training needs no data beyond the model itself: it answers calibration-corpus instructions
greedily (self-generated text); the norms learn the full model's greedy token at every
answer position (cross-entropy through the frozen head, via the shared service
:mod:`effinfer.plugins.model.training`), then the classifiers learn, by logistic regression,
where each exit agrees with the full model. A fifth of the answers (at least one) is held out:
the report gives each exit's top-1 agreement with the full model and its classifier's accuracy
on those unseen positions. The trained exits are cached on disk (the training service's
checkpoint folder), keyed by a fingerprint of the model and the options.
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
    translator: bool = Field(True, description="a tuned-lens affine map before each exit norm, fit by ridge "
                                               "regression to the last block's output")
    ridge: float = Field(0.05, gt=0.0, le=1e6, description="ridge strength of the translator fit (relative to the "
                                                          "mean feature energy; large: the identity)")
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

    def __init__(self, model: nn.Module, exits: list[int], translator: bool = False) -> None:
        super().__init__()
        self.exits = sorted(set(exits))
        final_norm = model.get_decoder().norm
        self.norms = nn.ModuleList(copy.deepcopy(final_norm) for _ in self.exits)
        parameter = next(model.parameters())
        size = model.config.hidden_size
        self.classifiers = nn.ModuleList(nn.Linear(size, 1) for _ in self.exits).to(parameter.device, torch.float32)
        self.translators = nn.ModuleList(nn.Linear(size, size) for _ in self.exits) if translator else None
        if self.translators is not None:
            self.translators.to(parameter.device, parameter.dtype)
            with torch.no_grad():
                for linear in self.translators:  # the identity until fitted (the plain logit lens)
                    linear.weight.copy_(torch.eye(size))
                    linear.bias.zero_()
        for norm in self.norms:
            norm.to(parameter.device).requires_grad_(True)  # the model's own norm may be frozen
        self.slot = {layer: index for index, layer in enumerate(self.exits)}

    def translated(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The block output mapped by the exit's translator (unchanged without one)."""
        return hidden if self.translators is None else self.translators[self.slot[layer]](hidden)

    def normed(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.norms[self.slot[layer]](self.translated(layer, hidden))

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
    #: per exit: the fraction of held-out positions where its top-1 equals the full model's, after training
    agreement: dict[int, float]
    #: per exit: accuracy of its classifier at 0.5 on the held-out positions
    classifier_accuracy: dict[int, float]
    cached: bool = False
    #: held-out positions (a fifth of the answers) the two figures above are measured on
    held_out: int = 0
    translator: bool = False

    def describe(self) -> str:
        agree = ", ".join(f"{layer + 1}:{value:.2f}" for layer, value in self.agreement.items())
        kind = "tuned-lens translator + norm" if self.translator else "norm"
        return (f"exits ({kind}) trained on {self.positions} positions of {self.generated_tokens} self-generated "
                f"tokens ({self.prompts} prompts): {self.generate_seconds:.1f} s generating + "
                f"{self.train_seconds:.1f} s training{' (cached)' if self.cached else ''}; top-1 agreement with the "
                f"full model on {self.held_out} held-out positions, by layers run: {agree}")


def self_generate(model: nn.Module, tokenizer: Any, count: int, new_tokens: int) -> tuple[list[list[int]], list[int]]:
    from effinfer.plugins.model.distillation.black_box import instruction_prompts, teacher_texts

    return teacher_texts(model, tokenizer, instruction_prompts(count, False), True, new_tokens, False, 1.0, 0,
                         batch_size=16)


@torch.no_grad()
def exit_features(model: nn.Module, exits: list[int], sequences: list[list[int]], prompt_lengths: list[int]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block outputs at the exits (``exits × N × H``), the last block's output before the final norm
    (``N × H``) and the full model's greedy token (``N``) at every answer position (the position that
    predicts the first answer token onwards)."""
    device = next(model.parameters()).device
    features, finals, targets = [], [], []
    captured: list[torch.Tensor] = []
    hook = model.get_decoder().norm.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    try:
        for sequence, start in zip(sequences, prompt_lengths):
            captured.clear()
            out = model(input_ids=torch.tensor([sequence], device=device), output_hidden_states=True,
                        use_cache=False)
            span = slice(max(start - 1, 0), len(sequence) - 1)
            features.append(torch.stack([out.hidden_states[i + 1][0, span] for i in exits]))
            finals.append(captured[-1][0, span])
            targets.append(out.logits[0, span].argmax(-1))
    finally:
        hook.remove()
    return torch.cat(features, 1), torch.cat(finals), torch.cat(targets)


@torch.no_grad()
def fit_translator(linear: nn.Linear, source: torch.Tensor, target: torch.Tensor, ridge: float) -> None:
    """Set ``linear`` to the ridge-regression map from ``source`` (``N × H``) to ``target``, each target row
    rescaled to its source row's RMS (the exit norm is scale-free), shrunk towards the identity:
    ``argmin_W,b ‖[X 1] [W; b] − Y‖² + λ‖W − I‖²`` with ``λ = ridge · mean diagonal of XᵀX``."""
    x, y = source.double(), target.double()
    y = y * (x.pow(2).mean(-1, keepdim=True) / y.pow(2).mean(-1, keepdim=True).clamp_min(1e-12)).sqrt()
    size = x.shape[1]
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    gram = design.T @ design
    strength = ridge * float(gram.diagonal()[:size].mean())
    prior = torch.zeros(size + 1, size, dtype=x.dtype)
    prior[:size] = torch.eye(size, dtype=x.dtype)
    penalty = torch.zeros(size + 1, dtype=x.dtype)
    penalty[:size] = strength  # the bias is not shrunk
    solution = torch.linalg.solve(gram + torch.diag(penalty), design.T @ y + penalty[:, None] * prior)
    linear.weight.copy_(solution[:size].T.to(linear.weight.dtype))
    linear.bias.copy_(solution[size].to(linear.bias.dtype))


def train_exits(model: nn.Module, tokenizer: Any, exits: list[int], options: ExitTraining
                ) -> tuple[ExitHeads, ExitReport]:
    """Exit heads for ``model`` at ``exits``: from the cache, or trained now on self-generated text."""
    heads = ExitHeads(model, exits, options.translator)
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
    held = max(1, len(sequences) // 5) if len(sequences) > 1 else 0
    features, finals, targets = exit_features(model, heads.exits, sequences[held:], lengths[held:])
    if held:
        test_features, _, test_targets = exit_features(model, heads.exits, sequences[:held], lengths[:held])
    else:  # a single answer: measured on what it trained on
        test_features, test_targets = features, targets
    if heads.translators is not None:
        for e, linear in enumerate(heads.translators):
            fit_translator(linear, features[e], finals, options.ridge)
    head = model.get_output_embeddings()
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for parameter, _ in frozen:
        parameter.requires_grad_(False)
    generator = torch.Generator().manual_seed(options.seed)
    with torch.no_grad():  # the translators are fitted: the norms train on their fixed outputs
        inputs = torch.stack([heads.translated(layer, features[e]) for e, layer in enumerate(heads.exits)])
        test_inputs = torch.stack([heads.translated(layer, test_features[e]) for e, layer in enumerate(heads.exits)])

    def positions():
        while True:
            yield torch.randint(0, len(targets), (min(options.train_batch, len(targets)),), generator=generator)

    def norm_loss(batch: torch.Tensor) -> torch.Tensor:
        losses = [F.cross_entropy(head(heads.norms[e](inputs[e, batch])).float(), targets[batch])
                  for e in range(len(heads.exits))]
        return torch.stack(losses).sum()

    def agreement(states: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            normed = torch.stack([heads.norms[e](states[e]) for e in range(len(heads.exits))])
            labels = torch.stack([(head(normed[e]).argmax(-1) == reference).float() for e in range(len(heads.exits))])
        return normed, labels

    try:
        train({f"norm{e}.{n}": p for e, norm in enumerate(heads.norms) for n, p in norm.named_parameters()},
              norm_loss, positions(), options.train_steps, lr=options.lr, grad_clip=None,
              description="exit norms")
        normed, labels = agreement(inputs, targets)

        def classifier_loss(_: Any) -> torch.Tensor:
            logits = torch.stack([heads.classifiers[e](normed[e].float()).squeeze(-1)
                                  for e in range(len(heads.exits))])
            return F.binary_cross_entropy_with_logits(logits, labels)

        train({f"classifier{e}.{n}": p for e, c in enumerate(heads.classifiers) for n, p in c.named_parameters()},
              classifier_loss, iter(int, 1), 200, lr=1e-2, weight_decay=1e-2, grad_clip=None,
              description="exit classifiers")
    finally:
        for parameter, flag in frozen:
            parameter.requires_grad_(flag)
    test_normed, test_labels = agreement(test_inputs, test_targets)
    with torch.no_grad():
        scores = torch.stack([heads.confidence(layer, test_normed[e]) for e, layer in enumerate(heads.exits)])
        accuracy = ((scores > 0.5).float() == test_labels).float().mean(-1)
    report = ExitReport(len(sequences), sum(len(s) for s in sequences) - sum(lengths), len(targets),
                        generated - started, time.perf_counter() - generated,
                        {layer: round(float(test_labels[e].mean()), 4) for e, layer in enumerate(heads.exits)},
                        {layer: round(float(accuracy[e]), 4) for e, layer in enumerate(heads.exits)},
                        held_out=len(test_targets), translator=options.translator)
    heads.requires_grad_(False)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": heads.state_dict(), "report": asdict(report)}, path)
    return heads.eval(), report
