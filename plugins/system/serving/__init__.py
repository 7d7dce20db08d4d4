"""Serving: paged KV, continuous batching, scheduling, distributed serving (system › serving).

This package's ``__init__`` is its entry point (``[project.entry-points.effinfer]``): it registers
every technique of the family through the public ``effinfer_register_techniques`` hook.
"""
