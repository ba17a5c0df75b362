"""The page at `/` in real Chromium: the reference rules agree with the CLI and the server, its URL downloads an
image that `docker load` takes, pre-warm shows progress and ends with size and ETag, and bad input says why.

One server (embedded mode, its registry = the session's test registry) serves every test here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
from collections import Counter
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx
import pytest
from starlette.requests import Request
from starlette.routing import Match

from docker_http_passthrough.api.app import create_app
from docker_http_passthrough.api.resolution import parse_image_request
from docker_http_passthrough.routes import RouteOptions, build
from docker_http_passthrough.shared.targets import target_from_settings
from docker_http_passthrough.shared.settings import load_settings
from tests.support.faults import run_cli
from tests.support.images import make_layer
from tests.support.references import generate
from tests.support.services import ServerProcess

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def page_server(registry, tmp_path_factory):
    base = tmp_path_factory.mktemp("page-server")
    server = ServerProcess({"REGISTRY_URL": registry.url, "CACHE_DIR": str(base / "cache")}, base / "server.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def page(browser, page_server):
    """The page, freshly loaded; every request it makes is recorded, and must go to the server."""
    context = browser.new_context(viewport={"width": 1200, "height": 1500})
    tab = context.new_page()
    tab.requests, tab.console = [], []
    tab.on("request", lambda request: tab.requests.append(request.url))
    tab.on("console", lambda message: tab.console.append(message.text))
    tab.on("pageerror", lambda error: tab.console.append(f"page error: {error}"))
    tab.goto(page_server.url + "/")
    tab.wait_for_selector("body[data-ready=true]")
    yield tab
    foreign = [url for url in tab.requests if not url.startswith(page_server.url + "/") and not url.startswith("data:")]
    assert not foreign, f"the page made requests elsewhere: {foreign}"
    assert not [m for m in tab.console if "Content Security Policy" in m or "page error" in m], tab.console
    assert tab.evaluate("localStorage.length + sessionStorage.length") == 0 and tab.evaluate("document.cookie") == ""
    assert tab.url == page_server.url + "/", "the page must put nothing in its own URL"
    context.close()


# -- one set of rules in three places ---------------------------------------------------------------------------


def _server_reads(url: str, default_registry: str | None, namespace: str | None, app_for) -> tuple:
    """What the server's routing and parser make of a URL: (registry, scheme, repository, tag, digest, platform).
    The server's own registry (REGISTRY_URL) is `default_registry`, for /docker/ URLs."""
    path = urlsplit(url).path
    app = app_for(default_registry, namespace)
    scope = {"type": "http", "method": "GET", "path": unquote(path), "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "app": app,
             "headers": [(b"authorization", b"Basic " + base64.b64encode(b"user:secret"))]}
    for route in app.router.routes:
        match, child = route.matches(scope)
        if match == Match.FULL:
            scope.update(child)
            break
    else:
        raise AssertionError(f"no route matches {path}")
    wanted = parse_image_request(Request(scope))
    return (wanted.target.name, wanted.target.api_url.split(":", 1)[0], wanted.image.repository, wanted.image.tag,
            wanted.image.digest, str(wanted.platform))


def _apps(tmp_path: Path):
    apps: dict = {}

    def app_for(registry: str | None, namespace: str | None):
        key = (registry, namespace)
        if key not in apps:
            scheme = "https" if registry is None or registry == "docker.io" else "http"
            env = {"CACHE_DIR": str(tmp_path), "REGISTRY_URL": f"{scheme}://{registry or 'docker.io'}"}
            if namespace:
                env["REGISTRY_DEFAULT_NAMESPACE"] = namespace
            app = create_app(load_settings(env))
            app.state.settings = load_settings(env)
            app.state.default_target = target_from_settings(app.state.settings)
            apps[key] = app
        return apps[key]

    return app_for


def _comparable(result: dict) -> dict:
    return {**result, "problem": result["problem"] and result["problem"]["rule"]}


