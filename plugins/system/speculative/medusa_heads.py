"""Medusa heads and their training on text the model generates itself (CPU, minutes).

Cai et al., "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding
Heads", arXiv:2401.10774. Head ``k`` (1-based) maps the last hidden state ``h_t`` to the
token at ``t + k + 1`` through one residual block and the model's own (frozen) LM head:
``logits_k = lm_head(h_t + SiLU(W_k h_t + b_k))``; ``W_k`` starts at zero, so each head
starts as the model's next-token head. Training is Medusa-1 (frozen backbone) with the
paper's self-distillation: the training text is the model's own greedy answers to prompts
built from the corpora's *calibration* split, so the heads learn the model's output
distribution without any external chat data. Loss weights decay as ``0.8^k``.

Trained heads are cached on disk, keyed by a fingerprint of the model and the training
settings; :class:`TrainingReport` records what the training cost.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

INSTRUCTIONS = (
    "Summarize the following passage in two or three sentences.\n\n{passage}",
    "Continue this text for a few sentences in the same style.\n\n{passage}",
    "What is this passage about? Explain it briefly.\n\n{passage}",
    "Write two questions a reader could ask about this passage, and answer them.\n\n{passage}",
)


class MedusaHeads(nn.Module):
    """``count`` residual heads over a hidden size, sharing an external LM head.

    The heads are trained and kept in float32 whatever the model's dtype; ``model_dtype`` (the
    dtype of the model's activations, which its LM head takes) is what their output is cast to
    before the LM head, so a float64 or bfloat16 model works with the same cached heads
    (``None``: the heads' own dtype).
    """

    def __init__(self, hidden_size: int, count: int, model_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(count))
        self.model_dtype = model_dtype
        for block in self.blocks:
            nn.init.zeros_(block.weight)
            nn.init.zeros_(block.bias)

    def forward(self, hidden: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """Logits ``count × … × vocab`` for the tokens 2, 3, … positions after ``hidden`` (any float dtype)."""
        own = self.blocks[0].weight.dtype
        hidden, output = hidden.to(own), self.model_dtype or own
        return torch.stack([lm_head((hidden + F.silu(block(hidden))).to(output)) for block in self.blocks])


@dataclass
class TrainingReport:
    prompts: int
    generated_tokens: int
    positions: int
    generate_seconds: float
    feature_seconds: float
    train_seconds: float
    epochs: int
    final_loss: float
    head_top1: list[float]  # per head, on the last epoch's batches
    cached: bool = False

    @property
    def total_seconds(self) -> float:
        return self.generate_seconds + self.feature_seconds + self.train_seconds


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's config and a sample of every parameter."""
    digest = hashlib.sha256(model.config.to_json_string().encode())
    for name, parameter in model.named_parameters():
        digest.update(name.encode())
        digest.update(parameter.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def training_prompts(count: int, corpora: list[str]) -> list[str]:
    """``count`` instruction prompts over passages of the corpora's calibration split."""
    from effinfer.data import load_corpus

    passages = []
    for name in corpora:
        for text in load_corpus(name, split="calibration")["text"]:
            passages += [p.strip()[:700] for p in text.split("\n\n") if len(p.strip()) > 200][:3]
    if not passages:
        raise RuntimeError(f"no passages to build Medusa training prompts from in {corpora}")
    return [INSTRUCTIONS[i % len(INSTRUCTIONS)].format(passage=passages[(i * 7) % len(passages)])
            for i in range(count)]


def self_generate(model: nn.Module, tokenizer: Any, prompts: list[str], new_tokens: int, engine: Any,
                  batch_size: int = 8) -> list[list[int]]:
    """Prompt + greedy answer token ids per prompt, decoded by ``engine``'s plain loop in batches."""
    from effinfer.core.generation import GenerationConfig, encode_prompts, stop_token_ids

    strategy = engine.decoding()
    config = GenerationConfig(max_new_tokens=new_tokens)
    stops = stop_token_ids(tokenizer, model, config)
    device = next(model.parameters()).device
    sequences = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = encode_prompts(tokenizer, prompts[start:start + batch_size], True, device)
        result = strategy.generate(model, ids, mask, config, stops)
        for row, answer in enumerate(result.sequences):
            sequences.append(ids[row][mask[row].bool()].tolist() + answer)
    return sequences


@torch.inference_mode()
def hidden_states(model: nn.Module, sequence: list[int]) -> torch.Tensor:
    """Final-norm hidden states of one sequence (``T × H``)."""
    ids = torch.tensor([sequence], device=next(model.parameters()).device)
    return model.get_decoder()(input_ids=ids).last_hidden_state[0].float()


def training_pairs(model: nn.Module, sequences: list[list[int]], prompt_lengths: list[int], heads: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of answer positions and the tokens 2…heads+1 positions later (−100: past the end)."""
    features, targets = [], []
    for sequence, prompt_length in zip(sequences, prompt_lengths):
        hidden = hidden_states(model, sequence)
        ids = torch.tensor(sequence + [-100] * (heads + 1))
        for t in range(max(prompt_length - 1, 0), len(sequence) - 2):
            features.append(hidden[t])
            targets.append(ids[t + 2:t + 2 + heads])
    return torch.stack(features), torch.stack(targets)


def train(heads: MedusaHeads, lm_head: nn.Module, features: torch.Tensor, targets: torch.Tensor, epochs: int,
          lr: float, batch_size: int, seed: int) -> tuple[float, list[float]]:
    """Adam on the heads' cross-entropy (weights 0.8^k); returns the last loss and per-head top-1."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    weights = torch.tensor([0.8 ** k for k in range(len(heads.blocks))])
    frozen = [(p, p.requires_grad) for p in lm_head.parameters()]
    for parameter, _ in frozen:
        parameter.requires_grad_(False)
    try:
        return _epochs(heads, lm_head, features, targets, epochs, optimizer, weights, batch_size, generator)
    finally:
        for parameter, flag in frozen:
            parameter.requires_grad_(flag)


def _epochs(heads: MedusaHeads, lm_head: nn.Module, features: torch.Tensor, targets: torch.Tensor, epochs: int,
            optimizer: torch.optim.Optimizer, weights: torch.Tensor, batch_size: int,
            generator: torch.Generator) -> tuple[float, list[float]]:
    loss_value, correct, counted = 0.0, torch.zeros(len(heads.blocks)), torch.zeros(len(heads.blocks))
    for epoch in range(epochs):
        order = torch.randperm(len(features), generator=generator)
        correct.zero_()
        counted.zero_()
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            logits = heads(features[batch], lm_head)  # heads × B × V
            labels = targets[batch].T  # heads × B
            losses = torch.stack([F.cross_entropy(logits[k], labels[k], ignore_index=-100)
                                  for k in range(len(heads.blocks))])
            loss = (weights * torch.nan_to_num(losses)).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_value = float(loss.detach())
            valid = labels != -100
            correct += ((logits.argmax(-1) == labels) & valid).sum(-1).float()
            counted += valid.sum(-1).float()
    return loss_value, (correct / counted.clamp_min(1)).tolist()


def train_medusa(model: nn.Module, tokenizer: Any, options: Any, engine: Any) -> tuple[MedusaHeads, TrainingReport]:
    """Heads for ``model`` from the cache, or trained now on self-generated text."""
    from effinfer.data.cache import cache_dir

    embeddings = model.get_input_embeddings().weight
    heads = MedusaHeads(model.config.hidden_size, options.heads, embeddings.dtype).to(embeddings.device)
    key_data = [model_fingerprint(model), options.heads, options.train_prompts, options.train_new_tokens,
                options.epochs, options.lr, options.seed, options.corpora]
    key = hashlib.sha256(json.dumps(key_data).encode()).hexdigest()[:16]
    path = Path(cache_dir()) / "medusa" / f"heads-{key}.pt"
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        heads.load_state_dict(saved["state"])
        return heads.eval(), TrainingReport(**json.loads(saved["report"]) | {"cached": True})
    torch.manual_seed(options.seed)
    started = time.perf_counter()
    prompts = training_prompts(options.train_prompts, options.corpora)
    sequences = self_generate(model, tokenizer, prompts, options.train_new_tokens, engine)
    generated = time.perf_counter()
    from effinfer.core.generation import encode_prompts

    prompt_lengths = [int(encode_prompts(tokenizer, [p], True)[1].sum()) for p in prompts]
    features, targets = training_pairs(model, sequences, prompt_lengths, options.heads)
    featured = time.perf_counter()
    with torch.enable_grad():
        loss, top1 = train(heads, model.get_output_embeddings(), features, targets, options.epochs, options.lr,
                           options.batch_size, options.seed)
    trained = time.perf_counter()
    report = TrainingReport(len(prompts), sum(len(s) for s in sequences) - sum(prompt_lengths), len(features),
                            generated - started, featured - generated, trained - featured, options.epochs, loss,
                            [round(t, 4) for t in top1])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": heads.state_dict(), "report": json.dumps(asdict(report))}, path)
    return heads.eval(), report
