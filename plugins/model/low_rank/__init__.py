"""Low-rank factorization of linear layers (model › compression › structure optimization › low rank).

This package's ``__init__`` is its entry point (``[project.entry-points.effinfer]``): it registers
every technique of the family through the public ``effinfer_register_techniques`` hook:
``svd`` (plain truncated SVD), ``asvd`` (activation-aware scaling), ``svd_llm`` (truncation-aware
whitening); the shared layer, rank rule and loop are in
:mod:`~effinfer.plugins.model.low_rank.factorize`.
"""

from effinfer.core import hookimpl


@hookimpl
def effinfer_register_techniques(register):
    from effinfer.plugins.model.low_rank.asvd import ASVD
    from effinfer.plugins.model.low_rank.svd import SVD
    from effinfer.plugins.model.low_rank.svd_llm import SVDLLM

    for technique in (SVD, ASVD, SVDLLM):
        register(technique)
