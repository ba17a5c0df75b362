"""The documentation site: `zensical build --strict` passes, and in Chromium every Mermaid block became an SVG,
every internal link (and anchor) resolves, and no page requests anything from outside the site. The docs
also keep up with the code: every error code and every setting is documented."""

from __future__ import annotations

import functools
import http.server
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlsplit

import pytest

from tests.support.services import REPO_ROOT

DOCS = REPO_ROOT / "docs"
SITE_SOURCES = ("zensical.toml", "docs", "CONTRIBUTING.md")


@pytest.fixture(scope="module")
def built_site(tmp_path_factory) -> Path:
    """The site built from a copy of the sources, so the build's output and cache stay out of the checkout."""
    work = tmp_path_factory.mktemp("docs-build")
    for name in SITE_SOURCES:
        source = REPO_ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, work / name)
    zensical = Path(sys.executable).with_name("zensical")
    assert zensical.exists(), "zensical is not installed (pip extra 'docs'; scripts/test.sh installs it)"
    build = subprocess.run([str(zensical), "build", "--strict"], cwd=work, capture_output=True, text=True,
                           timeout=300)
    output = re.sub(r"\x1b\[[0-9;]*m", "", build.stdout + build.stderr)
    assert build.returncode == 0 and "No issues found" in output, output[-5000:]
    return work / "site"


@pytest.fixture(scope="module")
def site_url(built_site: Path):
    handler = functools.partial(_QuietHandler, directory=str(built_site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass


def _mermaid_blocks(page_path: str) -> int:
    """How many ```mermaid blocks the Markdown source of a site path has."""
    name = page_path.strip("/") or "index"
    source = DOCS / f"{name}.md"
    return source.read_text().count("```mermaid") if source.exists() else 0


def test_every_diagram_renders_and_every_link_resolves(browser, site_url, built_site, screenshot):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    to_visit, visited, ids, links = ["/"], set(), {}, []
    diagrams = 0
    while to_visit:
        path = to_visit.pop()
        if path in visited:
            continue
        visited.add(path)
        page.goto(site_url + path, wait_until="domcontentloaded")
        expected = _mermaid_blocks(path)
        if expected:
            page.wait_for_selector("body[data-diagrams=rendered]", timeout=30_000)
            assert page.locator(".diagram-error").count() == 0, page.text_content(".diagram-error")
            assert page.locator("pre.diagram").count() == 0, f"{path}: a Mermaid block was left as text"
            assert page.locator(".diagram-rendered > svg").count() == expected, path
            diagrams += expected
            screenshot(page, "docs-" + (path.strip("/") or "home"))
        ids[path] = set(page.eval_on_selector_all("[id]", "elements => elements.map(e => e.id)"))
        for href in page.eval_on_selector_all("a[href]", "anchors => anchors.map(a => a.href)"):
            if href.startswith(site_url):
                target, fragment = urldefrag(href[len(site_url):])
                links.append((path, target or path, unquote(fragment)))
                if target.endswith("/") and target not in visited:
                    to_visit.append(target)
    context.close()

    pages = {f"/{p.stem}/" if p.stem != "index" else "/" for p in DOCS.glob("*.md")}
    assert pages <= visited, f"pages not reachable from the home page: {pages - visited}"
    assert diagrams >= 3
    broken = []
    for source, target, fragment in links:
        file = built_site / urlsplit(target).path.lstrip("/")
        if file.is_dir():
            file = file / "index.html"
        if not file.is_file():
            broken.append(f"{source} -> {target}")
        elif fragment and target in ids and fragment not in ids[target]:
            broken.append(f"{source} -> {target}#{fragment}")
    assert not broken, broken
    foreign = sorted({url for url in requests if not url.startswith(site_url) and not url.startswith("data:")})
    assert not foreign, f"the site requested things from elsewhere: {foreign}"


# -- the docs keep up with the code -----------------------------------------------------------------------------


def _source_text() -> str:
    return "\n".join(p.read_text() for folder in ("api", "shared", "worker") for p in (REPO_ROOT / folder).glob("*.py"))


def test_troubleshooting_lists_every_error_code():
    source = _source_text()
    codes = set(re.findall(r'code\s*=\s*"([a-z_]+)"', source))
    codes |= set(re.findall(r'status, code = \d+, "([a-z_]+)"', source))
    codes |= set(re.findall(r'"error": "([a-z_]+)"', source))
    rules = set(re.findall(r'FilenameError\(\s*"([a-z_]+)"', source))
    name_source = (REPO_ROOT / "shared" / "name.py").read_text()
    filename_rules = set(re.findall(r'FilenameError\(\s*"([a-z_]+)"', name_source.split("# -- The inverse")[0]))
    page = (DOCS / "troubleshooting.md").read_text()
    assert len(codes) >= 15 and len(filename_rules) >= 8, (codes, filename_rules)
    missing = [code for code in codes if f"`{code}`" not in page]
    missing += [f"bad_filename:{rule}" for rule in filename_rules if f"`bad_filename:{rule}`" not in page]
    missing += [rule for rule in rules - filename_rules if f"`{rule}`" not in page]
    assert not missing, f"error codes not in docs/troubleshooting.md: {missing}"


def test_docs_carry_every_setting_and_route_of_the_readme():
    readme = (REPO_ROOT / "README.md").read_text()
    settings = set(re.findall(r"^\| `([A-Z_]+)`", readme, re.MULTILINE))
    routes = set(re.findall(r"^\| `((?:GET|HEAD|POST)[^`]*)`", readme, re.MULTILINE))
    docs = (DOCS / "settings.md").read_text() + (DOCS / "routes.md").read_text()
    assert len(settings) >= 20 and len(routes) >= 5
    missing = [item for item in sorted(settings | routes) if f"`{item}`" not in docs]
    assert not missing, f"in README.md but not in docs/settings.md or docs/routes.md: {missing}"
