"""Which hosts a client may make this server connect to (REGISTRY_ALLOWED_HOSTS), checked after DNS resolution.

Anyone who can reach the server can name a registry in the URL (`/registry/{scheme}/{host}/…`), and that
registry then names further hosts: redirects (blob GETs go to object storage) and token realms (the realm's
answer is sent back to the registry as a bearer token, so a realm pointing at a cloud metadata service would
hand its credentials to whoever runs the registry). Every one of those hosts is checked here, after DNS
resolution, and the connection is made to the very address that was checked (no second lookup a rebinding DNS
server could answer differently).

The setting is a list of entries; an address is allowed when an entry covers it:
- `public`: globally routable addresses; `private`: RFC 1918, CGNAT (100.64/10) and IPv6 ULA (fc00::/7);
  `loopback`: 127/8 and ::1. The default is `public,private`: private registries sit on private addresses,
  while the server's own loopback services are refused.
- a CIDR or an address: `10.20.0.0/16`, `127.0.0.1`;
- a host pattern: `registry.example.com`, `*.corp.example`, optionally with `:port`. A host allowed by name may
  resolve to any address (through a proxy, we need not resolve it at all).
Link-local addresses (169.254/16, fe80::/10) and cloud metadata addresses are refused unless an entry names
them specifically (a CIDR inside them, e.g. `169.254.169.254/32`; `0.0.0.0/0` does not count); metadata host
names unless listed exactly. Addresses no registry can have (unspecified, multicast, broadcast) are always
refused. REGISTRY_URL and REGISTRY_MIRROR, which the operator chose, are not checked (see upstream_http).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from docker_http_passthrough.shared.errors import NotAllowed
from docker_http_passthrough.shared.host_patterns import HostPattern, first_match, parse_host_pattern

log = logging.getLogger("docker_http_passthrough.upstream")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]


def _nets(*cidrs: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


CATEGORIES: dict[str, tuple[Network, ...]] = {
    "private": _nets("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"),
    "loopback": _nets("127.0.0.0/8", "::1/128"),
}
LINK_LOCAL = _nets("169.254.0.0/16", "fe80::/10")
# Instance metadata services outside the link-local ranges: AWS (IPv6), GCP (IPv6), Alibaba, Azure's wireserver.
METADATA = _nets("fd00:ec2::254/128", "fd20:ce::254/128", "100.100.100.200/32", "168.63.129.16/32")
METADATA_NAMES = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data",
                            "instance-data.ec2.internal"})
NEVER = _nets("0.0.0.0/8", "::/128", "224.0.0.0/4", "ff00::/8", "255.255.255.255/32")
DEFAULT = "public,private"


def plain(address: Address) -> Address:
    """The IPv4 address hidden in an IPv4-mapped, NAT64 (64:ff9b::/96) or 6to4 address, else the address."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped:
            return address.ipv4_mapped
        if address in ipaddress.ip_network("64:ff9b::/96"):
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if address.sixtofour:
            return address.sixtofour
    return address


def _kind(address: Address) -> str:
    for name, nets in CATEGORIES.items():
        if any(address in net for net in nets):
            return name
    return "public" if address.is_global else "reserved"


@dataclass(frozen=True)
class AddressPolicy:
    keywords: frozenset[str] = frozenset({"public", "private"})
    networks: tuple[Network, ...] = ()
    names: tuple[HostPattern, ...] = ()
    text: str = DEFAULT
    resolver: Resolver | None = field(default=None, compare=False)  # tests: a resolver of their own

    def _explicit(self, address: Address, dangerous: Network) -> bool:
        return any(address in net and net.version == dangerous.version and net.subnet_of(dangerous)
                   for net in self.networks)

    def refusal(self, address: Address, by_name: bool) -> str | None:
        """Why `address` may not be connected to, or None."""
        address = plain(address)
        if any(address in net for net in NEVER):
            return "an address no registry can have"
        for dangerous, what in ((LINK_LOCAL, "a link-local address"), (METADATA, "a cloud metadata address")):
            hit = next((net for net in dangerous if address in net), None)
            if hit is not None:
                return None if self._explicit(address, hit) else f"{what}, allowed only when named explicitly"
        if by_name or _kind(address) in self.keywords or any(address in net for net in self.networks):
            return None
        return f"a {_kind(address)} address"

    def name_refusal(self, host: str, port: int | None) -> tuple[bool, str | None]:
        """(allowed by a name pattern, why the name alone is refused)."""
        host = host.lower().rstrip(".")
        named = first_match(list(self.names), host, port)
        if host in METADATA_NAMES and (named is None or named.host != host):
            return False, "a cloud metadata host name"
        return named is not None, None

    def refuse(self, host: str, why: str) -> NotAllowed:
        # The setting's value stays in the log: it may name internal hosts.
        log.warning("refused the host %s: %s (REGISTRY_ALLOWED_HOSTS=%s)", host, why, self.text)
        return NotAllowed(f"the host {host} is not allowed: it is {why} (REGISTRY_ALLOWED_HOSTS)")

    async def resolve(self, host: str, port: int) -> list[str]:
        if self.resolver is not None:
            return await self.resolver(host, port)
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return list(dict.fromkeys(info[4][0] for info in infos))

    async def allowed_addresses(self, host: str, port: int, *, must_resolve: bool = True) -> list[str]:
        """The addresses of `host` to connect to, all checked; NotAllowed when any is refused (a name that
        resolves to both a public and a metadata address is not a registry). With must_resolve=False (through
        a proxy, which resolves names itself), a host allowed by name needs no local resolution."""
        by_name, why = self.name_refusal(host, port)
        if why:
            raise self.refuse(host, why)
        try:
            addresses = await self.resolve(host, port)
        except OSError:
            if must_resolve:
                raise  # a direct connection to it would fail anyway
            if by_name:
                return []  # the proxy resolves it
            raise self.refuse(host, "a name that does not resolve here, so its address cannot be checked "
                                    "(through a proxy, allow it by name)") from None
        for text in addresses:
            why = self.refusal(ipaddress.ip_address(text.split("%")[0]), by_name)
            if why:
                log.warning("%s resolves to %s", host, text)
                raise self.refuse(host, why)
        return addresses


def parse_allowed_hosts(raw: str | None, resolver: Resolver | None = None) -> AddressPolicy:
    """REGISTRY_ALLOWED_HOSTS → a policy; ValueError naming the bad entry."""
    text = (raw or "").strip() or DEFAULT
    keywords, networks, names = set(), [], []
    for entry in (item for item in re.split(r"[,\s]+", text) if item):
        if entry.lower() in ("public", "private", "loopback"):
            keywords.add(entry.lower())
            continue
        try:
            bare = entry[1:-1] if entry.startswith("[") and entry.endswith("]") else entry
            networks.append(ipaddress.ip_network(bare, strict=False))
            continue
        except ValueError:
            pass
        names.append(parse_host_pattern(entry))
    return AddressPolicy(frozenset(keywords), tuple(networks), tuple(names), ",".join(text.split()), resolver)
