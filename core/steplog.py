"""Progress a person can follow when the output is not a terminal (CI logs, ``nohup``, pipes).

On a terminal, Rich progress bars redraw in place. Written to a file they show nothing until
the end, so long commands instead print one line per finished step, with its duration::

    12:03:07 model smollm2-135m-instruct loaded (3.1 s)
    12:04:10 bench 2/19: rtn:bits=4: ok (63 s)

:class:`LineProgress` has the part of :class:`rich.progress.Progress`'s API the evaluator
uses (``add_task``, ``update``, ``advance``), so it can be given wherever a ``Progress`` is.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.text import Text

__all__ = ["LineProgress", "StepLog", "escape_name", "plain"]


def plain(description: str, literal_prefix: str = "") -> str:
    """A progress description without its Rich markup (``[green]ok[/]`` → ``ok``); a leading
    ``literal_prefix`` (the task's own name, e.g. a stack ``rtn:x=[a]``) is kept as written."""
    if literal_prefix and description.startswith(literal_prefix):
        return literal_prefix + plain(description[len(literal_prefix):])
    try:
        return Text.from_markup(description).plain
    except Exception:  # not valid markup: it was meant literally
        return description


def escape_name(description: str, name: str) -> str:
    """Escape the task's own ``name`` where the description starts with it, keeping the markup
    that follows (the evaluator writes ``f"{stack}: [green]ok[/] …"``)."""
    if name and description.startswith(name):
        return escape(name) + description[len(name):]
    return description


def _stamp() -> str:
    return time.strftime("%H:%M:%S")


class StepLog:
    """``with log.step("loading …"):`` prints ``HH:MM:SS loading … (3.1 s)`` when the step ends,
    only when the console is not a terminal (a terminal has its progress bars)."""

    def __init__(self, console: Console, force: bool | None = None) -> None:
        self.console = console
        self.enabled = (not console.is_terminal) if force is None else force

    @contextmanager
    def step(self, done: str, failed: str | None = None) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        except BaseException:
            if self.enabled:
                self.line(f"{failed or done} failed after {time.perf_counter() - started:.1f} s")
            raise
        if self.enabled:
            self.line(f"{done} ({time.perf_counter() - started:.1f} s)")

    def line(self, text: str) -> None:
        self.console.print(f"{_stamp()} {text}", markup=False, highlight=False, soft_wrap=True)


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    step_started: float = field(default_factory=time.perf_counter)
    done: bool = False
    first: str = ""


class LineProgress:
    """A stand-in for :class:`rich.progress.Progress` that logs finished steps as lines.

    A task whose description changes logs the previous description as a finished step (the
    evaluator renames a stack's task at each phase); a task that completes logs its final
    description and total time; the overall task (the first one added) logs ``k/n`` on
    every advance.
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self.log = StepLog(console, force=True)
        self._tasks: dict[int, _Task] = {}
        self._overall: int | None = None

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def start(self) -> None:
        return None

    def stop(self) -> None:
        return None

    def add_task(self, description: str, total: float | None = 100.0, **_: Any) -> int:
        task_id = len(self._tasks)
        self._tasks[task_id] = _Task(description, total, first=description)
        if self._overall is None:
            self._overall = task_id
        return task_id

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, description: str | None = None, total: float | None = None,
               completed: float | None = None, advance: float | None = None, **_: Any) -> None:
        task = self._tasks[task_id]
        now = time.perf_counter()
        if description is not None and description != task.description:
            if task_id != self._overall and not task.done:
                step = "loaded and set up" if task.description == task.first else "done"
                self.log.line(f"{plain(task.description, task.first)} {step} ({now - task.step_started:.1f} s)")
            task.description, task.step_started = description, now
        if total is not None:
            task.total = total
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        if task_id == self._overall and (advance or completed is not None):
            of = f"/{task.total:g}" if task.total else ""
            self.log.line(f"{plain(task.description, task.first)} {task.completed:g}{of} ({now - task.started:.0f} s so far)")
        elif task.total is not None and task.completed >= task.total and not task.done:
            task.done = True
            self.log.line(f"{plain(task.description, task.first)} (total {now - task.started:.1f} s)")

    def remove_task(self, task_id: int) -> None:
        self._tasks.pop(task_id, None)

    def print(self, *args: Any, **kwargs: Any) -> None:
        self.console.print(*args, **kwargs)

