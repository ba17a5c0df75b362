"""The HTTP clients a process reaches registries with, built in one place from the settings (API and workers).

Each request is routed by the host in its URL — the registry, a redirect hop (blob GETs go to object storage),
a token realm:
- proxy: HTTPS_PROXY (https URLs) or HTTP_PROXY (http URLs), ALL_PROXY for both, unless NO_PROXY names the
  host (`*`; a name, which also covers its subdomains; `.domain`; an address or CIDR; optionally `:port`);
- TLS: `tls_trust` (extra CAs globally or per host, REGISTRY_INSECURE_HOSTS);
- addresses: two clients. `trusted` reaches what the operator configured (REGISTRY_URL, REGISTRY_MIRROR) and
  is never checked; `guarded` reaches what a request names, and checks every connection against
  REGISTRY_ALLOWED_HOSTS (`address_policy`) after DNS resolution, connecting to the very address checked.
  Through a proxy the proxy connects, so the name is resolved here for the check (a name allowed by pattern
  need not resolve here); the proxy's own egress rules are the second line.
"""

from __future__ import annotations

import ipaddress
import re
import typing

import httpcore
import httpx

from docker_http_passthrough.shared.address_policy import AddressPolicy, parse_allowed_hosts
from docker_http_passthrough.shared.host_patterns import split_host_port
from docker_http_passthrough.shared.locks import Locks
from docker_http_passthrough.shared.registry import Registries
from docker_http_passthrough.shared.registry_auth import AuthCache
from docker_http_passthrough.shared.settings import Settings
from docker_http_passthrough.shared.tls_trust import TlsTrust

USER_AGENT = "docker-http-passthrough"
MAX_CONNECTIONS = 200
MAX_KEEPALIVE = 50


class NoProxy:
    """NO_PROXY as curl reads it: `*`, names (with their subdomains), `.domain`, addresses, CIDRs, `:port`."""

    def __init__(self, raw: str | None):
        self.everything = False
        self.entries: list[tuple[str | ipaddress.IPv4Network | ipaddress.IPv6Network, int | None]] = []
        for item in (part.strip().lower() for part in re.split(r"[,\s]+", raw or "")):
            if item == "*":
                self.everything = True
            elif item:
                host, port = split_host_port(item)
                try:
                    entry: typing.Any = ipaddress.ip_network(host, strict=False)
                except ValueError:
                    entry = host.lstrip("*").lstrip(".")
                self.entries.append((entry, port))

    def bypass(self, host: str, port: int) -> bool:
        if self.everything:
            return True
        host = host.lower().strip("[]").rstrip(".")
        try:
            address: typing.Any = ipaddress.ip_address(host)
        except ValueError:
            address = None
        for entry, entry_port in self.entries:
            if entry_port is not None and entry_port != port:
                continue
            if isinstance(entry, str):
                if host == entry or host.endswith("." + entry):
                    return True
            elif address is not None and address.version == entry.version and address in entry:
                return True
        return False


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves, checks every address against the policy, and connects to a checked address."""

    def __init__(self, policy: AddressPolicy):
        self.policy = policy
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: typing.Iterable[typing.Any] | None = None) -> httpcore.AsyncNetworkStream:
        try:
            addresses = await self.policy.allowed_addresses(host, port)
        except OSError as exc:  # the name does not resolve: a connection error like any other
            raise httpcore.ConnectError(f"{host}: {exc}") from exc
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self.inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                                    socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        raise failure or httpcore.ConnectError(f"{host} has no address")

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: typing.Iterable[typing.Any] | None = None
                                  ) -> httpcore.AsyncNetworkStream:  # pragma: no cover - never asked by URLs
        raise httpcore.ConnectError("unix sockets are not registries")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class UpstreamTransport(httpx.AsyncBaseTransport):
    """Routes each request by host to a pool for its (TLS context, proxy); checks hosts when it has a policy."""

    def __init__(self, settings: Settings, trust: TlsTrust, policy: AddressPolicy | None):
        self.trust = trust
        self.policy = policy
        self.proxies = {"https": settings.https_proxy, "http": settings.http_proxy}
        self.no_proxy = NoProxy(settings.no_proxy)
        self.limits = httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_KEEPALIVE)
        self.pools: dict[tuple[str, str | None], httpx.AsyncHTTPTransport] = {}

    def proxy_for(self, url: httpx.URL) -> str | None:
        proxy = self.proxies.get(url.scheme)
        port = url.port or (443 if url.scheme == "https" else 80)
        return None if proxy is None or self.no_proxy.bypass(url.host, port) else proxy

    def _pool(self, tls_key: str, proxy: str | None) -> httpx.AsyncHTTPTransport:
        key = (tls_key, proxy)
        if key not in self.pools:
            context = self.trust.context(tls_key)
            transport = httpx.AsyncHTTPTransport(verify=context, proxy=proxy, limits=self.limits, trust_env=False)
            if proxy is None and self.policy is not None:
                # httpx builds this pool too, without a way to pass a network backend: ours replaces it.
                transport._pool = httpcore.AsyncConnectionPool(
                    ssl_context=context, max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_KEEPALIVE,
                    keepalive_expiry=self.limits.keepalive_expiry, network_backend=GuardedBackend(self.policy))
            self.pools[key] = transport
        return self.pools[key]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        port = url.port or (443 if url.scheme == "https" else 80)
        proxy = self.proxy_for(url)
        if self.policy is not None and proxy is not None:
            await self.policy.allowed_addresses(url.host, port, must_resolve=False)
        return await self._pool(self.trust.key(url.host, port), proxy).handle_async_request(request)

    async def aclose(self) -> None:
        for pool in self.pools.values():
            await pool.aclose()


def _client(settings: Settings, trust: TlsTrust, policy: AddressPolicy | None) -> httpx.AsyncClient:
    timeout = httpx.Timeout(settings.upstream_timeout, connect=min(settings.upstream_timeout, 10.0))
    # trust_env=False: proxies and CAs come from the settings (read from the same variables), and ~/.netrc is
    # never a source of credentials.
    return httpx.AsyncClient(transport=UpstreamTransport(settings, trust, policy), timeout=timeout,
                             follow_redirects=False, max_redirects=settings.upstream_max_redirects,
                             trust_env=False, headers={"User-Agent": USER_AGENT})


def registries_for(settings: Settings, auth: AuthCache | None = None, blob_locks: Locks | None = None) -> Registries:
    """What a process (the API, a worker) owns to reach registries, from the settings."""
    trust = TlsTrust(settings.registry_ca_bundle, settings.registry_ca_bundles, settings.registry_insecure_hosts)
    policy = parse_allowed_hosts(settings.registry_allowed_hosts)
    return Registries(_client(settings, trust, None), auth, blob_locks=blob_locks,
                      guarded=_client(settings, trust, policy), settings=settings)
