"""The effinfer CLI: taxonomy, plugins, run, generate — and its error messages."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from effinfer.core import cli
from effinfer.core.cli import app
from effinfer.core.registry import get_registry
from effinfer.taxonomy import load_taxonomy

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def plugin_commands():
    get_registry().register_commands(app)
    cli.console.width = 200  # no wrapping inside table cells


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_taxonomy_json_holds_every_leaf_with_counts():
    result = invoke("taxonomy", "--json")
    assert result.exit_code == 0
    seen, techniques = set(), {}

    def walk(node):
        seen.add(node["id"])
        techniques[node["id"]] = node["techniques"]
        for child in node["children"]:
            walk(child)

    for root in json.loads(result.stdout):
        walk(root)
    assert {leaf.id for leaf in load_taxonomy().leaves()} <= seen
    assert "rtn" in techniques["model.compression.quantization.ptq.weight_only"]


def test_taxonomy_second_view():
    result = invoke("taxonomy", "--view", "2408.03130", "--json")
    assert result.exit_code == 0
    assert len(json.loads(result.stdout)["categories"]) == 4


def test_plugins_json_covers_three_levels_with_node_paper_schema():
    data = json.loads(invoke("plugins", "--json").stdout)
    by_name = {t["name"]: t for t in data["techniques"]}
    assert {"data", "model", "system"} <= {level for t in by_name.values() for level in t["levels"]}
    rtn = by_name["rtn"]
    assert rtn["node"] == "model.compression.quantization.ptq.weight_only"
    assert rtn["paper"]["arxiv"] == "2210.17323"
    assert rtn["config_schema"]["properties"]["bits"]["enum"] == [2, 3, 4, 8]
    assert by_name["drop_layers"]["distribution"] == "effinfer-example-plugin"


def test_plugins_show_prints_the_config_table():
    result = invoke("plugins", "show", "prompt_lookup")
    assert result.exit_code == 0
    assert "num_draft_tokens" in result.stdout and "1 ≤ value ≤ 64" in result.stdout


def test_plugins_show_unknown_name_suggests():
    result = invoke("plugins", "show", "rtm")
    assert result.exit_code == 2
    assert "did you mean: rtn" in result.stderr


def test_run_yaml_on_a_local_model(tmp_path, tiny_model_dir):
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(
        f"model: {tiny_model_dir}\n"
        "techniques:\n  - rtn:bits=8\n  - name: prompt_lookup\n    config: {num_draft_tokens: 4}\n"
        "  - selective_context:ratio=0.2,min_tokens=0\n"
        "generation: {max_new_tokens: 8}\nprompts: [hello hello hello]\n"
    )
    result = invoke("run", str(experiment))
    assert result.exit_code == 0, result.stdout
    for line in ("model rtn: quantized", "system prompt_lookup:", "data selective_context: compressed"):
        assert line in " ".join(result.stdout.split())


def test_run_reports_every_problem_before_loading(tmp_path):
    experiment = tmp_path / "bad.yaml"
    experiment.write_text("model: /nowhere\ntechniques: [rtn:bits=5, prompt_lokup]\n")
    result = invoke("run", str(experiment))
    assert result.exit_code == 2
    assert "bits" in result.stderr and "did you mean: prompt_lookup" in result.stderr


def test_generate_with_a_malformed_technique_option():
    result = invoke("generate", "hi", "--technique", "rtn:bits")
    assert result.exit_code == 2
    assert "must look like key=value" in result.stderr


def test_missing_model_path_is_explained(tmp_path):
    result = invoke("generate", "hi", "--model", str(tmp_path / "missing.gguf"))
    assert result.exit_code == 2
    assert "does not exist" in result.stderr


def _tiny_suite(tmp_path):
    from effinfer.evaluation.suites import get_suite

    suite = tmp_path / "tiny-suite.yaml"
    suite.write_text(json.dumps(get_suite("tiny").model_dump(mode="json", exclude={"name"})
                                | {"tasks": None, "generation": None, "roofline": None, "fidelity": None}))
    return suite


def test_benches_on_two_stores_in_one_folder_keep_both_reports(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    suite = _tiny_suite(tmp_path)
    folders = []
    for store, *again in (("a.db",), ("b.db",), ("a.db", "--redo"), ("a.db",)):
        result = invoke("bench", "--baseline-only", "--model", str(tiny_model_dir), "--suite", str(suite),
                        "--store", store, "--threads", "1", *again)
        assert result.exit_code == 0, result.output
        folders.append(re.search(r"results/([^/\s]+)/report\.md", result.output).group(1))
    reports = sorted(p.parent.name for p in (tmp_path / "results").glob("*/report.md"))
    assert len(set(folders)) == 4 and sorted(folders) == reports
    # bench 1 of a, bench 1 of b, bench 2 of a, then a report of a's stored runs (no new bench)
    assert folders[0] == "bench-1" and folders[1].startswith("bench-1-") and folders[2] == "bench-2"
    assert folders[3].startswith("stored-")
    owner = (tmp_path / "results" / folders[1] / "report.md").read_text().rstrip().splitlines()[-1]
    assert owner.startswith("<!-- effinfer-report ") and '"bench_id": 1' in owner and "b.db" in owner


def test_without_a_terminal_long_commands_log_one_line_per_step(tmp_path, tiny_model_dir, monkeypatch):
    """CliRunner's output is not a terminal, as in CI logs, nohup and pipes."""
    monkeypatch.chdir(tmp_path)
    generated = invoke("generate", "hello", "--model", str(tiny_model_dir), "--max-new-tokens", "2")
    assert generated.exit_code == 0, generated.output
    stamp = r"\d\d:\d\d:\d\d "
    assert re.search(stamp + rf"model {re.escape(str(tiny_model_dir))} loaded \(\d+\.\d s\)", generated.output)
    assert re.search(stamp + r"no technique applied and 1 prompt\(s\) generated \(\d+\.\d s\)", generated.output)
    benched = invoke("bench", "-t", "rtn:bits=8", "--model", str(tiny_model_dir), "--suite",
                     str(_tiny_suite(tmp_path)), "--store", "r.db", "--threads", "1")
    assert benched.exit_code == 0, benched.output
    for step in (r"baseline loaded and set up \(", r"rtn:bits=8: perplexity \(wikipedia\) done \(",
                 r"rtn:bits=8: ok \(\d+ s\) \(total ", r"bench 3/3 \("):
        assert re.search(stamp + step, benched.output), (step, benched.output)


