"""Low-rank factorization of linear layers (model › compression › structure optimization › low rank).

This package's ``__init__`` is its entry point (``[project.entry-points.effinfer]``): it registers
every technique of the family through the public ``effinfer_register_techniques`` hook.
"""
