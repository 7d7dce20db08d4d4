"""Efficient structure design (model › structure): conversions of a pretrained model to a cheaper structure.

This package's ``__init__`` is its entry point (``[project.entry-points.effinfer]``): it registers
every technique of the family through the public ``effinfer_register_techniques`` hook.

In the literature these structures are mostly trained from scratch; here each is a
*conversion* of a pretrained model followed by a short, measured repair through the shared
service :mod:`.repair` (layer-wise MSE fit, end-to-end KD against the original):

- ``moefication`` (``efficient_ffn``): each FFN split into experts, a router, top-k experts per token;
- ``gqa_convert`` (``efficient_attention.shared_kv``): KV heads merged into fewer groups, down to MQA;
- the attention replacements and transformer alternates (kernel-based attention ``hedgehog``, low-rank
  attention ``linformer``, SSM, retention) in their own modules.
"""

from importlib import import_module

from effinfer.core import hookimpl

#: ``(module under this package, technique class)`` of every technique of the family
TECHNIQUES: tuple[tuple[str, str], ...] = (
    ("moefication", "MoEfication"),
    ("gqa_convert", "GQAConvert"),
    ("hedgehog", "Hedgehog"),
    ("mamba", "MambaConvert"),
    ("retention", "RetentionConvert"),
    ("linformer", "Linformer"),
)


@hookimpl
def effinfer_register_techniques(register):
    for module, cls in TECHNIQUES:
        register(getattr(import_module(f"{__name__}.{module}"), cls))
