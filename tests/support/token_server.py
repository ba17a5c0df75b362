"""A Docker bearer-token server for tests (the "auth: token" side of distribution).

``TokenServer`` runs on 127.0.0.1:<free port> in a thread, implements
``GET /token?service=…&scope=repository:<name>:pull,push`` (Basic auth optional,
anonymous otherwise) and issues RS256 JWTs that a real distribution registry
accepts. The signing certificate is a fresh self-signed RSA-2048 one, written to
a ``rootcertbundle`` file; ``auth_config()`` is the registry's ``auth:`` section.

Access policy (``access``):

- a dict ``{repository: {username or "*": [actions]}}`` - ``"*"`` means anyone,
  including anonymous callers; a repository key ending in ``*`` is a prefix
  match (``"public/*"``), ``"*"`` alone matches every repository; the grants of
  all matching keys are merged;
- or a callable ``(username_or_None, repository, requested_actions) -> granted``;
- default (``None``): everything for everyone.

Granted actions are always the intersection of what was asked and what the
policy allows, like a real token server.

Note on expiry: distribution 2.8 accepts tokens up to 60 s past ``exp`` (its
clock-skew leeway), so a token minted with ``expires_in=1`` still works a couple
of seconds later. To get a token the registry rejects as expired, backdate it:
``token_for(..., expires_in=1, issued_offset=-120)`` or set
``server.issued_offset = -120`` before the client asks for one.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

from tests.support.jwt_signing import SigningKey
from tests.support.lifecycle import ThreadedServer

# (username or None for anonymous, repository, requested actions) -> granted actions
AccessFunction = Callable[[str | None, str, Sequence[str]], Iterable[str]]
AccessPolicy = AccessFunction | Mapping[str, Mapping[str, Sequence[str]]] | None

DEFAULT_EXPIRES_IN = 300
# distribution 2.8 tolerates this much clock skew on exp/nbf (token.Leeway).
REGISTRY_LEEWAY_SECONDS = 60
_ANY: Any = object()


class TokenRequest(NamedTuple):
    path: str  # without the query string
    username: str | None  # None: anonymous; on a failed login the name tried (status 401)
    scope: str | None  # the scope parameters joined with " ", None if absent
    status: int


def parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    """``"repository:a/b:pull,push"`` -> ``("repository", "a/b", ["pull", "push"])``.

    The name may contain ``:`` (a registry host with a port), so the type is
    split off the front and the actions off the back. None if malformed.
    """
    resource_type, sep, rest = scope.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not sep or not sep2 or not resource_type or not name:
        return None
    return resource_type, name, [a for a in actions.split(",") if a]


class TokenServer(ThreadedServer):
    """Threaded Docker token endpoint on a free loopback port.

    Attributes you may change at any time (read per request):
    ``expires_in`` (seconds, default 300; ``reset()`` restores the constructor's), ``issued_offset`` (seconds added to
    iat/nbf/exp, e.g. -120 to hand out already-expired tokens), ``users``,
    ``access``.
    """

    def __init__(
        self,
        users: Mapping[str, str] | None = None,
        access: AccessPolicy = None,
        service: str = "test-registry",
        issuer: str = "test-issuer",
        *,
        workdir: Path | str | None = None,
        expires_in: int = DEFAULT_EXPIRES_IN,
    ) -> None:
        self.users: dict[str, str] = dict(users or {})
        self.access: AccessPolicy = access
        self.service = service
        self.issuer = issuer
        self.expires_in = self._default_expires_in = expires_in
        self.issued_offset = 0.0
        self.key = SigningKey()

        if workdir is None:
            self._tempdir: tempfile.TemporaryDirectory[str] | None = (
                tempfile.TemporaryDirectory(prefix="token-server-")
            )
            workdir = self._tempdir.name
        else:
            self._tempdir = None
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.rootcertbundle = self.workdir / "token-rootcerts.pem"
        self.rootcertbundle.write_bytes(self.key.cert_pem)

        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        super().__init__(_TokenHandler, "TokenServer", tokens=self)

    def stop(self) -> None:
        super().stop()
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    def auth_config(self) -> dict[str, Any]:
        """The distribution config ``auth:`` section for this server (start() first)."""
        return {
            "token": {
                "realm": self.realm,
                "service": self.service,
                "issuer": self.issuer,
                "rootcertbundle": str(self.rootcertbundle),
            }
        }

    # -- recording -----------------------------------------------------------------

    @property
    def requests(self) -> list[TokenRequest]:
        """Snapshot of ``(path, username-or-None, scope, status)`` records."""
        with self._lock:
            return list(self._requests)

    def count(
        self,
        username: Any = _ANY,
        scope_contains: str | None = None,
        status: int | None = None,
    ) -> int:
        """Number of recorded token requests matching all given filters.

        ``username=None`` counts anonymous requests; leave it out to count all.
        """
        return sum(
            1
            for record in self.requests
            if (username is _ANY or record.username == username)
            and (scope_contains is None or scope_contains in (record.scope or ""))
            and (status is None or record.status == status)
        )

    def reset(self) -> None:
        """Forget recorded requests and restore ``expires_in``/``issued_offset``."""
        with self._lock:
            self._requests.clear()
            self.expires_in = self._default_expires_in
            self.issued_offset = 0.0

    def _record(self, record: TokenRequest) -> None:
        with self._lock:
            self._requests.append(record)

    # -- policy and minting ----------------------------------------------------------

    def allowed_actions(
        self, username: str | None, repository: str, requested: Sequence[str]
    ) -> list[str]:
        """What ``username`` (None = anonymous) gets of ``requested`` on ``repository``."""
        policy = self.access
        if policy is None:
            allowed: set[str] | None = None  # everything
        elif callable(policy):
            allowed = set(policy(username, repository, list(requested)))
        else:
            allowed = set()
            for pattern, grants in policy.items():
                if not _repository_matches(pattern, repository):
                    continue
                allowed.update(grants.get("*", ()))
                if username is not None:
                    allowed.update(grants.get(username, ()))
        granted: list[str] = []
        for action in requested:
            if (allowed is None or action in allowed or "*" in allowed) and action not in granted:
                granted.append(action)
        return granted

    def token_for(
        self,
        username: str | None,
        repository: str | None = None,
        actions: Sequence[str] = ("pull",),
        *,
        expires_in: int | None = None,
        issued_offset: float | None = None,
        apply_policy: bool = False,
        access: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """Mint a signed token directly (no HTTP, not recorded).

        By default grants exactly ``actions`` on ``repository`` (policy bypassed;
        ``apply_policy=True`` filters through it). ``repository=None`` gives a
        token with no access (still valid for ``GET /v2/``). ``access`` overrides
        the whole access claim.
        """
        if access is None:
            access = []
            if repository is not None:
                granted = (
                    self.allowed_actions(username, repository, actions)
                    if apply_policy
                    else list(actions)
                )
                access = [{"type": "repository", "name": repository, "actions": granted}]
        return self._mint(username, list(access), expires_in, issued_offset)[0]

    def _mint(
        self,
        username: str | None,
        access: list[Mapping[str, Any]],
        expires_in: int | None = None,
        issued_offset: float | None = None,
    ) -> tuple[str, int, float]:
        expires = self.expires_in if expires_in is None else expires_in
        offset = self.issued_offset if issued_offset is None else issued_offset
        now = time.time() + offset
        issued_at = int(now)
        claims = {
            "iss": self.issuer,
            "sub": username or "",
            "aud": self.service,
            "exp": issued_at + int(expires),
            "nbf": issued_at,
            "iat": issued_at,
            "jti": secrets.token_hex(16),
            "access": list(access),
        }
        return self.key.sign_jwt(claims), int(expires), float(issued_at)

    def handle_token_request(
        self, query: str, authorization: str | None
    ) -> tuple[int, dict[str, Any], str | None, str | None]:
        """``(status, json body, username-or-None, scope)`` for one /token request."""
        params = parse_qs(query, keep_blank_values=True)
        scopes = [
            part
            for value in params.get("scope", [])
            for part in value.split(" ")  # some clients space-join several scopes
            if part
        ]
        scope_text = " ".join(scopes) if scopes else None

        username: str | None = None
        if authorization:
            scheme, _, credentials = authorization.partition(" ")
            if scheme.lower() != "basic":
                return 401, _error("UNAUTHORIZED", "only Basic credentials are accepted"), None, scope_text
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                return 400, _error("UNAUTHORIZED", "malformed Basic credentials"), None, scope_text
            user, sep, password = decoded.partition(":")
            if not sep or self.users.get(user) is None or not secrets.compare_digest(
                self.users[user].encode(), password.encode()
            ):
                return 401, _error("UNAUTHORIZED", "invalid username or password"), user or None, scope_text
            username = user

        service = params.get("service", [None])[0]
        if service is not None and service != self.service:
            return 400, _error("INVALID_REQUEST", f"unknown service {service!r}"), username, scope_text

        access: list[dict[str, Any]] = []
        for scope in scopes:
            parsed = parse_scope(scope)
            if parsed is None:
                return 400, _error("INVALID_REQUEST", f"malformed scope {scope!r}"), username, scope_text
            resource_type, name, requested = parsed
            if resource_type != "repository":
                continue  # e.g. registry:catalog:* - grant nothing
            granted = self.allowed_actions(username, name, requested)
            # Real servers include the entry even if nothing is granted.
            access.append({"type": "repository", "name": name, "actions": granted})

        token, expires, issued_at = self._mint(username, access)
        body = {
            "token": token,
            "access_token": token,
            "expires_in": expires,
            "issued_at": dt.datetime.fromtimestamp(issued_at, dt.UTC)
            .isoformat()
            .replace("+00:00", "Z"),
        }
        return 200, body, username, scope_text


def _repository_matches(pattern: str, repository: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return repository.startswith(pattern[:-1])
    return pattern == repository


def _error(code: str, message: str) -> dict[str, Any]:
    return {"errors": [{"code": code, "message": message}]}


class _TokenHandler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so stop() never waits on keep-alives.
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        tokens = self.server.tokens
        target = urlsplit(self.path)
        if target.path != "/token":
            self._reply(404, _error("NOT_FOUND", "only /token lives here"))
            tokens._record(TokenRequest(target.path, None, None, 404))
            return
        try:
            status, body, username, scope = tokens.handle_token_request(
                target.query, self.headers.get("Authorization")
            )
        except Exception as exc:  # noqa: BLE001 - a policy callable blew up: answer 500
            traceback.print_exc()
            status, body, username, scope = 500, _error("INTERNAL", repr(exc)), None, None
        tokens._record(TokenRequest(target.path, username, scope, status))
        extra = {}
        if status == 401:
            extra["WWW-Authenticate"] = f'Basic realm="{tokens.service} token server"'
        self._reply(status, body, extra)

    def do_POST(self) -> None:
        # The OAuth2 password grant is not implemented; 405 is what makes
        # containerd-style clients fall back to GET.
        self.close_connection = True  # the request body is left unread
        target = urlsplit(self.path)
        self.server.tokens._record(TokenRequest(target.path, None, None, 405))
        self._reply(
            405, _error("UNSUPPORTED", "use GET /token"), {"Allow": "GET"}
        )

    def _reply(self, status: int, body: dict[str, Any], headers: Mapping[str, str] = {}) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
