"""Knowledge distillation, white-box and black-box (model › compression › distillation).

This package's ``__init__`` is its entry point (``[project.entry-points.effinfer]``): it registers
every technique of the family through the public ``effinfer_register_techniques`` hook.
"""