def test_page_cli_and_server_agree_on_generated_references(page, tmp_path):
    cases = generate(seed=11, count=320)
    python = [build(case.reference, RouteOptions(**case.python_options())) for case in cases]
    page_results = page.evaluate("cases => cases.map(([text, options]) => window.DHP.build(text, options))",
                                 [[case.reference, case.js_options()] for case in cases])
    mismatches = [(c.reference, c.js_options(), _comparable(p), _comparable(j))
                  for c, p, j in zip(cases, python, page_results) if _comparable(p) != _comparable(j)]
    assert not mismatches, f"{len(mismatches)} page/Python mismatches, first: {mismatches[:3]}"

    # The CLI takes every reference of one option set in one run (it has no default-namespace option).
    groups: dict[tuple, list[int]] = {}
    for index, case in enumerate(cases):
        if case.default_namespace is None:
            groups.setdefault(case.cli_flags(), []).append(index)
    checked_cli = 0
    for flags, indexes in groups.items():
        run = run_cli(["url", "--json", *flags, "--", *(cases[i].reference for i in indexes)], {}, timeout=60)
        lines = [json.loads(line) for line in run.stdout.splitlines()]
        assert len(lines) == len(indexes), run.stderr
        for index, line in zip(indexes, lines):
            assert _comparable(line) == _comparable(python[index]), cases[index].reference
            checked_cli += 1

    # The server reads every URL back as the same registry, repository and tag.
    app_for = _apps(tmp_path)
    for case, result in zip(cases, python):
        if result["url"] is None:
            continue
        default = None if case.registry_in_url else result["registry"]
        registry, scheme, repository, tag, digest, platform = _server_reads(result["url"], default,
                                                                            case.default_namespace, app_for)
        assert (registry, repository, tag, digest) == (result["registry"], result["repository"], result["tag"],
                                                       result["digest"]), case
        assert platform == (result["platform"] or "linux/amd64"), case  # the URL's, else the server's PLATFORM
        if case.registry_in_url:
            loopback = re.fullmatch(r"(localhost|127\.[0-9.]+|\[::1\])(:[0-9]+)?", registry) is not None
            plain = registry != "docker.io" and (loopback or case.insecure_registry)
            assert scheme == ("http" if plain else "https"), (case, scheme)

    # A rule a filename cannot say is served through /ref/ (filename_problem), else it is the problem.
    rules = Counter(result["problem"]["rule"] if result["problem"] else result["filename_problem"]
                    for result in python if result["problem"] or result["filename_problem"])
    served = sum(result["url"] is not None for result in python)
    by_ref = sum(result["route"] == "ref" for result in python)
    platformed = sum(result["platform"] is not None and result["url"] is not None for result in python)
    assert served >= 120 and checked_cli >= 200 and by_ref >= 30 and platformed >= 30, (
        served, checked_cli, by_ref, platformed)
    for rule in ("tag_underscore", "digest", "uppercase", "invalid_registry", "invalid_tag", "invalid_component",
                 "component_double_underscore", "single_component", "single_component_underscore", "empty_reference",
                 "invalid_digest", "name_too_long", "invalid_platform"):
        assert rules[rule], f"the generator produced no case of {rule}: {rules}"


# -- the page as a user sees it ---------------------------------------------------------------------------------


def _layers(count: int, size: int) -> list:
    return [make_layer({f"data{i}.bin": os.urandom(size)}) for i in range(count)]


