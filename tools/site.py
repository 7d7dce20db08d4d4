"""The docs site's generated pages, and the ``effinfer docs build|serve`` commands.

At build time (``docs/gen_pages.py``, run by the mkdocs-gen-files plugin) :func:`generate_pages`
turns three live sources into markdown pages:

- the taxonomy tree (:func:`effinfer.taxonomy.load_taxonomy`): one page per node, a navigation
  file (``taxonomy/SUMMARY.md``, read by mkdocs-literate-nav) that mirrors the tree, the
  2408.03130 crosswalk and a coverage page;
- the technique registry (:func:`effinfer.core.registry.get_registry`): one card per technique
  on its node's page, so an installed third-party plugin gets its card without any edit to the
  docs sources;
- the results store (:class:`effinfer.evaluation.store.ResultsStore`), when a database exists:
  a table and an accuracy-vs-speed plot per technique, with the date and machine of the bench.

It also writes the CLI reference from the Typer app, plugin commands included.

This module is itself an ordinary plugin of the ``effinfer`` entry-point group
(``docs = "effinfer.tools.site"``): it adds ``effinfer docs`` through
``effinfer_register_commands``. Its top level imports only the standard library and Typer,
because every ``effinfer`` process loads it while building the registry.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from effinfer.core.hookspecs import hookimpl

if TYPE_CHECKING:
    from effinfer.core.registry import Registry, TechniqueEntry
    from effinfer.taxonomy import Node, Taxonomy

ROOT_DIR = "taxonomy"  # generated pages live under docs/taxonomy/ (nothing there is checked in)
PRIMARY_VIEW_ARXIV = "2404.14294"
CROSSWALK_VIEW = "2408.03130"
BUILTIN_DISTRIBUTION = "effinfer"
PLUGIN_TUTORIAL = "guides/write-a-plugin.md"
EVALUATOR_CONCEPT = "concepts/evaluator.md"
MAX_RESULT_ROWS = 12
#: benchmark scripts write their tables here, one markdown file per table, in a folder named
#: after the taxonomy node; each node page shows its folder's tables (sorted by file name)
BENCHMARK_TABLES_DIR = Path("benchmarks") / "results"
log = logging.getLogger("mkdocs.plugins.effinfer")


# ─────────────────────────────────────────────────────────────── small helpers ──


def node_page(node_id: str, is_leaf: bool) -> str:
    """Docs path of a node's page: ``taxonomy/a/b/index.md`` (inner node) or ``taxonomy/a/b.md`` (leaf)."""
    parts = node_id.split(".")
    return posixpath.join(ROOT_DIR, *parts, "index.md") if not is_leaf else posixpath.join(ROOT_DIR, *parts) + ".md"


def link(from_page: str, to_page: str, anchor: str = "") -> str:
    """A relative link from one docs page to another (mkdocs resolves and validates ``.md`` links)."""
    target = posixpath.relpath(to_page, posixpath.dirname(from_page) or ".")
    return target + (f"#{anchor}" if anchor else "")


def code(text: str) -> str:
    """``text`` as an inline code span, whatever backticks it holds."""
    text = str(text).replace("\n", " ")
    fence = "`"
    while fence in text:
        fence += "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def cell(text: Any) -> str:
    """Plain text made safe for a markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|") or "—"


def first_sentence(text: str) -> str:
    match = re.match(r"(.+?[.!?])(\s|$)", " ".join(text.split()))
    return match.group(1) if match else text


def type_name(annotation: Any) -> str:
    """A readable Python type: ``int``, ``int | None``, ``Literal[2, 4, 8]``, ``list[str]``."""
    if isinstance(annotation, type) and not getattr(annotation, "__args__", None):
        return annotation.__name__
    text = repr(annotation)
    text = re.sub(r"<class '([\w.]+)'>", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    text = re.sub(r"\b(typing|typing_extensions|collections\.abc|pathlib)\.", "", text)
    return text.replace("NoneType", "None")


def model_rows(model: type) -> list[tuple[str, str, str, str, str]]:
    """``(field, type, default, allowed range, description)`` for every field of a pydantic model."""
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    from effinfer.core.experiment import allowed_range

    schema = model.model_json_schema()
    rows = []
    for name, info in model.model_fields.items():
        prop = schema.get("properties", {}).get(info.alias or name, {})
        if info.default_factory is not None:
            try:
                value = info.default_factory()
            except TypeError:  # a factory that needs the other fields' values
                default = "computed"
            else:
                default = f"{type(value).__name__}()" if isinstance(value, BaseModel) else repr(value)
        elif info.default is PydanticUndefined:
            default = "required"
        else:
            default = repr(info.default)
        allowed = allowed_range(prop)
        if allowed == "boolean":
            allowed = "true or false"
        elif allowed in ("string", "integer", "number", "array", "object", ""):
            allowed = "any" if allowed else "—"  # no constraint beyond the type
        rows.append((name, type_name(info.annotation), default, allowed, info.description or ""))
    return rows


def config_rows(technique: type) -> list[tuple[str, str, str, str, str]]:
    """:func:`model_rows` of a technique's ``Config``."""
    return model_rows(technique.Config)


