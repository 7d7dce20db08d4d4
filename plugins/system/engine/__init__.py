"""The static-cache decoding engine (gpt-fast style) and the runners speculative strategies use.

::

    from effinfer.plugins.system.engine import Engine, StaticDecoding, EngineSettings

    engine = Engine(model, compile=True)            # a Llama-family HF model
    cache = engine.cache_for(batch=1, tokens=512)
    logits = engine.prefill(cache, ids, mask).logits[:, -1]
    logits = engine.decode(cache, logits.argmax(-1))  # compiled after the first call

:class:`StaticDecoding` is the default decoding strategy of experiments
(``runtime.engine: static``); ``runtime.engine: hf`` keeps the core's Hugging Face loop.
This module is an ``effinfer`` entry point: it registers the ``"static"`` engine through
the public ``effinfer_register_engines`` hook, like any third-party engine would.
"""

from effinfer.core import hookimpl

from effinfer.plugins.system.engine.cache import StaticKVCache
from effinfer.plugins.system.engine.decoding import StaticDecoding
from effinfer.plugins.system.engine.engine import Engine, StepOutput
from effinfer.plugins.system.engine.forward import DecoderLayout, UnsupportedModel
from effinfer.plugins.system.engine.settings import EngineChoice, EngineSettings

__all__ = ["DecoderLayout", "Engine", "EngineChoice", "EngineSettings", "StaticDecoding", "StaticKVCache",
           "StepOutput", "UnsupportedModel"]


def static_engine(compile: bool = False) -> StaticDecoding:
    """The ``"static"`` engine's decode loop (``compile``: torch.compile its decode step)."""
    return StaticDecoding(EngineSettings(engine="static", compile=compile))


@hookimpl
def effinfer_register_engines(register):
    register("static", static_engine,
             description="pre-allocated static KV cache, compilable one-token decode step (Llama family; "
                         "other models fall back to the hf path)")
