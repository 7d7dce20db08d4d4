"""Discovery of plugins (techniques, model sources, engines) through the ``effinfer`` entry-point group.

Built-in techniques are found exactly like third-party ones: each is a module listed
under ``[project.entry-points.effinfer]`` that implements
``effinfer_register_techniques``. A plugin that fails to import (any exception, a
``sys.exit`` included), registers on an unknown taxonomy node, breaks the technique
contract or reuses a name is recorded in :attr:`Registry.broken` with its distribution
name; everything else still loads. Built-ins (distribution ``effinfer``) load first, so a
third-party plugin can never replace one: the clashing plugin is the one reported.
"""

from __future__ import annotations

import importlib.metadata
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from effinfer.core.engines import HFEngine
from effinfer.core.errors import UnknownEngineError, UnknownTechniqueError, did_you_mean
from effinfer.core.hookspecs import PROJECT, RegistrationSpecs
from effinfer.core.technique import Technique, check_technique_class

ENTRY_POINT_GROUP = "effinfer"
#: the distribution whose plugins are the built-ins
BUILTIN_DISTRIBUTION = "effinfer"


@dataclass(frozen=True)
class TechniqueEntry:
    technique: type[Technique]
    plugin: str
    distribution: str


@dataclass(frozen=True)
class BrokenPlugin:
    plugin: str
    distribution: str
    error: str
    detail: str = ""
    #: the technique it tried to register, when the failure was that technique's
    technique: str | None = None


@dataclass(frozen=True)
class ModelAlias:
    alias: str
    loader: Callable[..., Any]
    description: str
    distribution: str
    #: the Hugging Face ``model_type`` the loader produces, when the plugin declares it
    layout: str | None = None


@dataclass(frozen=True)
class EngineEntry:
    name: str
    #: ``factory(compile=bool)`` → a :class:`~effinfer.core.engines.DecodeEngine`
    factory: Callable[..., Any]
    description: str
    distribution: str


def core_engines() -> dict[str, EngineEntry]:
    """The engine the core itself provides (the reference every other one is checked against)."""
    return {HFEngine.name: EngineEntry(HFEngine.name, HFEngine, "transformers' forward over a DynamicCache "
                                       "(the reference)", BUILTIN_DISTRIBUTION)}


