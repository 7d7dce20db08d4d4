"""What both distillation techniques share: the student's config fields, trainable parameters,
the checkpoint key and a held-out perplexity / KL-to-teacher probe for the run record."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from effinfer.plugins.model.calibration import model_fingerprint
from effinfer.plugins.model.distillation.losses import forward_kl


class StudentConfig(BaseModel):
    """The student (a layer-dropped copy of the teacher) and the training budget."""

    model_config = ConfigDict(extra="forbid")

    drop: int = Field(6, ge=0, le=256, description="decoder layers removed from the teacher to make the student")
    rule: Literal["block_influence", "uniform"] = Field(
        "block_influence", description="which layers: lowest ShortGPT Block Influence on calibration text, or "
                                       "spread evenly over the middle")
    steps: int = Field(60, ge=0, le=100_000, description="optimizer steps (0: the student without training)")
    batch_size: int = Field(4, ge=1, le=256, description="sequences per step")
    seq_len: int = Field(128, ge=8, le=8192, description="tokens per training sequence")
    lr: float = Field(1e-4, gt=0.0, le=1e-2, description="AdamW peak learning rate (cosine decay to 10%)")
    train: Literal["blocks", "all"] = Field(
        "blocks", description="what is trained: the decoder blocks and norms (embeddings and LM head frozen), "
                              "or every parameter")
    seed: int = Field(0, ge=0, description="seed of the data order")
    checkpoint: bool = Field(True, description="keep the trained student in the cache (an identical run is "
                                               "read back instead of trained again)")
    checkpoint_every: int = Field(0, ge=0, le=100_000, description="also save a resumable checkpoint every so "
                                                                    "many steps (0: only at the end)")
    eval_windows: int = Field(4, ge=0, le=256, description="held-out test-split windows on which the run record "
                                                            "reports perplexity and KL to the teacher, before and "
                                                            "after training (0: skip)")


def trainable(student: nn.Module, what: str) -> dict[str, nn.Parameter]:
    """Freeze the student, then unfreeze and return what ``what`` names."""
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    chosen = {}
    for name, parameter in student.named_parameters():
        frozen = what == "blocks" and ("embed_tokens" in name or name.startswith("lm_head"))
        if not frozen and parameter.is_floating_point():
            parameter.requires_grad_(True)
            chosen[name] = parameter
    return chosen


def checkpoint_identity(teacher: nn.Module, technique: str, config: BaseModel) -> list[Any]:
    options = config.model_dump(exclude={"checkpoint", "checkpoint_every", "eval_windows"})
    return [technique, model_fingerprint(teacher), str(next(teacher.parameters()).dtype), options]


@torch.no_grad()
def probe(student: nn.Module, teacher: nn.Module, windows: torch.Tensor) -> dict[str, float]:
    """Perplexity of ``student`` on ``windows`` and its forward KL to ``teacher`` (per token)."""
    device = next(student.parameters()).device
    nll, kl, count = 0.0, 0.0, 0
    for row in windows:
        ids = row[None].to(device)
        logits = student(input_ids=ids, use_cache=False).logits[0, :-1].float()
        reference = teacher(input_ids=ids, use_cache=False).logits[0, :-1].float()
        nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        kl += float(forward_kl(logits, reference)) * logits.shape[0]
        count += logits.shape[0]
    return {"perplexity": math.exp(nll / count), "kl": kl / count}


def freeze(student: nn.Module) -> None:
    """Back to inference after training: eval mode, no gradients."""
    student.eval()
    for parameter in student.parameters():
        parameter.requires_grad_(False)


def before_after_note(measured: dict[str, dict[str, float]], windows: int) -> str:
    before, after = measured["before"], measured["after"]
    return (f"held-out (wikipedia test, {windows} windows): perplexity {before['perplexity']:.2f} → "
            f"{after['perplexity']:.2f}, KL to teacher {before['kl']:.3f} → {after['kl']:.3f}")


def held_out_windows(tokenizer: Any, count: int, seq_len: int) -> torch.Tensor | None:
    """``count`` windows of the wikipedia *test* split (only measured, never trained on)."""
    if count == 0:
        return None
    from effinfer.core.calibration import corpus_tokens, sample_windows

    return sample_windows(corpus_tokens(tokenizer, "wikipedia", "test"), count, min(seq_len, 256), seed=1234)
