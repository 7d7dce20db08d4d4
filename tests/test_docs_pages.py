"""The generated docs pages (effinfer.tools.site), checked without running mkdocs."""

from __future__ import annotations

import importlib.util
import posixpath
import re
import types
from pathlib import Path

import pytest
from pydantic import BaseModel, Field
from typer.testing import CliRunner

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.registry import build_registry
from effinfer.taxonomy import load_taxonomy, load_view
from effinfer.tools import site
from effinfer.tools.site import (Results, SiteBuilder, generate_pages, load_benchmark_tables, load_results,
                                    node_page)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
STRUCTURED = "model.compression.sparsification.weight_pruning.structured"
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.fixture(scope="module")
def pages(registry):
    return generate_pages(registry=registry, results=Results())


def test_every_node_has_a_page_and_the_navigation_mirrors_the_tree(pages):
    tree = load_taxonomy()
    for node in tree.walk():
        text = pages[node_page(node.id, node.is_leaf)]
        assert text.startswith(f"# {node.title}\n")
        assert node.summary in text
        for paper in node.papers:
            assert f"(https://arxiv.org/abs/{paper.arxiv})" in text
        for child in tree.children(node.id):
            assert f"[{child.title}](" in text
    nav = pages["taxonomy/SUMMARY.md"].splitlines()
    items = [line for line in nav if "](" in line]
    assert len(items) == len(tree) + 3  # overview, every node, crosswalk, coverage
    for node in tree.walk():  # indentation = depth, in pre-order
        line = next(line for line in nav if line.lstrip().startswith(f"* [{node.title}]("))
        assert line.startswith("    " * node.depth + "* ")
    assert len(tree.leaves()) == 35 and all(node_page(leaf.id, True) in pages for leaf in tree.leaves())


def test_every_relative_link_of_a_generated_page_has_a_target(pages):
    sources = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    for path, text in pages.items():
        if not isinstance(text, str):
            continue
        for target in LINK.findall(text):
            if target.startswith(("http://", "https://", "#")):
                continue
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target.split("#")[0]))
            assert resolved in pages or resolved in sources, (path, target)


def test_the_installed_example_plugin_has_its_card(pages):
    text = pages[node_page(STRUCTURED, True)]
    card = text[text.index('<div class="ei-card"'):]
    assert "### `drop_layers` { #drop-layers }" in card
    assert "third-party plugin `effinfer-example-plugin` (entry point `example`)" in card
    assert "https://arxiv.org/abs/2403.17887" in card
    assert "| `drop` | `int` | `2` | 1 ≤ value ≤ 64 | how many of the last decoder layers to remove |" in card
    assert "| `keep_last` | `bool` | `True` | true or false |" in card
    assert "**Not measured yet**" in card
    assert "`effinfer bench -t drop_layers`" in card


def fake_plugin() -> types.ModuleType:
    class Config(BaseModel):
        rank: int = Field(8, ge=1, le=512, description="rank of the | factors")
        mode: str | None = Field(None, description="how")

    class LowRank(Technique):
        name = "my_low_rank"
        node = "model.compression.structure_optimization.low_rank"
        paper = Paper(title="A low-rank paper", year=2024, arxiv="2401.00001")
        summary = "Factorizes weights."
        lossless = True

        @hookimpl
        def effinfer_transform_model(self, stage):
            pass

    LowRank.Config = Config
    module = types.ModuleType("my_plugin")

    @hookimpl
    def effinfer_register_techniques(register):
        register(LowRank)

    module.effinfer_register_techniques = effinfer_register_techniques
    return module


def test_a_newly_registered_plugin_gets_a_card_without_docs_edits():
    registry = build_registry(extra_plugins=[(fake_plugin(), "my_plugin")])
    pages = generate_pages(registry=registry, results=Results())
    node = "model.compression.structure_optimization.low_rank"
    text = pages[node_page(node, load_taxonomy().get(node).is_leaf)]
    assert "### `my_low_rank` { #my-low-rank }" in text
    assert "**yes** — greedy output identical" in text
    assert "| `rank` | `int` | `8` | 1 ≤ value ≤ 512 | rank of the \\| factors |" in text
    assert "| `mode` | `str | None` | `None` | any | how |" in text
    coverage = pages["taxonomy/coverage.md"]
    assert "my_low_rank" in coverage
    overview = pages["taxonomy/index.md"]
    assert "my_low_rank" in overview and "model/compression/structure_optimization" in overview


def test_coverage_lists_every_leaf_with_counts(pages, registry):
    coverage = pages["taxonomy/coverage.md"]
    rows = [line for line in coverage.splitlines() if line.startswith("| ") and "](" in line]
    leaves = load_taxonomy().leaves()
    assert len(rows) == len(leaves)
    covered = sum(bool(registry.at_node(leaf.id)) for leaf in leaves)
    assert f"**{covered} of {len(leaves)} leaves**" in coverage
    structured = next(r for r in rows if "[Structured pruning]" in r)
    count = len(registry.at_node(STRUCTURED))
    assert "drop_layers" in structured and structured.rstrip(" |").endswith(f"| {count} | 0")


