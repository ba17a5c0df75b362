"""The client side of bearer-token auth, for pushing test images to a registry that wants tokens.

``parse_bearer_challenge`` reads a ``WWW-Authenticate: Bearer …`` header; ``BearerPushAuth`` is an httpx auth that
answers such a challenge with a token from a ``TokenServer`` (widened to ``pull,push``) and retries once.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import httpx

from tests.support.token_server import TokenServer, parse_scope



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
