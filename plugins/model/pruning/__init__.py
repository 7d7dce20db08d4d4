"""Weight pruning: unstructured, N:M and structured (model › compression › sparsification).

This package's ``__init__`` is its entry point (``[project.entry-points.effinfer]``): it registers
every technique of the family through the public ``effinfer_register_techniques`` hook.

- ``magnitude``, ``wanda``, ``sparsegpt`` (``weight_pruning.unstructured``): masks on the dense
  weights, unstructured or N:M, stored dense with zeros, bitmask + values, or CSR
  (:mod:`~effinfer.plugins.model.pruning.sparse`);
- ``layer_drop``, ``width_prune`` (``weight_pruning.structured``): whole blocks, or attention heads
  and FFN channels removed, leaving physically smaller matrices and a smaller model config.
"""

from effinfer.core import hookimpl
from effinfer.plugins.model.pruning.sparse import load_pruned

__all__ = ["load_pruned"]


@hookimpl
def effinfer_register_techniques(register):
    from effinfer.plugins.model.pruning.layer_drop import LayerDrop
    from effinfer.plugins.model.pruning.magnitude import Magnitude
    from effinfer.plugins.model.pruning.sparsegpt import SparseGPT
    from effinfer.plugins.model.pruning.wanda import Wanda
    from effinfer.plugins.model.pruning.width_prune import WidthPrune

    for technique in (Magnitude, Wanda, SparseGPT, LayerDrop, WidthPrune):
        register(technique)
