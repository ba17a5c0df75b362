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
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple, Self
from urllib.parse import parse_qs, urlsplit

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

# (username or None for anonymous, repository, requested actions) -> granted actions
AccessFunction = Callable[[str | None, str, Sequence[str]], Iterable[str]]
AccessPolicy = AccessFunction | Mapping[str, Mapping[str, Sequence[str]]] | None

DEFAULT_EXPIRES_IN = 300
# distribution 2.8 tolerates this much clock skew on exp/nbf (token.Leeway).
REGISTRY_LEEWAY_SECONDS = 60
_ANY: Any = object()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def decode_jwt(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(header, claims)`` of a JWT, *without* verifying it (for assertions)."""
    header, claims, _signature = token.split(".")
    return json.loads(_b64url_decode(header)), json.loads(_b64url_decode(claims))


class TokenRequest(NamedTuple):
    path: str  # without the query string
    username: str | None  # None: anonymous; on a failed login the name tried (status 401)
    scope: str | None  # the scope parameters joined with " ", None if absent
    status: int


class SigningKey:
    """Self-signed RSA-2048 certificate and key; ``cert_pem`` goes into the bundle."""

    def __init__(self, common_name: str = "docker-http-passthrough test token issuer") -> None:
        self.private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = dt.datetime.now(dt.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.private_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.private_key, hashes.SHA256())
        )
        self.cert_pem = self.certificate.public_bytes(serialization.Encoding.PEM)
        self.cert_der_b64 = base64.b64encode(
            self.certificate.public_bytes(serialization.Encoding.DER)
        ).decode("ascii")

    def sign_jwt(self, claims: Mapping[str, Any]) -> str:
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.cert_der_b64]}
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        signature = self.private_key.sign(
            signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256()
        )
        return signing_input + "." + _b64url(signature)


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


class TokenServer:
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
        self._server: _TokenHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> TokenServer:
        if self._server is not None:
            return self
        server = _TokenHTTPServer(("127.0.0.1", 0), _TokenHandler, self)  # port 0: no race
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"TokenServer:{server.server_address[1]}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
                self._thread = None
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("TokenServer is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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


class _TokenHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # A fleet connects at once: the default listen backlog of 5 would drop SYNs and stall clients for seconds.
    request_queue_size = 1024
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type, tokens: TokenServer) -> None:
        self.tokens = tokens
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return
        traceback.print_exc()


class _TokenHandler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so stop() never waits on keep-alives.
    protocol_version = "HTTP/1.0"
    server: _TokenHTTPServer

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


# -- client side -------------------------------------------------------------------------


def parse_bearer_challenge(header: str) -> dict[str, str] | None:
    """``Bearer realm="…",service="…",scope="…"`` -> dict; None if not Bearer."""
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " ,":
            i += 1
        eq = rest.find("=", i)
        if eq < 0:
            break
        key = rest[i:eq].strip().lower()
        i = eq + 1
        if i < n and rest[i] == '"':
            i += 1
            value = []
            while i < n and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < n:
                    i += 1
                value.append(rest[i])
                i += 1
            i += 1  # closing quote
            params[key] = "".join(value)
        else:
            end = rest.find(",", i)
            end = n if end < 0 else end
            params[key] = rest[i:end].strip()
            i = end
    return params


def _with_push(scope: str) -> str:
    """Widen a ``repository:…:pull`` challenge to ``pull,push`` (we are pushing)."""
    parsed = parse_scope(scope)
    if parsed is None or parsed[0] != "repository":
        return scope
    actions = list(parsed[2])
    for action in ("pull", "push"):
        if action not in actions:
            actions.append(action)
    return f"repository:{parsed[1]}:{','.join(actions)}"


class BearerPushAuth(httpx.Auth):
    """httpx auth answering a registry's ``401 Bearer`` challenge via ``server``.

    On a 401 with ``WWW-Authenticate: Bearer …`` it GETs a token from the
    challenge's realm (Basic ``username``/password from ``server.users``, or
    anonymous if ``username`` is None) for the challenged scope widened to
    ``pull,push``, and retries once. Tokens are cached per repository and
    re-fetched when the registry rejects them (e.g. expired). Its token requests
    show up in ``server.requests`` like anyone's, so push *before* resetting,
    and before setting ``issued_offset`` to hand out expired tokens.
    """

    def __init__(self, server: TokenServer, username: str | None) -> None:
        self.server = server
        self.username = username
        self._tokens: dict[str, str] = {}
        self._lock = threading.Lock()

    def _fetch(self, challenge: Mapping[str, str]) -> str:
        params: list[tuple[str, str]] = []
        if "service" in challenge:
            params.append(("service", challenge["service"]))
        for scope in challenge.get("scope", "").split(" "):
            if scope:  # one scope parameter each, like docker does
                params.append(("scope", _with_push(scope)))
        auth = None
        if self.username is not None:
            auth = (self.username, self.server.users[self.username])
        realm = challenge.get("realm") or self.server.realm
        with httpx.Client(trust_env=False, timeout=10.0) as client:
            response = client.get(realm, params=params, auth=auth)
        if response.status_code != 200:
            raise RuntimeError(
                f"token server {realm} answered {response.status_code}: {response.text[:500]}"
            )
        return str(response.json()["token"])

    def auth_flow(self, request: httpx.Request) -> Any:
        scope_key = None
        with self._lock:
            # Reuse the most recent token for this path's repository if we have one.
            for key, token in self._tokens.items():
                if key and request.url.path.startswith(f"/v2/{key}/"):
                    scope_key = key
                    request.headers["Authorization"] = f"Bearer {token}"
                    break
        response = yield request
        if response.status_code != 401:
            return
        challenge = parse_bearer_challenge(response.headers.get("WWW-Authenticate", ""))
        if challenge is None:
            return
        token = self._fetch(challenge)
        parsed = parse_scope(challenge.get("scope", "").split(" ")[0])
        key = parsed[1] if parsed else ""
        with self._lock:
            if scope_key is not None and scope_key != key:
                self._tokens.pop(scope_key, None)
            self._tokens[key] = token
        request.headers["Authorization"] = f"Bearer {token}"
        yield request
