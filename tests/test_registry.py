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


# --------------------------------------------------------------------------- the contract cannot be misused


def test_a_stage_hook_without_hookimpl_is_refused_with_the_fix(monkeypatch):
    class Forgot(Technique):
        name, node = "forgot", "model.compression.quantization.qat"

        def effinfer_transform_model(self, stage):  # no @hookimpl: pluggy would never call it
            pass

    class Misspelt(Technique):
        name, node = "misspelt", "model.compression.quantization.qat"

        @hookimpl
        def effinfer_transform_modle(self, stage):
            pass

    class WrongArgument(Technique):
        name, node = "wrong_argument", "model.compression.quantization.qat"

        @hookimpl
        def effinfer_transform_model(self, stge):
            pass

    fake_entry_points(monkeypatch, {"bad": plugin_module("bad", Forgot, Misspelt, WrongArgument)})
    built = registry_module.build_registry()
    errors = [b.error for b in built.broken]
    assert built.names() == []
    assert "Forgot.effinfer_transform_model is not decorated with @hookimpl" in errors[0]
    assert "add `@hookimpl` (from effinfer.core import hookimpl)" in errors[0]
    assert "effinfer_transform_modle is not a stage hook; did you mean: effinfer_transform_model" in errors[1]
    assert "takes ['stge'], which the hook does not pass" in errors[2]
    assert [b.technique for b in built.broken] == ["forgot", "misspelt", "wrong_argument"]


def test_features_and_layouts_are_named_constants_and_typos_are_refused(monkeypatch):
    from effinfer.core import Feature

    typo = make_technique("typo_feature", "model.compression.quantization.qat")
    typo.needs_features = frozenset({"dense_weight"})
    layout = make_technique("typo_layout", "model.compression.quantization.qat")
    layout.layouts = frozenset({"lama"})
    good = make_technique("good_feature", "model.compression.quantization.qat")
    good.needs_features = frozenset({Feature.DENSE_WEIGHTS})
    fake_entry_points(monkeypatch, {"mixed": plugin_module("mixed", typo, layout, good)})
    built = registry_module.build_registry()
    assert built.names() == ["good_feature"]
    errors = " | ".join(b.error for b in built.broken)
    assert "unknown feature 'dense_weight'; did you mean: dense_weights?" in errors
    assert "'lama' is not a transformers model type; did you mean: llama" in errors


def test_bench_compositions_must_name_their_technique(monkeypatch):
    own = make_technique("own_combo", "model.compression.quantization.qat")
    own.bench_compositions = ("own_combo:bits=4+prompt_lookup",)
    other = make_technique("other_combo", "model.compression.quantization.qat")
    other.bench_compositions = ("rtn+prompt_lookup",)
    fake_entry_points(monkeypatch, {"combos": plugin_module("combos", own, other)})
    built = registry_module.build_registry()
    assert built.names() == ["own_combo"]
    assert "bench_compositions must be a tuple of 'a+b' strings, each naming 'other_combo'" in built.broken[0].error


def test_a_technique_of_a_plugin_that_failed_says_why(monkeypatch, tmp_path):
    (tmp_path / "exiting_plugin.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    forgot = make_technique("forgot", "model.compression.quantization.qat")
    forgot.effinfer_transform_model = lambda self, stage: None  # the decorator is lost
    fake_entry_points(monkeypatch, {"other": plugin_module("other", forgot)})
    points = [importlib.metadata.EntryPoint("exiting", "exiting_plugin", "effinfer"), *registry_module._entry_points()]
    monkeypatch.setattr(registry_module, "_entry_points", lambda: points)
    built = registry_module.build_registry()
    with pytest.raises(UnknownTechniqueError, match=r"technique 'exiting' is not available: plugin 'exiting' "
                                                    r"failed to load: SystemExit: 3"):
        built.get("exiting")
    with pytest.raises(UnknownTechniqueError, match=r"plugin 'other' failed to load: TypeError: .*@hookimpl"):
        built.get("forgot")
    with pytest.raises(UnknownTechniqueError, match=r"unknown technique 'nothing_like_it'"):
        built.get("nothing_like_it")


def test_base_exceptions_at_registration_are_contained_but_ctrl_c_is_not(monkeypatch):
    exits = types.ModuleType("exits")
    exits.effinfer_register_techniques = hookimpl(lambda register: sys.exit("bye"))
    fake_entry_points(monkeypatch, {"exits": exits})
    assert registry_module.build_registry().broken[0].error == "SystemExit: bye"

    def interrupt(register):
        raise KeyboardInterrupt

    interrupted = types.ModuleType("interrupted")
    interrupted.effinfer_register_techniques = hookimpl(interrupt)
    fake_entry_points(monkeypatch, {"interrupted": interrupted})
    with pytest.raises(KeyboardInterrupt):
        registry_module.build_registry()


IMPOSTOR = '''
from effinfer.core import Technique, hookimpl


def make(name):
    class Impostor(Technique):
        node = "model.compression.quantization.ptq.weight_only"

        @hookimpl
        def effinfer_transform_model(self, stage):
            raise RuntimeError("the impostor ran")

    Impostor.name = name
    return Impostor


@hookimpl
def effinfer_register_techniques(register):
    register(make("rtn"))
    register(make("impostor_extra"))
'''


def install_impostor(folder) -> None:
    """An installed distribution (a .dist-info on sys.path): found by real entry-point discovery."""
    (folder / "effinfer_impostor.py").write_text(IMPOSTOR)
    info = folder / "effinfer_impostor-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: effinfer-impostor\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[effinfer]\nrtn = effinfer_impostor\n")


