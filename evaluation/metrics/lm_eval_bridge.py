"""lm-eval bridge: BIG-bench tasks as local YAML tasks, scored with ``HFLM`` wrapping the composed model.

The task files come from :func:`effinfer.data.write_lm_eval_tasks` (JSONL data
plus lm-eval 0.4 YAMLs with ``dataset_path: json``); they load with
``TaskManager(include_path=..., include_defaults=False)``, so lm-eval never looks at the hub
or its own task registry. ``HFLM(pretrained=<model object>)`` runs whatever the model-level
stage produced (quantized layers, pruned blocks...), exactly as it will generate.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from effinfer.data import BIGBENCH_TASKS, write_lm_eval_tasks

TaskScores = dict[str, dict[str, Any]]


def prepare_tasks(folder: Path, names: list[str], limit: int | None) -> Path:
    """Write the YAML tasks once; returns the include path."""
    return write_lm_eval_tasks(folder, names, limit=limit)


def rewrite_questions(include_path: Path, names: list[str], transform: Callable[[str], str]) -> None:
    """Apply ``transform`` to the question of every example of the written tasks, in place.

    Data-level techniques (prompt compression, retrieval) act on the request before the model
    sees it; rewriting the task data lets lm-eval score exactly what the data stage produces.
    """
    for name in names:
        config = yaml.safe_load((include_path / f"{BIGBENCH_TASKS[name].lm_eval_name}.yaml").read_text())
        data_file = Path(config["dataset_kwargs"]["data_files"]["test"])
        rows = [json.loads(line) for line in data_file.read_text().splitlines() if line.strip()]
        for row in rows:
            row["question"] = transform(row["question"])
        data_file.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence lm-eval's info logs and tqdm bars (the evaluator shows its own progress).

    lm-eval gives no switch for its bars, so stderr is muted while it runs; its exceptions
    still propagate with their messages.
    """
    for noisy in ("lm_eval", "lm-eval"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    with open(os.devnull, "w") as sink, redirect_stderr(sink):
        yield


def lm_eval_scores(model: nn.Module, tokenizer: Any, include_path: Path, names: list[str],
                   batch_size: int = 16) -> TaskScores:
    """``{task: {"acc": (mean, stderr), "acc_norm": (mean, stderr), "n": n}}`` through lm-eval."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    device = str(next(model.parameters()).device)
    lm_names = {BIGBENCH_TASKS[name].lm_eval_name: name for name in names}
    with _quiet():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        output = lm_eval.simple_evaluate(model=lm, tasks=list(lm_names), task_manager=manager, log_samples=False,
                                         verbosity="ERROR", bootstrap_iters=1)  # mean: closed-form stderr
    scores: TaskScores = {}
    for lm_name, name in lm_names.items():
        result = output["results"][lm_name]
        scores[name] = {
            "acc": (float(result["acc,none"]), _stderr(result.get("acc_stderr,none"))),
            "acc_norm": (float(result["acc_norm,none"]), _stderr(result.get("acc_norm_stderr,none"))),
            "n": int(output["n-samples"][lm_name]["effective"]),
        }
    return scores


def _stderr(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):  # lm-eval writes "N/A" when it cannot compute one
        return float("nan")
