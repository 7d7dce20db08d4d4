"""A versioned set of generation prompts for speed and speculative-decoding evaluation.

Every prompt is built deterministically from real text; the only hand-written parts are
the short instruction templates below. Nothing is stored in the repository:

- ``summarize``: the lead of a Wikipedia article (``wikipedia`` corpus, test split);
- ``qa``: the lead of an article + "According to the passage, who or what is <title>?";
- ``code_edit``: the source of a small pure-Python function of this interpreter's standard
  library (``inspect.getsource``) with a rewrite / copy-edit instruction;
- ``story``: consecutive speeches or stanzas of a Shakespeare work (test split) to continue;
- ``chat``: a short conversational question about an article title.

Passages are whole paragraphs (or speeches) from the start of the chosen span, between
:data:`MIN_PASSAGE_CHARS` and ``max_chars`` characters (about 150-400 SmolLM2 tokens with
the default), cut at a sentence end when a single paragraph is longer. Articles, works and
start positions are drawn by SHA-256 ranks salted with the set version and the category, so a call with the
same arguments returns the same prompts on every machine (``code_edit`` depends on the
standard library's source, so on the Python minor version, recorded in ``source``).
Bump :data:`PROMPT_SET_VERSION` whenever the output of :func:`load_prompts` changes.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict

from effinfer.data import _store
from effinfer.data.corpora import load_corpus

PROMPT_SET_VERSION = "1"
CATEGORIES = ("summarize", "qa", "code_edit", "story", "chat")
MIN_PASSAGE_CHARS = 700
DEFAULT_MAX_CHARS = 1600
CHARS_PER_TOKEN = 4.0  # rough English average for SmolLM2/Llama-style BPE vocabularies

MAX_NEW_TOKENS = {"summarize": 96, "qa": 64, "code_edit": 256, "story": 128, "chat": 128}

# Small pure-Python standard-library functions (frozen modules such as posixpath have no
# source). Taken in this order; those longer than ``max_chars`` are skipped.
STDLIB_FUNCTIONS = (
    "string.capwords", "shlex.quote", "fnmatch.filter", "textwrap.indent", "statistics.median",
    "colorsys.rgb_to_hls", "html.escape", "json.encoder.py_encode_basestring_ascii",
    "textwrap.shorten", "statistics.mode", "statistics.fmean", "difflib.get_close_matches",
    "textwrap.dedent", "ipaddress.summarize_address_range",
)

_SUMMARIZE = "Summarize the following passage in two or three sentences.\n\n{passage}"
_QA = ("Read the passage and answer the question.\n\nPassage:\n{passage}\n\n"
       "Question: According to the passage, who or what is {title}?")
_CODE_EDIT = (
    "Rewrite this Python function with type hints and a concise docstring. Keep its behaviour "
    "identical and return the complete function.",
    "Copy-edit this Python function: clearer variable names and comments, same behaviour. "
    "Return the complete edited function.",
    "Refactor this Python function for readability without changing what it does. "
    "Return the full code.",
)
_STORY = ("Here is a passage from {title} by William Shakespeare. Continue it for a few more "
          "lines in the same style.\n\n{passage}")
_CHAT = (
    "I keep hearing about {title}. Can you explain what it is in a few sentences?",
    "What are the most interesting things to know about {title}?",
    "Could you give me a short, friendly introduction to {title}?",
    "Why does {title} matter? Please keep it brief.",
)
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s")


class Prompt(BaseModel):
    """One generation request: chat messages plus the length it is meant to produce."""

    model_config = ConfigDict(frozen=True)

    id: str
    category: str
    messages: list[dict[str, str]]
    max_new_tokens: int
    approx_prompt_tokens: int
    source: str
    version: str = PROMPT_SET_VERSION

    @property
    def text(self) -> str:
        """The user message, for models used without a chat template."""
        return "\n\n".join(m["content"] for m in self.messages if m["role"] == "user")


def load_prompts(
    category: str | None = None, n_per_category: int = 4, max_chars: int = DEFAULT_MAX_CHARS
) -> list[Prompt]:
    """The prompts of one category (or of all, in :data:`CATEGORIES` order).

    ``max_chars`` caps each passage or code snippet (not the instruction around it).
    Raises ValueError for an unknown category or when fewer than ``n_per_category`` prompts
    can be built.
    """
    if category is not None and category not in CATEGORIES:
        raise ValueError(f"unknown prompt category {category!r}; available: {', '.join(CATEGORIES)}")
    if n_per_category < 1:
        raise ValueError(f"n_per_category must be >= 1 (got {n_per_category})")
    if max_chars < MIN_PASSAGE_CHARS:
        raise ValueError(f"max_chars must be >= {MIN_PASSAGE_CHARS} (got {max_chars})")
    prompts: list[Prompt] = []
    for name in (category,) if category else CATEGORIES:
        items = _BUILDERS[name](n_per_category, max_chars)
        if len(items) < n_per_category:
            raise ValueError(f"only {len(items)} {name!r} prompts can be built with max_chars={max_chars}")
        prompts += [_prompt(name, i, content, source) for i, (content, source) in enumerate(items)]
    return prompts


# --------------------------------------------------------------------------- builders

Item = tuple[str, str]  # (user message, source reference)


def _build_summarize(n: int, max_chars: int) -> list[Item]:
    return [(_SUMMARIZE.format(passage=passage), f"wikipedia:{title}")
            for title, passage in _wiki_passages("summarize", n, max_chars)]


def _build_qa(n: int, max_chars: int) -> list[Item]:
    return [(_QA.format(passage=passage, title=title), f"wikipedia:{title}")
            for title, passage in _wiki_passages("qa", n, max_chars)]


def _build_chat(n: int, max_chars: int) -> list[Item]:
    titles = _shuffled(_article_titles(), "chat")
    return [(_CHAT[i % len(_CHAT)].format(title=title), f"wikipedia:{title}")
            for i, title in enumerate(titles[:n])]


def _build_code_edit(n: int, max_chars: int) -> list[Item]:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    items: list[Item] = []
    for dotted in STDLIB_FUNCTIONS:
        source = _stdlib_source(dotted)
        if len(source) > max_chars:
            continue
        instruction = _CODE_EDIT[len(items) % len(_CODE_EDIT)]
        items.append((f"{instruction}\n\n```python\n{source}```", f"{version}-stdlib:{dotted}"))
        if len(items) == n:
            break
    return items


def _build_story(n: int, max_chars: int) -> list[Item]:
    works = load_corpus("shakespeare", "test").to_list()
    order = _store.stable_order([w["title"] for w in works], salt=_salt("story"))
    items: list[Item] = []
    for work in (works[i] for i in order[:n]):
        blocks = [b.strip() for b in work["text"].split("\n\n") if b.strip()]
        # A start inside the middle 80% skips the list of persons and the last lines.
        start = _store.stable_int(_salt("story-start"), work["title"], len(blocks) // 10, len(blocks) * 9 // 10)
        passage = _take_blocks(blocks[start:], max_chars)
        items.append((_STORY.format(title=work["title"], passage=passage), f"shakespeare:{work['title']}"))
    return items


_BUILDERS: dict[str, Callable[[int, int], list[Item]]] = {
    "summarize": _build_summarize, "qa": _build_qa, "code_edit": _build_code_edit,
    "story": _build_story, "chat": _build_chat,
}


# --------------------------------------------------------------------------- helpers


def _prompt(category: str, index: int, content: str, source: str) -> Prompt:
    return Prompt(
        id=f"{category}-{index:02d}", category=category,
        messages=[{"role": "user", "content": content}],
        max_new_tokens=MAX_NEW_TOKENS[category],
        approx_prompt_tokens=round(len(content) / CHARS_PER_TOKEN), source=source,
    )


def _salt(category: str) -> str:
    return f"effinfer-prompts-v{PROMPT_SET_VERSION}-{category}"


def _shuffled(titles: list[str], category: str) -> list[str]:
    """A seeded, machine-independent shuffle of sorted titles."""
    return [titles[i] for i in _store.stable_order(titles, salt=_salt(category))]


def _eligible(title: str) -> bool:
    """Articles about one thing: no disambiguation pages or lists."""
    return "(disambiguation)" not in title and not title.startswith("List of")


def _article_titles() -> list[str]:
    return sorted(t for t in load_corpus("wikipedia", "test")["title"] if _eligible(t))


def _wiki_passages(category: str, n: int, max_chars: int) -> list[tuple[str, str]]:
    """``n`` (title, lead passage) pairs from seeded-shuffled test-split articles."""
    articles = {a["title"]: a for a in load_corpus("wikipedia", "test").to_list() if _eligible(a["title"])}
    found = []
    for article in (articles[title] for title in _shuffled(sorted(articles), category)):
        paragraphs = [_without_headings(p) for p in article["text"].split("\n\n")]
        paragraphs = [p for p in paragraphs if p]
        passage = _take_blocks(paragraphs, max_chars)
        if len(passage) >= MIN_PASSAGE_CHARS:
            found.append((article["title"], passage))
        if len(found) == n:
            break
    return found


def _without_headings(paragraph: str) -> str:
    """Drop section-title lines (short, no final punctuation) that open a paragraph."""
    lines = paragraph.split("\n")
    while lines and len(lines[0].split()) <= 8 and not lines[0].rstrip().endswith((".", ":", "!", "?")):
        lines.pop(0)
    return "\n".join(lines)


def _take_blocks(blocks: list[str], max_chars: int) -> str:
    """Consecutive blocks until at least MIN_PASSAGE_CHARS, never over ``max_chars``."""
    passage = ""
    for block in blocks:
        candidate = f"{passage}\n\n{block}" if passage else block
        if len(candidate) > max_chars:
            return passage if len(passage) >= MIN_PASSAGE_CHARS else _cut_at_sentence(candidate, max_chars)
        passage = candidate
        if len(passage) >= MIN_PASSAGE_CHARS:
            return passage
    return passage


def _cut_at_sentence(text: str, max_chars: int) -> str:
    """The longest prefix of ``text`` ending at a sentence end within ``max_chars``."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text) if m.end() <= max_chars]
    return text[: ends[-1]].strip() if ends else text[:max_chars].rsplit(" ", 1)[0]


def _stdlib_source(dotted: str) -> str:
    """``inspect.getsource`` of ``module.function`` (the longest importable module prefix)."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        try:
            return inspect.getsource(obj)
        except (OSError, TypeError) as error:
            raise RuntimeError(f"no Python source for {dotted} on this interpreter: {error}") from error
    raise RuntimeError(f"cannot import a module for {dotted}")
