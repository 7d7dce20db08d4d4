"""The taxonomy of efficient LLM inference, as validated data.

The primary tree is that of arXiv 2404.14294 (Zhou et al. 2024, "A Survey on Efficient Inference
for Large Language Models"): roots ``data``, ``model``, ``system`` and dotted ids such as
``model.compression.quantization.ptq.weight_only`` (a public contract: plugins register on them).
It lives in ``tree.yaml``; views (``views/*.yaml``) map other surveys' categories onto it.

>>> [n.id for n in load_taxonomy().ancestors("model.compression.quantization.qat")]
['model', 'model.compression', 'model.compression.quantization']
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from effinfer.core.errors import EffinferError, close_matches
from effinfer.core.paper import Paper

__all__ = [
    "DATA_DIR", "LEVELS", "Node", "Paper", "Taxonomy", "TaxonomyError", "UnknownNodeError",
    "UnknownViewError", "View", "ViewCategory", "available_views", "load_taxonomy", "load_view",
]

DATA_DIR = Path(__file__).parent
TREE_PATH = DATA_DIR / "tree.yaml"
VIEWS_DIR = DATA_DIR / "views"
LEVELS = ("data", "model", "system")
Level = Literal["data", "model", "system"]
SEGMENT_RE = re.compile(r"[a-z][a-z0-9_]*")


class TaxonomyError(EffinferError, ValueError):
    """The taxonomy (or a view) data is invalid; ``node_id`` names the offending node."""

    def __init__(self, message: str, node_id: str | None = None) -> None:
        super().__init__(message)
        self.node_id = node_id


class UnknownNodeError(EffinferError, KeyError):
    """A node id that is not in the taxonomy; the message suggests the closest ids."""

    def __init__(self, node_id: str, suggestions: list[str]) -> None:
        self.node_id, self.suggestions = node_id, suggestions
        hint = f"; did you mean: {', '.join(suggestions)}?" if suggestions else ""
        super().__init__(f"unknown taxonomy node {node_id!r}{hint}")

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


class UnknownViewError(EffinferError, KeyError):
    """A view name that is not bundled; the message lists the available ones."""

    def __str__(self) -> str:
        return str(self.args[0])


class Node(BaseModel):
    """One node of the tree; ``parent`` and ``children`` hold dotted ids, not objects."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    id: str
    title: str = Field(min_length=1)
    summary: str = Field(min_length=1)
    papers: list[Paper] = Field(default_factory=list)
    aliases: list[str] = Field(default_factory=list)
    parent: str | None = None
    children: list[str] = Field(default_factory=list)

    @property
    def level(self) -> Level:
        """The root this node belongs to: ``"data"``, ``"model"`` or ``"system"``."""
        return cast(Level, self.id.split(".", 1)[0])

    @property
    def depth(self) -> int:
        """0 for a root, 1 for its children, and so on."""
        return self.id.count(".")

    @property
    def segment(self) -> str:
        """The last part of the dotted id."""
        return self.id.rpartition(".")[2]

    @property
    def is_leaf(self) -> bool:
        return not self.children


