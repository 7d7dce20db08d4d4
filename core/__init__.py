"""effinfer.core — the small core: hook specs, registry, techniques, experiments, generation.

The names a plugin author needs are importable from here::

    from effinfer.core import Technique, Paper, Requirement, Feature, hookimpl
"""

from effinfer.core.hookspecs import hookimpl
from effinfer.core.technique import (BUILTIN_LAYOUTS, GEMMA3, LLAMA, QWEN2, Feature, NoConfig, Paper, Requirement,
                                     Technique)

__all__ = ["BUILTIN_LAYOUTS", "Feature", "GEMMA3", "LLAMA", "NoConfig", "Paper", "QWEN2", "Requirement", "Technique",
           "hookimpl"]
