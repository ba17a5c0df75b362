"""Fixtures live in tests/support/*; they are loaded here as pytest plugins."""

pytest_plugins = [
    "tests.support.browser",
    "tests.support.registry_fixtures",
    "tests.support.service_fixtures",
    "tests.support.spans",
    "tests.support.token_fixtures",
]


import pytest  # noqa: E402 - plugins first, as pytest reads them


@pytest.fixture(autouse=True)
def _fresh_session_registry_proxy(request):
    """The session registry's proxy starts every test with no faults and no counts."""
    if "registry" in request.fixturenames:
        request.getfixturevalue("registry").proxy.reset()
    yield


@pytest.fixture
def anyio_backend() -> str:
    """Async tests (@pytest.mark.anyio) run on asyncio, like the server."""
    return "asyncio"
