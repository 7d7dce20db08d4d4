"""The EAGLE draft head and its training on text the target generates itself (CPU, minutes).

Li et al., "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty",
arXiv:2401.15077. The head autoregresses on the target's *features* (its last hidden
states), not on tokens: at position ``i`` its input is ``fc(concat(f_i, embed(x_{i+1})))``
— the feature that predicted token ``x_{i+1}`` and that token's embedding (the sampled
token resolves the feature's uncertainty) — and one decoder layer of the target's own
architecture class turns it into the next feature ``f̂_{i+1}``. Tokens come from the
target's frozen final norm and LM head: ``logits = lm_head(norm(layer_out))``.

Features, here, are the target's **final-norm** hidden states — what the engine's runner
returns with every forward (``StepOutput.hidden``), so drafting needs no change to the
engine. The head's layer output is a residual stream like the target's last block output;
the frozen final norm maps it into the same (post-norm) space as the features it is
compared with and fed back, and the LM head reads tokens from it.

Training follows EAGLE with a frozen target: the data is the target's own greedy answers
to prompts over the corpora's *calibration* split (Medusa's self-distillation data,
:func:`~effinfer.plugins.system.speculative.medusa_heads.self_generate`), the loss
``smooth_L1(f̂, f) + w · CE(lm_head(f̂), target's next token)`` (the paper's ``w = 0.1``),
teacher-forced on the true features, through the shared training service
(:mod:`effinfer.plugins.model.training`: AdamW, cosine schedule, a finished checkpoint in its
cache folder keyed by the model's fingerprint and the options). :class:`EagleReport` records
what it cost and the head's next-token agreement with the target on held-out answers.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from effinfer.plugins.model.calibration import model_fingerprint
from effinfer.plugins.model.training import checkpoint_path, run_key, train
from effinfer.plugins.system.speculative.medusa_heads import self_generate, training_prompts

#: Hugging Face model types whose decoder the head copies (one layer of it)
HEAD_LAYOUTS = frozenset({"llama", "qwen2", "gemma3_text"})
#: the paper's weight of the token loss next to the feature regression
TOKEN_LOSS_WEIGHT = 0.1


class UnsupportedLayout(ValueError):
    """The target's decoder layout is not one the EAGLE head is built for."""


def head_config(config: Any) -> Any:
    """The target's config cut to one full-attention decoder layer and no vocabulary of its own
    (the head reads the target's embeddings and LM head)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in HEAD_LAYOUTS:
        raise UnsupportedLayout(f"the EAGLE head copies one decoder layer of a {sorted(HEAD_LAYOUTS)} model; "
                                f"this model's type is {model_type!r}")
    one = copy.deepcopy(config)
    one.num_hidden_layers = 1
    one.vocab_size = 1
    one.pad_token_id = None
    if getattr(one, "layer_types", None):
        one.layer_types = ["full_attention"]
    return one


class EagleHead(nn.Module):
    """``fc`` (2·hidden → hidden) and one decoder layer of the target's class, in float32.

    The layer starts as a copy of the target's last block (a warm start: the head's job is
    "one more block"); ``fc`` starts as ``[I 0]`` plus a small random part, so the first
    input is close to the feature itself. ``model_dtype``: what the output is cast to before
    the target's norm and LM head.
    """

    def __init__(self, model: nn.Module, seed: int = 0) -> None:
        super().__init__()
        config = head_config(model.config)
        target = model.get_decoder()
        self.decoder = type(target)(config).float()
        self.decoder.norm = nn.Identity()  # the target's frozen final norm is applied outside
        self.decoder.layers[0].load_state_dict(target.layers[-1].state_dict())
        hidden = config.hidden_size
        generator = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(hidden, 2 * hidden, generator=generator) * 0.02 / hidden ** 0.5)
            self.fc.weight[:, :hidden] += torch.eye(hidden)
            self.fc.bias.zero_()
        self.model_dtype = next(model.parameters()).dtype

    def forward(self, features: torch.Tensor, embeddings: torch.Tensor, positions: torch.Tensor,
                cache: Any = None) -> torch.Tensor:
        """Layer outputs (``B × T × H``, before the final norm) for inputs at ``positions`` (``B × T``)."""
        inputs = self.fc(torch.cat([features.float(), embeddings.float()], -1))
        out = self.decoder(inputs_embeds=inputs, position_ids=positions, past_key_values=cache,
                           use_cache=cache is not None)
        return out.last_hidden_state

    def features(self, model: nn.Module, layer_out: torch.Tensor) -> torch.Tensor:
        """The predicted (final-norm) features: the target's frozen norm on the layer output."""
        return model.get_decoder().norm(layer_out.to(self.model_dtype))


