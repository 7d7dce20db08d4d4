"""Multiple-choice tasks of BIG-bench, read from the ``bigbench==1.0.0`` sdist on PyPI.

Source: ``bigbench-1.0.0/bigbench/benchmark_tasks/<task>[/<subtask>]/task.json`` inside the
sdist (358 MB, Apache-2.0; https://github.com/google/BIG-bench). The sdist is fetched once
into the cache and only the ``task.json`` files of :data:`BIGBENCH_TASKS` are extracted
from it (one streaming pass over the ``.tar.gz``, a few seconds), into
``cache_dir()/data/bigbench-1.0.0/tasks/``. Later loads read those files only.

Each example has an ``input`` and ``target_scores`` (choice -> score). A record here is::

    {"idx": position in task.json, "question": input, "choices": [...],
     "gold": index of the first choice with the top score, "correct": [every top-score index]}

Scoring is zero-shot cloze, as in lm-eval: the prompt ``"Q: {question}\\nA:"`` and each
choice as a continuation (``acc`` = argmax log-likelihood, ``acc_norm`` = per character).
``gold`` is the single target handed to lm-eval; ``correct`` keeps the few examples with
several right answers (one in ``general_knowledge``) for scorers that accept any of them.

Tasks (measured for SmolLM2-135M in DATA-SOURCES.md): five that a 135M model solves clearly
above chance, and ``physical_intuition`` as a near-chance control.
"""

from __future__ import annotations

import functools
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from datasets import Dataset, Features, Sequence, Value

from effinfer.data import _store

PACKAGE = "bigbench"
VERSION = "1.0.0"
LICENSE = "Apache-2.0"
TASKS_ROOT = "bigbench/benchmark_tasks"
LIMIT_SEED = 1234
LM_EVAL_PREFIX = "effinfer_bb_"
LM_EVAL_GROUP = "effinfer_bb"
DOC_TO_TEXT = "Q: {{question}}\nA:"

_FEATURES = Features({
    "idx": Value("int64"),
    "question": Value("string"),
    "choices": Sequence(Value("string")),
    "gold": Value("int64"),
    "correct": Sequence(Value("int64")),
})


@dataclass(frozen=True)
class BigBenchTask:
    """One BIG-bench (sub)task; ``n_examples`` and ``chance`` are measured on the full file."""

    name: str
    task: str
    subtask: str | None
    description: str
    n_examples: int
    chance: float
    control: bool = False

    @property
    def member(self) -> str:
        """Path of the task file inside the ``bigbench`` package."""
        parts = [TASKS_ROOT, self.task] + ([self.subtask] if self.subtask else []) + ["task.json"]
        return "/".join(parts)

    @property
    def lm_eval_name(self) -> str:
        """The task name in the lm-eval YAML files written by :func:`write_lm_eval_tasks`."""
        return LM_EVAL_PREFIX + self.name

    def provenance(self) -> dict[str, Any]:
        """Package, version, file and license of this task."""
        return {"package": PACKAGE, "version": VERSION, "member": self.member, "license": LICENSE,
                "url": _store.pypi_url(PACKAGE, VERSION)}


BIGBENCH_TASKS: dict[str, BigBenchTask] = {
    task.name: task
    for task in (
        BigBenchTask("general_knowledge", "general_knowledge", None,
                     "Answer basic general-knowledge questions", 70, 0.1444),
        BigBenchTask("phrase_relatedness", "phrase_relatedness", None,
                     "Pick the phrase most related to a given phrase", 100, 0.25),
        BigBenchTask("social_iqa", "social_iqa", None,
                     "Motivations, reactions and consequences of everyday social situations", 1954, 0.3337),
        BigBenchTask("goal_step_wikihow", "goal_step_wikihow", "goal_inference",
                     "Given a wikiHow step, choose the most likely goal", 1703, 0.2499),
        BigBenchTask("emoji_movie", "emoji_movie", None,
                     "Guess a popular movie from its emoji description", 100, 0.2),
        BigBenchTask("physical_intuition", "physical_intuition", None,
                     "Deduce the physical mechanism behind a system (near-chance control)", 81, 0.2549,
                     control=True),
    )
}


