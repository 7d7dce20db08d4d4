"""effinfer.core — the small core: hook specs, registry, techniques, experiments, generation.

The names a plugin author needs are importable from here::

    from effinfer.core import Technique, Paper, Requirement, hookimpl
"""

from effinfer.core.hookspecs import hookimpl, hookspec
from effinfer.core.technique import NoConfig, Paper, Requirement, Technique

__all__ = ["NoConfig", "Paper", "Requirement", "Technique", "hookimpl", "hookspec"]