def test_crosswalk_maps_every_category(pages):
    text = pages["taxonomy/crosswalk.md"]
    view = load_view("2408.03130")
    for category in view.categories:
        assert f"## {category.title} {{ #{category.id.replace('_', '-')} }}" in text
        for node_id in category.maps_to:
            assert f"(`{node_id}`)" in text
    assert "## Not covered by this view" in text and "(`data`)" in text
    assert "drop_layers" in text.split("## Pruning")[1].split("## ")[0]
    assert "[Pruning](../../../../crosswalk.md#pruning)" in pages[node_page(STRUCTURED, True)]


def test_no_results_store_means_not_measured_and_no_database_is_created(tmp_path, registry):
    missing = tmp_path / "nowhere" / "results.db"
    results = load_results(missing)
    assert not results.by_technique and not missing.exists() and not missing.parent.exists()
    text = generate_pages(registry=registry, results=missing)[node_page(STRUCTURED, True)]
    assert "**Not measured yet** (no results store was found when this site was built)" in text
    assert str(tmp_path) not in text  # a build machine's paths never reach a page


def make_store(path: Path) -> Path:
    from effinfer.evaluation.records import RunRecord, StackSpec
    from effinfer.evaluation.store import ResultsStore

    env = {"cpu": "Test CPU 9000", "cores": 2, "gpu": None, "threads": 2}

    def record(name, techniques, ppl, acc, tok, bench):
        run = RunRecord(spec=StackSpec(name=name, techniques=techniques), model="tiny-test", suite="quick",
                        bench_id=bench, key=name, seconds=1.0, environment=env)
        run.add("perplexity.wikipedia.token", ppl, stderr=0.1, higher_is_better=False)
        run.add("accuracy.mean.acc", acc, stderr=0.01, higher_is_better=True)
        run.add("speed.p128_b1.decode_tok_s", tok, low=tok * 0.95, high=tok * 1.05, higher_is_better=True)
        return run

    with ResultsStore(path) as store:
        old = store.start_bench("quick", "tiny-test", command="effinfer bench -t rtn", environment=env)
        store.save_run(record("baseline", [], 10.0, 0.5, 100.0, old))
        store.save_run(record("rtn", [{"name": "rtn", "config": {}}], 10.2, 0.48, 110.0, old))
        bench = store.start_bench("quick", "tiny-test", command="effinfer bench -t rtn:bits=8", environment=env)
        store.save_run(record("baseline", [], 10.0, 0.5, 100.0, bench))
        store.save_run(record("rtn:bits=8", [{"name": "rtn", "config": {"bits": 8}}], 10.1, 0.49, 120.0, bench))
        store.save_run(record("rtn:bits=4+prompt_lookup",
                              [{"name": "rtn", "config": {"bits": 4}}, {"name": "prompt_lookup", "config": {}}],
                              11.0, 0.45, 180.0, bench))
        store.finish_bench(bench)
    return path


def test_results_block_shows_the_latest_bench_with_date_machine_table_and_plot(tmp_path, registry):
    results = load_results(make_store(tmp_path / "results.db"))
    assert set(results.by_technique) == {"rtn", "prompt_lookup"}
    assert [r.name for r in results.by_technique["rtn"].records] == ["baseline", "rtn:bits=8",
                                                                    "rtn:bits=4+prompt_lookup"]
    assert results.by_technique["rtn"].earlier_benches == 1
    pages = generate_pages(registry=registry, results=results)
    text = pages[node_page("model.compression.quantization.ptq.weight_only", True)]
    block = text[text.index("#### Results { #rtn-results }"):]
    assert "on **Test CPU 9000 (2 cores), no GPU, 2 torch threads**" in block
    assert re.search(r"Measured on \*\*\d{4}-\d{2}-\d{2}\*\*", block)
    assert "| rtn:bits=8 | 10.10 ±0.10" in block and "| baseline | 10.00 ±0.10" in block
    assert "1 earlier bench(es)" in block and "`effinfer bench -t rtn:bits=8`" in block
    if importlib.util.find_spec("effinfer.evaluation.plots"):  # the evaluator's plotting module
        assert "![accuracy and perplexity against decode speed for rtn](rtn-results.png)" in block
        plot = pages["taxonomy/model/compression/quantization/ptq/rtn-results.png"]
        assert plot[:8] == b"\x89PNG\r\n\x1a\n"
    weight_only = next(r for r in pages["taxonomy/coverage.md"].splitlines() if "[Weight-only quantization]" in r)
    count = len(registry.at_node("model.compression.quantization.ptq.weight_only"))
    assert weight_only.endswith(f"| {count} | 1 |")  # every technique there counted, rtn measured
    assert "not measured" not in block.lower()


