"""The effinfer CLI: taxonomy, plugins, run, generate — and its error messages."""

from __future__ import annotations

import json

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
