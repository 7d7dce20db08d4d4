"""Output organization: Skeleton-of-Thought (data › output organization).

This package's ``__init__`` is its entry point (``[project.entry-points.effinfer]``): it registers
every technique of the family through the public ``effinfer_register_techniques`` hook.
"""

from effinfer.core import hookimpl


@hookimpl
def effinfer_register_techniques(register):
    from effinfer.plugins.data.output_organization.skeleton_of_thought import SkeletonOfThought

    register(SkeletonOfThought)
