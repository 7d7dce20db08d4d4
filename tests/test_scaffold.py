"""``effinfer new-plugin``: refused inputs write nothing; generated packages install and pass their tests.

The end-to-end test generates one plugin per level (three stand-alone packages), installs them
with pip into a scratch folder (its dist-infos come first on ``sys.path`` of a subprocess, so the
environment of the other tests is not touched and nothing needs uninstalling), checks that the
registry finds them through their entry points, and runs their generated tests with pytest.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from effinfer.core.errors import EffinferError
from effinfer.tools import scaffold
from effinfer.tools.scaffold import ScaffoldError, check_name, new_plugin, plan, suggest_name

PLUGINS = {  # name → (node, level): one per level, the system one on a model-level node on purpose
    "head_pruning": ("model.compression.sparsification.weight_pruning.structured", "model"),
    "kv_budget": ("model.compression.quantization", "system"),
    "doc_cut": ("data.input_compression.prompt_pruning", None),  # the level comes from the node
}
NODE = PLUGINS["head_pruning"][0]


@pytest.fixture(scope="module")
def cli():
    """A fresh CLI with every plugin's commands, added through ``effinfer_register_commands``."""
    from effinfer.core.registry import get_registry

    app = typer.Typer()
    get_registry().register_commands(app)
    return lambda *args: CliRunner().invoke(app, [str(arg) for arg in args], catch_exceptions=False)


# ─────────────────────────────────────────────────────────────── refused inputs ──


@pytest.mark.parametrize(("name", "fix"), [
    ("MyPruner", "my_pruner"), ("effinfer-my-pruner", "my_pruner"), ("my-pruner", "my_pruner"),
    ("my__pruner_", "my_pruner"), ("2bit_quant", "bit_quant"), ("effinfer_awq2", "awq2"),
])
def test_a_bad_name_is_refused_with_a_fix(name, fix):
    assert suggest_name(name) == fix
    with pytest.raises(ScaffoldError, match=f"try '{fix}'"):
        check_name(name)


def test_a_name_without_any_usable_letter_gets_no_suggestion():
    with pytest.raises(ScaffoldError, match="snake_case") as error:
        check_name("___")
    assert "try" not in str(error.value)


def test_a_taken_name_is_refused_unless_it_is_the_same_plugin(registry):
    with pytest.raises(ScaffoldError, match="'rtn' is already registered by the installed distribution 'effinfer'"):
        check_name("rtn", registry)
    regenerating = SimpleNamespace(techniques={"head_pruning": SimpleNamespace(distribution="effinfer_head_pruning")})
    check_name("head_pruning", regenerating)  # its own installed package: --force regenerates it
    assert issubclass(ScaffoldError, EffinferError)


def test_an_unknown_node_is_refused_with_close_matches_and_nothing_is_written(tmp_path, cli):
    result = cli("new-plugin", "my_pruner", "--node", "model.compresion.quantisation", "--out", tmp_path)
    assert result.exit_code == 2
    assert "unknown taxonomy node 'model.compresion.quantisation'; did you mean: model.compression.quantization" \
        in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_bad_name_on_the_command_line_writes_nothing(tmp_path, cli):
    result = cli("new-plugin", "MyPruner", "--node", NODE, "--out", tmp_path)
    assert result.exit_code == 2 and "try 'my_pruner'" in result.output
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_refused_without_force(tmp_path, cli):
    folder = tmp_path / "effinfer-my-pruner"
    (folder / "src").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    result = cli("new-plugin", "my_pruner", "--node", NODE, "--out", tmp_path)
    assert result.exit_code == 2 and "already exists; pass --force" in result.output
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "src"]

    result = cli("new-plugin", "my_pruner", "--node", NODE, "--out", tmp_path, "--force")
    assert result.exit_code == 0, result.output
    assert (folder / "notes.txt").read_text() == "mine"  # --force rewrites the generated files only
    assert (folder / "src" / "effinfer_my_pruner" / "__init__.py").is_file()


def test_a_file_in_the_way_is_refused_even_with_force(tmp_path):
    (tmp_path / "effinfer-my-pruner").write_text("")
    with pytest.raises(ScaffoldError, match="not a folder"):
        plan("my_pruner", NODE, "model", tmp_path, force=True)


# ─────────────────────────────────────────────────────────────── what is generated ──


