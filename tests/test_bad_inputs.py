"""The catalogue of a user's mistakes: one case per bad input, each refused with a message
that names the problem and the fix, with no traceback, and with nothing written or lost.

Every case runs the real ``effinfer`` command (in process, through Typer's runner) in an empty
working folder and compares that folder before and after: no results database, no report
folder, no file changed. Cases that need a model use the tiny random Llama saved as a folder
(seconds); those whose mistake can only show after loading (a config value that does not fit
the model's layers) still end with a message naming the technique and its plugin.

``python tests/test_bad_inputs.py`` prints every case with the message it gives (the
catalogue of issue 11's closing note).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.registry import build_registry, get_registry

NODE = "model.compression.quantization.ptq.weight_only"


class Explodes(Technique):
    """A plugin's technique whose model hook raises (a bug of that plugin, not the user's)."""

    name = "explodes"
    node = NODE
    paper = Paper(title="A technique with a broken hook", year=2024)

    @hookimpl
    def effinfer_transform_model(self, stage):
        raise RuntimeError("the hook tripped over its own feet")


@hookimpl
def effinfer_register_techniques(register):
    register(Explodes)


def registry_with_broken_plugin():
    plugin = types.SimpleNamespace(effinfer_register_techniques=effinfer_register_techniques)
    return build_registry(extra_plugins=[(plugin, "broken-hook-plugin")])


@dataclass
class Files:
    """Inputs prepared outside the working folder (so that creating them is not a 'write')."""

    root: Path
    tiny: Path          # a tiny model folder
    short_context: Path  # the same model whose tokenizer says its context is 64 tokens
    suite: Path         # a seconds-long suite file
    report: Path        # a folder that already holds a report


@dataclass
class Case:
    id: str
    args: Callable[[Files, Path], list[str]]
    says: tuple[str, ...]  # fragments of the message: the problem and the fix
    code: int = 2
    setup: Callable[[Files, Path], None] | None = None
    broken_plugin: bool = False
    needs_cpu_only_torch: bool = False


def write(name: str, content: str | bytes) -> Callable[[Files, Path], None]:
    def setup(files: Files, cwd: Path) -> None:
        path = cwd / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def yaml_case(id: str, text: str | bytes, says: tuple[str, ...], **kwargs) -> Case:
    return Case(id, lambda f, cwd: ["run", "exp.yaml"], says, setup=write("exp.yaml", text), **kwargs)


def with_model(id: str, body: str, says: tuple[str, ...], model: str = "tiny", **kwargs) -> Case:
    """A YAML experiment on the tiny model (``{model}`` is filled in at run time)."""
    def setup(files: Files, cwd: Path) -> None:
        (cwd / "exp.yaml").write_text(f"model: {getattr(files, model)}\n{body}")
    return Case(id, lambda f, cwd: ["run", "exp.yaml"], says, setup=setup, **kwargs)


def bench(*extra: str, store: str = "r.db", suite: str | None = None) -> Callable[[Files, Path], list[str]]:
    return lambda f, cwd: ["bench", "--model", str(f.tiny), "--suite", (suite or str(f.suite)).format(root=f.root),
                           "--store", store.format(root=f.root), "--threads", "1", *extra]


CASES = [
    # ---------------------------------------------------------------- experiment files
    Case("yaml-missing", lambda f, cwd: ["run", "nowhere.yaml"], ("nowhere.yaml does not exist",)),
    Case("yaml-is-a-folder", lambda f, cwd: ["run", str(f.root)], ("is a folder, not an experiment file",
                                                                  "give a .yaml file")),
    yaml_case("yaml-binary", bytes(range(256)) * 4, ("is not a text file", "an experiment is a YAML file")),
    yaml_case("yaml-empty", "", ("exp.yaml is empty", "an empty file is not taken as the defaults")),
    yaml_case("yaml-only-comments", "# model: smollm2-135m-instruct\n", ("exp.yaml is empty",)),
    yaml_case("yaml-not-a-mapping", "- rtn\n- prompt_lookup\n", ("holds a YAML list, not a mapping",
                                                                 "fields (name, model, techniques")),
    yaml_case("yaml-duplicate-key", "model: a\ntechniques: [rtn]\nmodel: b\n",
              ("duplicate key 'model' (first given on line 1)", "keep one of them")),
    yaml_case("yaml-syntax-error", "techniques: [rtn\n", ("is not valid YAML",)),
    yaml_case("yaml-unknown-field", "modle: x\n", ("modle: Extra inputs are not permitted", "known fields:")),
    # ---------------------------------------------------------------- prompts
    with_model("prompts-empty-list", "prompts: []\n", ("no prompt given", "list at least one prompt")),
    with_model("prompt-empty-string", "prompts: ['  ']\n", ("prompt(s) [0] are empty", "give each prompt some text")),
    Case("generate-empty-prompt", lambda f, cwd: ["generate", "", "--model", str(f.tiny)],
         ("prompt(s) [0] are empty",)),
    with_model("prompt-longer-than-context", f"prompts: ['{'long prompt ' * 20}']\ngeneration: {{max_new_tokens: 2}}\n",
               ("tokens; the model's context is 64 tokens", "Shorten the prompt or its documents"),
               model="short_context"),
    Case("prompt-longer-than-model-positions", lambda f, cwd: ["generate", "word " * 500, "--model", str(f.tiny),
                                                               "--max-new-tokens", "2"],
         ("tokens; the model's context is 2048 tokens",)),
    # ---------------------------------------------------------------- runtime and model
    with_model("device-cuda-on-cpu-torch", "runtime: {device: cuda}\n",
               ("runtime.device is 'cuda'", "use device cpu"), needs_cpu_only_torch=True),
    with_model("device-malformed", "runtime: {device: gpu}\n", ("runtime.device: String should match pattern",)),
    Case("model-folder-not-a-model", lambda f, cwd: ["generate", "hi", "--model", str(f.root)],
         ("is not a model (it has no config.json)", "give a Hugging Face model folder")),
    Case("model-path-missing", lambda f, cwd: ["generate", "hi", "--model", "./no-such-model"],
         ("./no-such-model does not exist",)),
    Case("model-gguf-missing", lambda f, cwd: ["generate", "hi", "--model", "missing.gguf"],
         ("GGUF file missing.gguf does not exist",)),
    # ---------------------------------------------------------------- techniques
    Case("technique-unknown", lambda f, cwd: ["generate", "hi", "--model", str(f.tiny), "-t", "prompt_lokup"],
         ("unknown technique 'prompt_lokup'", "did you mean: prompt_lookup")),
    Case("technique-option-malformed", lambda f, cwd: ["generate", "hi", "-t", "rtn:bits"],
         ("technique option 'bits' in 'rtn:bits' must look like key=value",)),
    Case("technique-value-out-of-range", lambda f, cwd: ["generate", "hi", "--model", str(f.tiny), "-t", "rtn:bits=5"],
         ("techniques[0] (rtn): bits", "allowed: one of 2, 3, 4, 8")),
    Case("rtn-group-size-does-not-divide", lambda f, cwd: ["generate", "hi", "--model", str(f.tiny), "-t",
                                                           "rtn:bits=4,group_size=48", "--max-new-tokens", "2"],
         ("rtn: group_size=48 does not divide the layer's 64 input features; use one of [16, 32, 64] or None "
          "(one group per row); layers with 64 input features: self_attn.q_proj",)),
    Case("self-speculative-layer-out-of-range", lambda f, cwd: ["generate", "hi", "--model", str(f.tiny), "-t",
                                                                "self_speculative:skip_layers=[99]",
                                                                "--max-new-tokens", "2"],
         ("self_speculative", "skip_layers [99]", "2 layers")),
    Case("draft-model-source-missing", lambda f, cwd: ["generate", "hi", "--model", str(f.tiny), "-t",
                                                       "draft_model:source=/nowhere/draft", "--max-new-tokens", "2"],
         ("techniques[0] (draft_model): source: /nowhere/draft does not exist; give a model folder, a .gguf file "
          "or an alias",)),
    Case("draft-model-gguf-missing", lambda f, cwd: ["generate", "hi", "--model", str(f.tiny), "-t",
                                                     "draft_model:source=draft.gguf"],
         ("techniques[0] (draft_model): source: GGUF file draft.gguf does not exist; check the path",)),
    Case("draft-model-folder-not-a-model", lambda f, cwd: ["generate", "hi", "--model", str(f.tiny), "-t",
                                                           f"draft_model:source={f.root}"],
         ("techniques[0] (draft_model): source: the folder", "is not a model (it has no config.json)")),
    Case("save-dir-not-writable", lambda f, cwd: ["generate", "hi", "--model", str(f.tiny), "-t",
                                                  f"rtn:bits=8,save_dir={f.root / 'a-file' / 'q'}"],
         ("techniques[0] (rtn): save_dir", "is a file, not a folder")),
    Case("plugin-hook-raises", lambda f, cwd: ["generate", "hi", "--model", str(f.tiny), "-t", "explodes",
                                               "--max-new-tokens", "2"],
         ("technique explodes (plugin 'broken-hook-plugin'", "RuntimeError: the hook tripped over its own feet",
          "this is a bug of that plugin"), broken_plugin=True),
    # ---------------------------------------------------------------- bench
    Case("bench-bad-stacks", bench("-t", "rtn:bits=5", "-c", "rtn+prompt_lokup"),
         ("rtn:bits=5: techniques[0] (rtn): bits", "rtn+prompt_lokup: techniques[1] (prompt_lokup): unknown "
          "technique", "did you mean: prompt_lookup")),
    Case("bench-device-cuda-on-cpu-torch", bench("--baseline-only", "--device", "cuda"),
         ("runtime.device is 'cuda'",), needs_cpu_only_torch=True),
    Case("bench-model-not-a-model", lambda f, cwd: ["bench", "--model", str(f.root), "--store", "r.db",
                                                    "--baseline-only"], ("is not a model",)),
    Case("bench-unknown-suite", bench(suite="quik"), ("unknown suite 'quik'", "use one of tiny, quick")),
    Case("bench-suite-file-empty", bench(suite="suite.yaml"), ("suite.yaml is empty",
                                                              "an empty file is not taken as the defaults"),
         setup=write("suite.yaml", "")),
    Case("bench-suite-file-binary", bench(suite="suite.yaml"), ("suite.yaml is not a text file",),
         setup=write("suite.yaml", bytes(range(256)))),
    Case("bench-suite-file-duplicate-key", bench(suite="suite.yaml"), ("duplicate key 'speed'",),
         setup=write("suite.yaml", "speed: null\nspeed: {repeats: 2}\n")),
    Case("bench-suite-file-bad-field", bench(suite="suite.yaml"), ("the suite is not valid", "speed.repeats",
                                                                  "greater than or equal to 1 (got 0); allowed: 1 ≤ value ≤ 100"),
         setup=write("suite.yaml", "speed: {repeats: 0}\n")),
    Case("bench-suite-is-a-folder", bench(suite="{root}"), ("is a folder, not a suite file",)),
    Case("bench-out-holds-a-report", lambda f, cwd: [*bench("--baseline-only")(f, cwd), "--out", str(f.report)],
         ("already holds a report", "never overwritten: choose a new folder")),
    Case("bench-out-is-a-file", lambda f, cwd: [*bench("--baseline-only")(f, cwd), "--out", str(f.root / "a-file")],
         ("is a file, not a folder",)),
    Case("bench-store-corrupt", bench("--baseline-only", store="bad.db"),
         ("bad.db is not an effinfer results database", "move it away or pass --store"),
         setup=write("bad.db", "this is not a database\n")),
    Case("bench-store-is-a-folder", bench("--baseline-only", store="dbdir"),
         ("the results database dbdir is a folder", "give a file path"),
         setup=lambda f, cwd: (cwd / "dbdir").mkdir()),
    Case("bench-store-under-a-file", bench("--baseline-only", store="{root}/a-file/r.db"),
         ("a-file is a file, not a folder",)),
    # ---------------------------------------------------------------- results
    Case("results-store-missing", lambda f, cwd: ["results", "list", "--store", "none.db"],
         ("no results database at none.db", "run `effinfer bench` first")),
    Case("results-store-corrupt", lambda f, cwd: ["results", "list", "--store", "bad.db"],
         ("not an effinfer results database",), setup=write("bad.db", b"\x00" * 200)),
    Case("results-store-is-a-folder", lambda f, cwd: ["results", "show", "--store", "dbdir"],
         ("is a folder",), setup=lambda f, cwd: (cwd / "dbdir").mkdir()),
    Case("results-unknown-bench", lambda f, cwd: ["results", "show", "--bench", "7", "--store", "empty.db"],
         ("no bench 7 in empty.db", "effinfer results list"), setup=lambda f, cwd: _empty_store(cwd / "empty.db")),
    Case("results-unknown-run", lambda f, cwd: ["results", "show", "999", "--store", "empty.db"],
         ("no run with id 999", "effinfer results list"), setup=lambda f, cwd: _empty_store(cwd / "empty.db")),
    Case("results-export-unknown-format", lambda f, cwd: ["results", "export", "--format", "xml"],
         ("unknown format 'xml'; use csv or json",)),
    Case("results-export-output-is-a-folder", lambda f, cwd: ["results", "export", "--store", "empty.db",
                                                              "--output", str(f.root)],
         ("is a folder; give a file path",), setup=lambda f, cwd: _empty_store(cwd / "empty.db")),
    Case("results-compare-one-run", lambda f, cwd: ["results", "compare", "1"], ("give at least two run ids",)),
]


def _empty_store(path: Path) -> None:
    from effinfer.evaluation.store import ResultsStore

    ResultsStore(path).close()


# ---------------------------------------------------------------------------- fixtures


def prepare_files(root: Path, tiny_model_dir: Path) -> Files:
    (root / "a-file").write_text("a file where a folder is expected\n")
    short = root / "short-context"
    shutil.copytree(tiny_model_dir, short)
    config = json.loads((short / "tokenizer_config.json").read_text())
    (short / "tokenizer_config.json").write_text(json.dumps(config | {"model_max_length": 64}))
    from effinfer.evaluation.suites import get_suite

    suite = root / "tiny-suite.yaml"
    suite.write_text(json.dumps(get_suite("tiny").model_dump(mode="json", exclude={"name"})
                                | {"tasks": None, "generation": None, "roofline": None}))
    report = root / "old-report"
    report.mkdir()
    (report / "report.md").write_text("# an earlier bench\n")
    return Files(root=root, tiny=Path(tiny_model_dir), short_context=short, suite=suite, report=report)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_dir) -> Files:
    return prepare_files(tmp_path_factory.mktemp("inputs"), tiny_model_dir)


@pytest.fixture(scope="module")
def app():
    from effinfer.core import cli

    get_registry().register_commands(cli.app)
    cli.console.width = 200
    return cli.app


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (and every empty folder) with the hash of its bytes."""
    found = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        found[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return found


def invoke(app, case: Case, files: Files, cwd: Path, monkeypatch) -> tuple[int, str]:
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("EFFINFER_DEBUG", raising=False)
    monkeypatch.setenv("EFFINFER_RESULTS", str(cwd / "default-store" / "effinfer.db"))
    if case.broken_plugin:
        registry = registry_with_broken_plugin()
        monkeypatch.setattr("effinfer.core.cli.get_registry", lambda: registry)
    result = CliRunner().invoke(app, case.args(files, cwd), catch_exceptions=False)
    return result.exit_code, result.stdout + result.stderr


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_mistake_is_refused_with_the_fix_and_nothing_written(case, app, files, tmp_path, monkeypatch):
    if case.needs_cpu_only_torch and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the mistake is not one here")
    if case.setup is not None:
        case.setup(files, tmp_path)
    before, inputs_before = snapshot(tmp_path), snapshot(files.root)
    code, output = invoke(app, case, files, tmp_path, monkeypatch)
    said = " ".join(output.split())
    assert code == case.code, output
    assert "Traceback" not in output and 'File "' not in output, output
    assert said.count("error:") == 1, output
    for fragment in case.says:
        assert " ".join(fragment.split()) in said, f"{fragment!r} not in:\n{output}"
    assert snapshot(tmp_path) == before, "the command wrote or changed files"
    assert snapshot(files.root) == inputs_before, "the command changed its inputs"


# ---------------------------------------------------------------------------- beyond the CLI runner


def test_a_read_only_store_is_refused_before_the_bench_and_still_readable(files):
    """Root ignores file permissions, so the command runs as ``nobody`` when the tests run as root."""
    if os.name != "posix":
        pytest.skip("POSIX permissions")
    folder = Path(tempfile.mkdtemp(prefix="effinfer-ro-"))
    writable = folder
    try:
        store = folder / "r.db"
        _empty_store(store)
        model, suite = folder / "tiny", folder / "suite.yaml"  # readable by the user the command runs as
        shutil.copytree(files.tiny, model)
        shutil.copy(files.suite, suite)
        for path in (folder, model, *model.iterdir(), suite):
            path.chmod(0o755 if path.is_dir() else 0o644)
        store.chmod(0o444)
        folder.chmod(0o555)
        prefix = []
        if os.geteuid() == 0:
            if not shutil.which("setpriv"):
                pytest.skip("running as root without setpriv")
            prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        effinfer = str(Path(sys.executable).with_name("effinfer"))
        before = store.read_bytes()
        writable = Path(tempfile.mkdtemp(prefix="effinfer-out-"))
        writable.chmod(0o777)
        out = writable / "out"
        bench = subprocess.run([*prefix, effinfer, "bench", "--model", str(model), "--suite", str(suite),
                                "--store", str(store), "--baseline-only", "--out", str(out)],
                               capture_output=True, text=True, cwd=folder, timeout=300)
        said = " ".join(bench.stderr.split())
        assert bench.returncode == 2, bench.stderr
        assert "is not writable" in said and "pass --store" in said and "Traceback" not in bench.stderr
        assert store.read_bytes() == before and not out.exists()
        listed = subprocess.run([*prefix, effinfer, "results", "list", "--store", str(store)], capture_output=True,
                                text=True, cwd=folder, timeout=300)
        assert listed.returncode == 0, listed.stderr
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(writable, ignore_errors=True)


def test_a_bench_with_a_failed_stack_exits_non_zero_and_keeps_its_report(app, files, tmp_path, monkeypatch):
    registry = registry_with_broken_plugin()
    monkeypatch.setattr("effinfer.evaluation.cli.get_registry", lambda: registry)
    monkeypatch.setattr("effinfer.evaluation.evaluator.get_registry", lambda: registry)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, bench("-t", "explodes")(files, tmp_path), catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert ("failed explodes (technique explodes, plugin 'broken-hook-plugin', distribution <in-process>): "
            "RuntimeError: the hook tripped over its own feet") in " ".join(result.output.split())
    assert (tmp_path / "results" / "bench-1" / "report.md").exists()
    with sqlite3.connect(tmp_path / "r.db") as db:
        assert db.execute("SELECT status FROM runs ORDER BY id").fetchall() == [("ok",), ("failed",)]


def test_python_api_errors_are_effinfer_errors(tmp_path, tiny):
    from effinfer.core.errors import EffinferError, ExperimentError
    from effinfer.core.experiment import Experiment
    from effinfer.core.generation import PromptTooLongError, encode_prompts
    from effinfer.evaluation.store import ResultsStore, StoreError

    (tmp_path / "dup.yaml").write_text("prompts: [a]\nprompts: [b]\n")
    with pytest.raises(ExperimentError, match="duplicate key 'prompts'"):
        Experiment.from_yaml(tmp_path / "dup.yaml")
    with pytest.raises(ExperimentError, match="no prompt given"):
        Experiment.checked(prompts=[])
    (tmp_path / "bad.db").write_text("not sqlite")
    with pytest.raises(StoreError, match="not an effinfer results database"):
        ResultsStore(tmp_path / "bad.db")
    _, tokenizer = tiny
    with pytest.raises(PromptTooLongError, match="prompt 1 has .* tokens; the model's context is 32 tokens"):
        encode_prompts(tokenizer, ["short", "x" * 100], max_tokens=32)
    assert issubclass(StoreError, EffinferError) and issubclass(PromptTooLongError, EffinferError)


def test_run_experiment_checks_what_the_cli_checks_before_loading(tmp_path, monkeypatch):
    """The Python API's ``run_experiment`` refuses, before loading, what ``effinfer run`` refuses."""
    from effinfer.core import runner
    from effinfer.core.errors import ExperimentError
    from effinfer.core.experiment import Experiment

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(runner, "load_model", no_loading)
    (tmp_path / "a-file").write_text("not a folder\n")
    experiment = Experiment(model="./no-such-model", techniques=[f"rtn:bits=8,save_dir={tmp_path / 'a-file' / 'q'}"])
    with pytest.raises(ExperimentError) as caught:
        runner.run_experiment(experiment)
    said = str(caught.value)
    assert "model: ./no-such-model does not exist" in said and "techniques[0] (rtn): save_dir" in said
    assert "is a file, not a folder" in said
    if not torch.cuda.is_available():
        with pytest.raises(ExperimentError, match="runtime.device is 'cuda' but this torch .* use device cpu"):
            runner.run_experiment(Experiment(model="./no-such-model", runtime={"device": "cuda"}))


def test_a_prompt_longer_than_the_model_is_refused_on_the_python_api(tiny):
    """``ComposedModel.generate`` checks the prompt against the model's positions (a tokenizer without a
    real ``model_max_length``, as GGUF conversions give, still gets the limit) and the tokenizer's limit."""
    from effinfer.core.compose import compose_stack
    from effinfer.core.generation import PromptTooLongError

    model, tokenizer = tiny
    assert tokenizer.model_max_length > 10**8  # declares no limit
    with compose_stack(model, tokenizer, []) as composed:
        with pytest.raises(PromptTooLongError, match=r"prompt 0 has \d+ tokens; the model's context is 2048 tokens"):
            composed.generate(["word " * 500])
        previous, tokenizer.model_max_length = tokenizer.model_max_length, 64
        try:
            with pytest.raises(PromptTooLongError, match="the model's context is 64 tokens. Shorten the prompt"):
                composed.generate(["long prompt " * 20])
        finally:
            tokenizer.model_max_length = previous
        [completion], _ = composed.generate(["hi"], None)
        assert completion.prompt_tokens > 0


def test_printed_text_is_literal_never_markup():
    """Model output, notes and config descriptions keep their brackets (no Rich markup)."""
    from rich.console import Console

    from effinfer.core.cli import print_run

    tricky = "values[h] + values[i] [/b] [bold]x[/bold] [min, max]"
    result = types.SimpleNamespace(
        report=types.SimpleNamespace(entries=[("model", "rtn[x]", f"note {tricky}")]),
        completions=[types.SimpleNamespace(prompt_tokens=3, text=tricky)],
        generation=types.SimpleNamespace(new_tokens=2, decode_seconds=1.0, prefill_seconds=0.1,
                                         drafted_per_step=[], accepted_per_step=[]),
        load_seconds=0.1, setup_seconds=0.1)
    console = Console(record=True, width=300, force_terminal=False)
    print_run(result, console)
    text = console.export_text()
    assert f"note {tricky}" in text and f"→ {tricky}" in text and "rtn[x]" in text


def test_plugins_show_keeps_brackets_in_descriptions(app, monkeypatch):
    from pydantic import BaseModel, Field

    class Bracketed(Technique):
        """Config descriptions with brackets."""

        name = "bracketed"
        node = NODE
        summary = "clips values to [min, max] per [group]"

        class Config(BaseModel):
            bounds: list[int] = Field(default_factory=lambda: [0, 1], description="the range [min, max]")

        @hookimpl
        def effinfer_transform_model(self, stage):
            return None

    @hookimpl
    def register(register):
        register(Bracketed)

    plugin = types.SimpleNamespace(effinfer_register_techniques=register)
    registry = build_registry(extra_plugins=[(plugin, "bracket-plugin")])
    monkeypatch.setattr("effinfer.core.cli.get_registry", lambda: registry)
    result = CliRunner().invoke(app, ["plugins", "show", "bracketed"], catch_exceptions=False)
    said = " ".join(result.stdout.split())
    assert result.exit_code == 0, result.output
    assert "[min, max] per [group]" in said and "[min, max]" in said.split("clips")[1] and "list[int]" in said


if __name__ == "__main__":  # print the catalogue: every case and the message it gives
    import tempfile as _tempfile

    from effinfer.core import cli as _cli
    from effinfer.core.testing import tiny_llama

    get_registry().register_commands(_cli.app)
    with _tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch)
        model, tokenizer = tiny_llama(layers=2, seed=0)
        model.save_pretrained(base / "tiny")
        tokenizer.save_pretrained(base / "tiny")

        (base / "inputs").mkdir()
        prepared = prepare_files(base / "inputs", base / "tiny")
        for case in CASES:
            cwd = base / "cwd" / case.id
            cwd.mkdir(parents=True)
            if case.setup is not None:
                case.setup(prepared, cwd)
            patch = pytest.MonkeyPatch()
            try:
                code, output = invoke(_cli.app, case, prepared, cwd, patch)
            finally:
                patch.undo()
            message = re.sub(r"\s+", " ", output[output.find("error:"):]).strip()
            print(f"{case.id} (exit {code}): {message}")
