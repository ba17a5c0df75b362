"""Unit tests for shared.registry and shared.targets: errors, verification, redirects, targets and credentials (auth flows are in
test_registry_auth.py).

No network: the registry, its token endpoint and a CDN are an in-memory fake behind httpx.MockTransport that
records every request, so each test checks what the client actually sent.
"""

from __future__ import annotations

import httpx
import pytest
from docker_http_passthrough.shared import manifest as mf
from docker_http_passthrough.shared.errors import (
    InvalidContent,
    LimitExceeded,
    NotFound,
    TimedOut,
    Unreachable,
    Unsupported,
)
from docker_http_passthrough.shared.registry import Registries, RegistryClient
from docker_http_passthrough.shared.settings import Settings, load_settings
from docker_http_passthrough.shared.targets import (
    DOCKER_HUB_SERVICE,
    DOCKER_HUB_TOKEN_URL,
    Credentials,
    RegistryTarget,
    target_from_settings,
    target_from_url,
)

from tests.support.fake_registry import (
    ALICE,
    CONFIG_BLOB,
    REPO,
    USERS,
    V1_MANIFEST,
    basic_header,
    sample_registry,
    streamed,
    target,
)
from tests.support.images import sha
from tests.support.testdata import SCHEMA1, SCHEMA1_MEDIA_TYPE





# --- other failures

@pytest.mark.parametrize("status, error, http_status, code, attempts", [
    (404, NotFound, 404, "not_found", 1),
    (429, Unreachable, 502, "rate_limited", 2),
    (500, Unreachable, 502, "registry_unreachable", 2),
    (503, Unreachable, 502, "registry_unreachable", 2),
])
@pytest.mark.anyio
async def test_registry_status_codes_map_to_errors_after_the_retries(status, error, http_status, code, attempts):
    fake = sample_registry()
    fake.override = lambda request: httpx.Response(status)
    async with fake.http(upstream_retries=1) as http:
        client = RegistryClient(http, target(), REPO)
        for call in (client.head_manifest("v1"), client.get_manifest("v1"), client.get_blob(sha(CONFIG_BLOB))):
            with pytest.raises(error) as info:
                await call
            assert (info.value.status, info.value.code) == (http_status, code)
            if attempts > 1:
                assert "UPSTREAM_RETRIES=1" in info.value.message, info.value.message
    assert len(fake.requests) == 3 * attempts  # "try again" statuses are retried, a 404 is not


@pytest.mark.anyio
async def test_connection_error_is_unreachable():
    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)

    transport = httpx.MockTransport(refuse)
    async with Registries(httpx.AsyncClient(transport=transport), settings=Settings(upstream_retries=1)) as http:
        with pytest.raises(Unreachable) as info:
            await RegistryClient(http, target(), REPO).head_manifest("v1")
    assert info.value.status == 502


@pytest.mark.parametrize("exc", [httpx.ReadTimeout, httpx.ConnectTimeout])
@pytest.mark.anyio
async def test_timeout_is_timed_out(exc):
    def slow(request):
        raise exc("too slow", request=request)

    transport = httpx.MockTransport(slow)
    async with Registries(httpx.AsyncClient(transport=transport), settings=Settings(upstream_retries=1)) as http:
        with pytest.raises(TimedOut) as info:
            await RegistryClient(http, target(), REPO).get_manifest("v1")
    assert (info.value.status, info.value.code) == (504, "timeout")


@pytest.mark.anyio
async def test_token_endpoint_timeout_is_timed_out():
    fake = sample_registry(auth="bearer")

    def slow_token(request):
        if request.url.host == "auth.example":
            raise httpx.ReadTimeout("too slow", request=request)
        return None

    fake.override = slow_token
    async with fake.http(upstream_retries=1) as http:
        with pytest.raises(TimedOut) as info:
            await RegistryClient(http, target(), REPO).head_manifest("v1")
    assert info.value.status == 504


