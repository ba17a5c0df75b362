"""Which registry a request goes to, and with which credentials: targets from settings or a request URL.

The settings' credentials belong to the configured registry (`REGISTRY_URL`) only; both tiers take them from
`settings_auth`, so the API and the workers can never disagree on what "settings credentials" means.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from docker_http_passthrough.shared.name import DOCKER_HUB_HOSTS
from docker_http_passthrough.shared.settings import DOCKER_HUB_API, Settings

DOCKER_HUB_TOKEN_URL = "https://auth.docker.io/token"
DOCKER_HUB_SERVICE = "registry.docker.io"
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
                      r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    @property
    def identity(self) -> str:
        """A stable, non-reversible key for caches: never the password itself."""
        return hashlib.sha256(f"{self.username}\0{self.password}".encode()).hexdigest()

    def basic_header(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


@dataclass(frozen=True)
class RegistryTarget:
    """One registry: where its API is, what it is called in image names, and how it hands out tokens."""

    api_url: str  # scheme://host[:port], no trailing slash
    name: str  # host[:port] as users write it; "docker.io" for Docker Hub
    token_url: str | None = None  # known token endpoint; None = learn it from the challenge
    service: str | None = None
    basic_only: bool = False  # REGISTRY_AUTH_URL explicitly empty: never look for a token endpoint

    @property
    def is_docker_hub(self) -> bool:
        return self.name in DOCKER_HUB_HOSTS

    @property
    def repo_tag_host(self) -> str | None:
        """Registry part of the RepoTags entry; None gives Docker Hub's short form."""
        return None if self.is_docker_hub else self.name

    def to_dict(self) -> dict:
        return {"api_url": self.api_url, "name": self.name, "token_url": self.token_url,
                "service": self.service, "basic_only": self.basic_only}

    @classmethod
    def from_dict(cls, data: dict) -> "RegistryTarget":
        return cls(**data)


def docker_hub_target() -> RegistryTarget:
    return RegistryTarget(DOCKER_HUB_API, "docker.io", DOCKER_HUB_TOKEN_URL, DOCKER_HUB_SERVICE)


def _valid_host(host: str) -> bool:
    if not _HOST_RE.match(host):
        return False
    if host.startswith("["):
        address, _, rest = host[1:].partition("]")
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            return False
        port = rest[1:] if rest else None
    else:
        port = host.rpartition(":")[2] if ":" in host else None
    return port is None or (port.isdigit() and 0 < int(port) < 65536)


def target_from_url(scheme: str, host: str) -> RegistryTarget:
    """The registry named in a request path (`/registry/{scheme}/{host}/…`); host may carry a port."""
    if scheme not in ("http", "https"):
        raise ValueError(f'registry scheme must be "http" or "https", not "{scheme}"')
    if not _valid_host(host):
        raise ValueError(f'"{host}" is not a registry host (expected host or host:port, port 1-65535)')
    if host.lower() in DOCKER_HUB_HOSTS:
        return docker_hub_target()
    return RegistryTarget(f"{scheme}://{host.lower()}", host.lower())


def _loopback(host: str) -> bool:
    name = host[1:].partition("]")[0] if host.startswith("[") else host.rpartition(":")[0] if ":" in host else host
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def target_for_reference(domain: str, default: RegistryTarget) -> RegistryTarget:
    """The registry an image reference names (`/ref/<reference>.tar`), reached as `docker pull` would:
    - the configured registry (`REGISTRY_URL`, by its host or its `REGISTRY_NAME`) exactly as configured —
      scheme, token endpoint, and the settings' credentials;
    - Docker Hub (any alias);
    - any other host over HTTPS, except loopback hosts (localhost, 127.0.0.0/8, [::1]) over plain HTTP, as
      Docker allows by default. (A plain-HTTP registry elsewhere: the /registry/http/… routes.)"""
    host = domain.lower()
    if host in DOCKER_HUB_HOSTS:
        return default if default.is_docker_hub else docker_hub_target()
    if host in (default.name.lower(), urlsplit(default.api_url).netloc.lower()):
        return default
    return target_from_url("http" if _loopback(host) else "https", host)


def target_from_settings(settings: Settings) -> RegistryTarget:
    parts = urlsplit(settings.registry_url)
    host = parts.netloc.lower()
    if host in DOCKER_HUB_HOSTS:
        base = docker_hub_target()
        name = base.name
    else:
        base = RegistryTarget(f"{parts.scheme}://{host}", host)
        name = settings.registry_name or host
    return RegistryTarget(
        api_url=base.api_url if host in DOCKER_HUB_HOSTS else settings.registry_url,
        name=name,
        token_url=settings.registry_auth_url or base.token_url,
        service=settings.registry_service or base.service,
        basic_only=settings.registry_auth_url == "",
    )


def settings_auth(settings: Settings) -> tuple[Credentials | None, str | None]:
    """The settings' (Basic credentials, static bearer token) for `REGISTRY_URL`; either may be None."""
    credentials = None
    if settings.registry_username and settings.registry_password:
        credentials = Credentials(settings.registry_username, settings.registry_password)
    return credentials, settings.registry_bearer_token
