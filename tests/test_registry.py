"""Plugin discovery: built-ins through entry points, broken plugins isolated and reported."""

from __future__ import annotations

import importlib.metadata
import sys
import types

import pytest
from pydantic import BaseModel

from effinfer.core import Technique, hookimpl
from effinfer.core import registry as registry_module
from effinfer.core.errors import UnknownTechniqueError


def test_builtins_cover_all_three_levels(registry):
    levels = {level for e in registry.techniques.values() for level in e.technique.levels()}
    assert levels == {"data", "model", "system"}
    for name in ("rtn", "prompt_lookup", "selective_context"):
        assert registry.techniques[name].distribution == "effinfer"
    assert not [b for b in registry.broken if b.distribution == "effinfer"]


def test_builtins_are_declared_as_entry_points():
    names = {ep.name for ep in importlib.metadata.entry_points(group="effinfer") if ep.dist.name == "effinfer"}
    assert {"rtn", "prompt_lookup", "selective_context"} <= names


def make_technique(name: str, node: str) -> type[Technique]:
    class Made(Technique):
        class Config(BaseModel):
            pass

        @hookimpl
        def effinfer_transform_model(self, stage):
            pass

    Made.name, Made.node = name, node
    return Made


def plugin_module(name: str, *classes: type[Technique]) -> types.ModuleType:
    module = types.ModuleType(name)

    @hookimpl
    def effinfer_register_techniques(register):
        for cls in classes:
            register(cls)

    module.effinfer_register_techniques = effinfer_register_techniques
    return module


def fake_entry_points(monkeypatch, modules: dict[str, types.ModuleType]):
    """Entry points named like the keys, pointing at in-memory modules."""
    points = []
    for name, module in modules.items():
        module_name = f"fake_effinfer_plugin_{name}"
        monkeypatch.setitem(sys.modules, module_name, module)
        points.append(importlib.metadata.EntryPoint(name, module_name, "effinfer"))
    monkeypatch.setattr(registry_module, "_entry_points", lambda: points)


def test_plugin_that_fails_to_import_is_reported_and_others_load(monkeypatch, tmp_path):
    (tmp_path / "plugin_with_missing_dependency.py").write_text("import a_dependency_nobody_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    good = plugin_module("good", make_technique("good_one", "model.compression.quantization.qat"))
    fake_entry_points(monkeypatch, {"good": good})
    points = [importlib.metadata.EntryPoint("broken", "plugin_with_missing_dependency", "effinfer"),
              *registry_module._entry_points()]
    monkeypatch.setattr(registry_module, "_entry_points", lambda: points)
    built = registry_module.build_registry()
    assert built.names() == ["good_one"]
    [broken] = built.broken
    assert broken.plugin == "broken"
    assert "No module named 'a_dependency_nobody_installed'" in broken.error


def test_unknown_node_lists_closest_ids(monkeypatch):
    typo = make_technique("typo", "model.compression.quantisation.ptq.weight_only")
    good = make_technique("fine", "model.compression.quantization.qat")
    fake_entry_points(monkeypatch, {"mixed": plugin_module("mixed", typo, good)})
    built = registry_module.build_registry()
    assert built.names() == ["fine"]
    [broken] = built.broken
    assert "unknown taxonomy node 'model.compression.quantisation.ptq.weight_only'" in broken.error
    assert "did you mean: model.compression.quantization.ptq.weight_only" in broken.error


def test_reused_name_is_reported_with_the_first_owner(monkeypatch):
    first = plugin_module("first", make_technique("same", "model.compression.quantization.qat"))
    second = plugin_module("second", make_technique("same", "model.compression.quantization.qat"))
    fake_entry_points(monkeypatch, {"first": first, "second": second})
    built = registry_module.build_registry()
    assert built.names() == ["same"]
    [broken] = built.broken
    assert broken.plugin == "second"
    assert "already registered by plugin 'first'" in broken.error


def test_registration_hook_that_raises_is_contained(monkeypatch):
    module = types.ModuleType("raiser")

    @hookimpl
    def effinfer_register_techniques(register):
        raise RuntimeError("boom in plugin")

    module.effinfer_register_techniques = effinfer_register_techniques
    fake_entry_points(monkeypatch, {"raiser": module})
    built = registry_module.build_registry()
    assert built.broken[0].error == "RuntimeError: boom in plugin"


def test_malformed_classes_are_refused(monkeypatch):
    bad_name = make_technique("Bad-Name", "model.compression.quantization.qat")
    no_hooks = type("NoHooks", (Technique,), {"name": "no_hooks", "node": "model.compression.quantization.qat"})
    fake_entry_points(monkeypatch, {"bad": plugin_module("bad", bad_name, no_hooks, object)})
    errors = " | ".join(b.error for b in registry_module.build_registry().broken)
    assert "must be lowercase snake_case" in errors
    assert "implements no stage hook" in errors
    assert "is not a subclass of effinfer.core.Technique" in errors


def test_unknown_technique_suggests_close_matches(registry):
    with pytest.raises(UnknownTechniqueError, match=r"unknown technique 'prompt_lokup'; did you mean: prompt_lookup"):
        registry.get("prompt_lokup")


def test_example_third_party_plugin_is_installed(registry):
    entry = registry.techniques["drop_layers"]
    assert entry.distribution == "effinfer-example-plugin"
    assert entry.technique.node == "model.compression.sparsification.weight_pruning.structured"