@dataclass
class Registry:
    techniques: dict[str, TechniqueEntry] = field(default_factory=dict)
    model_aliases: dict[str, ModelAlias] = field(default_factory=dict)
    engines: dict[str, EngineEntry] = field(default_factory=core_engines)
    broken: list[BrokenPlugin] = field(default_factory=list)
    #: every loaded plugin, as ``(plugin, name, distribution)``
    plugins: list[tuple[object, str, str]] = field(default_factory=list)

    def get(self, name: str) -> type[Technique]:
        """The technique class called ``name``; unknown names get close matches, or the reason
        the plugin that provides it failed to load."""
        try:
            return self.techniques[name].technique
        except KeyError:
            raise UnknownTechniqueError(name, self.techniques, self.failed_providers(name)) from None

    def failed_providers(self, name: str) -> dict[str, str]:
        """Broken plugins that may provide technique ``name``: the ones whose entry point is called
        ``name`` or whose refused technique is ``name``; ``plugin → error``."""
        return {b.plugin: b.error for b in self.broken if name in (b.plugin, b.technique)}

    def names(self) -> list[str]:
        return sorted(self.techniques)

    def engine(self, name: str) -> EngineEntry:
        """The engine called ``name``; unknown names get close matches."""
        try:
            return self.engines[name]
        except KeyError:
            raise UnknownEngineError(name, self.engines) from None

    def at_node(self, node_id: str, *, include_descendants: bool = False) -> list[TechniqueEntry]:
        def here(node: str) -> bool:
            return node == node_id or (include_descendants and node.startswith(node_id + "."))

        return [e for _, e in sorted(self.techniques.items()) if here(e.technique.node)]

    def add_plugin(self, plugin: ModuleType | object, plugin_name: str, distribution: str) -> None:
        """Run one plugin's registration hooks and record what it adds (or why it broke)."""
        self.plugins.append((plugin, plugin_name, distribution))
        manager = pluggy.PluginManager(PROJECT)
        manager.add_hookspecs(RegistrationSpecs)
        try:
            manager.register(plugin, name=plugin_name)
            manager.hook.effinfer_register_techniques(
                register=lambda cls: self._register_technique(cls, plugin_name, distribution)
            )
            manager.hook.effinfer_register_model_sources(
                register=lambda alias, loader, description="", layout=None: self._register_alias(
                    alias, loader, description, distribution, plugin_name, layout
                )
            )
            manager.hook.effinfer_register_engines(
                register=lambda name, factory, description="": self._register_engine(
                    name, factory, description, plugin_name, distribution
                )
            )
        except BaseException as error:  # a plugin's bug (even sys.exit) must not take the framework down
            if isinstance(error, KeyboardInterrupt):
                raise
            self._broken(plugin_name, distribution, error)

    def register_commands(self, app: Any) -> None:
        """Let every loaded plugin add CLI commands; a failing plugin is reported, not fatal."""
        for plugin, name, distribution in self.plugins:
            if not hasattr(plugin, "effinfer_register_commands"):
                continue
            manager = pluggy.PluginManager(PROJECT)
            manager.add_hookspecs(RegistrationSpecs)
            try:
                manager.register(plugin, name=name)
                manager.hook.effinfer_register_commands(app=app)
            except BaseException as error:
                if isinstance(error, KeyboardInterrupt):
                    raise
                self._broken(name, distribution, error)

    def _register_technique(self, cls: Any, plugin: str, distribution: str) -> None:
        from effinfer.taxonomy import load_taxonomy

        try:
            check_technique_class(cls)
            taxonomy = load_taxonomy()
            if cls.node not in taxonomy:
                raise ValueError(
                    f"technique {cls.name!r} registers on unknown taxonomy node {cls.node!r}"
                    f"{did_you_mean(cls.node, taxonomy.nodes)}"
                )
            if cls.name in self.techniques:
                first = self.techniques[cls.name]
                fix = ("built-in techniques cannot be replaced: give yours another name"
                       if first.distribution == BUILTIN_DISTRIBUTION else "rename one of them")
                raise ValueError(
                    f"technique name {cls.name!r} is already registered by plugin {first.plugin!r} "
                    f"(distribution {first.distribution}); {fix}"
                )
        except (TypeError, ValueError) as error:
            name = getattr(cls, "name", None)
            self._broken(plugin, distribution, error, with_traceback=False,
                         technique=name if isinstance(name, str) and name not in self.techniques else None)
            return
        self.techniques[cls.name] = TechniqueEntry(cls, plugin, distribution)

    def _register_alias(self, alias: str, loader: Callable[..., Any], description: str,
                        distribution: str, plugin: str, layout: str | None = None) -> None:
        if self._free(self.model_aliases, "model alias", alias, loader, plugin, distribution):
            self.model_aliases[alias] = ModelAlias(alias, loader, description, distribution, layout)

    def _register_engine(self, name: str, factory: Callable[..., Any], description: str, plugin: str,
                         distribution: str) -> None:
        if self._free(self.engines, "engine name", name, factory, plugin, distribution):
            self.engines[name] = EngineEntry(name, factory, description, distribution)

    def _free(self, table: dict[str, Any], kind: str, name: Any, function: Any, plugin: str,
              distribution: str) -> bool:
        """Whether ``name`` may be registered in ``table``; if not, the plugin is reported broken."""
        if not isinstance(name, str) or not name or not callable(function):
            error: Exception = TypeError(f"register({kind.split()[0]}, ...) needs a non-empty name and a callable, "
                                         f"got {name!r}")
        elif name in table:
            error = ValueError(f"{kind} {name!r} is already registered (distribution {table[name].distribution}); "
                               "give yours another name")
        else:
            return True
        self._broken(plugin, distribution, error, with_traceback=False)
        return False

    def _broken(self, plugin: str, distribution: str, error: BaseException,
                with_traceback: bool = True, technique: str | None = None) -> None:
        detail = "".join(traceback.format_exception(error)) if with_traceback else ""
        self.broken.append(BrokenPlugin(plugin, distribution, f"{type(error).__name__}: {error}", detail, technique))


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def _distribution(entry_point: importlib.metadata.EntryPoint) -> str:
    return entry_point.dist.name if entry_point.dist else "<unknown distribution>"


def build_registry(extra_plugins: Iterable[tuple[object, str]] = ()) -> Registry:
    """Load every plugin of the ``effinfer`` entry-point group, plus ``extra_plugins``.

    ``extra_plugins`` are ``(module_or_object, name)`` pairs, handy in tests and notebooks.
    """
    registry = Registry()
    # built-ins first (a stable sort keeps each distribution's own order), so they always win a clash
    for entry_point in sorted(_entry_points(), key=lambda ep: _distribution(ep) != BUILTIN_DISTRIBUTION):
        distribution = _distribution(entry_point)
        try:
            plugin = entry_point.load()
        except BaseException as error:  # ImportError, a bug, or sys.exit at import: report, go on
            if isinstance(error, KeyboardInterrupt):
                raise
            registry._broken(entry_point.name, distribution, error)
            continue
        registry.add_plugin(plugin, entry_point.name, distribution)
    for plugin, name in extra_plugins:
        registry.add_plugin(plugin, name, "<in-process>")
    return registry


_DEFAULT: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry, built on first use."""
    global _DEFAULT
    if _DEFAULT is None or refresh:
        _DEFAULT = build_registry()
    return _DEFAULT