@pytest.mark.parametrize("order", ["discovered", "impostor_first"])
def test_an_installed_package_cannot_replace_a_builtin(monkeypatch, tmp_path, order):
    install_impostor(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    found = list(importlib.metadata.entry_points(group="effinfer"))
    assert any(ep.dist and ep.dist.name == "effinfer-impostor" for ep in found)
    if order == "impostor_first":
        found.sort(key=lambda ep: not (ep.dist and ep.dist.name == "effinfer-impostor"))
        monkeypatch.setattr(registry_module, "_entry_points", lambda: found)
    built = registry_module.build_registry()
    entry = built.techniques["rtn"]
    assert (entry.distribution, entry.technique.__module__) == ("effinfer", "effinfer.plugins.model.quantization.rtn")
    assert built.techniques["impostor_extra"].distribution == "effinfer-impostor"  # its other names still load
    [clash] = [b for b in built.broken if b.distribution == "effinfer-impostor"]
    assert "technique name 'rtn' is already registered by plugin 'rtn' (distribution effinfer)" in clash.error
    assert "built-in techniques cannot be replaced" in clash.error
    assert not [b for b in built.broken if b.distribution == "effinfer"]


def test_a_technique_needing_dense_weights_after_a_quantizer_is_refused_before_loading():
    from effinfer.core import Feature
    from effinfer.core.errors import ExperimentError
    from effinfer.core.experiment import Experiment

    pruner = make_technique("dense_pruner", "model.compression.sparsification.weight_pruning.structured")
    pruner.needs_features = frozenset({Feature.DENSE_WEIGHTS})
    built = registry_module.build_registry([(plugin_module("pruner", pruner), "pruner")])
    with pytest.raises(ExperimentError, match=r"dense_pruner needs 'dense_weights', which rtn \(earlier in the "
                                              r"stack\) removes; put dense_pruner before rtn"):
        Experiment(model="/nonexistent", techniques=["rtn", "dense_pruner"]).build_stack(built)
    assert [t.name for t in Experiment(techniques=["dense_pruner", "rtn"]).build_stack(built)] == ["dense_pruner", "rtn"]


def test_a_technique_is_checked_against_the_model_layout_before_and_after_loading(monkeypatch, tmp_path):
    from effinfer.core import LLAMA
    from effinfer.core import runner as runner_module
    from effinfer.core.compose import compose_stack
    from effinfer.core.errors import EffinferError, ExperimentError
    from effinfer.core.experiment import Experiment
    from effinfer.core.testing import tiny_qwen2

    llama_only = make_technique("llama_only", "model.compression.quantization.qat")
    llama_only.layouts = frozenset({LLAMA})
    built = registry_module.build_registry([(plugin_module("only", llama_only), "only")])
    model, tokenizer = tiny_qwen2()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(runner_module, "load_model", no_loading)
    experiment = Experiment(model=str(tmp_path), techniques=["llama_only"])
    with pytest.raises(ExperimentError, match=r"llama_only does not support the 'qwen2' model layout \(it supports: "
                                              r"llama\)"):
        runner_module.run_experiment(experiment, built)
    with pytest.raises(EffinferError, match=r"llama_only does not support the 'qwen2' model layout"):
        compose_stack(model, tokenizer, ["llama_only"], registry=built)
    assert llama_only.describe()["layouts"] == ["llama"]


def test_a_model_alias_already_taken_is_refused():
    def loader(dtype, device):
        raise AssertionError("not loaded here")

    first, second = types.ModuleType("first_source"), types.ModuleType("second_source")
    first.effinfer_register_model_sources = hookimpl(lambda register: register("tiny-one", loader, layout="llama"))
    second.effinfer_register_model_sources = hookimpl(lambda register: register("tiny-one", loader))
    built = registry_module.build_registry([(first, "first_source"), (second, "second_source")])
    assert built.model_aliases["tiny-one"].layout == "llama"
    [broken] = [b for b in built.broken if b.plugin == "second_source"]
    assert "model alias 'tiny-one' is already registered (distribution <in-process>); give yours another name" \
        in broken.error
