"""The static-cache decoding engine (gpt-fast style), registered as the ``"static"`` engine.

::

    from effinfer.plugins.system.engine import StaticEngine

    engine = StaticEngine(compile=False)                # a DecodeEngine
    strategy = engine.decoding()                        # plain decoding on the static cache
    runner = engine.runner(model, tokens=512, max_nodes=16)   # what speculative strategies drive

The compute part, for benchmarks and tests (a Llama, Qwen2 or Gemma 3 HF model)::

    from effinfer.plugins.system.engine import Engine
    engine = Engine(model, compile=True)
    cache = engine.cache_for(batch=1, tokens=512)
    logits = engine.prefill(cache, ids, mask).logits[:, -1]
    logits = engine.decode(cache, logits.argmax(-1))  # compiled after the first call

:class:`StaticEngine` is the default engine of experiments (``runtime.engine: static``).
This module is an ``effinfer`` entry point: it registers it through the public
``effinfer_register_engines`` hook, like any third-party engine would.
"""

from effinfer.core import hookimpl
from effinfer.plugins.system.engine.cache import StaticKVCache
from effinfer.plugins.system.engine.decoding import StaticDecoding
from effinfer.plugins.system.engine.engine import Engine
from effinfer.plugins.system.engine.forward import DecoderLayout, UnsupportedModel
from effinfer.plugins.system.engine.runner import StaticRunner
from effinfer.plugins.system.engine.static import StaticEngine, shared_engine

__all__ = ["DecoderLayout", "Engine", "StaticDecoding", "StaticEngine", "StaticKVCache", "StaticRunner",
           "UnsupportedModel", "shared_engine"]


@hookimpl
def effinfer_register_engines(register):
    register(StaticEngine.name, StaticEngine,
             description="pre-allocated static KV cache, compilable one-token decode step (Llama, Qwen2 and "
                         "Gemma 3 layouts; other models fall back to the hf path)")
