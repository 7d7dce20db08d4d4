"""Shared plumbing for the data loaders: cache folders, JSONL files, progress bars.

Every processed data set lives under ``cache_dir()/data/<name>-<version>/`` (the cache
root is ``$EFFINFER_CACHE`` or ``~/.cache/effinfer``). Files are written atomically
(temporary file + rename), so an interrupted build never leaves a half-written file that
a later load would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from effinfer.data.cache import FetchError, cache_dir, fetch_distribution

#: Bump when the processing of any source changes; stale caches are then rebuilt.
PROCESSING_VERSION = "2"

#: pip 26.3 rejects, even under ``--no-deps``, any sdist from PyPI whose metadata declares a
#: direct URL dependency (``bigbench`` 1.0.0 does: ``bleurt @ file://...``). Older pips only
#: check that while resolving dependencies, so this one downloads such sdists.
FALLBACK_PIP = "pip==26.2"

_console = Console(stderr=True)


def data_dir(name: str, version: str) -> Path:
    """``cache_dir()/data/<name>-<version>``, created on demand."""
    path = cache_dir() / "data" / f"{name}-{version}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_archive(requirement: str, *, sdist: bool = False) -> Path:
    """:func:`effinfer.data.cache.fetch_distribution`, plus a fallback for sdists that the
    running pip refuses to download because of a direct URL dependency (see FALLBACK_PIP)."""
    try:
        return fetch_distribution(requirement, sdist=sdist)
    except FetchError as error:
        if not sdist or "direct URL dependencies" not in str(error):
            raise
    return _download_with_pinned_pip(requirement)


def _download_with_pinned_pip(requirement: str) -> Path:
    """Run ``pip download --no-deps`` with the FALLBACK_PIP wheel (pip runs from its wheel)."""
    pip_wheel = fetch_distribution(FALLBACK_PIP)
    name, _, version = requirement.partition("==")
    dest = cache_dir() / "downloads" / f"{name}-{version}"
    dest.mkdir(parents=True, exist_ok=True)
    status(f"retrying {requirement} with {FALLBACK_PIP} (the installed pip refuses its metadata)")
    cmd = [sys.executable, str(pip_wheel / "pip"), "download", "--no-deps", "--disable-pip-version-check",
           "--no-binary", ":all:", "-d", str(dest), requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(dest.glob("*.tar.gz")) + sorted(dest.glob("*.zip"))
    if done.returncode != 0 or not archives:
        raise FetchError(f"could not download {requirement!r} with {FALLBACK_PIP} "
                         f"(exit {done.returncode}).\n{done.stderr.strip()[-2000:]}")
    return archives[0]


def stable_order(keys: list[str], salt: str) -> list[int]:
    """Indices of ``keys`` sorted by SHA-256 of ``salt:key``: a seeded shuffle that is the same
    on every machine and every Python version (``random``'s sample/shuffle are not promised to be)."""
    return sorted(range(len(keys)), key=lambda i: (_digest(salt, keys[i]), i))


def stable_int(salt: str, key: str, low: int, high: int) -> int:
    """A deterministic integer in ``[low, high)`` derived from SHA-256 of ``salt:key``."""
    if high <= low:
        raise ValueError(f"empty range [{low}, {high})")
    return low + int(_digest(salt, key), 16) % (high - low)


def _digest(salt: str, key: str) -> str:
    return hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()


def pypi_url(package: str, version: str) -> str:
    """The PyPI page of one release."""
    return f"https://pypi.org/project/{package}/{version}/"


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Write one JSON object per line (UTF-8, non-ASCII kept as is), atomically."""
    lines = (json.dumps(record, ensure_ascii=False) for record in records)
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a file written by :func:`write_jsonl`."""
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_meta(folder: Path) -> dict[str, Any] | None:
    """The ``meta.json`` of a processed data set, or None when absent or stale."""
    path = folder / "meta.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    if meta.get("processing_version") != PROCESSING_VERSION:
        return None
    return meta


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """Write ``meta.json`` last, so that its presence marks a complete build."""
    meta = {"processing_version": PROCESSING_VERSION, **meta}
    write_text_atomic(folder / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


def status(message: str) -> None:
    """One line on stderr (the same console the cache helper uses)."""
    _console.print(f"[cyan]{message}[/]")


def track(items: list[Any], description: str) -> Iterator[Any]:
    """A transient progress bar over a list (on stderr)."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(), console=_console, transient=True,
    ) as progress:
        task = progress.add_task(description, total=len(items))
        for item in items:
            yield item
            progress.advance(task)


@contextmanager
def byte_progress(description: str, total: int) -> Iterator[Any]:
    """A transient progress bar counting bytes; yields ``update(position)``."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
        console=_console, transient=True,
    ) as progress:
        task = progress.add_task(description, total=total)
        yield lambda position: progress.update(task, completed=position)