# --------------------------------------------------------------------------- public API


def load_task(name: str, limit: int | None = None) -> Dataset:
    """The examples of one task (columns ``idx``, ``question``, ``choices``, ``gold``, ``correct``).

    ``limit`` keeps ``limit`` examples drawn by a fixed seeded shuffle, returned in file order;
    a smaller limit gives a subset of a larger one. ``None`` keeps every example.
    """
    return Dataset.from_list(task_examples(name, limit), features=_FEATURES)


def task_examples(name: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Like :func:`load_task`, as plain dicts."""
    examples = parse_examples(_read_task_json(_task(name)))
    return _subsample(examples, limit)


def chance_level(name: str, limit: int | None = None) -> float:
    """Expected accuracy of a uniform random guess: mean over examples of correct / choices."""
    return _chance(task_examples(name, limit))


def _chance(examples: list[dict[str, Any]]) -> float:
    return sum(len(e["correct"]) / len(e["choices"]) for e in examples) / len(examples)


def parse_examples(task_json: dict[str, Any]) -> list[dict[str, Any]]:
    """Multiple-choice records from a BIG-bench ``task.json`` (examples without choices skipped)."""
    records = []
    for idx, example in enumerate(task_json.get("examples", [])):
        scores = example.get("target_scores") or {}
        if len(scores) < 2:
            continue
        choices = [str(choice).strip() for choice in scores]
        values = [float(value) for value in scores.values()]
        best = max(values)
        correct = [i for i, value in enumerate(values) if value == best]
        records.append({"idx": idx, "question": str(example["input"]).strip(), "choices": choices,
                        "gold": correct[0], "correct": correct})
    return records


def write_lm_eval_tasks(dest_dir: Path, names: list[str] | None = None, limit: int | None = None) -> Path:
    """Write lm-eval 0.4 task YAMLs (plus their JSONL data) for ``names`` into ``dest_dir``.

    Returns the folder to pass as ``TaskManager(include_path=str(folder), include_defaults=False)``.
    Each task is ``effinfer_bb_<name>``; the group ``effinfer_bb`` lists them all. The YAMLs
    point at the JSONL files by absolute path (``dataset_path: json``), so no hub is involved.
    """
    dest_dir = Path(dest_dir).resolve()
    dest_dir.mkdir(parents=True, exist_ok=True)
    names = list(BIGBENCH_TASKS) if names is None else list(names)
    for name in names:
        task = _task(name)
        examples = task_examples(name, limit)
        data_file = dest_dir / f"{task.lm_eval_name}.jsonl"
        _store.write_jsonl(data_file, examples)
        config = _task_yaml(task, data_file, chance=round(_chance(examples), 4))
        _store.write_text_atomic(dest_dir / f"{task.lm_eval_name}.yaml", config)
    group = {"group": LM_EVAL_GROUP, "task": [_task(name).lm_eval_name for name in names],
             "metadata": {"version": 1.0}}
    _store.write_text_atomic(dest_dir / f"{LM_EVAL_GROUP}.yaml", yaml.safe_dump(group, sort_keys=False))
    return dest_dir


# --------------------------------------------------------------------------- internals


def _task(name: str) -> BigBenchTask:
    if name not in BIGBENCH_TASKS:
        raise ValueError(f"unknown BIG-bench task {name!r}; available: {', '.join(BIGBENCH_TASKS)}")
    return BIGBENCH_TASKS[name]


def _subsample(examples: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    if limit is None or limit >= len(examples):
        return examples
    if limit < 1:
        raise ValueError(f"limit must be a positive number of examples (got {limit})")
    order = _store.stable_order([str(e["idx"]) for e in examples], salt=str(LIMIT_SEED))
    return [examples[i] for i in sorted(order[:limit])]


def _task_yaml(task: BigBenchTask, data_file: Path, chance: float) -> str:
    """One lm-eval 0.4 task config: zero-shot cloze over local JSONL data."""
    metric = {"aggregation": "mean", "higher_is_better": True}
    config = {
        "task": task.lm_eval_name,
        "dataset_path": "json",
        # The Arrow copy that ``datasets`` makes stays next to the data, not in ~/.cache/huggingface.
        "dataset_kwargs": {"data_files": {"test": str(data_file)},
                           "cache_dir": str(data_file.parent / "hf_datasets_cache")},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": DOC_TO_TEXT,
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "metric_list": [{"metric": "acc", **metric}, {"metric": "acc_norm", **metric}],
        "metadata": {"version": 1.0, "source": f"{PACKAGE}=={VERSION}:{task.member}",
                     "license": LICENSE, "chance": chance},
    }
    header = f"# BIG-bench {task.task}{'/' + task.subtask if task.subtask else ''} ({PACKAGE}=={VERSION}, {LICENSE})\n"
    return header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def _tasks_dir() -> Path:
    return _store.data_dir(PACKAGE, VERSION) / "tasks"


@functools.cache
def unavailable_reason() -> str | None:
    """Why this machine cannot read the BIG-bench task files (``None``: it can).

    Since December 2026 PyPI no longer serves ``bigbench==1.0.0`` (its JSON API answers 403 and
    the simple index lists only 0.0.1, which ships no task files); a machine whose cache does not
    already hold the extracted tasks cannot get them. The evaluator then leaves the zero-shot
    task section out of a run, with this reason in the run's notes, instead of failing the stack.
    """
    from effinfer.data.cache import FetchError

    try:
        for task in BIGBENCH_TASKS.values():
            _read_task_json(task)
    except FetchError as error:
        from effinfer.data.cache import cache_dir

        return (f"BIG-bench tasks not measured: the task files are not in the cache and {PACKAGE}=={VERSION} could "
                f"not be fetched ({str(error).splitlines()[0]}); put its sdist in "
                f"{cache_dir() / 'downloads' / f'{PACKAGE}-{VERSION}'} to measure them")
    return None


def _read_task_json(task: BigBenchTask) -> dict[str, Any]:
    path = _tasks_dir() / PurePosixPath(task.member).relative_to(TASKS_ROOT)
    if not path.is_file():
        _extract_task_files()
    return json.loads(path.read_text(encoding="utf-8"))


def _extract_task_files() -> None:
    """Extract every task.json of :data:`BIGBENCH_TASKS` from the sdist in one streaming pass."""
    archive = _store.fetch_archive(f"{PACKAGE}=={VERSION}", sdist=True)
    wanted = {f"{PACKAGE}-{VERSION}/{task.member}" for task in BIGBENCH_TASKS.values()}
    found: list[str] = []
    _store.status(f"extracting {len(wanted)} BIG-bench task files from {archive.name}")
    prefix = f"{PACKAGE}-{VERSION}/{TASKS_ROOT}"
    with (
        archive.open("rb") as raw,
        _store.byte_progress("scanning bigbench sdist", archive.stat().st_size) as update,
        tarfile.open(fileobj=raw, mode="r|gz") as sdist,
    ):
        for member in sdist:  # streaming: members are read in archive order, once
            update(raw.tell())
            if member.isfile() and member.name in wanted:
                target = _tasks_dir() / PurePosixPath(member.name).relative_to(prefix)
                _store.write_text_atomic(target, sdist.extractfile(member).read().decode("utf-8"))
                found.append(member.name)
                if len(found) == len(wanted):
                    break
    missing = sorted(wanted - set(found))
    if missing:
        raise RuntimeError(f"{archive} lacks the BIG-bench task files {missing}")
    _store.write_meta(_store.data_dir(PACKAGE, VERSION), {
        "package": PACKAGE, "version": VERSION, "license": LICENSE, "archive": archive.name,
        "url": _store.pypi_url(PACKAGE, VERSION), "members": sorted(found),
    })
