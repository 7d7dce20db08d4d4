"""``pip install .`` and ``pip install -e .`` both expose every subpackage under ``effinfer``."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ["core", "data", "plugins", "taxonomy", "kernels", "evaluation", "tools"]
CHECK = f"""
import importlib, importlib.util, json, os, sys
mods = {{name: importlib.import_module('effinfer.' + name).__file__ for name in {SUBPACKAGES!r}}}
# a leak is one of *our* folders importable at top level; another distribution's package of the same
# name (Hugging Face's `kernels`, which transformers requires) is not one
ours = {{sys.argv[1], sys.argv[2]}}
leaks = [name for name in {SUBPACKAGES!r} if (spec := importlib.util.find_spec(name)) is not None
         and os.path.dirname(os.path.dirname(os.path.realpath(spec.origin or ""))) in ours]
from effinfer.taxonomy import load_taxonomy
print(json.dumps({{'files': mods, 'leaks': leaks, 'nodes': len(load_taxonomy())}}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_install_imports_every_subpackage(tmp_path, editable):
    import json

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    target = ["-e", str(ROOT)] if editable else [str(ROOT)]
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", *target],
                   check=True, cwd=tmp_path)
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    # dependencies (torch, pydantic, …) come from the test environment; .pth files there are not executed
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    report = json.loads(subprocess.check_output([str(python), "-c", CHECK, str(ROOT.resolve()), str(site.resolve())],
                                                text=True, cwd=tmp_path))
    assert report["leaks"] == []
    assert report["nodes"] == 55
    expected_root = ROOT if editable else site / "effinfer"
    for name, file in report["files"].items():
        assert Path(file).is_relative_to(expected_root), (name, file)
    if not editable:
        assert not any((site / name).exists() for name in SUBPACKAGES)
