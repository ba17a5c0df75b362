"""Which certificates a registry's TLS connection must present: the TLS context per host.

- Default trust: httpx's (the certifi bundle, or SSL_CERT_FILE / SSL_CERT_DIR when set), plus REGISTRY_CA_BUNDLE
  (a PEM file of extra CAs, e.g. the company's internal CA) for every host;
- REGISTRY_CA_BUNDLES (`host[:port]=file,…`): extra CAs for one host only, on top of the above;
- REGISTRY_INSECURE_HOSTS (`host[:port],…`, as Docker's `insecure-registries`): no verification at all for
  those hosts — logged at start and on the first connection to each.
The context is chosen per request URL, so redirects and token realms get their own host's trust.
"""

from __future__ import annotations

import logging
import ssl

import httpx

from docker_http_passthrough.shared.host_patterns import HostPattern, first_match, parse_host_list, parse_host_pattern

log = logging.getLogger("docker_http_passthrough.upstream")

INSECURE = "insecure"
DEFAULT = "default"


def parse_ca_bundles(raw: str | None) -> list[tuple[HostPattern, str]]:
    """`host[:port]=path,…` → [(pattern, path)]; ValueError naming the bad entry."""
    pairs = []
    for entry in (item.strip() for item in (raw or "").split(",")):
        if not entry:
            continue
        host, sep, path = entry.partition("=")
        if not sep or not path.strip():
            raise ValueError(f"{entry!r} is not host[:port]=/path/to/ca.pem")
        pairs.append((parse_host_pattern(host), path.strip()))
    return pairs


def check_ca_file(path: str) -> None:
    """ValueError unless `path` is a readable PEM file with at least one CA certificate."""
    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"{path!r} is not a readable PEM file of CA certificates ({exc})") from None


class TlsTrust:
    """TLS contexts by host, built once each."""

    def __init__(self, ca_bundle: str | None, ca_bundles: str | None, insecure_hosts: str | None):
        self.ca_bundle = ca_bundle
        self.per_host = parse_ca_bundles(ca_bundles)
        self.insecure = parse_host_list(insecure_hosts)
        self.contexts: dict[str, ssl.SSLContext] = {}
        self.warned: set[str] = set()
        if self.insecure:
            log.warning("TLS certificates are NOT verified for %s (REGISTRY_INSECURE_HOSTS)",
                        ", ".join(str(pattern) for pattern in self.insecure))

    def key(self, host: str, port: int | None) -> str:
        """Which context a connection to host:port uses: "insecure", "default", or a per-host CA file."""
        if first_match(self.insecure, host, port):
            if host not in self.warned:
                self.warned.add(host)
                log.warning("not verifying the TLS certificate of %s (REGISTRY_INSECURE_HOSTS)", host)
            return INSECURE
        for pattern, path in self.per_host:
            if pattern.matches(host, port):
                return path
        return DEFAULT

    def context(self, key: str) -> ssl.SSLContext:
        if key not in self.contexts:
            if key == INSECURE:
                context = httpx.create_ssl_context(verify=False)
            else:
                context = httpx.create_ssl_context(verify=True)
                for path in (self.ca_bundle, None if key == DEFAULT else key):
                    if path:
                        context.load_verify_locations(cafile=path)
            self.contexts[key] = context
        return self.contexts[key]
