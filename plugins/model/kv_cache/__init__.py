"""KV-cache quantization (model › compression › quantization › PTQ › KV cache).

``kv_int8`` / ``kv_int4`` quantize every cached key and value per token; ``kivi`` quantizes keys
per channel and values per token at 2 or 4 bits with a full-precision residual. All are
:class:`~effinfer.core.kv_cache.KVPolicy` s stored packed (``nbytes`` is what they hold).

This package's ``__init__`` is its entry point (``[project.entry-points.effinfer]``): it registers
every technique of the family through the public ``effinfer_register_techniques`` hook.
"""

from effinfer.core import hookimpl
from effinfer.plugins.model.kv_cache.kivi import Kivi, KiviPolicy
from effinfer.plugins.model.kv_cache.kv_int import KVInt4, KVInt8, PerTokenQuantPolicy

__all__ = ["KVInt4", "KVInt8", "Kivi", "KiviPolicy", "PerTokenQuantPolicy"]


@hookimpl
def effinfer_register_techniques(register):
    for technique in (KVInt8, KVInt4, Kivi):
        register(technique)
