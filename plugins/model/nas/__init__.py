"""Neural architecture search over the other plugins' spaces (model › compression › structure optimization › NAS).

This package's ``__init__`` is its entry point (``[project.entry-points.effinfer]``): it registers
every technique of the family through the public ``effinfer_register_techniques`` hook:
``nas_evolution`` (:mod:`~effinfer.plugins.model.nas.evolution`), a regularized-evolution search over
per-layer keep-or-drop and magnitude sparsity under a bytes budget.
"""

from effinfer.core import hookimpl


@hookimpl
def effinfer_register_techniques(register):
    from effinfer.plugins.model.nas.evolution import EvolutionaryNAS

    register(EvolutionaryNAS)
