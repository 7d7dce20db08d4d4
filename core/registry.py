"""Discovery of plugins (techniques, model sources, engines) through the ``effinfer`` entry-point group.

Built-in techniques are found exactly like third-party ones: each is a module listed
under ``[project.entry-points.effinfer]`` that implements
``effinfer_register_techniques``. A plugin that fails to import, registers on an
unknown taxonomy node or reuses a name is recorded in :attr:`Registry.broken` with its
distribution name; everything else still loads.
"""

from __future__ import annotations

import importlib.metadata
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from effinfer.core.errors import UnknownEngineError, UnknownTechniqueError, did_you_mean
from effinfer.core.hookspecs import PROJECT, RegistrationSpecs
from effinfer.core.technique import Technique, check_technique_class

ENTRY_POINT_GROUP = "effinfer"


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


@dataclass(frozen=True)
class ModelAlias:
    alias: str
    loader: Callable[..., Any]
    description: str
    distribution: str


@dataclass(frozen=True)
class EngineEntry:
    name: str
    #: ``factory(compile=bool)`` → a decoding strategy
    factory: Callable[..., Any]
    description: str
    distribution: str


def _hf_engine(compile: bool = False) -> Any:
    from effinfer.core.generation import PlainDecoding

    return PlainDecoding()


def core_engines() -> dict[str, EngineEntry]:
    """The engine the core itself provides (the reference every other one is checked against)."""
    return {"hf": EngineEntry("hf", _hf_engine, "transformers' forward over a DynamicCache (the reference)",
                              "effinfer")}


@dataclass
class Registry:
    techniques: dict[str, TechniqueEntry] = field(default_factory=dict)
    model_aliases: dict[str, ModelAlias] = field(default_factory=dict)
    engines: dict[str, EngineEntry] = field(default_factory=core_engines)
    broken: list[BrokenPlugin] = field(default_factory=list)
    #: every loaded plugin, as ``(plugin, name, distribution)``
    plugins: list[tuple[object, str, str]] = field(default_factory=list)

    def get(self, name: str) -> type[Technique]:
        """The technique class called ``name``; unknown names get close matches."""
        try:
            return self.techniques[name].technique
        except KeyError:
            raise UnknownTechniqueError(name, self.techniques) from None

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
                register=lambda alias, loader, description="": self._register_alias(
                    alias, loader, description, distribution
                )
            )
            manager.hook.effinfer_register_engines(
                register=lambda name, factory, description="": self._register_engine(
                    name, factory, description, plugin_name, distribution
                )
            )
        except Exception as error:  # a plugin's bug must not take the framework down
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
            except Exception as error:
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
                raise ValueError(
                    f"technique name {cls.name!r} is already registered by plugin {first.plugin!r} "
                    f"(distribution {first.distribution}); rename one of them"
                )
        except (TypeError, ValueError) as error:
            self._broken(plugin, distribution, error, with_traceback=False)
            return
        self.techniques[cls.name] = TechniqueEntry(cls, plugin, distribution)

    def _register_alias(self, alias: str, loader: Callable[..., Any], description: str,
                        distribution: str) -> None:
        self.model_aliases[alias] = ModelAlias(alias, loader, description, distribution)

    def _register_engine(self, name: str, factory: Callable[..., Any], description: str, plugin: str,
                         distribution: str) -> None:
        if not isinstance(name, str) or not name or not callable(factory):
            error = TypeError(f"register(name, factory) needs a non-empty name and a callable, got {name!r}")
            self._broken(plugin, distribution, error, with_traceback=False)
        elif name in self.engines:
            first = self.engines[name]
            error = ValueError(f"engine name {name!r} is already registered (distribution {first.distribution})")
            self._broken(plugin, distribution, error, with_traceback=False)
        else:
            self.engines[name] = EngineEntry(name, factory, description, distribution)

    def _broken(self, plugin: str, distribution: str, error: BaseException,
                with_traceback: bool = True) -> None:
        detail = "".join(traceback.format_exception(error)) if with_traceback else ""
        self.broken.append(BrokenPlugin(plugin, distribution, f"{type(error).__name__}: {error}", detail))


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def build_registry(extra_plugins: Iterable[tuple[object, str]] = ()) -> Registry:
    """Load every plugin of the ``effinfer`` entry-point group, plus ``extra_plugins``.

    ``extra_plugins`` are ``(module_or_object, name)`` pairs, handy in tests and notebooks.
    """
    registry = Registry()
    for entry_point in _entry_points():
        distribution = entry_point.dist.name if entry_point.dist else "<unknown distribution>"
        try:
            plugin = entry_point.load()
        except Exception as error:
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
