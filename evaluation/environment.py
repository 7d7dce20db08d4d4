"""The environment a run was measured in: versions, git sha, CPU/GPU, threads, load."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("effinfer", "torch", "transformers", "lm_eval", "datasets", "accelerate", "pydantic", "numpy",
            "triton")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def git_revision(folder: Path | None = None) -> dict[str, Any]:
    """``{"sha": ..., "dirty": bool}`` of the effinfer checkout, or ``{}`` outside one."""
    folder = folder or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                                capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"sha": sha, "dirty": bool(status.strip())}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_model() -> str | None:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return None


def machine_identity() -> dict[str, Any]:
    """What decides whether a stored measurement can stand for a new one on this machine."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu_model(), "threads": torch.get_num_threads()}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def collect_environment() -> dict[str, Any]:
    """Everything recorded with a bench and its runs."""
    return {
        **machine_identity(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "git": git_revision(),
        "load_average": load_average(),
    }
