"""An in-memory V2 registry for unit tests, behind httpx.MockTransport: no sockets, every request recorded.

    fake = FakeRegistry(auth="bearer", users={"alice": "pw"})
    fake.add_manifest("v1", manifest_bytes)            # by tag; add_image() stores manifest, config and layers
    async with fake.http() as http:
        ...RegistryClient(http, RegistryTarget("https://reg.example", "reg.example"), REPO)...
    assert fake.count("GET", layer_digest) == 1

- Every host but ``auth.example`` is the same registry (so one fake can play several registries that hold the
  same content), unless ``missing`` says a host lacks a blob; ``auth.example`` is its token endpoint.
- ``auth``: None (open), ``"basic"`` or ``"bearer"`` (tokens from ``auth.example/token``, each valid for the scope
  it was asked for). Repositories: ``team/app`` (``REPO``) and ``team/other``; others are 404.
- Bodies arrive in ``chunk``-byte pieces (``ChunkStream``), as a real transport gives them; blob GETs honour
  ``Range: bytes=a-b`` with a 206.
- Faults: ``override(request) -> Response | None`` is tried first; ``missing``, ``forged_ranges``,
  ``reject_all_tokens``, ``send_digest_on_head``, ``blob_delay``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import httpx
from docker_http_passthrough.shared.registry import Registries
from docker_http_passthrough.shared.settings import Settings
from docker_http_passthrough.shared.targets import Credentials, RegistryTarget

from tests.support.images import DOCKER_CONFIG, DOCKER_MANIFEST, sha

REPO = "team/app"
OTHER_REPO = "team/other"
TOKEN_HOST = "auth.example"
REALM = f"https://{TOKEN_HOST}/token"
SERVICE = "reg.example"

USERS = {"alice": "alice-secret-pw", "bob": "bob-secret-pw"}  # for FakeRegistry(auth, users=USERS)
ALICE = Credentials("alice", USERS["alice"])
BOB = Credentials("bob", USERS["bob"])
# What sample_registry() holds: a small image manifest (tag v1) and a config-sized blob.
V1_MANIFEST = json.dumps({
    "schemaVersion": 2,
    "mediaType": DOCKER_MANIFEST,
    "config": {"mediaType": DOCKER_CONFIG, "digest": sha(b"{}"), "size": 2},
    "layers": [],
}, indent=3).encode()
CONFIG_BLOB = b"some config blob \x00\x01\x02" * 50

_PATH_RE = re.compile(r"^/v2/(?P<repo>.+)/(?P<kind>manifests|blobs)/(?P<ref>[^/]+)$")


def basic_header(user: str, password: str) -> str:
    """The ``Authorization`` value of HTTP Basic credentials."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def target(**kwargs: Any) -> RegistryTarget:
    """The fake registry as a client's target: ``https://reg.example``."""
    return RegistryTarget("https://reg.example", "reg.example", **kwargs)


def sample_registry(auth: str | None = None, **kwargs: Any) -> FakeRegistry:
    """A FakeRegistry holding V1_MANIFEST (tag v1) and CONFIG_BLOB in team/app, sending bodies in 1000-byte pieces."""
    fake = FakeRegistry(auth, chunk=1000, **kwargs)
    fake.add_manifest("v1", V1_MANIFEST)
    fake.add_blob(CONFIG_BLOB)
    return fake


class ChunkStream(httpx.AsyncByteStream):
    """A response body as a real transport gives it: not read yet, in pieces of ``size`` bytes."""

    def __init__(self, data: bytes, size: int = 4096) -> None:
        self.data, self.size = data, size

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self.data), self.size):
            yield self.data[i:i + self.size]


def streamed(data: bytes, status: int = 200, chunk: int = 4096, **headers: str) -> httpx.Response:
    """A response whose body streams ``data`` with its Content-Length."""
    return httpx.Response(status, headers={"Content-Length": str(len(data)), **headers},
                          stream=ChunkStream(data, chunk))


