"""Pytest plugin: real registries (with a CountingProxy in front) as fixtures.

- ``registry`` (session): anonymous registry shared by all tests. Point the code
  under test at ``registry.url`` / ``registry.host`` (the proxy), push test
  images with ``registry.push_image(...)`` (direct, not counted), and call
  ``registry.proxy.reset()`` at the start of a test that counts requests or
  injects faults.
- ``registry_factory`` (function): ``registry_factory(auth=None, push_auth=None)``
  starts a private registry, e.g. with htpasswd or token auth.
- ``unique_repo`` (function): a fresh repository name like ``test/1a2b3c4d``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import pushing
from tests.support.images import Auth, Layer
from tests.support.pushing import PushedImage
from tests.support.proxy import CountingProxy
from tests.support.registry import RegistryProcess, start_registry


@dataclass
class RegistryUnderTest:
    """A registry process plus the counting proxy in front of it."""

    registry: RegistryProcess
    proxy: CountingProxy
    push_auth: Auth = None  # credentials used by the push_* helpers

    @property
    def url(self) -> str:
        """Proxy URL: what the server under test must use (requests get counted)."""
        return self.proxy.url

    @property
    def host(self) -> str:
        """Proxy ``127.0.0.1:PORT``, for image references like ``HOST/repo:tag``."""
        return self.proxy.host

    @property
    def direct_url(self) -> str:
        return self.registry.url

    @property
    def direct_host(self) -> str:
        return self.registry.host

    def push_image(
        self,
        repository: str,
        tag: str | None,
        layers: Sequence[Layer],
        config: bytes | None = None,
        **kwargs: Any,
    ) -> PushedImage:
        """``pushing.push_image`` straight to the registry (bypasses the proxy)."""
        kwargs.setdefault("auth", self.push_auth)
        return pushing.push_image(self.direct_url, repository, tag, layers, config, **kwargs)

    def push_index(
        self,
        repository: str,
        tag: str | None,
        entries: Sequence[tuple[PushedImage, Mapping[str, str]]],
        **kwargs: Any,
    ) -> tuple[bytes, str]:
        """``pushing.push_index`` straight to the registry (bypasses the proxy)."""
        kwargs.setdefault("auth", self.push_auth)
        return pushing.push_index(self.direct_url, repository, tag, entries, **kwargs)

    def push_blob(self, repository: str, data: bytes, **kwargs: Any) -> str:
        kwargs.setdefault("auth", self.push_auth)
        return pushing.push_blob(self.direct_url, repository, data, **kwargs)

    def stop(self) -> None:
        self.proxy.stop()
        self.registry.stop()


def launch_registry(
    workdir: Path, auth: dict[str, Any] | None = None, push_auth: Auth = None
) -> RegistryUnderTest:
    """Start a registry under ``workdir`` and a CountingProxy in front of it."""
    registry = start_registry(workdir, auth=auth)
    try:
        proxy = CountingProxy(registry.url).start()
    except BaseException:
        registry.stop()
        raise
    return RegistryUnderTest(registry=registry, proxy=proxy, push_auth=push_auth)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryUnderTest]:
    """Session-wide anonymous registry; use ``unique_repo`` to avoid collisions."""
    under_test = launch_registry(tmp_path_factory.mktemp("registry"))
    try:
        yield under_test
    finally:
        under_test.stop()


RegistryFactory = Callable[..., RegistryUnderTest]


@pytest.fixture
def registry_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RegistryFactory]:
    """``factory(auth=None, push_auth=None)`` -> a private RegistryUnderTest.

    ``auth`` is the distribution config ``auth`` section, verbatim; ``push_auth``
    (a (user, password) tuple or httpx auth) is used by its push_* helpers.
    """
    started: list[RegistryUnderTest] = []

    def factory(
        auth: dict[str, Any] | None = None, push_auth: Auth = None
    ) -> RegistryUnderTest:
        under_test = launch_registry(tmp_path_factory.mktemp("registry"), auth, push_auth)
        started.append(under_test)
        return under_test

    try:
        yield factory
    finally:
        for under_test in started:
            under_test.stop()


@pytest.fixture
def unique_repo() -> str:
    """A fresh lowercase repository name, e.g. ``test/1a2b3c4d``."""
    return f"test/{secrets.token_hex(4)}"
