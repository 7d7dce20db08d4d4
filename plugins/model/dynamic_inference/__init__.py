"""Dynamic inference: model cascades and token-level early exit (model › compression › dynamic inference).

This package's ``__init__`` is its entry point (``[project.entry-points.effinfer]``): it registers
every technique of the family through the public ``effinfer_register_techniques`` hook.

- :mod:`.cascade` — ``cascade``: a compressed copy answers first, escalate to the full model when unsure;
- :mod:`.early_exit` — ``early_exit``: CALM-style per-token exit on a trained classifier's confidence;
- :mod:`.layerskip` — ``layerskip``: the early-exit draft verified by the full model (lossless);
- :mod:`.exits` (trained exit norms and classifiers), :mod:`.layers` (the block-by-block step).
"""

from effinfer.core import hookimpl


@hookimpl
def effinfer_register_techniques(register):
    from effinfer.plugins.model.dynamic_inference.cascade import Cascade
    from effinfer.plugins.model.dynamic_inference.early_exit import EarlyExit
    from effinfer.plugins.model.dynamic_inference.layerskip import LayerSkip

    register(Cascade)
    register(EarlyExit)
    register(LayerSkip)
