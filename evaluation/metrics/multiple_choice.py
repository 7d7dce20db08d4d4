"""A direct zero-shot multiple-choice scorer, the reference for the lm-eval bridge.

It scores exactly as lm-eval's ``multiple_choice`` output type does for the BIG-bench YAML
tasks of :mod:`effinfer.data.bigbench`: context ``"Q: {question}\\nA:"``, each
choice as the continuation ``" {choice}"`` (trailing context spaces moved into the
continuation, the pair tokenized whole and split at the context's length), ``acc`` =
argmax of the summed log-likelihood, ``acc_norm`` = argmax of the log-likelihood per
character of the choice. Standard errors are lm-eval's (sample standard deviation / √n).

It exists for two reasons: to check the bridge (tests assert both agree), and to score
data-level techniques, whose data stage must rewrite each question before scoring
(``transform``), which lm-eval's task pipeline has no hook for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

TARGET_DELIMITER = " "


def context_text(question: str) -> str:
    """The prompt of one example, as in the task YAML's ``doc_to_text``."""
    return f"Q: {question}\nA:"


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal ``_encode_pair``: encode the whole text, split at the context's length."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


@torch.inference_mode()
def choice_log_likelihoods(model: nn.Module, tokenizer: Any, context: str, choices: list[str]) -> list[float]:
    """Summed log-probability of each choice (as a continuation of ``context``)."""
    device = next(model.parameters()).device
    scores = []
    for choice in choices:
        context_ids, continuation_ids = encode_pair(tokenizer, context, TARGET_DELIMITER + choice)
        ids = torch.tensor([context_ids + continuation_ids], device=device)
        log_probs = model(input_ids=ids, use_cache=False).logits[0, :-1].float().log_softmax(-1)
        targets = ids[0, len(context_ids):]
        scores.append(float(log_probs[len(context_ids) - 1:].gather(-1, targets[:, None]).sum()))
    return scores


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and lm-eval's standard error (sample standard deviation / √n)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def score_examples(model: nn.Module, tokenizer: Any, examples: Iterable[dict[str, Any]],
                   transform: Callable[[str], str] | None = None,
                   progress: Callable[[], None] | None = None) -> dict[str, tuple[float, float] | int]:
    """``{"acc": (mean, stderr), "acc_norm": (mean, stderr), "n": n}`` over the examples.

    Each example has ``question``, ``choices`` and ``gold`` (see :func:`~effinfer.data.load_task`).
    ``transform`` rewrites the question first (a data-level technique's data stage).
    """
    acc: list[float] = []
    acc_norm: list[float] = []
    for example in examples:
        question = transform(example["question"]) if transform else example["question"]
        lls = choice_log_likelihoods(model, tokenizer, context_text(question), list(example["choices"]))
        pred = max(range(len(lls)), key=lambda i: lls[i])
        pred_norm = max(range(len(lls)), key=lambda i: lls[i] / len(example["choices"][i]))
        acc.append(float(pred == example["gold"]))
        acc_norm.append(float(pred_norm == example["gold"]))
        if progress is not None:
            progress()
    if not acc:
        raise ValueError("no examples to score")
    return {"acc": mean_and_stderr(acc), "acc_norm": mean_and_stderr(acc_norm), "n": len(acc)}
