"""Which route a path reaches, and what it asks for: the platform prefix in front of every download route, the
/ref/ and /ref-auth/ routes, the registry a reference names, and the credential rules on /ref/. In process, and
no request leaves it unless a test says so (those go to a closed loopback port)."""

from __future__ import annotations

import asyncio

import pytest
from starlette.routing import Match

from docker_http_passthrough.api.app import create_app
from docker_http_passthrough.shared.settings import load_settings
from docker_http_passthrough.shared.targets import target_for_reference, target_from_settings
from tests.support.asgi import app_in_process, embedded_env

DIGEST = "sha256:" + "a" * 64


def matched(path: str, method: str = "GET") -> tuple[str, dict]:
    """The template of the route that answers `path`, and its path parameters."""
    app = create_app(load_settings({}))
    scope = {"type": "http", "path": path, "method": method, "root_path": ""}
    for route in app.routes:
        match, child = route.matches(scope)
        if match == Match.FULL:
            return route.path, child["path_params"]
    raise AssertionError(f"no route for {path}")


@pytest.mark.parametrize("path, template, params", [
    ("/docker/nginx_latest.tar", "/docker/{filename}", {"filename": "nginx_latest.tar"}),
    ("/platform/linux/arm64/docker/nginx_latest.tar", "/platform/{os}/{arch}/docker/{filename}",
     {"os": "linux", "arch": "arm64", "filename": "nginx_latest.tar"}),
    ("/platform/linux/arm/v7/docker/nginx_latest.tar", "/platform/{os}/{arch}/{variant}/docker/{filename}",
     {"os": "linux", "arch": "arm", "variant": "v7", "filename": "nginx_latest.tar"}),
    ("/platform/linux/arm64/registry-auth/https/ghcr.io/docker/a__b_1.tar",
     "/platform/{os}/{arch}/registry-auth/{scheme}/{host}/docker/{filename}",
     {"os": "linux", "arch": "arm64", "scheme": "https", "host": "ghcr.io", "filename": "a__b_1.tar"}),
    ("/ref/ghcr.io/my-org/app:1.0_rc1.tar", "/ref/{reference:path}", {"reference": "ghcr.io/my-org/app:1.0_rc1.tar"}),
    (f"/ref-auth/ghcr.io/my-org/app@{DIGEST}.tar", "/ref-auth/{reference:path}",
     {"reference": f"ghcr.io/my-org/app@{DIGEST}.tar"}),
    # A reference whose first component reads like a variant or a route name stays a reference.
    ("/platform/linux/arm64/ref/docker/app:1.tar", "/platform/{os}/{arch}/ref/{reference:path}",
     {"os": "linux", "arch": "arm64", "reference": "docker/app:1.tar"}),
    ("/platform/linux/arm64/v8/ref/registry/app:1.tar", "/platform/{os}/{arch}/{variant}/ref/{reference:path}",
     {"os": "linux", "arch": "arm64", "variant": "v8", "reference": "registry/app:1.tar"}),
])
def test_every_download_route_answers_behind_a_platform(path, template, params):
    for method in ("GET", "HEAD", "POST"):
        assert matched(path, method) == (template, params)


@pytest.mark.parametrize("domain, expected", [
    ("registry.example.com", ("https://registry.example.com", "registry.example.com")),
    ("Registry.Example.com:5000", ("https://registry.example.com:5000", "registry.example.com:5000")),
    ("localhost:5000", ("http://localhost:5000", "localhost:5000")),
    ("127.0.0.1:5000", ("http://127.0.0.1:5000", "127.0.0.1:5000")),
    ("[::1]:5000", ("http://[::1]:5000", "[::1]:5000")),
    ("10.0.0.5:5000", ("https://10.0.0.5:5000", "10.0.0.5:5000")),
    ("index.docker.io", ("https://registry-1.docker.io", "docker.io")),
])
def test_a_reference_names_its_registry_as_docker_pull_reaches_it(domain, expected):
    default = target_from_settings(load_settings({"REGISTRY_URL": "https://ghcr.io"}))
    chosen = target_for_reference(domain, default)
    assert (chosen.api_url, chosen.name) == expected


def test_a_reference_to_the_configured_registry_reaches_it_as_configured():
    settings = load_settings({"REGISTRY_URL": "http://10.0.0.5:5000", "REGISTRY_NAME": "registry.corp.example",
                              "REGISTRY_AUTH_URL": ""})
    default = target_from_settings(settings)
    for domain in ("10.0.0.5:5000", "registry.corp.example", "REGISTRY.corp.example"):
        assert target_for_reference(domain, default) is default  # plain http, Basic, its credentials
    hub = target_from_settings(load_settings({}))
    assert target_for_reference("docker.io", hub) is hub
    with pytest.raises(ValueError):
        target_for_reference("[fd00123123123]:5000", default)


def run(env: dict, *requests: tuple[str, str, dict]) -> list:
    async def scenario():
        async with app_in_process(env) as (_app, client):
            return [await client.request(method, path, **kwargs) for method, path, kwargs in requests]
    return asyncio.run(scenario())


def test_bad_platforms_and_references_say_which_rule_broke(tmp_path):
    bad_platform, no_tar, bad_tag, sha512 = run(
        embedded_env(tmp_path),
        ("GET", "/platform/linux/x y/docker/nginx_latest.tar", {}),
        ("GET", "/ref/ghcr.io/my-org/app:1.0", {}),
        ("HEAD", "/ref/ghcr.io/my-org/app:-x.tar", {}),
        ("POST", "/ref/ghcr.io/my-org/app@sha512:" + "f" * 128 + ".tar", {}))
    assert (bad_platform.status_code, bad_platform.json()["error"]) == (400, "bad_platform")
    assert "os/architecture" in bad_platform.json()["message"] or "platform name" in bad_platform.json()["message"]
    assert (no_tar.status_code, no_tar.json()["error"]) == (400, "bad_reference:extension")
    assert "/ref/ghcr.io/my-org/app:1.0.tar" in no_tar.json()["message"]
    assert bad_tag.status_code == 400 and bad_tag.headers["content-type"] == "application/json"
    assert (sha512.status_code, sha512.json()["error"]) == (400, "bad_reference:invalid_digest")


def test_required_client_auth_guards_the_configured_registry_on_ref_too(tmp_path):
    """REGISTRY_CLIENT_AUTH=required: /ref/ naming REGISTRY_URL's registry wants the client's credentials before
    anything else (its settings credentials must not serve a request without them); /ref/ naming another
    registry does not (settings credentials never go there), and /ref-auth/ always does."""
    env = embedded_env(tmp_path, REGISTRY_URL="http://127.0.0.1:9", REGISTRY_USERNAME="svc",
                       REGISTRY_PASSWORD="svc-pw", REGISTRY_CLIENT_AUTH="required")
    own, other, auth_route = run(env, ("GET", "/ref/127.0.0.1:9/team/app:1.tar", {}),
                                 ("GET", "/ref/127.0.0.2:9/team/app:1.tar", {}),
                                 ("GET", "/platform/linux/arm64/ref-auth/127.0.0.2:9/team/app:1.tar", {}))
    assert (own.status_code, own.json()["error"]) == (401, "credentials_required")
    assert own.headers["www-authenticate"].startswith("Basic ")
    assert other.status_code == 502 and other.json()["error"] == "registry_unreachable"  # tried, anonymously
    assert (auth_route.status_code, auth_route.json()["error"]) == (401, "credentials_required")
