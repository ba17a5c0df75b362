"""What a process learns from registries about auth: their challenges, and the tokens they issue.

One `AuthCache` per process, owned by whoever runs the requests (the API app, a worker process) and handed
to every `RegistryClient` through `Registries`: a warm request then costs one round trip. In memory only,
and bounded, since clients name registries and credentials: expired tokens go first, then the oldest entries.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

# Refresh a cached token this long before the registry says it expires.
TOKEN_MARGIN = 10.0
CACHE_LIMIT = 10_000

Challenge = tuple[str, dict[str, str]]  # ("bearer" | "basic" | "", parameters)
TokenKey = tuple[str, str, str, str]  # (realm, service, scope, identity of the credentials)


# RFC 9110 auth-param: token BWS "=" BWS ( token / quoted-string ), quoted-pairs unescaped.
_AUTH_PARAM = re.compile(r'([!#$%&\'*+.^_`|~0-9A-Za-z-]+)[ \t]*=[ \t]*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))', re.S)
_QUOTED_PAIR = re.compile(r"\\(.)", re.S)


def parse_challenge(header: str) -> Challenge:
    """`Bearer realm="…",service="…"` → ("bearer", {realm, service, …}); never raises."""
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    for name, quoted, token in _AUTH_PARAM.findall(rest):
        params[name.lower()] = _QUOTED_PAIR.sub(r"\1", quoted) if quoted or not token else token
    return scheme.lower(), params


@dataclass
class Token:
    value: str
    expires: float  # time.time() after which it is not used


class AuthCache:
    def __init__(self, limit: int = CACHE_LIMIT):
        self.limit = limit
        self.tokens: dict[TokenKey, Token] = {}
        self.challenges: dict[str, Challenge] = {}  # by registry API URL

    def challenge(self, api_url: str) -> Challenge:
        return self.challenges.get(api_url, ("", {}))

    def remember_challenge(self, api_url: str, challenge: Challenge) -> None:
        self._bounded(self.challenges, api_url)
        self.challenges[api_url] = challenge

    def token(self, key: TokenKey) -> str | None:
        """A cached token that has not expired."""
        cached = self.tokens.get(key)
        return cached.value if cached is not None and cached.expires > time.time() else None

    def remember_token(self, key: TokenKey, value: str, expires_in: float) -> None:
        self._bounded(self.tokens, key)
        self.tokens[key] = Token(value, time.time() + max(expires_in - TOKEN_MARGIN, 1.0))

    def _bounded(self, cache: dict, key: object) -> None:
        """Make room for `key`: expired tokens go first, then the oldest entries."""
        if key in cache or len(cache) < self.limit:
            return
        now = time.time()
        for stale in [k for k, v in cache.items() if isinstance(v, Token) and v.expires <= now]:
            del cache[stale]
        while len(cache) >= self.limit:
            del cache[next(iter(cache))]
