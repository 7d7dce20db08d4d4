"""The taxonomy data (arXiv 2404.14294 tree, 2408.03130 view) and its loader."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from effinfer.taxonomy import (
    DATA_DIR, Node, Paper, Taxonomy, TaxonomyError, UnknownNodeError, View, available_views,
    load_taxonomy, load_view,
)

# The contract other code relies on: exactly these ids, no more, no fewer.
CONTRACT_IDS = """
data
data.input_compression
data.input_compression.prompt_pruning
data.input_compression.prompt_summary
data.input_compression.soft_prompt
data.input_compression.rag
data.output_organization
model
model.structure
model.structure.efficient_ffn
model.structure.efficient_attention
model.structure.efficient_attention.shared_kv
model.structure.efficient_attention.low_complexity
model.structure.efficient_attention.low_complexity.kernel_based
model.structure.efficient_attention.low_complexity.low_rank
model.structure.transformer_alternates
model.structure.transformer_alternates.ssm
model.structure.transformer_alternates.other
model.compression
model.compression.quantization
model.compression.quantization.ptq
model.compression.quantization.ptq.weight_only
model.compression.quantization.ptq.weight_activation
model.compression.quantization.ptq.kv_cache
model.compression.quantization.qat
model.compression.sparsification
model.compression.sparsification.weight_pruning
model.compression.sparsification.weight_pruning.unstructured
model.compression.sparsification.weight_pruning.structured
model.compression.sparsification.sparse_attention
model.compression.sparsification.sparse_attention.static
model.compression.sparsification.sparse_attention.dynamic
model.compression.structure_optimization
model.compression.structure_optimization.nas
model.compression.structure_optimization.low_rank
model.compression.distillation
model.compression.distillation.white_box
model.compression.distillation.black_box
model.compression.dynamic_inference
model.compression.dynamic_inference.sample_level
model.compression.dynamic_inference.token_level
system
system.inference_engine
system.inference_engine.graph_operator
system.inference_engine.graph_operator.attention_operator
system.inference_engine.graph_operator.linear_operator
system.inference_engine.graph_operator.graph_fusion
system.inference_engine.speculative_decoding
system.inference_engine.offloading
system.serving
system.serving.memory_management
system.serving.continuous_batching
system.serving.scheduling
system.serving.distributed
system.hardware_accelerator
""".split()

TAX = load_taxonomy()


# ── the shipped tree ──────────────────────────────────────────────────────────
def test_exactly_the_contract_ids() -> None:
    assert len(CONTRACT_IDS) == len(set(CONTRACT_IDS))
    assert set(TAX.nodes) == set(CONTRACT_IDS)
    assert len(TAX) == len(CONTRACT_IDS)


def test_roots_titles_and_levels() -> None:
    assert [(r.id, r.title) for r in TAX.roots()] == [
        ("data", "Data-level optimization"),
        ("model", "Model-level optimization"),
        ("system", "System-level optimization"),
    ]
    for node in TAX:
        assert node.level == node.id.split(".")[0]
        assert node.depth == len(TAX.ancestors(node.id))


def test_every_leaf_has_papers_and_every_node_a_summary() -> None:
    leaves = TAX.leaves()
    assert len(leaves) == 35
    assert all(leaf.papers for leaf in leaves)
    for node in TAX:
        sentences = re.findall(r"[.!?](?:\s|$)", node.summary)
        assert node.title and 2 <= len(sentences) <= 4, node.id


def test_ids_are_consistent_and_every_node_is_reachable() -> None:
    walked = [node.id for node in TAX.walk()]
    assert sorted(walked) == sorted(TAX.nodes)  # each node exactly once
    for node in TAX:
        assert node.id == (f"{node.parent}.{node.segment}" if node.parent else node.segment)
        assert all(TAX.get(child).parent == node.id for child in node.children)


def test_papers_are_well_formed() -> None:
    papers = [paper for node in TAX for paper in node.papers]
    assert len({p.arxiv for p in papers}) == len(papers)  # no paper filed twice
    for paper in papers:
        assert paper.url == f"https://arxiv.org/abs/{paper.arxiv}"
        assert paper.year == 2000 + int(paper.arxiv[:2])  # year of the first arXiv version
    known = {p.arxiv: p.title for p in papers}
    assert known["2210.17323"].startswith("GPTQ")
    assert known["2309.06180"].startswith("Efficient Memory Management")


def test_walk_is_preorder_and_navigation_agrees() -> None:
    position = {node.id: i for i, node in enumerate(TAX.walk())}
    assert next(iter(TAX.walk())).id == "data"
    for node in TAX:
        if node.parent:
            assert position[node.parent] < position[node.id]
    qat = "model.compression.quantization.qat"
    assert [n.id for n in TAX.ancestors(qat)] == [
        "model", "model.compression", "model.compression.quantization"]
    assert TAX.ancestors("data") == []
    sub = [n.id for n in TAX.subtree("model.compression.quantization")]
    assert sub[0] == "model.compression.quantization" and len(sub) == 6
    assert [n.id for n in TAX.children("model.structure.transformer_alternates")] == [
        "model.structure.transformer_alternates.ssm",
        "model.structure.transformer_alternates.other"]
    assert "system.serving" in TAX and "system.nope" not in TAX


def test_to_dict_round_trips_through_json_and_back() -> None:
    data = TAX.to_dict()
    assert json.loads(json.dumps(data)) == data
    again = Taxonomy.from_dict(json.loads(json.dumps(data)))
    assert again.to_dict() == data
    assert data["source"]["arxiv"] == "2404.14294"


def test_default_tree_is_cached_and_package_data() -> None:
    assert load_taxonomy() is load_taxonomy()
    assert (DATA_DIR / "tree.yaml").is_file()
    assert load_taxonomy(DATA_DIR / "tree.yaml").to_dict() == TAX.to_dict()


def test_search_uses_aliases() -> None:
    assert "model.compression.quantization.ptq.weight_only" in [n.id for n in TAX.search("w4a16")]
    assert [n.id for n in TAX.search("PagedAttention")] == ["system.serving.memory_management"]


# ── unknown ids ───────────────────────────────────────────────────────────────
@pytest.mark.parametrize(("typo", "expected"), [
    ("model.compression.quantisation", "model.compression.quantization"),
    ("model.compression.quantization.ptq.weight-only",
     "model.compression.quantization.ptq.weight_only"),
    ("system.inference_engine.speculative", "system.inference_engine.speculative_decoding"),
    ("data.input_compression.soft_prompts", "data.input_compression.soft_prompt"),
    ("GPTQ", "model.compression.quantization.ptq.weight_only"),
])
def test_get_misspelled_id_suggests(typo: str, expected: str) -> None:
    with pytest.raises(UnknownNodeError) as info:
        TAX.get(typo)
    message = str(info.value)
    assert message.startswith(f"unknown taxonomy node {typo!r}; did you mean: ")
    assert expected in message.split("did you mean: ")[1]
    assert isinstance(info.value, KeyError) and info.value.node_id == typo


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_one_character_typo_suggests_the_original(data: st.DataObject) -> None:
    node_id = data.draw(st.sampled_from(sorted(TAX.nodes)))
    i = data.draw(st.integers(0, len(node_id) - 1))
    char = data.draw(st.sampled_from("abcdefghijklmnopqrstuvwxyz_"))
    op = data.draw(st.sampled_from(["replace", "insert", "delete"]))
    typo = {"replace": node_id[:i] + char + node_id[i + 1:],
            "insert": node_id[:i] + char + node_id[i:],
            "delete": node_id[:i] + node_id[i + 1:]}[op]
    if typo in TAX:
        return
    with pytest.raises(UnknownNodeError) as info:
        TAX.get(typo)
    assert node_id in info.value.suggestions


# ── corrupted trees ───────────────────────────────────────────────────────────
GOOD = """
nodes:
  - id: model
    title: Model
    summary: Model level.
    children:
      - id: compression
        title: Compression
        summary: Compress.
        children:
          - id: quantization
            title: Quantization
            summary: Fewer bits.
            papers:
              - {title: GPTQ, arxiv: "2210.17323", year: 2022}
          - id: distillation
            title: Distillation
            summary: Students.
            papers:
              - {title: MiniLLM, arxiv: "2306.08543", year: 2023}