@dataclass
class EagleReport:
    prompts: int
    generated_tokens: int
    positions: int
    generate_seconds: float
    feature_seconds: float
    train_seconds: float
    steps: int
    first_loss: float
    final_loss: float
    #: next-token agreement of the head's greedy token with the target's, on held-out answers
    held_out_top1: float
    untrained_top1: float
    held_out_positions: int
    cached: bool = False

    @property
    def total_seconds(self) -> float:
        return self.generate_seconds + self.feature_seconds + self.train_seconds

    def describe(self) -> str:
        how = "loaded from cache" if self.cached else "trained"
        return (f"head {how}: {self.positions} positions of {self.prompts} self-generated answers "
                f"({self.generated_tokens} tokens), {self.steps} steps, loss {self.first_loss:.3f} → "
                f"{self.final_loss:.3f}; cost {self.total_seconds:.0f} s (generate {self.generate_seconds:.0f} s, "
                f"features {self.feature_seconds:.0f} s, train {self.train_seconds:.0f} s); next-token agreement "
                f"with the target on {self.held_out_positions} held-out positions {self.held_out_top1:.3f} "
                f"(untrained head {self.untrained_top1:.3f})")


@dataclass
class TrainingSequence:
    """One training sequence: tokens, the target's features and its greedy next token per position."""

    tokens: torch.Tensor    # T
    features: torch.Tensor  # T × H, final-norm
    targets: torch.Tensor   # T: argmax of the target's logits at each position


@torch.no_grad()
def target_sequence(model: nn.Module, tokens: list[int]) -> TrainingSequence:
    """The target's final-norm features and greedy next tokens along ``tokens``."""
    ids = torch.tensor([tokens], device=next(model.parameters()).device)
    hidden = model.get_decoder()(input_ids=ids).last_hidden_state
    greedy = model.get_output_embeddings()(hidden).argmax(-1)[0]
    return TrainingSequence(ids[0].cpu(), hidden[0].float().cpu(), greedy.cpu())


def head_outputs(head: EagleHead, model: nn.Module, sequence: TrainingSequence) -> torch.Tensor:
    """Teacher-forced predicted features for positions ``1 … T-1`` (``T-1 × H``)."""
    embed = model.get_input_embeddings()
    device = head.fc.weight.device
    with torch.no_grad():
        embeddings = embed(sequence.tokens[1:][None].to(device)).float()
    positions = torch.arange(len(sequence.tokens) - 1, device=device)[None]
    layer_out = head(sequence.features[:-1][None].to(device), embeddings, positions)
    return head.features(model, layer_out)[0]


def sequence_loss(head: EagleHead, model: nn.Module, sequence: TrainingSequence, token_positions: int,
                  generator: torch.Generator) -> torch.Tensor:
    """Smooth-L1 on every predicted feature + ``w`` · cross-entropy of the target's next token on
    ``token_positions`` sampled positions (the LM head is the costly part on a large vocabulary)."""
    predicted = head_outputs(head, model, sequence)
    feature_loss = F.smooth_l1_loss(predicted.float(), sequence.features[1:].to(predicted.device))
    chosen = torch.randperm(len(predicted), generator=generator)[:token_positions]
    logits = model.get_output_embeddings()(predicted[chosen]).float()
    token_loss = F.cross_entropy(logits, sequence.targets[1:][chosen].to(logits.device))
    return feature_loss + TOKEN_LOSS_WEIGHT * token_loss