class Taxonomy:
    """A validated tree of :class:`Node` objects, indexed by dotted id.

    Build it with :meth:`from_yaml` / :meth:`from_dict` (nested form) or directly from a flat
    iterable of nodes. Validation runs in the constructor and raises :class:`TaxonomyError`.
    ``nodes`` keeps the depth-first order of the source; treat it as read-only. Iterating yields
    nodes in pre-order; ``in`` and ``len`` work on ids.
    """

    def __init__(self, nodes: Iterable[Node], source: dict[str, Any] | None = None) -> None:
        self.source = dict(source or {})
        self.nodes: dict[str, Node] = {}
        for node in nodes:
            if node.id in self.nodes:
                raise TaxonomyError(f"duplicate node id {node.id!r}", node.id)
            self.nodes[node.id] = node
        self._validate()

    @classmethod
    def from_yaml(cls, path: Path | str) -> Taxonomy:
        """Load the nested YAML format described at the top of ``tree.yaml``."""
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
            raise TaxonomyError(f"{path}: expected a mapping with a 'nodes' list")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Taxonomy:
        """Build from the nested form (``{"source": ..., "nodes": [...]}``, as :meth:`to_dict`)."""
        nodes: list[Node] = []
        _flatten(data.get("nodes") or [], None, nodes)
        return cls(nodes, data.get("source"))

    def _validate(self) -> None:
        for node in self.nodes.values():
            problem, siblings = None, getattr(self.nodes.get(node.parent or ""), "children", ())
            if (node.id.rpartition(".")[0] or None) != node.parent:
                problem = f"dotted id must be parent id + '.' + segment (parent: {node.parent!r})"
            elif not all(SEGMENT_RE.fullmatch(part) for part in node.id.split(".")):
                problem = "id segments must be lower_snake_case"
            elif node.parent is None and node.id not in LEVELS:
                problem = f"a root must be one of {LEVELS}"
            elif node.parent and node.id not in siblings:
                problem = f"not reachable from a root: parent {node.parent!r} does not list it"
            elif len(set(node.children)) != len(node.children) or any(
                    getattr(self.nodes.get(c), "parent", None) != node.id for c in node.children):
                problem = f"children {node.children} must be distinct nodes naming it as parent"
            elif node.is_leaf and not node.papers:
                problem = "leaf has no papers; every leaf needs at least one"
            if problem:
                raise TaxonomyError(f"node {node.id!r}: {problem}", node.id)
        unreachable = set(self.nodes) - {node.id for node in self.walk()}
        if unreachable:
            first = sorted(unreachable)[0]
            raise TaxonomyError(f"node {first!r} is not reachable from a root", first)

    # ── lookup ──────────────────────────────────────────────────────────────
    def get(self, node_id: str) -> Node:
        """The node with this dotted id; :class:`UnknownNodeError` (a KeyError) if none."""
        try:
            return self.nodes[node_id]
        except KeyError:
            raise UnknownNodeError(node_id, self.closest(node_id)) from None

    def closest(self, node_id: str, n: int = 3, cutoff: float = 0.6) -> list[str]:
        """Up to ``n`` ids most similar to ``node_id`` (full ids, last segments and aliases)."""
        return close_matches(node_id, self.nodes, n=n, cutoff=cutoff,
                             aliases={node.id: node.aliases for node in self.nodes.values()})

    def search(self, text: str) -> list[Node]:
        """Nodes whose id, title or an alias contains ``text`` (case-insensitive)."""
        needle = text.lower()
        return [node for node in self.walk()
                if any(needle in hay.lower() for hay in (node.id, node.title, *node.aliases))]

    # ── navigation ──────────────────────────────────────────────────────────
    def roots(self) -> list[Node]:
        return [node for node in self.nodes.values() if node.parent is None]

    def children(self, node_id: str) -> list[Node]:
        return [self.nodes[child] for child in self.get(node_id).children]

    def leaves(self) -> list[Node]:
        return [node for node in self.walk() if node.is_leaf]

    def walk(self, node_id: str | None = None) -> Iterator[Node]:
        """Depth-first, pre-order: the whole tree, or the subtree under ``node_id``."""
        stack = [self.get(node_id)] if node_id is not None else self.roots()[::-1]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(self.nodes[child] for child in reversed(node.children))

    def ancestors(self, node_id: str) -> list[Node]:
        """The node's ancestors, root first, excluding the node itself (breadcrumbs)."""
        chain: list[Node] = []
        parent = self.get(node_id).parent
        while parent is not None:
            chain.append(self.nodes[parent])
            parent = self.nodes[parent].parent
        return chain[::-1]

    def subtree(self, node_id: str) -> list[Node]:
        """The node and all its descendants, pre-order."""
        return list(self.walk(node_id))

    def to_dict(self) -> dict[str, Any]:
        """The nested, JSON-serializable form (full dotted ids); :meth:`from_dict` reads it."""

        def nest(node: Node) -> dict[str, Any]:
            return {"id": node.id, "title": node.title, "summary": node.summary,
                    "aliases": list(node.aliases),
                    "papers": [paper.model_dump() for paper in node.papers],
                    "children": [nest(self.nodes[child]) for child in node.children]}

        return {"source": dict(self.source), "nodes": [nest(root) for root in self.roots()]}

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.nodes

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[Node]:
        return self.walk()

    def __repr__(self) -> str:
        return f"<Taxonomy {len(self)} nodes, {len(self.leaves())} leaves>"