def fields_table(model: type) -> str:
    """A markdown table of a pydantic model's fields (the config table of a technique card)."""
    rows = model_rows(model)
    if not rows:
        return "Nothing to configure."
    lines = ["| field | type | default | allowed | description |", "|---|---|---|---|---|"]
    for name, kind, default, allowed, description in rows:
        lines.append(f"| {code(name)} | {code(kind)} | {code(default)} | {cell(allowed)} | {cell(description)} |")
    return "\n".join(lines)


def config_table(technique: type) -> str:
    return fields_table(technique.Config)


def experiment_schema() -> str:
    """The experiment schema reference page, from the pydantic models shared by Python and YAML."""
    from effinfer.core.experiment import Experiment, Runtime, TechniqueSpec
    from effinfer.core.generation import GenerationConfig

    lines = [
        "# Experiment schema",
        "",
        "Generated when the site is built from the pydantic models that both the Python API and "
        "`effinfer run` files use, so it always matches the installed effinfer. Unknown keys are "
        "errors everywhere (`extra=\"forbid\"`). See the [experiment scripts guide](../guides/experiments.md).",
        "",
    ]
    for model, anchor, intro in (
        (Experiment, "experiment", "The top level of a YAML file, or `Experiment(...)` in Python."),
        (TechniqueSpec, "techniquespec", "One entry of `techniques`: a string `NAME:key=value,...` "
                                         "(values read as YAML scalars) or a mapping."),
        (GenerationConfig, "generationconfig", "The `generation` block."),
        (Runtime, "runtime", "The `runtime` block."),
    ):
        lines += [f"## `{model.__name__}` {{ #{anchor} }}", "", intro, "", fields_table(model), ""]
    return "\n".join(lines)


# ─────────────────────────────────────────────────────────────────── results ──


@dataclass
class TechniqueResults:
    """The latest bench that measured a technique: its baseline and the stacks holding the technique."""

    technique: str
    records: list[Any]  # RunRecord, baseline first
    bench: dict[str, Any]
    earlier_benches: int = 0

    @property
    def environment(self) -> dict[str, Any]:
        return self.bench.get("environment") or next((r.environment for r in self.records if r.environment), {})

    @property
    def date(self) -> str:
        return (self.bench.get("started") or self.records[-1].started or "")[:10] or "unknown date"


@dataclass
class Results:
    """What the results store holds, per technique.

    ``note`` says, in words fit for a published page, where the numbers came from or why there
    are none; ``path`` (never printed on a page) is the database that was read.
    """

    by_technique: dict[str, TechniqueResults] = field(default_factory=dict)
    note: str = "no results store was found when this site was built"
    path: str | None = None

    def measured(self, technique: str) -> bool:
        return technique in self.by_technique


def load_benchmark_tables(root: str | Path | None = None) -> dict[str, list[str]]:
    """Node id → the markdown tables benchmark scripts wrote for it (``benchmarks/results/<node>/*.md``).

    ``root`` defaults to ``$EFFINFER_BENCHMARK_TABLES``, else ``benchmarks/results`` in the
    current directory (the checkout, when mkdocs builds the site).
    """
    folder = Path(root or os.environ.get("EFFINFER_BENCHMARK_TABLES") or BENCHMARK_TABLES_DIR)
    if not folder.is_dir():
        return {}
    return {node.name: [table.read_text().strip() for table in sorted(node.glob("*.md"))]
            for node in sorted(folder.iterdir()) if node.is_dir()}


def load_benchmark_images(root: str | Path | None = None) -> dict[str, dict[str, bytes]]:
    """Node id → the PNG plots benchmark scripts wrote next to its tables (``benchmarks/results/<node>/*.png``)."""
    folder = Path(root or os.environ.get("EFFINFER_BENCHMARK_TABLES") or BENCHMARK_TABLES_DIR)
    if not folder.is_dir():
        return {}
    return {node.name: {image.name: image.read_bytes() for image in sorted(node.glob("*.png"))}
            for node in sorted(folder.iterdir()) if node.is_dir() and any(node.glob("*.png"))}