def test_page_is_served_with_a_strict_policy(page_server):
    html = (Path(__file__).resolve().parents[1] / "docs" / "index.html").read_bytes()
    with httpx.Client(base_url=page_server.url, trust_env=False, timeout=10) as client:
        got, head = client.get("/"), client.head("/")
        info = client.get("/info").json()
    assert got.status_code == 200 and got.content == html
    assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) == len(html)
    policy = got.headers["content-security-policy"]
    script = re.search(rb"<script>(.*?)</script>", html, re.DOTALL).group(1)
    digest = base64.b64encode(hashlib.sha256(script).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in policy
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "unsafe" not in policy
    assert info["registry"].startswith("127.0.0.1:") and info["platform"] == "linux/amd64"


def test_typed_reference_gives_a_url_that_downloads_and_loads(page, page_server, registry, unique_repo,
                                                                docker_engine, screenshot, tmp_path):
    registry.push_image(unique_repo, "v1", _layers(2, 50_000))
    page.fill("#ref", f"{registry.host}/{unique_repo}:v1")
    url = page.text_content("#url")
    assert url == f"{page_server.url}/docker/{unique_repo.replace('/', '_')}_v1.tar"
    assert f"copy {url} flash:" in page.text_content("#ios")
    screenshot(page, "1-reference-typed")

    # The page's own shell lines, run as shown: curl against the server (and so the test registry), docker load.
    curl_line, load_line = page.text_content("#shell").splitlines()
    subprocess.run(["bash", "-c", curl_line], cwd=tmp_path, check=True, timeout=120)
    filename = load_line.split()[-1]
    try:
        loaded = docker_engine.load(tmp_path / filename)
        assert f"Loaded image: {registry.host}/{unique_repo}:v1" in loaded
    finally:
        docker_engine.run("rmi", "-f", f"{registry.host}/{unique_repo}:v1", check=False)

    page.check("input[name=registry][value=url]")
    page.check("input[name=credentials][value=switch]")
    page.select_option("#destination", "usbflash1:")
    ios = page.text_content("#ios")
    assert page.text_content("#url") == f"{page_server.url}/registry-auth/http/{registry.host}/docker/{filename}"
    assert "ip http client username <registry-username>" in ios and "no ip http client password" in ios
    assert f"usbflash1:{filename}" in ios and page.is_visible("#credential-hint")
    assert page.locator("input[type=password]").count() == 0, "the page must never ask for a password"
    assert page.is_disabled("#prewarm")  # /registry-auth/ needs credentials the page never has
    screenshot(page, "2-switch-credentials")


def test_prewarm_button_shows_progress_then_size_and_etag(page, page_server, registry, unique_repo, screenshot):
    registry.push_image(unique_repo, "v2", _layers(3, 400_000))
    page.fill("#ref", f"{registry.host}/{unique_repo}:v2")
    registry.proxy.throttle_bytes_per_second = 400_000  # slow enough to watch the bar move
    page.click("#prewarm")
    page.wait_for_selector("#prewarm-status:has-text('of 3 layers')", timeout=30_000)
    assert page.get_attribute("#prewarm-box", "data-state") == "running"
    screenshot(page, "3-prewarm-running")
    page.wait_for_selector("#prewarm-box[data-state=done]", timeout=60_000)
    registry.proxy.throttle_bytes_per_second = 0
    screenshot(page, "4-prewarm-done")

    head = httpx.head(page.text_content("#url"), trust_env=False, timeout=30)
    status = page.text_content("#prewarm-status")
    assert f"{int(head.headers['content-length']):,} bytes" in status, status
    assert head.headers["etag"] in status
    assert page.evaluate("document.getElementById('bar').value") == 1


def test_bad_references_and_failed_prewarm_say_why(page, registry, unique_repo, screenshot):
    cases = {
        "Nginx:latest": "use lowercase",
        "nginx@sha512:" + "cd" * 64: "sha256 digests only",
        "ghcr.io/my-org/app:1.0": "this server's own registry is",
        "registry.example.com:99999/app": "port must be 1-65535",
    }
    for reference, words in cases.items():
        page.fill("#ref", reference)
        assert page.is_visible("#problem") and not page.is_visible("#output"), reference
        assert words.lower() in page.text_content("#problem").lower(), (reference, page.text_content("#problem"))
        assert page.is_disabled("#prewarm")
    page.fill("#ref", "Nginx:latest")
    screenshot(page, "5-bad-reference")

    # What a filename cannot say (a tag with "_", a digest) is served through /ref/, behind the chosen platform.
    page.select_option("#platform", "linux/arm64")
    for reference, path, rule in (
            ("nginx:1.0_beta", "/platform/linux/arm64/ref/docker.io/library/nginx:1.0_beta.tar", "tag_underscore"),
            ("nginx@sha256:" + "ab" * 32, f"/platform/linux/arm64/ref/docker.io/library/nginx@sha256:{'ab' * 32}.tar",
             "digest")):
        page.fill("#ref", reference)
        assert page.is_visible("#output") and not page.is_visible("#problem"), reference
        assert urlsplit(page.text_content("#url")).path == path
        assert f"cannot say this reference ({rule})" in page.text_content("#notes")
        assert "for linux/arm64 through" in page.text_content("#ios")
    screenshot(page, "7-ref-route-arm64")
    page.select_option("#platform", "")

    page.fill("#ref", f"{registry.host}/{unique_repo}:missing")
    page.click("#prewarm")
    page.wait_for_selector("#prewarm-box[data-state=failed]", timeout=30_000)
    status = page.text_content("#prewarm-status")
    assert "no such repository, tag or platform" in status and f"{unique_repo}:missing not found" in status, status
    screenshot(page, "6-prewarm-failed")
