"""The shared training service of model-level techniques that train (distillation, exit heads).

One loop, :func:`train`: AdamW (Loshchilov & Hutter, "Decoupled Weight Decay
Regularization", arXiv:1711.05101) over the parameters a technique hands it, a loss
function the technique writes (``loss_fn(batch) -> scalar``), a rich progress bar, gradient
clipping, optional checkpointing (resumable; a finished checkpoint is reused as a cache,
so an experiment that is run twice trains once), and the cost of the run — steps,
seconds, tokens — as a :class:`TrainingCost` that the technique puts in its notes (the run
record). Batches come from :func:`token_batches`: seeded windows of a corpus split of
:mod:`effinfer.data` (the calibration split by default, disjoint from the ``test`` split
that perplexity is measured on), or from :func:`sequence_batches` over token sequences a
technique made itself (teacher- or self-generated text).

The same code runs on a GPU: every tensor follows the device of the parameters.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from effinfer.core.calibration import corpus_tokens


@dataclass
class TrainingCost:
    """What a training run cost (what a technique reports in its run record)."""

    steps: int
    seconds: float
    tokens: int
    first_loss: float
    final_loss: float
    #: the run was read back from a finished checkpoint (``seconds`` is what it cost when it ran)
    cached: bool = False
    #: the step a partial checkpoint resumed from (0: from scratch)
    resumed_from: int = 0

    def describe(self) -> str:
        cached = " (read from its checkpoint)" if self.cached else ""
        resumed = f", resumed at step {self.resumed_from}" if self.resumed_from else ""
        return (f"{self.steps} steps, {self.tokens} tokens, {self.seconds:.1f} s, loss {self.first_loss:.3f} → "
                f"{self.final_loss:.3f}{resumed}{cached}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def token_batches(tokenizer: Any, batch_size: int, seq_len: int, seed: int = 0, corpus: str = "wikipedia",
                  split: str = "calibration") -> Iterator[torch.Tensor]:
    """Endless ``batch_size × seq_len`` windows of a corpus split at seeded random offsets."""
    ids = corpus_tokens(tokenizer, corpus, split)
    if len(ids) <= seq_len + 1:
        raise ValueError(f"the {corpus} {split} split has {len(ids)} tokens; windows of {seq_len} need more "
                         f"(use a shorter seq_len)")
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=generator)
        yield torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def sequence_batches(sequences: Sequence[Sequence[int]], batch_size: int, pad_id: int, seed: int = 0,
                     loss_from: Sequence[int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled ``(ids, labels)`` batches of variable-length sequences, right-padded with
    ``pad_id``; ``labels`` is ``-100`` on padding and before ``loss_from[i]`` (e.g. the prompt)."""
    if not sequences:
        raise ValueError("no sequences to train on")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(sequences), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            chosen = order[start:start + batch_size]
            width = max(len(sequences[i]) for i in chosen)
            ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
            labels = torch.full((len(chosen), width), -100, dtype=torch.long)
            for row, index in enumerate(chosen):
                sequence = torch.tensor(list(sequences[index]), dtype=torch.long)
                ids[row, :len(sequence)] = sequence
                labels[row, :len(sequence)] = sequence
                if loss_from is not None:
                    labels[row, :loss_from[index]] = -100
            yield ids, labels


def run_key(*parts: Any) -> str:
    """A short stable hash of a run's identity (model fingerprint, config …), for checkpoint names."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def batch_tokens(batch: Any) -> int:
    """Tokens in a batch: a tensor of ids, or a tuple whose first item is one (anything else: 0)."""
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.numel()) if isinstance(first, torch.Tensor) else 0


def train(parameters: dict[str, nn.Parameter], loss_fn: Callable[[Any], torch.Tensor], batches: Iterable[Any],
          steps: int, lr: float = 1e-4, weight_decay: float = 0.0, grad_clip: float | None = 1.0,
          warmup: int = 0, checkpoint: Path | None = None, checkpoint_every: int = 0,
          description: str = "training", progress: bool = True) -> TrainingCost:
    """AdamW on ``parameters`` (a name → parameter dict) for ``steps`` steps of ``loss_fn(batch)``.

    The learning rate warms up linearly for ``warmup`` steps, then decays with a cosine to 10%.
    ``checkpoint``: a file holding the parameters, the optimizer and the cost so far, written
    every ``checkpoint_every`` steps (0: only at the end); if it exists when training starts,
    a finished run is loaded instead of trained, and a partial one resumes.
    """
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1 (got {steps})")
    if not parameters:
        raise ValueError("nothing to train: the parameter dict is empty")
    params = list(parameters.values())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    done, spent, tokens, first_loss, last_loss = 0, 0.0, 0, float("nan"), float("nan")
    if checkpoint is not None and Path(checkpoint).exists():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(saved["parameters"][name].to(parameter.device, parameter.dtype))
        cost = TrainingCost(**saved["cost"])
        if saved["step"] >= steps:
            return TrainingCost(**(cost.as_dict() | {"cached": True}))
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        done, spent, tokens = saved["step"], cost.seconds, cost.tokens
        first_loss, last_loss = cost.first_loss, cost.final_loss
    resumed_from = done
    iterator = iter(batches)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("loss {task.fields[loss]}"), transient=True, disable=not progress)
    started = time.perf_counter()
    with bar, torch.enable_grad():
        task = bar.add_task(description, total=steps, completed=done, loss="…")
        while done < steps:
            batch = next(iterator)
            loss = loss_fn(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{description}: the loss became {float(loss)} at step {done}; "
                                         f"lower lr (now {lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            scheduler.step()
            last_loss = float(loss.detach())
            first_loss = last_loss if math.isnan(first_loss) else first_loss
            tokens += batch_tokens(batch)
            done += 1
            bar.update(task, advance=1, loss=f"{last_loss:.4f}")
            if checkpoint is not None and checkpoint_every and done % checkpoint_every == 0 and done < steps:
                _save(checkpoint, parameters, optimizer, scheduler, done,
                      TrainingCost(done, spent + time.perf_counter() - started, tokens, first_loss, last_loss))
    cost = TrainingCost(steps, spent + time.perf_counter() - started, tokens, first_loss, last_loss,
                        resumed_from=resumed_from)
    if checkpoint is not None:
        _save(checkpoint, parameters, None, None, steps, cost)
    return cost


def _save(path: Path, parameters: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer | None,
          scheduler: Any, step: int, cost: TrainingCost) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    finished = step >= cost.steps and cost.steps == step and optimizer is None
    state = {"step": step, "cost": cost.as_dict(),
             "parameters": {name: p.detach().cpu() for name, p in parameters.items()}}
    if not finished:  # a partial run keeps what resuming needs; a finished one only its weights
        state |= {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    torch.save(state, temporary)
    temporary.replace(path)


def checkpoint_path(kind: str, key: str) -> Path:
    """``<cache>/training/<kind>/<key>.pt``: where a technique's finished training is kept."""
    from effinfer.data.cache import cache_dir

    return Path(cache_dir()) / "training" / kind / f"{key}.pt"
