"""``effinfer demo``: one technique per level, composed on the embedded model.

Runs the baseline and the composition ``selective_context → rtn → prompt_lookup`` on
the same passage-based prompt and prints what each stage did and both answers.
"""

from __future__ import annotations

from collections.abc import Iterator

from effinfer.core.experiment import Experiment
from effinfer.core.models import load_model
from effinfer.core.runner import ExperimentRun, run_experiment
from effinfer.data import load_corpus

DEMO_STACK = ["selective_context:ratio=0.3,unit=word", "rtn:bits=8", "prompt_lookup:num_draft_tokens=8"]


def demo_passage(max_chars: int = 1200) -> tuple[str, str]:
    """The title and lead paragraphs of the first article of the Wikipedia test split."""
    article = load_corpus("wikipedia", split="test")[0]
    lead = ""
    for paragraph in article["text"].split("\n"):
        if len(lead) + len(paragraph) > max_chars and lead:
            break
        lead = f"{lead}\n{paragraph}".strip()
    return article["title"], lead


def demo_experiments(model: str) -> list[Experiment]:
    title, passage = demo_passage()
    question = f"According to the passage above, who or what is {title}? Answer in one sentence."
    common = dict(model=model, prompts=[question], documents=[passage], generation={"max_new_tokens": 48})
    return [Experiment(name="baseline", **common), Experiment(name="composed", techniques=DEMO_STACK, **common)]


def demo_runs(model: str) -> Iterator[tuple[str, ExperimentRun]]:
    """Yield ``(heading, run)`` for the baseline then the composition (the CLI prints them)."""
    experiments = demo_experiments(model)
    for experiment in experiments:  # validate every stack before loading anything
        experiment.build_stack()
    loaded = load_model(model)
    for experiment in experiments:
        stack = " → ".join(t.name for t in experiment.techniques) or "no technique"
        yield f"{experiment.name}: {stack}", run_experiment(experiment, model=loaded[0], tokenizer=loaded[1])
