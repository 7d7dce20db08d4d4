"""The docs site as a reader gets it: a strict build through ``effinfer docs build``, then the
built HTML served on localhost and opened in headless Chromium.

The build uses a small results database made for the test, so the results blocks (table and plot)
are exercised too. Screenshots land in ``artifacts/docs/``.
"""

from __future__ import annotations

import functools
import html.parser
import http.server
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import pytest

from effinfer.taxonomy import load_taxonomy
from test_docs_pages import make_store  # tests/ is on sys.path (pytest rootdir-relative imports)

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts" / "docs"
LEAF = "taxonomy/model/compression/sparsification/weight_pruning/structured/"
TUTORIAL = "guides/write-a-plugin/"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install -e '.[docs]')")
    folder = tmp_path_factory.mktemp("docs")
    store = make_store(folder / "results.db")
    out = folder / "site"
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "effinfer.core.cli", "docs", "build", "--site-dir", str(out), "--store", str(store)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    print(f"strict docs build: {time.perf_counter() - started:.1f} s")
    return out


def html_pages(site: Path) -> list[Path]:
    return sorted(p for p in site.rglob("*.html") if p.name != "404.html")


def test_strict_build_has_a_page_per_node_and_the_generated_sections(site):
    pages = html_pages(site)
    tree = load_taxonomy()
    for node in tree.walk():
        assert (site / "taxonomy" / Path(*node.id.split(".")) / "index.html").is_file(), node.id
    for page in ("index.html", "getting-started/index.html", "concepts/stages/index.html", f"{TUTORIAL}index.html",
                 "guides/experiments/index.html", "reference/cli/index.html", "reference/experiment-schema/index.html",
                 "reference/api/hookspecs/index.html", "taxonomy/index.html", "taxonomy/crosswalk/index.html",
                 "taxonomy/coverage/index.html"):
        assert (site / page).is_file(), page
    assert len(pages) >= len(tree) + 25
    (ARTIFACTS.mkdir(parents=True, exist_ok=True))
    (ARTIFACTS / "page-count.txt").write_text(f"{len(pages)}\n")


def test_built_pages_carry_cards_results_and_api_docs(site):
    leaf = (site / LEAF / "index.html").read_text()
    assert 'id="drop-layers"' in leaf and "effinfer-example-plugin" in leaf
    assert "how many of the last decoder layers to remove" in leaf
    rtn = (site / "taxonomy/model/compression/quantization/ptq/weight_only/index.html").read_text()
    assert "Test CPU 9000" in rtn and "rtn:bits=4+prompt_lookup" in rtn
    if importlib.util.find_spec("effinfer.evaluation.plots"):
        assert (site / "taxonomy/model/compression/quantization/ptq/rtn-results.png").stat().st_size > 1000
    tutorial = (site / TUTORIAL / "index.html").read_text()
    assert "DropLayers" in tutorial and "effinfer_register_techniques" in tutorial  # snippets were inserted
    assert "--8&lt;--" not in tutorial and "--8<--" not in tutorial
    api = (site / "reference/api/hookspecs/index.html").read_text()
    assert "effinfer_register_techniques" in api and "effinfer_transform_model" in api
    cli = (site / "reference/cli/index.html").read_text()
    assert "effinfer docs build" in cli and "effinfer plugins show" in cli


def test_search_index_holds_techniques_and_nodes(site):
    index = json.loads((site / "search" / "search_index.json").read_text())
    text = " ".join(doc["title"] + " " + doc["text"] for doc in index["docs"])
    for needle in ("drop_layers", "prompt_lookup", "Weight-only quantization", "Structured pruning"):
        assert needle in text, needle


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if values.get("id"):
            self.ids.add(values["id"])
        for name in ("href", "src"):
            if values.get(name) and (tag != "link" or values.get("rel") != "canonical"):
                self.links.append(values[name])


