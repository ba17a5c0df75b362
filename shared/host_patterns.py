"""Host patterns as operators write them in settings: `registry.example.com`, `*.corp.example`, with an optional
`:port`, IPv6 in brackets when a port follows (`[fd00::1]:5000`). Used by REGISTRY_ALLOWED_HOSTS,
REGISTRY_INSECURE_HOSTS and REGISTRY_CA_BUNDLES."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_NAME = re.compile(r"^(\*\.)?[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*$")


@dataclass(frozen=True)
class HostPattern:
    host: str  # lowercase name, "*.suffix", or an IP address without brackets
    port: int | None = None  # None: any port

    def matches(self, host: str, port: int | None) -> bool:
        if self.port is not None and port != self.port:
            return False
        host = host.lower().strip("[]").rstrip(".")
        if self.host.startswith("*."):
            return host.endswith(self.host[1:])
        return host == self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"


def split_host_port(text: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 address → (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ValueError(f"{text!r} lacks the closing ]")
        port = rest[1:] if rest.startswith(":") else None
        if rest and port is None:
            raise ValueError(f"{text!r} is not host[:port]")
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, None  # a name, or a bare IPv6 address
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{text!r} has no valid port (1-65535)")
    return host.lower().rstrip("."), int(port) if port is not None else None


def parse_host_pattern(text: str) -> HostPattern:
    host, port = split_host_port(text)
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if not _NAME.match(host):
            raise ValueError(f"{text!r} is not a host name, *.domain pattern or IP address") from None
    return HostPattern(host, port)


def parse_host_list(raw: str | None) -> list[HostPattern]:
    """Comma- or whitespace-separated host patterns."""
    return [parse_host_pattern(item) for item in re.split(r"[,\s]+", raw or "") if item]


def first_match(patterns: list[HostPattern], host: str, port: int | None) -> HostPattern | None:
    return next((pattern for pattern in patterns if pattern.matches(host, port)), None)
