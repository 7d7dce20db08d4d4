"""Static and dynamic sparse attention as KV-cache policies (model › compression › sparsification › sparse attention).

Every technique here bounds the KV cache at a ``budget`` of entries per layer and KV head
(:mod:`.eviction`), through the public cache interface :mod:`effinfer.core.kv_cache`:
static patterns (``streaming_llm``, ``sliding_window``) and attention-scored ones (``h2o``,
``snapkv``, ``tova``).

This package's ``__init__`` is its entry point (``[project.entry-points.effinfer]``): it registers
every technique of the family through the public ``effinfer_register_techniques`` hook.
"""

from effinfer.core import hookimpl
from effinfer.plugins.model.sparse_attention.h2o import H2O, HeavyHitterPolicy
from effinfer.plugins.model.sparse_attention.sliding_window import RecentPolicy, SlidingWindow
from effinfer.plugins.model.sparse_attention.snapkv import ObservationPolicy, SnapKV
from effinfer.plugins.model.sparse_attention.streaming_llm import SinkWindowPolicy, StreamingLLM
from effinfer.plugins.model.sparse_attention.tova import TOVA, LastQueryPolicy

__all__ = ["H2O", "TOVA", "HeavyHitterPolicy", "LastQueryPolicy", "ObservationPolicy", "RecentPolicy",
           "SinkWindowPolicy", "SlidingWindow", "SnapKV", "StreamingLLM"]


@hookimpl
def effinfer_register_techniques(register):
    for technique in (StreamingLLM, SlidingWindow, H2O, SnapKV, TOVA):
        register(technique)