def load_results(path: str | Path | None = None) -> Results:
    """Read the results store (``path``, else the default database) without ever creating one.

    Everything that can go wrong (no database, no evaluation package, a database from a newer
    effinfer) becomes :attr:`Results.note` and a log line; the pages then say "not measured yet".
    """
    try:
        from effinfer.evaluation.store import ResultsStore, default_store_path
    except Exception as error:  # the evaluator is optional for the docs
        log.info("effinfer docs: no results (%s: %s)", type(error).__name__, error)
        return Results(note="the evaluator was not installed when this site was built")
    path = Path(path) if path is not None else default_store_path()
    if not path.exists():
        log.info("effinfer docs: no results store at %s; techniques show 'not measured yet'", path)
        return Results(path=str(path))
    try:
        with ResultsStore(path) as store:
            results = _collect(store)
    except Exception as error:
        log.info("effinfer docs: results store %s unreadable (%s: %s)", path, type(error).__name__, error)
        return Results(note=f"the results store could not be read when this site was built "
                            f"({type(error).__name__})", path=str(path))
    results.path = str(path)
    results.note = (f"the results store held {len(results.by_technique)} measured technique(s) "
                    "when this site was built")
    log.info("effinfer docs: results from %s (%d techniques measured)", path, len(results.by_technique))
    return results


def _collect(store: Any) -> Results:
    runs_of: dict[str, list[Any]] = defaultdict(list)
    for record in store.runs(status="ok"):  # newest first
        for name in {t["name"] for t in record.spec.techniques}:
            runs_of[name].append(record)
    benches = {row["id"]: row for row in store.benches()}
    results = Results()
    for name, records in runs_of.items():
        bench_ids = list(dict.fromkeys(r.bench_id for r in records))  # newest first, unique
        latest = bench_ids[0]
        if latest is not None:
            in_bench = [r for r in store.bench_runs(latest) if r.ok]
            baseline = next((r for r in in_bench if r.is_baseline), None) or store.baseline_of(latest)
        else:
            in_bench, baseline = [r for r in records if r.bench_id is None], None
        stacks = [r for r in in_bench if not r.is_baseline and name in {t["name"] for t in r.spec.techniques}]
        for record in stacks:
            record.baseline = record.baseline or baseline
        chosen = ([baseline] if baseline is not None else []) + stacks[:MAX_RESULT_ROWS]
        results.by_technique[name] = TechniqueResults(name, chosen, benches.get(latest, {}), len(bench_ids) - 1)
    return results


def machine_text(environment: dict[str, Any]) -> str:
    gpu = environment.get("gpu")
    parts = [f"{environment.get('cpu', 'unknown CPU')} ({environment.get('cores', '?')} cores)",
             f"GPU: {gpu}" if gpu else "no GPU", f"{environment.get('threads', '?')} torch threads"]
    return ", ".join(parts)


def results_plot(results: TechniqueResults) -> bytes | None:
    """The accuracy-vs-speed plot of a technique's latest bench (PNG bytes), or ``None``."""
    try:
        from effinfer.evaluation.plots import pareto_plot
    except Exception:  # matplotlib missing: the table still shows the numbers
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "plot.png"
        try:
            pareto_plot(results.records, path, title=f"{results.technique}: quality vs decode speed "
                                                     f"({results.date}, {results.bench.get('model', '')})")
        except Exception:
            return None
        return path.read_bytes() if path.exists() else None


def results_table(records: list[Any]) -> str:
    """The evaluator's own markdown table (the one ``effinfer bench`` writes), or a short fallback."""
    try:
        from effinfer.evaluation.report import markdown_table
    except ImportError:
        pass
    else:
        return markdown_table(records)

    def value(record: Any, prefix: str, suffix: str, digits: int) -> str:
        name = next((n for n in sorted(record.metrics) if n.startswith(prefix) and n.endswith(suffix)), None)
        if name is None:
            return "—"
        metric = record.metrics[name]
        spread = f" ±{metric.stderr:.{digits}f}" if metric.stderr is not None else ""
        return f"{metric.value:.{digits}f}{spread}"

    lines = ["| stack | perplexity | accuracy | decode tok/s |", "|---|---|---|---|"]
    for record in records:
        lines.append(f"| {cell(record.name)} | {value(record, 'perplexity.', '.token', 2)} | "
                     f"{value(record, 'accuracy.mean.', '.acc', 3)} | {value(record, 'speed.', '.decode_tok_s', 1)} |")
    return "\n".join(lines)