def test_bench_refuses_every_bad_stack_before_measuring(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("bench", "-t", "rtn:bits=5", "-t", "prompt_lookup", "-c", "selective_context+rtm",
                    "--model", str(tiny_model_dir), "--store", "r.db")
    assert result.exit_code == 2
    said = " ".join(result.stderr.split())
    assert "the experiment is not valid (2 problem(s))" in said
    assert "rtn:bits=5: techniques[0] (rtn): bits" in said and "did you mean: rtn" in said
    assert not (tmp_path / "r.db").exists() and not (tmp_path / "results").exists()
    ran = invoke("run", str(_yaml(tmp_path, f"model: {tiny_model_dir}\ntechniques: [rtn:bits=5]\n")))
    assert "techniques[0] (rtn): bits" in ran.stderr  # the message `effinfer run` gives


def _yaml(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_bench_redo_drifted_reaches_the_evaluator(tmp_path, tiny_model_dir, monkeypatch):
    from effinfer.evaluation import api

    seen = {}

    def fake_bench(stacks, **options):
        seen.update(options, stacks=stacks)
        raise KeyboardInterrupt  # stop there: what it was given is what matters

    monkeypatch.setattr(api, "bench", fake_bench)
    monkeypatch.chdir(tmp_path)
    result = invoke("bench", "-t", "rtn:bits=8", "--redo-drifted", "--model", str(tiny_model_dir),
                    "--suite", str(_tiny_suite(tmp_path)), "--store", "r.db")
    assert result.exit_code == 130 and "interrupted before any run was stored" in " ".join(result.stderr.split())
    assert seen["redo_drifted"] is True and seen["redo"] is False and len(seen["stacks"]) == 2


def test_progress_shows_stack_names_literally(monkeypatch):
    """Stack names may hold brackets (a config value a[h]b); the evaluator's [green]ok[/] still renders."""
    import io

    from rich.console import Console

    from effinfer.core.steplog import LineProgress
    from effinfer.evaluation import cli as eval_cli

    name = "rtn:x=a[h]b"
    for console, progress in ((terminal := Console(file=io.StringIO(), force_terminal=True, width=120,
                                                   color_system=None), None),
                              (lines := Console(file=io.StringIO(), width=200), LineProgress(lines))):
        monkeypatch.setattr(eval_cli, "console", console)
        progress = progress or eval_cli._progress()
        with progress:
            task = progress.add_task(name, total=None)
            progress.update(task, description=f"{name}: perplexity")
            progress.update(task, description=f"{name}: [green]ok[/] (3 s)", total=1, completed=1)
        text = console.file.getvalue()
        assert f"{name}: ok (3 s)" in text and "[green]" not in text
    assert terminal is not lines
