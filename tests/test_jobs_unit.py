"""Unit tests for shared.jobs: sealed client credentials and secret-free job arguments."""

from __future__ import annotations

import json
import pickle

import pytest

from docker_http_passthrough.api.client_auth import choose_upstream_auth
from docker_http_passthrough.shared.jobs import CREDENTIAL_SOURCES, JobSpec, seal_credentials, unseal_credentials
from docker_http_passthrough.shared.targets import Credentials, RegistryTarget, target_from_settings, target_from_url
from docker_http_passthrough.shared.settings import load_settings

PASSWORD = "Sw1tch-P4ssw0rd-do-not-leak"
KEY = "a long random shared secret"


def test_sealed_credentials_unseal_with_the_same_key():
    creds = Credentials("device-user", PASSWORD)
    sealed = seal_credentials(creds, KEY)
    assert isinstance(sealed, bytes)
    assert unseal_credentials(sealed, KEY) == creds
    # Non-ASCII survives too.
    odd = Credentials("üser", "pässwörd:with:colons")
    assert unseal_credentials(seal_credentials(odd, KEY), KEY) == odd


def test_sealed_bytes_do_not_contain_the_secret():
    creds = Credentials("device-user", PASSWORD)
    sealed = seal_credentials(creds, KEY)
    for secret in (PASSWORD, "device-user", KEY):
        assert secret.encode() not in sealed
    # Fresh randomness each time: equal inputs give unrelated tokens.
    assert seal_credentials(creds, KEY) != sealed


def test_unseal_with_another_key_fails_without_revealing_the_secret():
    sealed = seal_credentials(Credentials("device-user", PASSWORD), KEY)
    with pytest.raises(ValueError) as info:
        unseal_credentials(sealed, "a different key")
    text = f"{info.value} {info.value!r}"
    assert "CREDENTIALS_KEY" in text
    assert PASSWORD not in text and KEY not in text
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize("sealed", [b"", b"garbage", b"gAAAAA" + b"A" * 80])
def test_unseal_of_garbage_is_a_value_error(sealed):
    with pytest.raises(ValueError):
        unseal_credentials(sealed, KEY)


def test_job_arguments_carry_no_secret_whatever_the_credential_source():
    settings = load_settings({"REGISTRY_URL": "https://reg.internal", "REGISTRY_USERNAME": "svc",
                              "REGISTRY_PASSWORD": PASSWORD, "REGISTRY_BEARER_TOKEN": "static-" + PASSWORD})
    default = target_from_settings(settings)
    cases = [
        (default, Credentials("device-user", "client-" + PASSWORD)),  # client credentials
        (default, None),  # settings credentials
        (target_from_url("https", "other.example:5000"), None),  # anonymous
    ]
    sources = []
    for target, client_creds in cases:
        auth = choose_upstream_auth(settings, target, default, client_creds)
        sources.append(auth.source)
        spec = JobSpec(target.to_dict(), "team/app", "sha256:" + "a" * 64, auth.source)
        kwargs = spec.as_kwargs()
        assert set(kwargs) == {"target", "repository", "manifest_digest", "credential_source"}
        # What RQ stores (pickle) and what workers log (the repr) hold no secret.
        for text in (json.dumps(kwargs), repr(kwargs), repr(spec), pickle.dumps(kwargs).decode("latin-1")):
            assert PASSWORD not in text
        assert JobSpec(**kwargs) == spec
        assert spec.registry == target
        assert kwargs["credential_source"] in CREDENTIAL_SOURCES
    assert sources == ["client", "settings", "anonymous"]


def test_registry_target_round_trips_through_job_arguments():
    target = RegistryTarget("http://reg.example:5000", "reg.example:5000", "https://auth.example/token", "svc", False)
    spec = JobSpec(target.to_dict(), "team/app", "sha256:" + "b" * 64, "anonymous")
    assert JobSpec(**json.loads(json.dumps(spec.as_kwargs()))).registry == target