"""


def _load(tmp_path: Path, text: str) -> Taxonomy:
    path = tmp_path / "tree.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return load_taxonomy(path)


def test_small_good_tree_loads(tmp_path: Path) -> None:
    tax = _load(tmp_path, GOOD)
    assert [n.id for n in tax.leaves()] == [
        "model.compression.quantization", "model.compression.distillation"]


@pytest.mark.parametrize(("old", "new", "bad_node", "words"), [
    ("id: distillation", "id: quantization", "model.compression.quantization", "duplicate"),
    ("""papers:
              - {title: MiniLLM, arxiv: "2306.08543", year: 2023}""", "papers: []",
     "model.compression.distillation", "no papers"),
    ('arxiv: "2210.17323"', 'arxiv: "2210.1732"', "model.compression.quantization", "arXiv"),
    ('arxiv: "2210.17323"', 'arxiv: "2213.17323"', "model.compression.quantization", "arXiv"),
    ('arxiv: "2210.17323"', "arxiv: 2210.17323", "model.compression.quantization", "quoted"),
    ("id: distillation", "id: model.other.distillation", "model.other.distillation", "parent"),
    ("id: distillation", "id: Distill-ation", "model.compression.Distill-ation", "snake_case"),
    ("id: model", "id: modle", "modle", "root"),
    ("summary: Students.", "summary: Students.\n            colour: red",
     "model.compression.distillation", "colour"),
])
def test_corrupted_tree_names_the_node(tmp_path: Path, old: str, new: str, bad_node: str,
                                       words: str) -> None:
    assert old in GOOD
    with pytest.raises(TaxonomyError) as info:
        _load(tmp_path, GOOD.replace(old, new, 1))
    assert repr(bad_node) in str(info.value) and words in str(info.value)
    assert info.value.node_id == bad_node


def test_flat_construction_rejects_unreachable_nodes() -> None:
    paper = Paper(title="GPTQ", arxiv="2210.17323", year=2022)
    root = Node(id="model", title="M", summary="M.", children=[])
    orphan = Node(id="model.lost", title="L", summary="L.", parent="model", papers=[paper])
    with pytest.raises(TaxonomyError, match="'model.lost': not reachable"):
        Taxonomy([root.model_copy(update={"papers": [paper]}), orphan])


ARXIV_OK = r"(1[5-9]|[2-9][0-9])(0[1-9]|1[0-2])\.[0-9]{5}|(0[7-9]|1[0-4])(0[1-9]|1[0-2])\.[0-9]{4}"


@given(st.from_regex(ARXIV_OK, fullmatch=True))
def test_valid_arxiv_ids_accepted(arxiv: str) -> None:
    assert Paper(title="x", arxiv=arxiv, year=2020).url.endswith(arxiv)


@given(st.text(max_size=12).filter(lambda s: not s.isascii() or "." not in s))
def test_malformed_arxiv_ids_rejected(arxiv: str) -> None:
    with pytest.raises(ValidationError):
        Paper(title="x", arxiv=arxiv, year=2020)


# ── the 2408.03130 view ───────────────────────────────────────────────────────
def test_view_maps_onto_existing_nodes() -> None:
    assert available_views() == ["2408.03130"]
    view = load_view("2408.03130")
    assert [c.id for c in view.categories] == [
        "quantization", "pruning", "knowledge_distillation", "architectural_optimization"]
    for category in view.categories:
        assert category.maps_to and category.summary
        assert all(node_id in TAX for node_id in category.maps_to)


@pytest.mark.parametrize(("node_id", "expected"), [
    ("model.compression.quantization.ptq.kv_cache", ["quantization"]),
    ("model.compression.sparsification.weight_pruning.structured", ["pruning"]),
    ("model.compression.distillation.black_box", ["knowledge_distillation"]),
    ("model.structure.efficient_attention.shared_kv", ["architectural_optimization"]),
    ("system.inference_engine.speculative_decoding", ["architectural_optimization"]),
    ("data.input_compression.rag", []),
    ("model.compression", []),
])
def test_view_category_of(node_id: str, expected: list[str]) -> None:
    assert [c.id for c in load_view("2408.03130").category_of(node_id)] == expected


def test_every_leaf_under_model_compression_or_structure_has_a_category_except_dynamic() -> None:
    view = load_view("2408.03130")
    for leaf in TAX.leaves():
        if leaf.id.startswith("model.") and ".dynamic_inference." not in leaf.id:
            assert view.category_of(leaf.id), leaf.id


def test_view_with_unknown_node_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "view.yaml"
    path.write_text(textwrap.dedent("""
        name: test
        title: Test view
        arxiv: "2408.03130"
        year: 2024
        categories:
          - {id: q, title: Q, summary: Q., maps_to: [model.compression.quantisation]}
    """), encoding="utf-8")
    with pytest.raises(TaxonomyError, match="did you mean: model.compression.quantization"):
        View.from_yaml(path)
    with pytest.raises(KeyError, match="available: 2408.03130"):
        load_view("9999.99999")