def test_the_level_defaults_to_the_node_and_each_level_implements_its_hook(tmp_path):
    assert plan("a", "data.input_compression.rag", None, tmp_path).level == "data"
    hooks = {}
    for level in scaffold.Level:
        spec, _ = new_plugin(f"x_{level.value}", "system.serving.memory_management", level, tmp_path)
        module = (spec.folder / "src" / spec.package / "__init__.py").read_text()
        hooks[level.value] = [hook for hook in scaffold.STAGE_HOOKS.values() if f"def {hook}(" in module]
        assert "effinfer_decoding_strategy(" not in module
        assert 'paper = Paper(title="TODO' in module and "class Config(BaseModel)" in module
        compile(module, str(spec.folder), "exec")
    assert hooks == {level: [hook] for level, hook in scaffold.STAGE_HOOKS.items()}


def test_a_class_name_never_shadows_an_import(tmp_path):
    assert plan("technique", NODE, "model", tmp_path).class_name == "TechniqueTechnique"
    assert plan("paper", NODE, "model", tmp_path).class_name == "PaperTechnique"
    assert plan("kv_budget", NODE, "model", tmp_path).class_name == "KvBudget"


def test_the_package_pins_the_effinfer_series(tmp_path):
    spec = plan("a", NODE, "model", tmp_path)
    assert scaffold.PluginSpec(**{**spec.__dict__, "effinfer_version": "0.1.3"}).requirement == "effinfer>=0.1,<0.2"
    assert scaffold.PluginSpec(**{**spec.__dict__, "effinfer_version": "1.4.0"}).requirement == "effinfer>=1.4,<2"


def test_generated_plugins_install_register_and_pass_their_tests(tmp_path, cli):
    out = tmp_path / "plugins"
    outputs = {}
    for name, (node, level) in PLUGINS.items():
        result = cli("new-plugin", name, "--node", node, "--out", out, *(["--level", level] if level else []))
        assert result.exit_code == 0, result.output
        outputs[name] = result.output
        assert f"pip install -e '{out / scaffold.distribution_of(name)}[test]'" in result.output
    assert "note: model.compression.quantization is a model-level node; the technique acts at the system level" \
        in outputs["kv_budget"]
    assert "note:" not in outputs["head_pruning"] + outputs["doc_cut"]
    folders = sorted(out.iterdir())
    assert [f.name for f in folders] == ["effinfer-doc-cut", "effinfer-head-pruning", "effinfer-kv-budget"]

    installed = tmp_path / "installed"
    offline = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec("setuptools") else []
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *offline,
                    "--target", str(installed), *map(str, folders)], check=True, capture_output=True, cwd=tmp_path)
    check = (
        "import json, sys, pytest\n"
        "from effinfer.core.registry import get_registry\n"
        "registry = get_registry()\n"
        f"names = {sorted(PLUGINS)!r}\n"
        "print(json.dumps({'found': {n: [registry.techniques[n].distribution, registry.techniques[n].technique.levels(),"
        " registry.techniques[n].technique.__module__] for n in names if n in registry.techniques},"
        " 'broken': [b.distribution for b in registry.broken]}))\n"
        "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-rs', *sys.argv[1:]]))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(installed))
    result = subprocess.run([sys.executable, "-c", check, *(str(f / "tests") for f in folders)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    report = json.loads(result.stdout.splitlines()[0])
    assert report["found"] == {
        "doc_cut": ["effinfer-doc-cut", ["data"], "effinfer_doc_cut"],
        "head_pruning": ["effinfer-head-pruning", ["model"], "effinfer_head_pruning"],
        "kv_budget": ["effinfer-kv-budget", ["system"], "effinfer_kv_budget"],
    }
    assert not set(report["broken"]) & {f.name for f in folders}
    assert "17 passed, 3 skipped" in output and output.count("fill in ") == 3
    for folder in folders:  # each package is complete on its own
        assert {p.name for p in folder.iterdir()} >= {"pyproject.toml", "README.md", "src", "tests"}


def test_the_command_comes_through_the_entry_point(registry, cli):
    assert any(plugin is scaffold and name == "scaffold" and distribution == "effinfer"
               for plugin, name, distribution in registry.plugins)
    assert "Write a pip-installable plugin package" in cli("new-plugin", "--help").output


def test_the_guide_shows_real_output(tmp_path, monkeypatch, cli):
    """Every ``$ effinfer new-plugin ...`` of docs/guides/new-plugin.md prints what the page says."""
    import re
    import shlex

    page = (Path(__file__).resolve().parents[1] / "docs" / "guides" / "new-plugin.md").read_text()
    monkeypatch.chdir(tmp_path)
    sessions = re.findall(r"^\$ effinfer (new-plugin .*)\n((?:(?!\$ |```).*\n)*)", page, re.M)
    assert len(sessions) == 5
    for command, shown in sessions:
        result = cli(*shlex.split(command))
        assert result.output.strip() == shown.strip(), command


@given(st.text(max_size=40))
def test_a_suggested_name_is_always_accepted(text):
    fix = suggest_name(text)
    if fix:
        check_name(fix)
