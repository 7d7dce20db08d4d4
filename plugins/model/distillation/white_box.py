"""White-box knowledge distillation of a layer-dropped student against the teacher's logits.

The student is a copy of the teacher without ``drop`` decoder blocks (chosen by ShortGPT's
Block Influence or uniformly, :mod:`~effinfer.plugins.model.distillation.student`); it is
trained on windows of the calibration corpus to match the teacher, token by token, with a
weighted sum of forward KL (Hinton et al., arXiv:1503.02531), reverse KL (the objective of
MiniLLM, Gu et al., "MiniLLM: Knowledge Distillation of Large Language Models",
arXiv:2306.08543) and a hidden-state MSE between each student block and the teacher block it
came from (:mod:`~effinfer.plugins.model.distillation.losses`). Training goes through the
shared service :mod:`effinfer.plugins.model.training` (AdamW, progress bar, checkpoint,
cost); the run record gives the cost and the student's held-out perplexity and KL to the
teacher before and after.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, model_validator

from effinfer.core import Feature, Paper, Requirement, Technique, hookimpl
from effinfer.core.stages import ModelStage
from effinfer.plugins.model.distillation.common import (StudentConfig, before_after_note, checkpoint_identity, freeze,
                                                        held_out_windows, probe, trainable)
from effinfer.plugins.model.distillation.losses import forward_kl, hidden_mse, reverse_kl
from effinfer.plugins.model.distillation.student import build_student, check_drop, describe, kept_blocks
from effinfer.plugins.model.training import checkpoint_path, run_key, token_batches, train


class WhiteBoxDistillation(Technique):
    name = "kd_white_box"
    node = "model.compression.distillation.white_box"
    paper = Paper(title="MiniLLM: Knowledge Distillation of Large Language Models", year=2023, arxiv="2306.08543")
    summary = ("Drops decoder layers from a copy of the model (ShortGPT Block Influence or uniform) and trains "
               "that student on the teacher's logits: forward KL, reverse KL (MiniLLM) and hidden-state MSE.")
    requires = frozenset({Requirement.TRAINING})
    needs_features = frozenset({Feature.DENSE_WEIGHTS})
    removes_features = frozenset({Feature.ALL_LAYERS})
    #: a smoke-sized budget for `effinfer bench` (benchmarks/distillation.py runs the real one)
    bench_config = {"drop": 6, "steps": 12, "batch_size": 2, "seq_len": 128}

    class Config(StudentConfig):
        forward_kl: float = Field(1.0, ge=0.0, le=100.0, description="weight of KL(teacher ‖ student)")
        reverse_kl: float = Field(0.0, ge=0.0, le=100.0, description="weight of KL(student ‖ teacher) (MiniLLM)")
        hidden_mse: float = Field(0.0, ge=0.0, le=100.0, description="weight of the MSE between each student "
                                                                     "block's output and its teacher block's")
        temperature: float = Field(1.0, ge=0.1, le=20.0, description="softmax temperature of both KL terms")

        @model_validator(mode="after")
        def _some_objective(self) -> WhiteBoxDistillation.Config:
            if self.steps and not (self.forward_kl or self.reverse_kl or self.hidden_mse):
                raise ValueError("all loss weights are 0: set forward_kl, reverse_kl or hidden_mse > 0 (or steps=0)")
            return self

    def check_model_config(self, config: Any) -> list[str]:
        layers = getattr(config, "num_hidden_layers", None)
        return check_drop(layers, self.config.drop) if layers is not None else []

    def objective(self) -> str:
        c = self.config
        terms = [f"{w:g}·{n}" for w, n in ((c.forward_kl, "FKL"), (c.reverse_kl, "RKL"), (c.hidden_mse, "MSE")) if w]
        return " + ".join(terms) + (f" (τ={c.temperature:g})" if c.temperature != 1 else "")

    def loss(self, student: torch.nn.Module, teacher: torch.nn.Module, kept: list[int], ids: torch.Tensor
             ) -> torch.Tensor:
        c = self.config
        hidden = c.hidden_mse > 0
        with torch.no_grad():
            reference = teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
        out = student(input_ids=ids, use_cache=False, output_hidden_states=hidden)
        total = out.logits.new_zeros(())
        if c.forward_kl:
            total = total + c.forward_kl * forward_kl(out.logits, reference.logits, c.temperature)
        if c.reverse_kl:
            total = total + c.reverse_kl * reverse_kl(out.logits, reference.logits, c.temperature)
        if hidden:
            pairs = [(out.hidden_states[j + 1], reference.hidden_states[i + 1]) for j, i in enumerate(kept)]
            total = total + c.hidden_mse * hidden_mse([s for s, _ in pairs], [t for _, t in pairs])
        return total

    @hookimpl
    def effinfer_transform_model(self, stage: ModelStage) -> None:
        c = self.config
        teacher = stage.model
        num_layers = teacher.config.num_hidden_layers
        device = next(teacher.parameters()).device
        calibration = next(token_batches(stage.tokenizer, 8, min(c.seq_len, 256), seed=c.seed + 99))
        student, dropped = build_student(teacher, c.drop, c.rule, calibration)
        kept = kept_blocks(num_layers, dropped)
        self.note(describe(num_layers, dropped, c.rule))
        windows = held_out_windows(stage.tokenizer, c.eval_windows, c.seq_len)
        before = probe(student, teacher, windows) if windows is not None and c.steps else None
        if c.steps:
            parameters = trainable(student, c.train)
            path = checkpoint_path(self.name, run_key(*checkpoint_identity(teacher, self.name, c))) \
                if c.checkpoint else None
            batches = (batch.to(device) for batch in token_batches(stage.tokenizer, c.batch_size, c.seq_len, c.seed))
            student.train()
            cost = train(parameters, lambda ids: self.loss(student, teacher, kept, ids), batches, c.steps, lr=c.lr,
                         warmup=max(1, c.steps // 10), checkpoint=path, checkpoint_every=c.checkpoint_every,
                         description=f"{self.name}: {self.objective()}")
            freeze(student)
            self.cost = cost
            self.note(f"KD {self.objective()}: {cost.describe()}")
        if before is not None:
            self.measured = {"before": before, "after": probe(student, teacher, windows)}
            self.note(before_after_note(self.measured, len(windows)))
        stage.model = student
