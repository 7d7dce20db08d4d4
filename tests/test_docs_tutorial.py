"""The guides' code, followed as a reader would.

- "Write a plugin": the package is assembled from the tutorial's titled code blocks (with the
  ``--8<--`` includes resolved the way the docs build resolves them), installed with pip into a
  scratch folder, and its own tests are run against that installed copy.
- "Experiment scripts": the YAML file validates, and the script runs on a tiny random model.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from effinfer.core.experiment import Experiment

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "docs" / "guides" / "write-a-plugin.md"
GUIDE = ROOT / "docs" / "guides" / "experiments.md"
PACKAGE = "effinfer-example-plugin"
BLOCK = re.compile(r'^```\w*[^\n]*?title="([^"]+)"[^\n]*\n(.*?)^```', re.S | re.M)
INCLUDE = re.compile(r'^--8<-- "([^"]+)"$', re.M)
SECTION = re.compile(r"^\s*# --8<-- \[(start|end):[\w-]+\]\s*$", re.M)


def resolve_includes(text: str) -> str:
    """Replace ``--8<-- "path"`` lines (``path:section`` too) by the file, as pymdownx.snippets does."""
    def include(match: re.Match[str]) -> str:
        path, _, section = match.group(1).partition(":")
        content = (ROOT / path).read_text()
        if section:
            content = content.split(f"# --8<-- [start:{section}]\n", 1)[1].split(f"# --8<-- [end:{section}]", 1)[0]
        return SECTION.sub("", content).rstrip("\n")

    return INCLUDE.sub(include, text)


def titled_blocks(page: Path) -> dict[str, str]:
    """``title="..."`` code blocks of a docs page → their text, includes resolved."""
    return {title: resolve_includes(body) for title, body in BLOCK.findall(page.read_text())}


def test_tutorial_blocks_are_the_tested_files():
    blocks = titled_blocks(TUTORIAL)
    files = {t.removeprefix(PACKAGE + "/"): text for t, text in blocks.items() if t.startswith(PACKAGE + "/")}
    assert set(files) == {"pyproject.toml", "src/effinfer_example_plugin/__init__.py", "tests/test_drop_layers.py"}
    example = ROOT / "examples" / PACKAGE
    for name in ("pyproject.toml", "src/effinfer_example_plugin/__init__.py"):
        assert files[name] == (example / name).read_text()
    assert "def effinfer_register_commands(app" in blocks["effinfer/tools/site.py (excerpt)"]
    assert "--8<--" not in blocks["effinfer/tools/site.py (excerpt)"]


def test_the_tutorial_package_installs_and_its_tests_pass(tmp_path):
    package = tmp_path / PACKAGE
    for title, text in titled_blocks(TUTORIAL).items():
        if title.startswith(PACKAGE + "/"):
            target = package / title.removeprefix(PACKAGE + "/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
    installed = tmp_path / "installed"
    # step 5 of the tutorial, into a scratch folder: its dist-info comes first on sys.path, so the
    # registry sees this copy of the entry point instead of the one the dev environment installed
    offline = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec("setuptools") else []
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *offline,
                    "--target", str(installed), str(package)], check=True, cwd=tmp_path, capture_output=True)
    check = (
        "import importlib.metadata, sys, pytest, effinfer_example_plugin as plugin\n"
        "print('module:', plugin.__file__)\n"
        "print('dist:', importlib.metadata.distribution('effinfer-example-plugin').locate_file(''))\n"
        "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests']))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(installed))
    result = subprocess.run([sys.executable, "-c", check], cwd=package, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert f"module: {installed}" in result.stdout and f"dist: {installed}" in result.stdout
    assert "3 passed" in result.stdout


def test_the_guide_yaml_file_validates_without_loading_a_model(registry):
    blocks = titled_blocks(GUIDE)
    path = ROOT / "docs" / "snippets" / "experiments" / "three_levels.yaml"
    assert blocks["three_levels.yaml"] == path.read_text()
    experiment = Experiment.from_yaml(path)
    stack = experiment.build_stack(registry)
    assert [t.name for t in stack] == ["selective_context", "rtn", "prompt_lookup"]
    assert stack[1].config.bits == 8 and experiment.runtime.threads == 2


def test_the_guide_script_runs(monkeypatch, tiny, capsys):
    from effinfer.core import runner

    model, tokenizer = tiny
    real = runner.run_experiment
    monkeypatch.setattr(runner, "run_experiment",  # the tiny model instead of downloading SmolLM2
                        lambda experiment, **kwargs: real(experiment, model=model, tokenizer=tokenizer))
    script = titled_blocks(GUIDE)["script.py"]
    exec(compile(script, "script.py", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    assert "model rtn:" in out and "prompt tokens ->" in out and "new tokens in" in out
    assert "name: int8-with-lookup" in out  # the experiment round-trips to YAML


def test_the_pruning_guide_yaml_file_validates_without_loading_a_model(registry):
    path = ROOT / "docs" / "snippets" / "experiments" / "prune_then_quantize.yaml"
    stack = Experiment.from_yaml(path).build_stack(registry)
    assert [t.name for t in stack] == ["wanda", "gptq"]
    assert stack[0].config.pattern == "2:4" and stack[1].config.group_size == 64