@pytest.mark.anyio
async def test_registry_answering_with_a_signed_schema1_manifest_is_unsupported():
    """testdata/schema1-prettyjws.json is what CNCF distribution sends a client that does not ask for schema2."""
    fake = sample_registry()
    fake.manifests["old"] = (SCHEMA1.read_bytes(), SCHEMA1_MEDIA_TYPE)
    async with fake.http() as http:
        client = RegistryClient(http, target(), REPO)
        for call in (client.head_manifest("old"), client.get_manifest("old")):
            with pytest.raises(Unsupported) as info:
                await call
            assert info.value.status == 502
            assert "schema1" in info.value.message
    assert [r.method for r in fake.requests] == ["HEAD", "GET"]


@pytest.mark.anyio
async def test_head_without_digest_falls_back_to_get_and_computes_it():
    fake = sample_registry()
    fake.send_digest_on_head = False
    async with fake.http() as http:
        desc = await RegistryClient(http, target(), REPO).head_manifest("v1")
    assert [r.method for r in fake.requests] == ["HEAD", "GET"]
    assert desc == mf.Descriptor(mf.DOCKER_MANIFEST, sha(V1_MANIFEST), len(V1_MANIFEST))


@pytest.mark.anyio
async def test_get_manifest_by_digest_verifies_bytes():
    fake = sample_registry()
    wrong = sha(b"something else")
    fake.manifests[wrong] = (V1_MANIFEST, mf.DOCKER_MANIFEST)
    async with fake.http() as http:
        client = RegistryClient(http, target(), REPO)
        assert (await client.get_manifest(sha(V1_MANIFEST)))[0] == V1_MANIFEST
        with pytest.raises(InvalidContent) as info:
            await client.get_manifest(wrong)
    assert info.value.status == 502
    assert fake.requests[-1].url.path == f"/v2/{REPO}/manifests/{wrong}"


@pytest.mark.anyio
async def test_get_blob_verifies_digest():
    fake = sample_registry()
    wrong = sha(b"not the blob")
    fake.blobs[wrong] = CONFIG_BLOB
    async with fake.http() as http:
        client = RegistryClient(http, target(), REPO)
        assert await client.get_blob(sha(CONFIG_BLOB)) == CONFIG_BLOB
        with pytest.raises(InvalidContent):
            await client.get_blob(wrong)
        with pytest.raises(LimitExceeded) as info:
            await client.get_blob(sha(CONFIG_BLOB), limit=100)  # larger than the limit
        assert "CONFIG_MAX_BYTES=100" in info.value.message
    assert [r.url.path for r in fake.requests] == [f"/v2/{REPO}/blobs/{sha(CONFIG_BLOB)}", f"/v2/{REPO}/blobs/{wrong}",
                                                  f"/v2/{REPO}/blobs/{sha(CONFIG_BLOB)}"]


@pytest.mark.parametrize("location, keeps_auth", [
    ("https://cdn.example/storage/blob?sig=1", False),  # another origin: credentials must not follow
    ("https://reg.example/v2/storage/blob", True),  # same origin: httpx keeps them
])
@pytest.mark.anyio
async def test_blob_redirect_is_followed_without_leaking_authorization(location, keeps_auth):
    fake = sample_registry(auth="basic", users=USERS)

    def redirect(request):
        if request.url.path.startswith("/v2/storage/") or request.url.host == "cdn.example":
            return streamed(CONFIG_BLOB, chunk=1000)
        if "/blobs/" in request.url.path and request.method == "GET":
            if not request.headers.get("authorization"):
                return None  # let the fake challenge
            return httpx.Response(307, headers={"Location": location})
        return None

    fake.override = redirect
    async with fake.http() as http:
        data = await RegistryClient(http, target(basic_only=True), REPO, ALICE).get_blob(sha(CONFIG_BLOB))
    assert data == CONFIG_BLOB
    first, followed = fake.requests
    assert first.headers["authorization"] == basic_header("alice", "alice-secret-pw")
    assert str(followed.url) == location
    assert ("authorization" in followed.headers) is keeps_auth


# --- targets and credentials

