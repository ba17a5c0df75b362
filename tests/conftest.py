"""Fixtures live in tests/support/*; they are loaded here as pytest plugins."""

pytest_plugins = [
    "tests.support.browser",
    "tests.support.registry_fixtures",
    "tests.support.service_fixtures",
    "tests.support.spans",
    "tests.support.token_fixtures",
    "tests.support.deploy_fixtures",
]


import pytest  # noqa: E402 - plugins first, as pytest reads them


@pytest.fixture(autouse=True)
def _fresh_session_registry_proxy(request):
    """The session registry's proxy starts every test with no faults and no counts."""
    if "registry" in request.fixturenames:
        request.getfixturevalue("registry").proxy.reset()
    yield


@pytest.fixture(autouse=True)
def _loopback_registries_allowed(monkeypatch):
    """Jobs run in this process read their settings from os.environ: let them reach the loopback test registries
    (tests of REGISTRY_ALLOWED_HOSTS itself pass their own value)."""
    from tests.support.services import TEST_ALLOWED_HOSTS

    monkeypatch.setenv("REGISTRY_ALLOWED_HOSTS", TEST_ALLOWED_HOSTS)


@pytest.fixture
def anyio_backend() -> str:
    """Async tests (@pytest.mark.anyio) run on asyncio, like the server."""
    return "asyncio"


# Property-based tests (hypothesis): the same bounded, derandomized examples in every CI run; HYPOTHESIS_PROFILE=dev
# searches wider with fresh random examples (and remembers failures in .hypothesis/).
import os  # noqa: E402

from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("ci", max_examples=150, derandomize=True, deadline=None, database=None,
                                      print_blob=True)
_hypothesis_settings.register_profile("dev", max_examples=2000, deadline=None)
_hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