class FakeRegistry:
    def __init__(self, auth: str | None = None, users: dict[str, str] | None = None, *, anonymous_tokens: bool = True,
                 expires_in: float = 300, realm: str = REALM, challenge_service: str = SERVICE, chunk: int = 4096,
                 blob_delay: float = 0.0) -> None:
        self.auth = auth  # None (open), "bearer" or "basic"
        self.users = users or {}
        self.anonymous_tokens = anonymous_tokens
        self.expires_in = expires_in
        self.realm = realm
        self.challenge_service = challenge_service
        self.chunk = chunk
        self.blob_delay = blob_delay
        self.manifests: dict[str, tuple[bytes, str]] = {}  # tag or digest -> (bytes, media type)
        self.blobs: dict[str, bytes] = {}
        self.missing: set[tuple[str, str]] = set()  # (host, digest) that host does not hold
        # (host, digest) -> bytes a lying registry serves for ranges of a blob it does not really hold
        self.forged_ranges: dict[tuple[str, str], bytes] = {}
        self.requests: list[httpx.Request] = []
        self.tokens: dict[str, tuple[str | None, str | None]] = {}  # token -> (user, scope)
        self.issued = 0
        self.reject_all_tokens = False
        self.send_digest_on_head = True
        self.override: Callable[[httpx.Request], httpx.Response | None] | None = None

    # --- content

    def add_manifest(self, reference: str | None, data: bytes, media_type: str = DOCKER_MANIFEST) -> str:
        """Serve ``data`` under its digest, and under ``reference`` (a tag) if given; returns the digest."""
        digest = sha(data)
        self.manifests[digest] = (data, media_type)
        if reference is not None:
            self.manifests[reference] = (data, media_type)
        return digest

    def add_image(self, manifest: bytes, config: bytes, layer_blobs: Iterable[bytes], reference: str | None = None,
                  media_type: str = DOCKER_MANIFEST) -> str:
        """Serve an image manifest with its config and layer blobs; returns the manifest digest."""
        for blob in (config, *layer_blobs):
            self.add_blob(blob)
        return self.add_manifest(reference, manifest, media_type)

    def add_blob(self, data: bytes) -> str:
        digest = sha(data)
        self.blobs[digest] = data
        return digest

    # --- what was asked

    def http(self, **settings: Any) -> Registries:
        """What a process owns to reach registries, fresh (nothing learned about auth yet), through this fake;
        ``settings`` override fields of the transport's Settings (e.g. ``upstream_retries=0``)."""
        return Registries(httpx.AsyncClient(transport=httpx.MockTransport(self.handle), follow_redirects=False),
                          settings=Settings(**settings))

    def to(self, host: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.host == host]

    @property
    def registry_requests(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.host != TOKEN_HOST]

    @property
    def token_requests(self) -> list[httpx.Request]:
        return self.to(TOKEN_HOST)

    def count(self, method: str, digest: str, host: str | None = None) -> int:
        return sum(1 for r in self.requests if r.method == method and r.url.path.endswith("/" + digest)
                   and (host is None or r.url.host == host))

    def ranged(self, digest: str, host: str) -> int:
        """Ranged GETs of ``digest`` at ``host``."""
        return sum(1 for r in self.requests if r.method == "GET" and r.url.path.endswith("/" + digest)
                   and r.url.host == host and "range" in r.headers)

    # --- answers

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.override is not None:
            response = self.override(request)
            if response is not None:
                return response
        if request.url.host == TOKEN_HOST:
            return self._token(request)
        if self.blob_delay and "/blobs/" in request.url.path:
            await asyncio.sleep(self.blob_delay)
        return self.registry(request)

    def registry(self, request: httpx.Request) -> httpx.Response:
        """What the registry itself answers (callable from an ``override`` to alter it)."""
        match = _PATH_RE.match(request.url.path)
        if not match:
            return httpx.Response(404)
        if not self._allowed(request, match["repo"]):
            return httpx.Response(401, headers=self._challenge(), json={"errors": [{"code": "UNAUTHORIZED"}]})
        if match["repo"] not in (REPO, OTHER_REPO):
            return httpx.Response(404)
        if match["kind"] == "manifests":
            return self._manifest(request, match["ref"])
        return self._blob(request, match["ref"])

    def _manifest(self, request: httpx.Request, reference: str) -> httpx.Response:
        if reference not in self.manifests:
            return httpx.Response(404)
        data, media_type = self.manifests[reference]
        headers = {"Content-Type": media_type, "Docker-Content-Digest": sha(data)}
        if request.method == "HEAD":
            if not self.send_digest_on_head:
                del headers["Docker-Content-Digest"]
            return httpx.Response(200, headers={**headers, "Content-Length": str(len(data))})
        return streamed(data, chunk=self.chunk, **headers)

    def _blob(self, request: httpx.Request, digest: str) -> httpx.Response:
        data = self.blobs.get(digest)
        if data is None or (request.url.host, digest) in self.missing:
            return httpx.Response(404)
        if request.method == "HEAD":
            return httpx.Response(200, headers={"Content-Length": str(len(data)), "Docker-Content-Digest": digest})
        wanted = request.headers.get("range")
        if wanted:
            first, last = wanted.removeprefix("bytes=").split("-")
            start, end = int(first), int(last or len(data) - 1)
            part = self.forged_ranges.get((request.url.host, digest), data)[start:end + 1]
            return streamed(part, 206, self.chunk, **{"Content-Range": f"bytes {start}-{end}/{len(data)}"})
        return streamed(data, chunk=self.chunk, **{"Docker-Content-Digest": digest})

    # --- auth

    def _user(self, header: str | None) -> str | None | bool:
        """None: no credentials; False: wrong ones; else the user name."""
        if not header:
            return None
        if not header.startswith("Basic "):
            return False
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return user if self.users.get(user) == password else False

    def _token(self, request: httpx.Request) -> httpx.Response:
        user = self._user(request.headers.get("authorization"))
        if user is False or (user is None and not self.anonymous_tokens):
            return httpx.Response(401, json={"details": "bad credentials"})
        self.issued += 1
        token = f"tok{self.issued}"
        self.tokens[token] = (user, request.url.params.get("scope"))
        return httpx.Response(200, json={"token": token, "expires_in": self.expires_in})

    def _challenge(self) -> dict[str, str]:
        if self.auth == "bearer":
            return {"WWW-Authenticate": f'Bearer realm="{self.realm}",service="{self.challenge_service}"'}
        return {"WWW-Authenticate": 'Basic realm="Registry Realm"'}

    def _allowed(self, request: httpx.Request, repo: str) -> bool:
        header = request.headers.get("authorization", "")
        if self.auth is None:
            return True
        if self.auth == "basic":
            return bool(self._user(header))
        if not header.startswith("Bearer ") or self.reject_all_tokens:
            return False
        grant = self.tokens.get(header[7:])
        return grant is not None and grant[1] == f"repository:{repo}:pull"