@pytest.mark.parametrize("scheme, host, api_url, name", [
    ("https", "registry.example.com:5000", "https://registry.example.com:5000", "registry.example.com:5000"),
    ("http", "Registry.Example.COM", "http://registry.example.com", "registry.example.com"),
    ("http", "[::1]:5000", "http://[::1]:5000", "[::1]:5000"),
    ("http", "[fd00::1]", "http://[fd00::1]", "[fd00::1]"),
    ("https", "reg.example:65535", "https://reg.example:65535", "reg.example:65535"),
    ("http", "127.0.0.1:5000", "http://127.0.0.1:5000", "127.0.0.1:5000"),
    ("https", "localhost", "https://localhost", "localhost"),
])
def test_target_from_url_accepts_hosts(scheme, host, api_url, name):
    t = target_from_url(scheme, host)
    assert (t.api_url, t.name, t.token_url, t.service, t.basic_only) == (api_url, name, None, None, False)
    assert t.repo_tag_host == name


@pytest.mark.parametrize("scheme, host", [
    ("https", "bad host"),
    ("ftp", "registry.example.com"),
    ("HTTPS", "registry.example.com"),
    ("https", ""),
    ("https", "registry.example.com/path"),
    ("https", "user@registry.example.com"),
    ("https", "registry.example.com:"),
    ("https", "-bad.example.com"),
    ("http", "127.0.0.1:99999"),  # no such port: the socket layer fails with OverflowError, not an HTTPError
    ("http", "127.0.0.1:65536"),
    ("http", "localhost:0"),
    ("http", "[::1]:99999"),
    ("http", "[:]"),  # not an IPv6 address: httpx raises InvalidURL (not an HTTPError)
    ("http", "[1:2:3]"),
])
def test_target_from_url_rejects(scheme, host):
    with pytest.raises(ValueError):
        target_from_url(scheme, host)


@pytest.mark.parametrize("host", ["docker.io", "index.docker.io", "registry-1.docker.io", "Docker.IO"])
def test_target_from_url_maps_docker_hub(host):
    t = target_from_url("https", host)
    assert t.api_url == "https://registry-1.docker.io"
    assert t.token_url == DOCKER_HUB_TOKEN_URL == "https://auth.docker.io/token"
    assert t.service == DOCKER_HUB_SERVICE == "registry.docker.io"
    assert t.name == "docker.io" and t.is_docker_hub and t.repo_tag_host is None


@pytest.mark.parametrize("env", [{}, {"REGISTRY_URL": "https://docker.io"}, {"REGISTRY_URL": "https://index.docker.io/"}])
def test_target_from_settings_docker_hub(env):
    t = target_from_settings(load_settings(env))
    assert (t.api_url, t.name, t.token_url, t.service, t.basic_only) == (
        "https://registry-1.docker.io", "docker.io", "https://auth.docker.io/token", "registry.docker.io", False)


def test_target_from_settings_private_registry_basic_only():
    t = target_from_settings(load_settings({
        "REGISTRY_URL": "https://reg.internal:5000/", "REGISTRY_NAME": "registry.corp.example",
        "REGISTRY_AUTH_URL": ""}))
    assert t.api_url == "https://reg.internal:5000"
    assert t.name == "registry.corp.example" and t.repo_tag_host == "registry.corp.example"
    assert t.token_url is None and t.basic_only is True


def test_target_from_settings_private_registry_with_token_endpoint():
    t = target_from_settings(load_settings({
        "REGISTRY_URL": "http://reg.internal:5000", "REGISTRY_AUTH_URL": "https://auth.internal/token",
        "REGISTRY_SERVICE": "internal-svc"}))
    assert (t.api_url, t.name, t.token_url, t.service, t.basic_only) == (
        "http://reg.internal:5000", "reg.internal:5000", "https://auth.internal/token", "internal-svc", False)
    assert RegistryTarget.from_dict(t.to_dict()) == t


def test_credentials_repr_and_identity_hide_the_password():
    creds = Credentials("alice", "p4ssw0rd-very-secret")
    for text in (repr(creds), str(creds), creds.identity, repr(target())):
        assert "p4ssw0rd-very-secret" not in text
    assert "alice" in repr(creds)
    assert creds.identity == Credentials("alice", "p4ssw0rd-very-secret").identity
    assert creds.identity != Credentials("alice", "other").identity
    assert creds.basic_header() == basic_header("alice", "p4ssw0rd-very-secret")