def results_block(name: str, results: Results, page: str, plots: dict[str, bytes]) -> list[str]:
    """The markdown of a card's results section; plots to write are added to ``plots``."""
    measured = results.by_technique.get(name)
    if measured is None:
        return [
            f"**Not measured yet** ({results.note}).",
            f"Measure it with {code(f'effinfer bench -t {name}')}, then rebuild the docs "
            f"([how the evaluator works]({link(page, EVALUATOR_CONCEPT)})).",
        ]
    bench = measured.bench
    lines = [
        f"Measured on **{measured.date}** on **{cell(machine_text(measured.environment))}**; "
        f"model {code(bench.get('model') or measured.records[-1].model)}, suite "
        f"{code(bench.get('suite') or measured.records[-1].suite)}"
        + (f", bench {bench['id']}" if bench.get("id") is not None else "") + ".",
        "",
        results_table(measured.records),
        "",
    ]
    image = results_plot(measured)
    if image is not None:
        image_path = posixpath.join(posixpath.dirname(page), f"{name}-results.png")
        plots[image_path] = image
        lines += [f"![accuracy and perplexity against decode speed for {name}]({link(page, image_path)})", ""]
    lines += ["Numbers in parentheses compare with the baseline measured in the same bench; "
              "`= base` marks a number the stack cannot change (copied from the baseline)."]
    if bench.get("command"):
        lines += [f"Produced by {code(bench['command'])}."]
    if measured.earlier_benches:
        lines += [f"{measured.earlier_benches} earlier bench(es) also measured {code(name)} "
                  f"({code('effinfer results list')})."]
    return lines


# ──────────────────────────────────────────────────────────────── the pages ──


