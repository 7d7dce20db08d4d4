"""Black-box knowledge distillation: the student learns only from text the teacher writes.

Sequence-level KD (Kim & Rush, "Sequence-Level Knowledge Distillation", arXiv:1606.07947) in
the setting of distilling from an API: no logits, no hidden states — the teacher *generates*
answers to prompts, and the student (a layer-dropped copy of the teacher,
:mod:`~effinfer.plugins.model.distillation.student`) is fine-tuned with cross-entropy on
those answers only. Prompts come from the calibration split of the corpora in
:mod:`effinfer.data` (never the evaluation prompt set or the test split): raw text windows
to continue (``corpus``) and instructions over passages (``instructions``); with
``rationale`` the instructions ask for an explanation before the answer, as in "Distilling
Step-by-Step!" (Hsieh et al., arXiv:2305.02301), so the student imitates the reasoning too.
Training goes through :mod:`effinfer.plugins.model.training`; the run record gives the
teacher's generation cost, the training cost and held-out perplexity before and after.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from effinfer.core import Feature, Paper, Requirement, Technique, hookimpl
from effinfer.core.stages import ModelStage
from effinfer.plugins.model.distillation.common import (StudentConfig, before_after_note, checkpoint_identity, freeze,
                                                        held_out_windows, probe, trainable)
from effinfer.plugins.model.distillation.student import build_student, check_drop, describe
from effinfer.plugins.model.training import checkpoint_path, run_key, sequence_batches, token_batches, train

INSTRUCTIONS = (
    "Summarize the following passage in two or three sentences.\n\n{passage}",
    "Continue this text for a few sentences in the same style.\n\n{passage}",
    "What is this passage about? Explain it briefly.\n\n{passage}",
    "Write a question a reader could ask about this passage, and answer it.\n\n{passage}",
)
RATIONALE = "\n\nFirst explain your reasoning step by step, then give your answer."


def instruction_prompts(count: int, rationale: bool, corpora: tuple[str, ...] = ("wikipedia", "shakespeare")
                        ) -> list[str]:
    from effinfer.data import load_corpus

    passages = []
    for name in corpora:
        for text in load_corpus(name, split="calibration")["text"]:
            passages += [p.strip()[:600] for p in text.split("\n\n") if len(p.strip()) > 200][:3]
    suffix = RATIONALE if rationale else ""
    return [INSTRUCTIONS[i % len(INSTRUCTIONS)].format(passage=passages[(i * 7) % len(passages)]) + suffix
            for i in range(count)]


def teacher_texts(teacher: nn.Module, tokenizer: Any, prompts: list[Any], chat: bool, new_tokens: int,
                  sample: bool, temperature: float, seed: int, batch_size: int = 8) -> tuple[list[list[int]], list[int]]:
    """Prompt + teacher continuation ids per prompt (a prompt is text, or a list of token ids), and
    each prompt's length; decoded by the default engine's plain loop."""
    from effinfer.core.compose import make_engine
    from effinfer.core.generation import GenerationConfig, encode_prompts, stop_token_ids

    strategy = make_engine().decoding()
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=sample, temperature=temperature, seed=seed)
    stops = stop_token_ids(tokenizer, teacher, config)
    device = next(teacher.parameters()).device
    sequences, lengths = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        if chat:
            ids, mask = encode_prompts(tokenizer, chunk, True, device)
        else:
            ids = torch.tensor(chunk, device=device)
            mask = torch.ones_like(ids)
        result = strategy.generate(teacher, ids, mask, config, stops)
        for row, answer in enumerate(result.sequences):
            prompt = ids[row][mask[row].bool()].tolist()
            sequences.append(prompt + answer)
            lengths.append(len(prompt))
    return sequences, lengths


class BlackBoxDistillation(Technique):
    name = "kd_black_box"
    node = "model.compression.distillation.black_box"
    paper = Paper(title="Distilling Step-by-Step! Outperforming Larger Language Models with Less Training Data "
                        "and Smaller Model Sizes", year=2023, arxiv="2305.02301")
    summary = ("Fine-tunes a layer-dropped copy of the model only on text the full model generates (corpus "
               "continuations and instructions, optionally explain-then-answer): no teacher logits.")
    requires = frozenset({Requirement.TRAINING})
    needs_features = frozenset({Feature.DENSE_WEIGHTS})
    removes_features = frozenset({Feature.ALL_LAYERS})
    bench_config = {"drop": 6, "steps": 12, "batch_size": 2, "num_prompts": 8, "new_tokens": 48}

    class Config(StudentConfig):
        prompts: Literal["corpus", "instructions", "both"] = Field(
            "both", description="teacher prompts: calibration-corpus windows to continue, instructions over "
                                "calibration passages (chat template), or half of each")
        num_prompts: int = Field(48, ge=1, le=100_000, description="prompts the teacher answers")
        prompt_tokens: int = Field(64, ge=4, le=4096, description="tokens of each corpus window prompt")
        new_tokens: int = Field(96, ge=4, le=4096, description="tokens the teacher writes per prompt")
        rationale: bool = Field(False, description="instructions ask the teacher to explain step by step before "
                                                   "answering (distilling step-by-step)")
        sample: bool = Field(True, description="the teacher samples (else greedy)")
        temperature: float = Field(0.8, gt=0.0, le=5.0, description="the teacher's sampling temperature")

    def check_model_config(self, config: Any) -> list[str]:
        layers = getattr(config, "num_hidden_layers", None)
        return check_drop(layers, self.config.drop) if layers is not None else []

    def teacher_data(self, teacher: nn.Module, tokenizer: Any) -> tuple[list[list[int]], list[int]]:
        c = self.config
        corpus_count = {"corpus": c.num_prompts, "instructions": 0, "both": c.num_prompts // 2}[c.prompts]
        sequences, lengths = [], []
        if corpus_count:
            windows = next(token_batches(tokenizer, corpus_count, c.prompt_tokens, seed=c.seed + 7))
            s, n = teacher_texts(teacher, tokenizer, windows.tolist(), False, c.new_tokens, c.sample,
                                 c.temperature, c.seed)
            sequences, lengths = sequences + s, lengths + n
        if c.num_prompts - corpus_count:
            prompts = instruction_prompts(c.num_prompts - corpus_count, c.rationale)
            s, n = teacher_texts(teacher, tokenizer, prompts, True, c.new_tokens, c.sample, c.temperature, c.seed)
            sequences, lengths = sequences + s, lengths + n
        return sequences, lengths

    @hookimpl
    def effinfer_transform_model(self, stage: ModelStage) -> None:
        c = self.config
        teacher = stage.model
        num_layers = teacher.config.num_hidden_layers
        device = next(teacher.parameters()).device
        calibration = next(token_batches(stage.tokenizer, 8, min(c.seq_len, 256), seed=c.seed + 99))
        student, dropped = build_student(teacher, c.drop, c.rule, calibration)
        self.note(describe(num_layers, dropped, c.rule))
        windows = held_out_windows(stage.tokenizer, c.eval_windows, c.seq_len)
        before = probe(student, teacher, windows) if windows is not None and c.steps else None
        if c.steps:
            path = checkpoint_path(self.name, run_key(*checkpoint_identity(teacher, self.name, c))) \
                if c.checkpoint else None
            parameters = trainable(student, c.train)
            if path is not None and path.exists():
                batches: Any = iter(())  # the finished checkpoint is read back: no teacher text needed
                generated = "teacher text: read back with the checkpoint"
            else:
                started = time.perf_counter()
                sequences, lengths = self.teacher_data(teacher, stage.tokenizer)
                written = sum(len(s) for s in sequences) - sum(lengths)
                generated = (f"teacher wrote {written} tokens for {len(sequences)} prompts in "
                             f"{time.perf_counter() - started:.1f} s")
                pad = stage.tokenizer.pad_token_id if stage.tokenizer.pad_token_id is not None else 0
                # keep every answer and, within seq_len, the end of its prompt; drop empty answers
                kept = [(s[max(0, len(s) - c.seq_len):], max(0, n - max(0, len(s) - c.seq_len)))
                        for s, n in zip(sequences, lengths) if len(s) > n]
                if not kept:
                    raise RuntimeError("the teacher wrote no tokens for any prompt; raise new_tokens")
                sequences, lengths = [s for s, _ in kept], [n for _, n in kept]
                batches = ((ids.to(device), labels.to(device)) for ids, labels in
                           sequence_batches(sequences, min(c.batch_size, len(sequences)), pad, c.seed, lengths))
            self.note(generated)

            def loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
                ids, labels = batch
                logits = student(input_ids=ids, use_cache=False).logits[:, :-1].float()
                return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                       ignore_index=-100)

            student.train()
            cost = train(parameters, loss, batches, c.steps, lr=c.lr, warmup=max(1, c.steps // 10), checkpoint=path,
                         checkpoint_every=c.checkpoint_every, description=f"{self.name}: CE on teacher text")
            freeze(student)
            self.cost = cost
            self.note(f"fine-tuned on teacher text{' (rationales)' if c.rationale else ''}: {cost.describe()}")
        if before is not None:
            self.measured = {"before": before, "after": probe(student, teacher, windows)}
            self.note(before_after_note(self.measured, len(windows)))
        stage.model = student
