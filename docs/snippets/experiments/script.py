"""Compose two techniques on the default model and print what each stage did."""

from effinfer.core.errors import ExperimentError
from effinfer.core.experiment import Experiment
from effinfer.core.runner import run_experiment

experiment = Experiment(
    name="int8-with-lookup",
    techniques=["rtn:bits=8", {"name": "prompt_lookup", "config": {"num_draft_tokens": 8}}],
    prompts=["According to the passage, what is the capital of France?"],
    documents=["France is a country in Western Europe. Its capital and largest city is Paris."],
    generation={"max_new_tokens": 32},
)

try:
    experiment.build_stack()  # validates names, configs and conflicts; loads nothing
except ExperimentError as error:
    raise SystemExit(str(error)) from None

run = run_experiment(experiment)  # load, apply the stack, generate, restore
for level, technique, note in run.report.entries:
    print(f"{level:>6} {technique}: {note}")
for completion in run.completions:
    print(completion.prompt_tokens, "prompt tokens ->", completion.text)
print(f"{run.generation.new_tokens} new tokens in {run.generation.decode_seconds:.2f} s")
print(experiment.to_yaml())  # the same experiment as a YAML file for `effinfer run`
