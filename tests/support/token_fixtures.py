"""Pytest plugin: a real registry behind bearer-token auth (``TokenServer``).

- ``token_registry`` (function; the registry + token server underneath are
  session-wide, so it is cheap): a ``TokenRegistry`` with ``.registry`` (a
  ``RegistryUnderTest``: point the code under test at ``.registry.url``, push
  with ``.registry.push_image(...)``, which authenticates as ``pusher``) and
  ``.tokens`` (the ``TokenServer``). Before each test the token server's
  request log, ``expires_in``/``issued_offset``, users and policy and the
  counting proxy are reset. Use ``.repo("public")`` / ``.repo("private")`` for
  fresh repository names, since the registry is shared.
- ``token_registry_factory`` (function): ``factory(users=None, access=None,
  **token_server_kwargs)`` -> a private ``TokenRegistry`` with its own policy.

Default users and policy (``DEFAULT_USERS`` / ``DEFAULT_ACCESS``):

- ``alice``/``wonderland``: pull+push on ``private/*``;
- ``pusher``/``pushpw``: everything everywhere (used by the push helpers);
- anyone, anonymous included: pull on ``public/*``; nothing else.
"""

from __future__ import annotations

import copy
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.registry_fixtures import RegistryUnderTest, launch_registry
from tests.support.bearer_client import BearerPushAuth
from tests.support.token_server import AccessPolicy, TokenServer

PUSH_USER = "pusher"
PUSH_PASSWORD = "pushpw"
DEFAULT_USERS: dict[str, str] = {"alice": "wonderland", PUSH_USER: PUSH_PASSWORD}
DEFAULT_ACCESS: dict[str, dict[str, list[str]]] = {
    "*": {PUSH_USER: ["*"]},
    "public/*": {"*": ["pull"]},
    "private/*": {"alice": ["pull", "push"]},
}


@dataclass
class TokenRegistry:
    """A registry with ``auth: token`` and the token server it trusts."""

    registry: RegistryUnderTest
    tokens: TokenServer
    default_users: dict[str, str] = field(default_factory=dict)
    default_access: AccessPolicy = None

    @property
    def url(self) -> str:
        """The registry as seen through the counting proxy."""
        return self.registry.url

    @property
    def host(self) -> str:
        return self.registry.host

    def repo(self, prefix: str = "public") -> str:
        """A fresh repository name like ``public/1a2b3c4d``."""
        return f"{prefix}/{secrets.token_hex(4)}"

    def reset(self) -> None:
        """Reset request logs, token knobs, users and policy to the defaults."""
        self.tokens.reset()
        self.tokens.users = dict(self.default_users)
        self.tokens.access = copy.deepcopy(self.default_access)
        self.registry.proxy.reset()

    def stop(self) -> None:
        self.registry.stop()
        self.tokens.stop()


def launch_token_registry(
    workdir: Path,
    users: Mapping[str, str] | None = None,
    access: AccessPolicy = None,
    **token_server_kwargs: Any,
) -> TokenRegistry:
    """Start a TokenServer and a registry trusting it; pushes go as ``pusher``.

    ``users``/``access`` default to ``DEFAULT_USERS``/``DEFAULT_ACCESS``; the
    push user is always added (and granted everything if ``access`` is a dict
    without a rule for it).
    """
    users = dict(DEFAULT_USERS if users is None else users)
    users.setdefault(PUSH_USER, PUSH_PASSWORD)
    if access is None:
        access = copy.deepcopy(DEFAULT_ACCESS)
    elif isinstance(access, Mapping):
        access = copy.deepcopy(dict(access))
        access.setdefault("*", {})
        access["*"] = {**access["*"], PUSH_USER: ["*"]}
    else:
        policy = access

        def with_pusher(username: str | None, repository: str, requested: Any) -> Any:
            if username == PUSH_USER:
                return list(requested)
            return policy(username, repository, requested)

        access = with_pusher

    workdir = Path(workdir)
    tokens = TokenServer(users, access, workdir=workdir / "tokens", **token_server_kwargs)
    tokens.start()
    try:
        registry = launch_registry(
            workdir / "registry",
            auth=tokens.auth_config(),
            push_auth=BearerPushAuth(tokens, PUSH_USER),
        )
    except BaseException:
        tokens.stop()
        raise
    return TokenRegistry(registry, tokens, dict(users), copy.deepcopy(access))


@pytest.fixture(scope="session")
def _token_registry_session(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TokenRegistry]:
    under_test = launch_token_registry(tmp_path_factory.mktemp("token-registry"))
    try:
        yield under_test
    finally:
        under_test.stop()


@pytest.fixture
def token_registry(_token_registry_session: TokenRegistry) -> TokenRegistry:
    """Session-wide token-auth registry, reset for this test (see module doc)."""
    _token_registry_session.reset()
    return _token_registry_session


TokenRegistryFactory = Callable[..., TokenRegistry]


@pytest.fixture
def token_registry_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TokenRegistryFactory]:
    """``factory(users=None, access=None, **TokenServer kwargs)`` -> own TokenRegistry."""
    started: list[TokenRegistry] = []

    def factory(
        users: Mapping[str, str] | None = None,
        access: AccessPolicy = None,
        **token_server_kwargs: Any,
    ) -> TokenRegistry:
        under_test = launch_token_registry(
            tmp_path_factory.mktemp("token-registry"), users, access, **token_server_kwargs
        )
        started.append(under_test)
        return under_test

    try:
        yield factory
    finally:
        for under_test in started:
            under_test.stop()