class SiteBuilder:
    """Builds every generated page; :meth:`pages` maps docs paths to text (or PNG bytes)."""

    def __init__(self, taxonomy: Taxonomy | None = None, registry: Registry | None = None,
                 results: Results | None = None, benchmark_tables: dict[str, list[str]] | None = None) -> None:
        from effinfer.core.registry import get_registry
        from effinfer.taxonomy import load_taxonomy

        self.taxonomy = taxonomy or load_taxonomy()
        self.registry = registry or get_registry()
        self.results = results if results is not None else load_results()
        self.benchmark_tables = benchmark_tables if benchmark_tables is not None else load_benchmark_tables()
        self.benchmark_images = load_benchmark_images() if benchmark_tables is None else {}
        self.view = self._load_view()
        self.plots: dict[str, bytes] = {}

    def _load_view(self) -> Any:
        from effinfer.taxonomy import load_view

        try:
            return load_view(CROSSWALK_VIEW)
        except (KeyError, ValueError):
            return None

    # paths
    def page(self, node_id: str) -> str:
        return node_page(node_id, self.taxonomy.get(node_id).is_leaf)

    def technique_anchor(self, name: str) -> str:
        return name.replace("_", "-")

    def technique_link(self, from_page: str, entry: TechniqueEntry) -> str:
        name = entry.technique.name
        return f"[{code(name)}]({link(from_page, self.page(entry.technique.node), self.technique_anchor(name))})"

    def node_link(self, from_page: str, node: Node, text: str | None = None) -> str:
        return f"[{text or node.title}]({link(from_page, self.page(node.id))})"

    def subtree_entries(self, node_id: str) -> list[TechniqueEntry]:
        return self.registry.at_node(node_id, include_descendants=True)

    # assembly
    def pages(self) -> dict[str, str | bytes]:
        out: dict[str, str | bytes] = {}
        for node in self.taxonomy.walk():
            out[self.page(node.id)] = self.node_page(node)
        out[f"{ROOT_DIR}/index.md"] = self.overview()
        out[f"{ROOT_DIR}/crosswalk.md"] = self.crosswalk()
        out[f"{ROOT_DIR}/coverage.md"] = self.coverage()
        out[f"{ROOT_DIR}/SUMMARY.md"] = self.summary()
        out.update(self.plots)
        return out

    def summary(self) -> str:
        """The literate-nav file: the section's navigation mirrors the tree."""
        lines = ["* [Overview](index.md)"]

        def add(node: Node, depth: int) -> None:
            lines.append("    " * depth + f"* [{node.title}]({link(f'{ROOT_DIR}/SUMMARY.md', self.page(node.id))})")
            for child in self.taxonomy.children(node.id):
                add(child, depth + 1)

        for root in self.taxonomy.roots():
            add(root, 0)
        lines += [f"* [Crosswalk: arXiv {CROSSWALK_VIEW}](crosswalk.md)", "* [Coverage](coverage.md)"]
        return "\n".join(lines) + "\n"

    def node_page(self, node: Node) -> str:
        page = self.page(node.id)
        here = self.registry.at_node(node.id)
        below = [e for e in self.subtree_entries(node.id) if e.technique.node != node.id]
        kind = "leaf" if node.is_leaf else f"{len(node.children)} sub-families"
        facts = [code(node.id), f"{node.level} level", kind,
                 f"{len(here) + len(below)} technique{'s' if len(here) + len(below) != 1 else ''} in this subtree"]
        categories = self.view.category_of(node.id, self.taxonomy) if self.view else []
        if categories:
            facts.append(f"arXiv {CROSSWALK_VIEW}: " + ", ".join(
                f"[{c.title}]({link(page, f'{ROOT_DIR}/crosswalk.md', c.id.replace('_', '-'))})" for c in categories))
        lines = [f"# {node.title}", "", '<p class="ei-facts" markdown>' + " · ".join(facts) + "</p>", "",
                 node.summary, ""]
        if node.aliases:
            lines += ["Also known as: " + ", ".join(node.aliases) + ".", ""]
        lines += ["## Key papers", ""]
        if node.papers:
            lines += [f"- [{p.title}]({p.url}) — arXiv:{p.arxiv} ({p.year})" for p in node.papers]
        else:
            lines.append("The survey introduces this family through its sub-families; their pages list the papers.")
        lines.append("")
        if node.children:
            lines += ["## Sub-families", "", "| family | techniques | what it does |", "|---|---|---|"]
            for child in self.taxonomy.children(node.id):
                count = len(self.subtree_entries(child.id))
                lines.append(f"| {self.node_link(page, child)} | {count} | {cell(first_sentence(child.summary))} |")
            lines.append("")
        lines += ["## Techniques", ""]
        if here:
            lines += [f"{len(here)} technique{'s' if len(here) != 1 else ''} registered on this node "
                      "(built-in and installed plugins, read from the registry when the site was built).", ""]
            for entry in here:
                lines += self.card(entry, page)
        else:
            lines += [f"No installed technique registers on this node yet. A plugin adds one with "
                      f"{code(f'node = {node.id!r}')} ([write a plugin]({link(page, PLUGIN_TUTORIAL)})).", ""]
        if below:
            lines += ["### Further down the tree", ""]
            lines += [f"- {self.technique_link(page, e)} — {self.node_link(page, self.taxonomy.get(e.technique.node))}"
                      for e in below]
            lines.append("")
        tables = self.benchmark_tables.get(node.id, [])
        if tables:
            lines += ["## Benchmarks", "",
                      f"Tables written by the scripts in {code('benchmarks/')} (each says the command that made it).", ""]
            for table in tables:
                lines += [re.sub(r"^#{1,2} ", "### ", table, flags=re.MULTILINE), ""]
        for name, image in self.benchmark_images.get(node.id, {}).items():
            target = posixpath.join(posixpath.dirname(page), f"{posixpath.basename(page)[:-3]}-{name}")
            self.plots[target] = image
            lines += [f"![{name[:-4].replace('_', ' ')}]({posixpath.basename(target)})", ""]
        return "\n".join(lines)

    def card(self, entry: TechniqueEntry, page: str) -> list[str]:
        cls = entry.technique
        info = cls.describe()
        anchor = self.technique_anchor(cls.name)
        if cls.paper is not None:
            paper = f"[{cell(cls.paper.title)}]({cls.paper.link})" if cls.paper.link else cell(cls.paper.title)
            paper += f" ({cls.paper.year})" if cls.paper.year else ""
            paper += f", arXiv:{cls.paper.arxiv}" if cls.paper.arxiv else ""
        else:
            paper = "—"
        if entry.distribution == BUILTIN_DISTRIBUTION:
            source = f"built in ({code('effinfer')}, entry point {code(entry.plugin)})"
        else:
            source = f"third-party plugin {code(entry.distribution)} (entry point {code(entry.plugin)})"
        lossless = ("**yes** — greedy output identical to the baseline's (checked by the evaluator)"
                    if cls.lossless else "no — outputs may differ from the baseline's")
        hooks = ", ".join(code(h) for h in cls.stage_hooks())
        rows = [
            ("paper", paper),
            ("lossless", lossless),
            ("requires", ", ".join(r.replace("_", " ") for r in info["requires"]) or "nothing beyond the model"),
            ("acts at", f"{', '.join(cls.levels())} level ({hooks})"),
            ("decoding strategy", "yes (at most one per experiment)" if cls.is_decoding_strategy() else "no"),
        ]
        if info["incompatible_with"]:
            rows.append(("incompatible with", ", ".join(code(n) for n in info["incompatible_with"])))
        if cls.needs_features or cls.removes_features:
            rows.append(("model features", "needs " + (", ".join(sorted(cls.needs_features)) or "none")
                         + "; removes " + (", ".join(sorted(cls.removes_features)) or "none")))
        rows += [("provided by", source), ("use it", f"{code(f'effinfer generate PROMPT -t {cls.name}')} or "
                                                      f"{code(f'techniques: [{cls.name}]')} in an experiment")]
        lines = ['<div class="ei-card" markdown>', "", f"### {code(cls.name)} {{ #{anchor} }}", "",
                 cls.summary or "(no summary)", "", '<div class="ei-props" markdown>', "",
                 "| property | value |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in rows]
        lines += ["", "</div>", "", "#### Configuration {{ #{}-config }}".format(anchor), "",
                  '<div class="ei-config" markdown>', "", config_table(cls), "", "</div>", "",
                  "#### Results {{ #{}-results }}".format(anchor), ""]
        lines += results_block(cls.name, self.results, page, self.plots)
        lines += ["", "</div>", ""]
        return lines

    def overview(self) -> str:
        page = f"{ROOT_DIR}/index.md"
        leaves = self.taxonomy.leaves()
        techniques = self.registry.techniques
        measured = sum(self.results.measured(n) for n in techniques)
        source = self.taxonomy.source
        lines = [
            "# The taxonomy",
            "",
            f"effinfer files every technique under a node of the tree of "
            f"[*{source.get('title', 'A Survey on Efficient Inference for Large Language Models')}*]"
            f"(https://arxiv.org/abs/{source.get('arxiv', PRIMARY_VIEW_ARXIV)}) "
            f"(arXiv {source.get('arxiv', PRIMARY_VIEW_ARXIV)}): {len(self.taxonomy)} nodes, {len(leaves)} leaves, "
            "three levels (data, model, system).",
            "",
            f"These pages are generated when the site is built, from the taxonomy data, the registry of installed "
            f"techniques ({len(techniques)} now, {measured} of them measured) and the results store, "
            f"so a newly installed plugin shows up on its node after `effinfer docs build`. The "
            f"[crosswalk]({link(page, f'{ROOT_DIR}/crosswalk.md')}) maps the four-way split of arXiv "
            f"{CROSSWALK_VIEW} onto this tree; the [coverage page]({link(page, f'{ROOT_DIR}/coverage.md')}) "
            "lists every leaf with its techniques.",
            "",
            "The number after each node counts the techniques in its subtree.",
            "",
        ]

        def add(node: Node, depth: int) -> None:
            names = [self.technique_link(page, e) for e in self.registry.at_node(node.id)]
            count = len(self.subtree_entries(node.id))
            lines.append("    " * depth + f"- {self.node_link(page, node)} ({count})"
                         + (" — " + ", ".join(names) if names else ""))
            for child in self.taxonomy.children(node.id):
                add(child, depth + 1)

        for root in self.taxonomy.roots():
            add(root, 0)
        if self.registry.broken:
            lines += ["", "## Plugins that failed to load", "",
                      "These were found in the `effinfer` entry-point group but could not be registered "
                      "when the site was built:", ""]
            lines += [f"- {code(b.plugin)} from {code(b.distribution)}: {code(b.error)}" for b in self.registry.broken]
        return "\n".join(lines) + "\n"

    def coverage(self) -> str:
        page = f"{ROOT_DIR}/coverage.md"
        leaves = self.taxonomy.leaves()
        covered = sum(bool(self.registry.at_node(leaf.id)) for leaf in leaves)
        measured_leaves = sum(any(self.results.measured(e.technique.name) for e in self.registry.at_node(leaf.id))
                              for leaf in leaves)
        lines = [
            "# Coverage",
            "",
            f"Every leaf of the tree, with the techniques registered on it and how many of them have results "
            f"in the store. **{covered} of {len(leaves)} leaves** have at least one technique; "
            f"**{measured_leaves}** have measured results ({self.results.note}).",
            "",
            "| level | family | leaf | techniques | count | measured |",
            "|---|---|---|---|---|---|",
        ]
        for leaf in leaves:
            entries = self.registry.at_node(leaf.id)
            names = ", ".join(self.technique_link(page, e) for e in entries) or "—"
            measured = sum(self.results.measured(e.technique.name) for e in entries)
            family = self.node_link(page, self.taxonomy.get(leaf.parent)) if leaf.parent else "—"
            lines.append(f"| {leaf.level} | {family} | {self.node_link(page, leaf)} | {names} | {len(entries)} "
                         f"| {measured} |")
        inner = [e for e in self.registry.techniques.values() if not self.taxonomy.get(e.technique.node).is_leaf]
        if inner:
            lines += ["", "## Techniques on inner nodes", "",
                      "These register on a family rather than a leaf (they span several leaves):", ""]
            lines += [f"- {self.technique_link(page, e)} — {self.node_link(page, self.taxonomy.get(e.technique.node))}"
                      for e in sorted(inner, key=lambda e: e.technique.name)]
        return "\n".join(lines) + "\n"

    def crosswalk(self) -> str:
        page = f"{ROOT_DIR}/crosswalk.md"
        if self.view is None:
            return f"# Crosswalk\n\nThe {CROSSWALK_VIEW} view is not available in this installation.\n"
        view = self.view
        lines = [
            f"# Crosswalk: arXiv {view.arxiv}",
            "",
            f"[*{view.title}*](https://arxiv.org/abs/{view.arxiv}) ({view.year}) sorts inference optimizations "
            f"into {len(view.categories)} categories. Each maps onto one or more subtrees of the primary tree "
            f"(arXiv {PRIMARY_VIEW_ARXIV}); a technique belongs to a category when its node lies in one of "
            "those subtrees.",
            "",
            "| category | primary-tree subtrees | techniques |",
            "|---|---|---|",
        ]
        for category in view.categories:
            nodes = ", ".join(self.node_link(page, self.taxonomy.get(n)) for n in category.maps_to)
            entries = {e.technique.name: e for n in category.maps_to for e in self.subtree_entries(n)}
            names = ", ".join(self.technique_link(page, entries[n]) for n in sorted(entries)) or "—"
            lines.append(f"| [{category.title}](#{category.id.replace('_', '-')}) | {nodes} | {names} |")
        lines.append("")
        for category in view.categories:
            lines += [f"## {category.title} {{ #{category.id.replace('_', '-')} }}", "", category.summary, "",
                      "Primary-tree subtrees:", ""]
            for node_id in category.maps_to:
                node = self.taxonomy.get(node_id)
                names = [self.technique_link(page, e) for e in self.subtree_entries(node_id)]
                lines.append(f"- {self.node_link(page, node)} ({code(node_id)})"
                             + (": " + ", ".join(names) if names else ": no technique yet"))
            lines.append("")
        mapped = {n for c in view.categories for n in c.maps_to}
        outside = [node for node in self.taxonomy.walk()
                   if not ({node.id} | {a.id for a in self.taxonomy.ancestors(node.id)}) & mapped
                   and not any(m.startswith(node.id + ".") for m in mapped)]
        if outside:
            lines += ["## Not covered by this view", "",
                      f"arXiv {view.arxiv} has no category for these subtrees of the primary tree:", ""]
            lines += [f"- {self.node_link(page, n)} ({code(n.id)})" for n in outside]
        return "\n".join(lines) + "\n"


def generate_pages(registry: Registry | None = None, results: Results | str | Path | None = None,
                   taxonomy: Taxonomy | None = None) -> dict[str, str | bytes]:
    """Every generated page of the taxonomy section (docs path → markdown text or PNG bytes).

    ``results`` is a :class:`Results`, a store path, or ``None`` for ``$EFFINFER_RESULTS`` / the
    default database.
    """
    if not isinstance(results, Results):
        results = load_results(results)
    return SiteBuilder(taxonomy, registry, results).pages()


# ───────────────────────────────────────────────────────────── CLI reference ──

_COMMANDS_REGISTERED = False


def cli_reference() -> str:
    """The CLI reference, from the Typer app with every installed plugin's commands added."""
    global _COMMANDS_REGISTERED
    import click
    from typer.cli import get_docs_for_click
    from typer.main import get_command

    from effinfer.core.cli import app
    from effinfer.core.registry import get_registry

    if not _COMMANDS_REGISTERED:  # `mkdocs serve` reruns the generator in the same process
        get_registry().register_commands(app)
        _COMMANDS_REGISTERED = True
    command = get_command(app)
    body = get_docs_for_click(obj=command, ctx=click.Context(command, info_name="effinfer"), name="effinfer",
                              title="CLI reference")
    intro = ("Generated when the site is built from the `effinfer` Typer app, including the commands that "
             "installed plugins add through `effinfer_register_commands` (`bench` and `results` come from "
             "the evaluator, `docs` from this site's own plugin). `effinfer COMMAND --help` prints the same.")
    title, _, rest = body.partition("\n")
    return f"{title}\n\n{intro}\n{rest}"


# ─────────────────────────────────────────────────────── effinfer docs build|serve ──

docs_app = typer.Typer(help="Build or serve the documentation site (mkdocs-material).", no_args_is_help=True)


def find_docs_root(start: Path | None = None) -> Path:
    """The folder holding ``mkdocs.yml``: this checkout's, else the nearest one above ``start``."""
    candidates = [Path(__file__).resolve().parents[1]]
    here = (start or Path.cwd()).resolve()
    candidates += [here, *here.parents]
    for folder in candidates:
        config = folder / "mkdocs.yml"
        if config.is_file() and (folder / "docs" / "gen_pages.py").is_file():
            return folder
    raise FileNotFoundError(
        "no effinfer docs sources (mkdocs.yml and docs/) here: they live in the effinfer repository, "
        "so run this from a clone (pip install -e '.[docs]')"
    )


def _mkdocs(args: list[str], store: Path | None) -> int:
    try:
        root = find_docs_root()
    except FileNotFoundError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    try:
        import mkdocs  # noqa: F401
    except ImportError:
        typer.echo("error: mkdocs is not installed; install the docs extra: pip install -e '.[docs]'", err=True)
        raise typer.Exit(2) from None
    env = dict(os.environ)
    # MkDocs' ecosystem prints migration notices on every build (see docs/concepts/decisions.md)
    env.setdefault("NO_MKDOCS_2_WARNING", "1")
    env.setdefault("DISABLE_MKDOCS_2_WARNING", "true")
    if store is not None:
        env["EFFINFER_RESULTS"] = str(store.resolve())
    command = [sys.executable, "-m", "mkdocs", *args, "--config-file", str(root / "mkdocs.yml")]
    return subprocess.call(command, env=env, cwd=root)


StoreOption = Annotated[Path | None, typer.Option(
    help="results database shown on the technique cards (default: $EFFINFER_RESULTS or the cache)")]


@docs_app.command("build")
def build(
    site_dir: Annotated[Path | None, typer.Option(help="output folder (default: site/ in the checkout)")] = None,
    strict: Annotated[bool, typer.Option(help="fail on any warning (broken link, missing page…)")] = True,
    store: StoreOption = None,
) -> None:
    """Build the static site; taxonomy pages come from the installed plugins and the results store."""
    args = ["build", "--clean"] + (["--strict"] if strict else [])
    if site_dir is not None:
        args += ["--site-dir", str(site_dir.resolve())]
    code_ = _mkdocs(args, store)
    if code_:
        raise typer.Exit(code_)


@docs_app.command("serve")
def serve(
    address: Annotated[str, typer.Option("--dev-addr", help="IP:PORT to serve on")] = "127.0.0.1:8000",
    store: StoreOption = None,
) -> None:
    """Serve the site with live reload while you edit docs/ (Ctrl-C stops it)."""
    code_ = _mkdocs(["serve", "--dev-addr", address], store)
    if code_:
        raise typer.Exit(code_)


# --8<-- [start:register-commands]
@hookimpl
def effinfer_register_commands(app: typer.Typer) -> None:
    """Add ``effinfer docs build|serve`` to the CLI (``app`` is its Typer app)."""
    app.add_typer(docs_app, name="docs")
# --8<-- [end:register-commands]


def write_pages(pages: dict[str, str | bytes], open_file: Any) -> None:
    """Write ``pages`` through ``open_file(path, mode)`` (``mkdocs_gen_files.open`` at build time)."""
    for path, content in pages.items():
        with open_file(path, "wb" if isinstance(content, bytes) else "w") as handle:
            handle.write(content)


__all__ = [
    "Results", "SiteBuilder", "TechniqueResults", "cli_reference", "config_rows", "config_table",
    "effinfer_register_commands", "find_docs_root", "generate_pages", "load_results", "node_page", "write_pages",
]
