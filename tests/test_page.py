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
from docker_http_passthrough.shared.registry import target_from_settings
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


def _server_reads(url: str, default_registry: str | None, namespace: str | None, app_for) -> tuple[str, str, str, str]:
    """What the server's routing and parser make of a URL: (registry, scheme, repository, tag). The server's own
    registry (REGISTRY_URL) is `default_registry`, for /docker/ URLs."""
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
    return wanted.target.name, wanted.target.api_url.split(":", 1)[0], wanted.image.repository, wanted.image.tag


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
        registry, scheme, repository, tag = _server_reads(result["url"], default, case.default_namespace, app_for)
        assert (registry, repository, tag) == (result["registry"], result["repository"], result["tag"]), case
        if case.registry_in_url:
            loopback = re.fullmatch(r"(localhost|127\.[0-9.]+|\[::1\])(:[0-9]+)?", registry) is not None
            plain = registry != "docker.io" and (loopback or case.insecure_registry)
            assert scheme == ("http" if plain else "https"), (case, scheme)

    rules = Counter(result["problem"]["rule"] for result in python if result["problem"])
    served = sum(result["url"] is not None for result in python)
    assert served >= 120 and checked_cli >= 200, (served, checked_cli)
    for rule in ("tag_underscore", "digest", "uppercase", "invalid_registry", "invalid_tag", "invalid_component",
                 "component_double_underscore", "single_component", "single_component_underscore", "empty_reference",
                 "invalid_digest", "name_too_long"):
        assert rules[rule], f"the generator produced no case of {rule}: {rules}"