def test_an_unreadable_store_is_reported_gracefully(tmp_path, registry):
    broken = tmp_path / "results.db"
    broken.write_text("this is not a database")
    results = load_results(broken)
    assert not results.by_technique and "could not be read" in results.note
    text = generate_pages(registry=registry, results=results)[node_page(STRUCTURED, True)]
    assert "**Not measured yet** (the results store could not be read" in text


def test_cli_reference_includes_plugin_commands():
    text = site.cli_reference()
    assert text.startswith("# CLI reference\n")
    for command in ("effinfer taxonomy", "effinfer plugins show", "effinfer docs build", "effinfer docs serve"):
        assert f"`{command}`" in text


def test_experiment_schema_page_comes_from_the_models():
    text = site.experiment_schema()
    assert "## `Experiment` { #experiment }" in text
    assert "| `max_new_tokens` | `int` | `64` | 1 ≤ value ≤ 8192 | tokens to generate per prompt |" in text
    assert "| `dtype` | `Literal['float32', 'bfloat16', 'float16']` |" in text


def test_docs_commands_come_through_the_public_hook(monkeypatch, tmp_path):
    import importlib.metadata

    import typer

    points = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="effinfer")}
    assert points.get("docs") == "effinfer.tools.site"
    app = typer.Typer()
    app.command("noop")(lambda: None)
    site.effinfer_register_commands(app)
    calls = []
    monkeypatch.setattr(site.subprocess, "call", lambda command, **kw: calls.append((command, kw)) or 0)
    result = CliRunner().invoke(app, ["docs", "build", "--site-dir", str(tmp_path), "--store", str(tmp_path / "r.db")])
    assert result.exit_code == 0, result.output
    command, kwargs = calls[0]
    assert command[1:4] == ["-m", "mkdocs", "build"] and "--strict" in command
    assert command[command.index("--site-dir") + 1] == str(tmp_path)
    assert command[-1] == str(ROOT / "mkdocs.yml") and kwargs["cwd"] == ROOT
    assert kwargs["env"]["EFFINFER_RESULTS"] == str(tmp_path / "r.db")


def test_docs_root_is_found_or_explained(tmp_path, monkeypatch):
    assert site.find_docs_root() == ROOT
    monkeypatch.setattr(site, "__file__", str(tmp_path / "x" / "site.py"))
    with pytest.raises(FileNotFoundError, match="run this from a clone"):
        site.find_docs_root(tmp_path)


def test_type_names_are_readable():
    from typing import Literal

    assert site.type_name(int) == "int"
    assert site.type_name(int | None) == "int | None"
    assert site.type_name(list[str]) == "list[str]"
    assert site.type_name(Literal[2, 4]) == "Literal[2, 4]"
    assert site.code("a`b") == "``a`b``"
    assert SiteBuilder  # imported for the API surface


def test_results_table_has_a_fallback_without_the_report_module(tmp_path, monkeypatch):
    results = load_results(make_store(tmp_path / "results.db"))
    monkeypatch.setitem(__import__("sys").modules, "effinfer.evaluation.report", None)  # import fails
    table = site.results_table(results.by_technique["rtn"].records)
    assert table.splitlines()[0] == "| stack | perplexity | accuracy | decode tok/s |"
    assert "| rtn:bits=8 | 10.10 ±0.10 | 0.490 ±0.010 | 120.0 |" in table


def test_benchmark_tables_appear_on_their_node_page(tmp_path, monkeypatch, registry):
    folder = tmp_path / STRUCTURED
    folder.mkdir()
    (folder / "b.md").write_text("## Second table\n\n| a |\n|---|\n| 2 |\n")
    (folder / "a.md").write_text("## First table\n\n| a |\n|---|\n| 1 |\n")
    monkeypatch.setenv("EFFINFER_BENCHMARK_TABLES", str(tmp_path))
    assert load_benchmark_tables() == {STRUCTURED: [(folder / n).read_text().strip() for n in ("a.md", "b.md")]}
    text = generate_pages(registry=registry, results=Results())[node_page(STRUCTURED, True)]
    section = text[text.index("## Benchmarks"):]
    assert section.index("### First table") < section.index("### Second table")
    assert load_benchmark_tables(tmp_path / "missing") == {}


def test_benchmark_plots_appear_on_their_node_page(tmp_path, monkeypatch, registry):
    folder = tmp_path / STRUCTURED
    folder.mkdir()
    (folder / "a.md").write_text("## A table\n\n| a |\n|---|\n| 1 |\n")
    (folder / "speed_vs_quality.png").write_bytes(b"\x89PNG not really")
    monkeypatch.setenv("EFFINFER_BENCHMARK_TABLES", str(tmp_path))
    pages = generate_pages(registry=registry, results=Results())
    page = node_page(STRUCTURED, True)
    image = posixpath.join(posixpath.dirname(page), posixpath.basename(page)[:-3] + "-speed_vs_quality.png")
    assert pages[image] == b"\x89PNG not really"
    assert f"![speed vs quality]({posixpath.basename(image)})" in pages[page]
