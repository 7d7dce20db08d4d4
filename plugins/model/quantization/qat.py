"""Quantization-aware training: a short fine-tune through fake-quantized weights, then real packing.

Follows LLM-QAT — Liu, Oguz, Zhao, Chang, Stock, Mehdad, Shi, Krishnamoorthi & Chandra,
"LLM-QAT: Data-Free Quantization Aware Training for Large Language Models",
arXiv:2305.17888 — in its weight-only form:

- every linear layer of the decoder computes with ``Q(W)`` (the min-max grid of the
  current weight, per group) in the forward pass, while the gradient flows to the float
  ``W`` unchanged: the straight-through estimator (Bengio et al., arXiv:1308.3432);
- the loss is knowledge distillation from the float model (cross-entropy against the
  teacher's next-token distributions, ``loss='kd'``, as LLM-QAT does) or plain
  next-token cross-entropy (``loss='ce'``);
- the training text is either the calibration split (``data='calibration'``) or, data
  free, text the float model generates itself: a random first token, the next
  ``greedy_tokens`` chosen by argmax, the rest sampled (LLM-QAT's hybrid sampling);
- afterwards the trained weights are quantized on the same grid and packed, so the
  model runs through the same kernels as any PTQ result.

Its cost (data generation, training time, tokens, peak memory) is reported in the notes.
Only the linear weights are trained; embeddings and norms stay frozen.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from transformers import DynamicCache

from effinfer.core import Paper, Requirement, Technique, hookimpl
from effinfer.core.memory import peak_rss_bytes
from effinfer.core.stages import ModelStage
from effinfer.plugins.model.quantization.config import (WeightQuantConfig, float_zero, grid_text, group_size_problems,
                                                        maybe_save, round_to_nearest_linear, selected_linears, swap_in,
                                                        weight_math_threads)
from effinfer.plugins.model.quantization.packing import check_group_size, fake_quantize


class FakeQuantLinear(nn.Module):
    """Training-time linear layer: forward with ``Q(W)``, backward straight through to ``W``."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: int | None, symmetric: bool,
                 float_zero: bool = False) -> None:
        super().__init__()
        check_group_size(linear.in_features, group_size)
        self.bits, self.group_size, self.symmetric, self.float_zero = bits, group_size, symmetric, float_zero
        self.weight = nn.Parameter(linear.weight.detach().clone().float())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def quantized(self) -> torch.Tensor:
        q = fake_quantize(self.weight.detach(), self.bits, self.group_size, self.symmetric,
                          float_zero=self.float_zero)
        return self.weight + (q - self.weight).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized().to(x.dtype), self.bias)


