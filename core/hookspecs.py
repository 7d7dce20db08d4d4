"""The hook specifications: effinfer's public plugin API.

Two groups of hooks exist.

**Registration hooks** are called once per process, on every plugin found in the
``effinfer`` entry-point group (built-ins included; there is no private back door)::

    from effinfer.core import hookimpl

    @hookimpl
    def effinfer_register_techniques(register):
        register(MyTechnique)

**Stage hooks** are implemented by :class:`~effinfer.core.technique.Technique`
instances. For every experiment a fresh :class:`pluggy.PluginManager` holds only the
techniques of its stack, configured, and pluggy calls them stage by stage:

1. model level — :func:`effinfer_transform_model`, in stack order;
2. system level — :func:`effinfer_configure_system`, then exactly one
   :func:`effinfer_decoding_strategy` (the runtime engine's plain decoding when no technique
   offers one);
3. data level — :func:`effinfer_transform_request`, once per request, in stack order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    from effinfer.core.stages import DataStage, ModelStage, Request, SystemStage
    from effinfer.core.generation import DecodingStrategy

PROJECT = "effinfer"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class RegistrationSpecs:
    """Hooks a plugin package implements at module level."""

    @hookspec
    def effinfer_register_techniques(self, register: Callable[[type], None]) -> None:
        """Register technique classes: call ``register(TechniqueSubclass)`` once per class.

        The class must subclass :class:`~effinfer.core.technique.Technique`, have a
        unique ``name`` and sit on a node id of the taxonomy. A class that fails these
        checks is reported as broken (with the plugin's distribution name) and skipped;
        the other classes of the plugin still load.
        """

    @hookspec
    def effinfer_register_model_sources(self, register: Callable[..., None]) -> None:
        """Register model aliases: ``register(alias, loader, description=..., layout=...)``.

        ``loader(dtype: torch.dtype, device: str) -> (model, tokenizer)`` builds the
        model. Aliases can then be used wherever a model source string is accepted.
        ``layout`` (optional) is the Hugging Face ``model_type`` the loader produces, so a
        stack can be checked against it before the model loads. An alias already taken is
        reported as a broken plugin and skipped.
        """

    @hookspec
    def effinfer_register_engines(self, register: Callable[..., None]) -> None:
        """Register decode engines: ``register(name, factory, description=...)``.

        ``factory(compile=bool)`` returns a :class:`~effinfer.core.engines.DecodeEngine`
        (a subclass, e.g. of :class:`~effinfer.core.engines.HFEngine`, registered as its own
        factory); ``compile`` is ``runtime.compile`` (an engine that cannot compile ignores
        it). ``runtime.engine`` picks one by name (unknown names are refused before any
        model loads, with close matches); the composition puts it on
        ``SystemStage.engine``, and every decoding strategy decodes through it: its
        ``decoding()`` is the plain loop, its ``runner(...)`` what speculative strategies
        drive. The core registers ``"hf"`` (the reference); the built-in plugin
        ``effinfer.plugins.system.engine`` registers ``"static"`` (the default). A name
        already taken is reported as a broken plugin and skipped::

            @hookimpl
            def effinfer_register_engines(register):
                register("mine", MyEngine, description="...")   # class MyEngine(DecodeEngine)
        """

    @hookspec
    def effinfer_register_commands(self, app: Any) -> None:
        """Add commands to the ``effinfer`` CLI: ``app`` is its :class:`typer.Typer`.

        ``@app.command()`` adds a command; ``app.add_typer(sub, name=...)`` a group.
        """


class StageSpecs:
    """Hooks a :class:`~effinfer.core.technique.Technique` implements as methods."""

    @hookspec
    def effinfer_transform_model(self, stage: ModelStage) -> None:
        """Model level: transform ``stage.model`` in place or replace it.

        Swap modules through ``stage.patcher`` so the composition can undo the change on
        exit. Calibration batches come from ``stage.calibration_batches(n, seq_len)``.
        """

    @hookspec
    def effinfer_configure_system(self, stage: SystemStage) -> None:
        """System level: contribute generation components (e.g. ``stage.cache_factory``)."""

    @hookspec(firstresult=True)
    def effinfer_decoding_strategy(self, stage: SystemStage) -> DecodingStrategy | None:
        """System level: return the decoding strategy that replaces the engine's plain decoding.

        At most one technique of a stack may implement it (checked before loading). Build the
        strategy on ``stage.engine`` (the engine the runtime chose) so that it runs on whatever
        engine the user picked; the public API for strategies is
        ``effinfer.plugins.system.speculative.api``.
        """

    @hookspec
    def effinfer_transform_request(self, request: Request, stage: DataStage) -> None:
        """Data level: rewrite one request in place (compress, retrieve, restructure)."""


def stage_hook_names() -> dict[str, str]:
    """Map each stage hook name to its level (``model``, ``system`` or ``data``)."""
    return {
        "effinfer_transform_model": "model",
        "effinfer_configure_system": "system",
        "effinfer_decoding_strategy": "system",
        "effinfer_transform_request": "data",
    }