@torch.no_grad()
def next_token_agreement(head: EagleHead, model: nn.Module, sequences: list[TrainingSequence]) -> tuple[float, int]:
    """How often the head's greedy token (from its predicted feature) equals the target's next token."""
    hits, total = 0, 0
    for sequence in sequences:
        predicted = head_outputs(head, model, sequence)
        drafted = model.get_output_embeddings()(predicted).argmax(-1)
        hits += int((drafted.cpu() == sequence.targets[1:]).sum())
        total += len(drafted)
    return hits / max(total, 1), total


def training_data(model: nn.Module, tokenizer: Any, options: Any, engine: Any
                  ) -> tuple[list[TrainingSequence], list[int], float, float]:
    """Self-generated answers as :class:`TrainingSequence` s; answer tokens per sequence; generate and feature seconds."""
    from effinfer.core.generation import encode_prompts

    started = time.perf_counter()
    prompts = training_prompts(options.train_prompts, options.corpora)
    tokens = self_generate(model, tokenizer, prompts, options.train_new_tokens, engine)
    generated = time.perf_counter()
    prompt_lengths = [int(encode_prompts(tokenizer, [p], True)[1].sum()) for p in prompts]
    sequences = [target_sequence(model, sequence) for sequence in tokens]
    answers = [len(s) - n for s, n in zip(tokens, prompt_lengths)]
    return sequences, answers, generated - started, time.perf_counter() - generated


def fit(head: EagleHead, model: nn.Module, sequences: list[TrainingSequence], options: Any, path: Path) -> Any:
    """The shared training service on ``sequences`` (one per step, in seeded random order)."""
    generator = torch.Generator().manual_seed(options.seed)

    def order():
        while True:
            yield from torch.randperm(len(sequences), generator=generator).tolist()

    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for parameter, _ in frozen:
        parameter.requires_grad_(False)
    try:
        return train(dict(head.named_parameters()),
                     lambda index: sequence_loss(head, model, sequences[index], options.token_loss_positions,
                                                 generator),
                     order(), options.epochs * len(sequences), lr=options.lr, grad_clip=1.0,
                     warmup=min(10, len(sequences)), checkpoint=path, description="eagle head")
    finally:
        for parameter, flag in frozen:
            parameter.requires_grad_(flag)


def train_eagle(model: nn.Module, tokenizer: Any, options: Any, engine: Any) -> tuple[EagleHead, EagleReport]:
    """The EAGLE head for ``model``: from the training cache, or trained now on self-generated text.

    A fifth of the answers (at least one, when there are two or more) is held out for the report's
    next-token agreement; ``options`` is :class:`~effinfer.plugins.system.speculative.eagle.Eagle.Config`.
    """
    head = EagleHead(model, options.seed).to(next(model.parameters()).device)
    training = options.model_dump(include={"train_prompts", "train_new_tokens", "epochs", "lr", "seed",
                                           "corpora", "token_loss_positions"})
    path = checkpoint_path("eagle", run_key("eagle", model_fingerprint(model), training))
    report_path = path.with_suffix(".json")
    if path.exists() and report_path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=False)
        with torch.no_grad():
            for name, parameter in head.named_parameters():
                parameter.copy_(saved["parameters"][name].to(parameter.device))
        return head.eval().requires_grad_(False), EagleReport(**json.loads(report_path.read_text()) | {"cached": True})
    sequences, answers, generate_seconds, feature_seconds = training_data(model, tokenizer, options, engine)
    held = max(1, len(sequences) // 5) if len(sequences) > 1 else 0
    train_on, test_on = sequences[held:], sequences[:held] or sequences
    untrained, _ = next_token_agreement(head, model, test_on)
    cost = fit(head, model, train_on, options, path)
    top1, positions = next_token_agreement(head, model, test_on)
    report = EagleReport(len(sequences), sum(answers), sum(len(s.tokens) - 1 for s in train_on), generate_seconds,
                         feature_seconds, cost.seconds, cost.steps, cost.first_loss, cost.final_loss,
                         round(top1, 4), round(untrained, 4), positions)
    report_path.write_text(json.dumps(asdict(report)))
    return head.eval().requires_grad_(False), report