@torch.no_grad()
def self_generated_text(model: nn.Module, tokenizer: Any, n: int, length: int, greedy_tokens: int, seed: int,
                        batch_size: int = 16) -> torch.Tensor:
    """``n × length`` token ids the model writes itself (LLM-QAT's data-free recipe)."""
    generator = torch.Generator().manual_seed(seed)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocabulary = torch.tensor([i for i in range(model.config.vocab_size) if i not in special])
    device = next(model.parameters()).device
    rows = []
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        tokens = vocabulary[torch.randint(len(vocabulary), (count, 1), generator=generator)].to(device)
        cache = DynamicCache(config=model.config)
        step_input = tokens
        for position in range(1, length):
            logits = model(input_ids=step_input, past_key_values=cache, use_cache=True).logits[:, -1].float()
            if position <= greedy_tokens:
                chosen = logits.argmax(-1, keepdim=True)
            else:
                chosen = torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator).to(device)
            tokens = torch.cat([tokens, chosen], dim=1)
            step_input = chosen
        rows.append(tokens.cpu())
    return torch.cat(rows)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student's next-token distributions against the teacher's (mean per token)."""
    return -(teacher.float().softmax(-1) * student.float().log_softmax(-1)).sum(-1).mean()


def peak_rss_gib() -> float:
    return peak_rss_bytes() / 2**30


class QAT(Technique):
    name = "qat"
    node = "model.compression.quantization.qat"
    paper = Paper(title="LLM-QAT: Data-Free Quantization Aware Training for Large Language Models", year=2023,
                  arxiv="2305.17888")
    summary = ("Quantization-aware training: a short fine-tune of the linear weights through fake quantization "
               "with a straight-through estimator, distilling from the float model on calibration text or on "
               "text the model generates itself (data-free, as LLM-QAT), then export to the real packed format.")
    lossless = False
    requires = frozenset({Requirement.CALIBRATION_DATA, Requirement.TRAINING})
    removes_features = frozenset({"dense_weights"})
    #: `effinfer bench --suite quick`: 16 steps of 2 × 128 tokens (a forward+backward of SmolLM2 plus the
    #: teacher's forward take about 2 s a step on an idle 2-core CPU): about half a minute of training
    bench_config = {"bits": 4, "group_size": 32, "steps": 16, "batch_size": 2, "seq_len": 128, "n_samples": 32}

    class Config(WeightQuantConfig):
        data: Literal["calibration", "self_generated"] = Field(
            "calibration", description="training text: the calibration split, or text the float model generates "
                                       "itself (data-free, LLM-QAT)")
        loss: Literal["kd", "ce"] = Field("kd", description="'kd' = cross-entropy against the float model's "
                                                            "next-token distributions, 'ce' = next-token labels")
        steps: int = Field(32, ge=1, le=100_000, description="optimizer steps")
        lr: float = Field(1e-5, gt=0.0, le=1e-2, description="AdamW learning rate (constant)")
        batch_size: int = Field(4, ge=1, le=256, description="sequences per step")
        seq_len: int = Field(256, ge=16, le=8192, description="tokens per training sequence")
        n_samples: int = Field(64, ge=1, le=100_000, description="distinct training sequences (cycled)")
        greedy_tokens: int = Field(3, ge=0, le=64, description="self-generated text: tokens after the random first "
                                                               "one chosen by argmax before sampling starts")
        seed: int = Field(0, ge=0, description="seed of data generation and batch order")

    def check_model_config(self, config: Any) -> list[str]:
        """A ``group_size`` that does not divide the input features of every linear layer not in skip_modules,
        refused before loading (the model's config tells their sizes)."""
        return group_size_problems(config, self.config.group_size, self.config.skip_modules)

    @hookimpl
    def effinfer_transform_model(self, stage: ModelStage) -> None:
        config = self.config
        started = time.perf_counter()
        tokens = self._training_tokens(stage)
        data_seconds = time.perf_counter() - started
        layers = selected_linears(stage.model, config.skip_modules)
        trained, losses, train_seconds = self._train(stage.model, layers, tokens)
        with weight_math_threads():
            swapped = {name: round_to_nearest_linear(weight, linear.bias, name, config)
                       for (name, linear), weight in zip(layers, trained)}
        self.note(swap_in(stage, layers, swapped, f"QAT {grid_text(config)}"))
        rss = peak_rss_gib()
        trained_tokens = config.steps * config.batch_size * config.seq_len
        self.note(f"QAT cost: data ({config.data}, {tokens.shape[0]}×{tokens.shape[1]} tokens) {data_seconds:.1f} s, "
                  f"training {train_seconds:.1f} s for {config.steps} steps ({trained_tokens} tokens, "
                  f"{train_seconds / config.steps:.2f} s/step), loss ({config.loss}) {losses[0]:.4f} → "
                  f"{losses[-1]:.4f}, peak RSS {rss:.2f} GiB")
        maybe_save(stage, config.save_dir, self)

    def _training_tokens(self, stage: ModelStage) -> torch.Tensor:
        config = self.config
        if config.data == "calibration":
            return stage.calibration_batches(config.n_samples, config.seq_len)
        return self_generated_text(stage.model, stage.tokenizer, config.n_samples, config.seq_len,
                                   config.greedy_tokens, config.seed)

    def _train(self, model: nn.Module, layers: list[tuple[str, nn.Linear]], tokens: torch.Tensor
               ) -> tuple[list[torch.Tensor], list[float], float]:
        """Fine-tune fake-quantized copies of ``layers``; return the trained weights (the model is left as found)."""
        config = self.config
        teacher = copy.deepcopy(model).eval() if config.loss == "kd" else None
        fakes = {name: FakeQuantLinear(linear, config.bits, config.group_size, config.symmetric, float_zero(config))
                 for name, linear in layers}
        frozen = [(p, p.requires_grad) for p in model.parameters()]
        for parameter, _ in frozen:
            parameter.requires_grad_(False)
        for name, fake in fakes.items():
            _set_module(model, name, fake)
        started = time.perf_counter()
        losses: list[float] = []
        try:
            optimizer = torch.optim.AdamW([f.weight for f in fakes.values()], lr=config.lr, weight_decay=0.0)
            generator = torch.Generator().manual_seed(config.seed)
            device = next(model.parameters()).device
            with torch.enable_grad():
                for _ in range(config.steps):
                    batch = tokens[torch.randint(len(tokens), (config.batch_size,), generator=generator)].to(device)
                    loss = self._loss(model, teacher, batch)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_([f.weight for f in fakes.values()], 1.0)
                    optimizer.step()
                    losses.append(float(loss.detach()))
        finally:
            for name, linear in layers:
                _set_module(model, name, linear)
            for parameter, flag in frozen:
                parameter.requires_grad_(flag)
            del teacher
        return [fakes[name].weight.detach() for name, _ in layers], losses, time.perf_counter() - started

    def _loss(self, model: nn.Module, teacher: nn.Module | None, batch: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
        if teacher is None:
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
        with torch.no_grad():
            target = teacher(input_ids=batch, use_cache=False).logits[:, :-1]
        return distillation_loss(logits, target)


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@hookimpl
def effinfer_register_techniques(register):
    register(QAT)
