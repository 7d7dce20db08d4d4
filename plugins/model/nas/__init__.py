"""Neural architecture search over the other plugins' spaces (model › compression › structure optimization › NAS).

This package's ``__init__`` is its entry point (``[project.entry-points.effinfer]``): it registers
every technique of the family through the public ``effinfer_register_techniques`` hook.
"""
