"""Fixtures live in tests/support/*; they are loaded here as pytest plugins."""

pytest_plugins = [
    "tests.support.registry_fixtures",
    "tests.support.service_fixtures",
    "tests.support.token_fixtures",
]
