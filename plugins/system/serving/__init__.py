"""Serving: paged KV, continuous batching, scheduling (system › serving).

This package's ``__init__`` is its entry point (``[project.entry-points.effinfer]``): it registers
every technique of the family through the public ``effinfer_register_techniques`` hook, and the
``effinfer serve`` command (``effinfer loadtest`` and ``effinfer sweep`` are the evaluator's) through ``effinfer_register_commands``.

- ``paged_kv`` (``system.serving.memory_management``): :mod:`~effinfer.plugins.system.serving.paged`;
- ``continuous_batching``, ``static_batching`` (``system.serving.continuous_batching``):
  :mod:`~effinfer.plugins.system.serving.engine`;
- ``fcfs``, ``sjf``, ``priority`` (``system.serving.scheduling``):
  :mod:`~effinfer.plugins.system.serving.scheduling`;
- the OpenAI-compatible server :mod:`~effinfer.plugins.system.serving.server` and the load
  generator :mod:`~effinfer.plugins.system.serving.loadtest`.
"""

from effinfer.core import hookimpl


@hookimpl
def effinfer_register_techniques(register):
    from effinfer.plugins.system.serving.techniques import TECHNIQUES

    for technique in TECHNIQUES:
        register(technique)


@hookimpl
def effinfer_register_commands(app):
    from effinfer.plugins.system.serving.commands import serve_command

    app.command("serve")(serve_command)