def _flatten(raw_nodes: Any, parent: str | None, out: list[Node]) -> None:
    """Turn the nested YAML form into flat :class:`Node` objects (pre-order) in ``out``."""
    if not isinstance(raw_nodes, list):
        raise TaxonomyError(f"children of {parent!r} must be a list", parent)
    for raw in raw_nodes:
        if not isinstance(raw, dict):
            raise TaxonomyError(f"a child of {parent!r} is not a mapping: {raw!r}", parent)
        fields = dict(raw)
        raw_children = fields.pop("children", None) or []
        node_id = _dotted_id(fields.pop("id", None), parent)
        children = [_dotted_id(child.get("id") if isinstance(child, dict) else None, node_id)
                    for child in (raw_children if isinstance(raw_children, list) else [])]
        try:
            out.append(Node(id=node_id, parent=parent, children=children, **fields))
        except (ValidationError, TypeError) as error:
            raise TaxonomyError(f"node {node_id!r}: {_describe(error)}", node_id) from None
        _flatten(raw_children, node_id, out)


def _dotted_id(raw_id: Any, parent: str | None) -> str:
    """Accept a last segment or a full dotted id; the latter must extend ``parent``."""
    if not isinstance(raw_id, str) or not raw_id:
        raise TaxonomyError(f"a child of {parent!r} has no id (got {raw_id!r})", parent)
    if "." in raw_id:
        if raw_id.rpartition(".")[0] != parent:
            raise TaxonomyError(f"node {raw_id!r}: dotted id must be parent id + '.' + segment "
                                f"(parent is {parent!r})", raw_id)
        return raw_id
    return f"{parent}.{raw_id}" if parent else raw_id


def _describe(error: Exception) -> str:
    if isinstance(error, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
    return str(error)


@functools.lru_cache(maxsize=1)
def _default_taxonomy() -> Taxonomy:
    return Taxonomy.from_yaml(TREE_PATH)


def load_taxonomy(path: Path | str | None = None) -> Taxonomy:
    """The primary tree (cached) or, given ``path``, a tree read from that YAML file."""
    return _default_taxonomy() if path is None else Taxonomy.from_yaml(path)


# ── views ─────────────────────────────────────────────────────────────────
class ViewCategory(BaseModel):
    """A category of another survey and the primary-tree nodes (with subtrees) it covers."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    id: str
    title: str
    summary: str
    maps_to: list[str] = Field(min_length=1)


class View(BaseModel):
    """Another survey's classification, mapped onto the primary tree."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    title: str
    arxiv: str
    year: int
    categories: list[ViewCategory] = Field(min_length=1)

    @classmethod
    def from_yaml(cls, path: Path | str, taxonomy: Taxonomy | None = None) -> View:
        """Read a view file and check every ``maps_to`` id against ``taxonomy`` (default tree)."""
        try:
            view = cls.model_validate(yaml.safe_load(Path(path).read_text(encoding="utf-8")))
        except ValidationError as error:
            raise TaxonomyError(f"view {str(path)!r}: {_describe(error)}") from None
        view.check(taxonomy or load_taxonomy())
        return view

    def check(self, taxonomy: Taxonomy) -> None:
        """Raise :class:`TaxonomyError` on duplicate categories or unknown ``maps_to`` ids."""
        ids = [category.id for category in self.categories]
        if len(set(ids)) != len(ids):
            raise TaxonomyError(f"view {self.name!r} has duplicate category ids: {ids}")
        for category in self.categories:
            for node_id in category.maps_to:
                if node_id not in taxonomy:
                    raise TaxonomyError(f"view {self.name!r}, category {category.id!r}: "
                                        f"{UnknownNodeError(node_id, taxonomy.closest(node_id))}",
                                        node_id)

    def category_of(self, node_id: str, taxonomy: Taxonomy | None = None) -> list[ViewCategory]:
        """Categories whose ``maps_to`` holds the node or one of its ancestors."""
        tax = taxonomy or load_taxonomy()
        lineage = {tax.get(node_id).id} | {node.id for node in tax.ancestors(node_id)}
        return [c for c in self.categories if lineage.intersection(c.maps_to)]


def _view_files() -> dict[str, Path]:
    """View name (the file's ``name`` field) -> file."""
    return {str(yaml.safe_load(path.read_text(encoding="utf-8")).get("name", path.stem)): path
            for path in sorted(VIEWS_DIR.glob("*.yaml"))}


def available_views() -> list[str]:
    """Names of the bundled views, e.g. ``["2408.03130"]``."""
    return sorted(_view_files())


@functools.lru_cache(maxsize=None)
def load_view(name: str) -> View:
    """A bundled view by name (e.g. ``"2408.03130"``), validated against the primary tree."""
    files = _view_files()
    if name not in files:
        raise UnknownViewError(f"unknown taxonomy view {name!r}; available: {', '.join(sorted(files))}")
    return View.from_yaml(files[name])
