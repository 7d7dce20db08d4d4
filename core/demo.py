"""``effinfer demo``: one technique per level, composed on the embedded model.

Runs the baseline and the composition ``selective_context → rtn → prompt_lookup`` on
the same passage-based prompt and prints what each stage did and both answers.
"""

from __future__ import annotations

from rich.console import Console

from effinfer.core.experiment import Experiment
from effinfer.core.models import load_model

DEMO_STACK = ["selective_context:ratio=0.3,unit=word", "rtn:bits=8", "prompt_lookup:num_draft_tokens=8"]


def demo_experiments(model: str) -> list[Experiment]:
    from effinfer.evaluation.data import load_prompts

    prompt = load_prompts("qa", n_per_category=1)[0]
    question, documents = prompt.question_and_documents()
    common = dict(model=model, prompts=[question], documents=documents, generation={"max_new_tokens": 48})
    return [Experiment(name="baseline", **common), Experiment(name="composed", techniques=DEMO_STACK, **common)]


def run_demo(model: str, console: Console) -> None:
    from effinfer.core.cli import print_run
    from effinfer.core.runner import run_experiment

    experiments = demo_experiments(model)
    for experiment in experiments:  # validate every stack before loading anything
        experiment.build_stack()
    loaded = load_model(model)
    for experiment in experiments:
        stack = " → ".join(t.name for t in experiment.techniques) or "no technique"
        console.rule(f"[bold]{experiment.name}[/]: {stack}")
        print_run(run_experiment(experiment, model=loaded[0], tokenizer=loaded[1]), console)
