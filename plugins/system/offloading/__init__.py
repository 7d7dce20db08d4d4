"""Weight and KV offloading (system › inference engine › offloading).

``offload_weights`` keeps the decoder layers on disk and streams them layer by layer with
prefetch (:mod:`.weights`); ``offload_kv`` keeps the KV cache beyond a budget of recent entries
on disk and reads it back when a layer attends, exactly (:mod:`.kv`).

This package's ``__init__`` is its entry point (``[project.entry-points.effinfer]``): it registers
every technique of the family through the public ``effinfer_register_techniques`` hook.
"""

from effinfer.core import hookimpl
from effinfer.plugins.system.offloading.kv import OffloadedKVPolicy, Staging, offloaded_kv_factory
from effinfer.plugins.system.offloading.offload_kv import OffloadKV
from effinfer.plugins.system.offloading.offload_weights import OffloadWeights
from effinfer.plugins.system.offloading.weights import HostToDeviceStreamer, LayerStreamer, layer_streamer

__all__ = ["HostToDeviceStreamer", "LayerStreamer", "OffloadKV", "OffloadWeights", "OffloadedKVPolicy", "Staging",
           "layer_streamer", "offloaded_kv_factory"]


@hookimpl
def effinfer_register_techniques(register):
    register(OffloadWeights)
    register(OffloadKV)