def test_every_internal_link_resolves(site):
    parsed: dict[Path, _Links] = {}

    def parse(path: Path) -> _Links:
        if path not in parsed:
            parser = _Links()
            parser.feed(path.read_text(errors="replace"))
            parsed[path] = parser
        return parsed[path]

    broken, checked = [], 0
    for page in html_pages(site):
        base = "/" + page.relative_to(site).as_posix()
        for href in parse(page).links:
            parts = urlsplit(href)
            if parts.scheme or parts.netloc or href.startswith(("mailto:", "data:", "javascript:")):
                continue
            url = urlsplit(urljoin(base, href))
            target = site / unquote(url.path).lstrip("/")
            if url.path.endswith("/") or target.is_dir():
                target = target / "index.html"
            checked += 1
            if not target.is_file():
                broken.append(f"{base}: {href}")
            elif url.fragment and target.suffix == ".html" and unquote(url.fragment) not in parse(target).ids:
                broken.append(f"{base}: {href} (no anchor)")
    assert checked > 1000
    assert not broken, "\n".join(broken[:40])


# ───────────────────────────────────────────────────────────── in a browser ──


@pytest.fixture(scope="module")
def served(site) -> Iterator[str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def chromium() -> str:
    path = chromium_path()
    if path is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium); the browser checks need it")
    return path


def test_pages_render_and_search_works_in_chromium(served, chromium, tmp_path):
    """Home page, a leaf page and the tutorial render; typing in the search box finds a technique."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        return _check_with_cli(served, chromium, tmp_path)
    errors: list[str] = []
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS[1:])
        except PlaywrightError as error:  # a Chromium this Playwright cannot drive: plain command line
            print(f"Playwright could not start {chromium} ({error}); checking with --dump-dom instead")
            return _check_with_cli(served, chromium, tmp_path)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(served, wait_until="load")
            assert page.title().startswith("effinfer")
            assert "one shared evaluator" in page.inner_text("article")
            page.screenshot(path=str(ARTIFACTS / "home.png"))

            page.goto(served + LEAF, wait_until="load")
            assert page.inner_text("h1").rstrip("¶ ") == "Structured pruning"
            crumbs = page.inner_text(".md-path")
            assert "Model compression" in crumbs and "Weight pruning" in crumbs
            card = page.locator(".ei-card", has=page.locator("#drop-layers"))
            assert card.count() == 1 and "1 ≤ value ≤ 64" in card.inner_text()
            assert page.locator(".md-nav__link--active", has_text="Structured pruning").count() >= 1
            page.screenshot(path=str(ARTIFACTS / "leaf-structured-pruning.png"), full_page=True)

            page.goto(served + TUTORIAL, wait_until="load")
            assert page.inner_text("h1").rstrip("¶ ") == "Write a plugin"
            assert "class DropLayers(Technique):" in page.inner_text("article")
            page.screenshot(path=str(ARTIFACTS / "tutorial.png"))

            page.goto(served, wait_until="load")
            search = page.locator("input.md-search__input")
            search.click()
            result = page.locator(".md-search-result__item").first
            for attempt in range(3):  # the search worker may still be building its index: type again
                search.fill("")
                search.press_sequentially("drop_layers", delay=40)  # real key events, as a reader types
                try:
                    result.wait_for(timeout=8_000)
                    break
                except Exception:
                    if attempt == 2:
                        raise
            results_text = page.inner_text(".md-search-result")
            assert "drop_layers" in results_text or "Structured pruning" in results_text
            page.screenshot(path=str(ARTIFACTS / "search.png"))
            page.locator(".md-search-result__item a", has_text="Structured pruning").first.click()
            page.wait_for_url("**/structured/**", timeout=10_000)
        finally:
            browser.close()
    assert not errors, errors


def _check_with_cli(served: str, chromium: str, tmp_path: Path) -> None:
    """Without Playwright: render with ``--dump-dom`` and ``--screenshot``; search via its index only."""
    def run(*args: str) -> str:
        profile = tmp_path / f"profile-{len(os.listdir(tmp_path))}"
        command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1280,900", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120).stdout

    for url, name, expected in ((served, "home", "one shared evaluator"),
                                (served + LEAF, "leaf-structured-pruning", "drop_layers"),
                                (served + TUTORIAL, "tutorial", "DropLayers")):  # code is highlighted: spans
        assert expected in run("--dump-dom", url)
        run(f"--screenshot={ARTIFACTS / (name + '.png')}", url)
        assert (ARTIFACTS / f"{name}.png").is_file()
    import urllib.request

    with urllib.request.urlopen(served + "search/search_index.json") as response:
        assert b"drop_layers" in response.read()
