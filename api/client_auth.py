"""The client's own registry credentials (HTTP Basic from a switch or curl) and which credentials a request uses."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from docker_http_passthrough.shared.errors import BadRequest
from docker_http_passthrough.shared.settings import Settings
from docker_http_passthrough.shared.targets import Credentials, RegistryTarget, settings_auth

CHALLENGE = 'Basic realm="registry credentials"'


def basic_credentials(header: str | None) -> Credentials | None:
    """Credentials from `Authorization: Basic …`; None when absent or another scheme."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise BadRequest("the Authorization header is not valid Basic credentials", code="bad_authorization") from None
    username, sep, password = decoded.partition(":")
    if not sep or not username:
        raise BadRequest("Basic credentials need a username and a password", code="bad_authorization")
    return Credentials(username, password)


@dataclass(frozen=True)
class UpstreamAuth:
    source: str  # "client", "settings" or "anonymous"
    credentials: Credentials | None
    token: str | None


def choose_upstream_auth(settings: Settings, target: RegistryTarget, default_target: RegistryTarget,
                         client: Credentials | None) -> UpstreamAuth:
    """Client credentials first; the settings' credentials only for the configured registry (never sent to a
    registry named in a request URL); otherwise anonymous."""
    if client is not None:
        return UpstreamAuth("client", client, None)
    if target.api_url == default_target.api_url:
        credentials, token = settings_auth(settings)
        if credentials or token:
            return UpstreamAuth("settings", credentials, token)
    return UpstreamAuth("anonymous", None, None)
