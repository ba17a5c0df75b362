"""REGISTRY_ALLOWED_HOSTS (shared/address_policy.py) and the guarded connections of shared/upstream_http.py.

Names are resolved by a stub resolver here, so a name can "resolve" to a metadata address without any packet
leaving the machine; the connections that are made go to 127.0.0.1 only.
"""

from __future__ import annotations

import ipaddress

import httpcore
import pytest
from docker_http_passthrough.shared.address_policy import AddressPolicy, parse_allowed_hosts
from docker_http_passthrough.shared.errors import NotAllowed
from docker_http_passthrough.shared.host_patterns import parse_host_list
from docker_http_passthrough.shared.settings import Settings, SettingsError, load_settings
from docker_http_passthrough.shared.upstream_http import GuardedBackend, NoProxy, registries_for

from tests.support.rogue_registry import Answer, RogueRegistry


def refusal(policy: AddressPolicy, address: str, by_name: bool = False) -> str | None:
    return policy.refusal(ipaddress.ip_address(address), by_name)


@pytest.mark.parametrize("address, allowed", [
    ("93.184.216.34", True),  # public
    ("10.1.2.3", True), ("172.20.0.5", True), ("192.168.1.10", True), ("100.64.0.1", True), ("fd12::1", True),
    ("127.0.0.1", False), ("127.8.8.8", False), ("::1", False),  # this host's own services
    ("169.254.169.254", False), ("169.254.1.1", False), ("fe80::1", False),  # link-local, metadata
    ("fd00:ec2::254", False), ("100.100.100.200", False), ("168.63.129.16", False),  # metadata outside link-local
    ("0.0.0.0", False), ("::", False), ("224.0.0.1", False), ("255.255.255.255", False), ("ff02::1", False),
    ("::ffff:169.254.169.254", False), ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", True),  # IPv4-mapped
    ("64:ff9b::a9fe:a9fe", False), ("2002:a9fe:a9fe::1", False),  # NAT64 and 6to4 of 169.254.169.254
    ("198.51.100.7", False), ("240.0.0.1", False),  # documentation, reserved
])
def test_default_policy_allows_public_and_private_addresses_only(address, allowed):
    assert (refusal(parse_allowed_hosts(""), address) is None) is allowed


def test_link_local_and_metadata_need_an_entry_that_names_them():
    everything = parse_allowed_hosts("0.0.0.0/0, ::/0")
    assert refusal(everything, "8.8.8.8") is None and refusal(everything, "127.0.0.1") is None
    assert "link-local" in refusal(everything, "169.254.169.254")
    assert "metadata" in refusal(everything, "100.100.100.200")
    assert "metadata" in refusal(parse_allowed_hosts("private"), "100.100.100.200")  # inside 100.64/10
    assert refusal(parse_allowed_hosts("169.254.169.254/32"), "169.254.169.254") is None
    assert refusal(parse_allowed_hosts("169.254.0.0/16"), "169.254.10.1") is None
    assert refusal(parse_allowed_hosts("100.100.100.200"), "100.100.100.200") is None
    # Allowed by name: any address, except link-local and metadata ones.
    by_name = parse_allowed_hosts("registry.corp.example")
    assert refusal(by_name, "127.0.0.1", by_name=True) is None
    assert refusal(by_name, "169.254.169.254", by_name=True) is not None
    assert refusal(parse_allowed_hosts("public"), "0.0.0.0") == "an address no registry can have"


def test_entries_are_keywords_networks_and_host_patterns():
    policy = parse_allowed_hosts(" loopback,10.20.0.0/16 *.corp.example, registry.lab:5000 ")
    assert policy.keywords == {"loopback"}
    assert refusal(policy, "10.20.3.4") is None and refusal(policy, "10.21.0.1") is not None
    assert refusal(policy, "8.8.8.8") is not None  # "public" was not listed
    assert policy.name_refusal("harbor.corp.example", 443) == (True, None)
    assert policy.name_refusal("corp.example", 443)[0] is False
    assert policy.name_refusal("registry.lab", 5000)[0] is True
    assert policy.name_refusal("registry.lab", 5001)[0] is False
    assert policy.name_refusal("metadata.google.internal", 80) == (False, "a cloud metadata host name")
    assert parse_allowed_hosts("metadata.google.internal").name_refusal("metadata.google.internal", 80) == (True, None)
    assert parse_allowed_hosts("*.internal").name_refusal("metadata.google.internal", 80)[1] is not None


@pytest.mark.parametrize("raw", ["not a host!", "a..b", "host:0", "host:99999", "[::1"])
def test_bad_entries_stop_start_up_naming_the_variable(raw):
    with pytest.raises(SettingsError) as info:
        load_settings({"REGISTRY_ALLOWED_HOSTS": raw})
    assert "REGISTRY_ALLOWED_HOSTS" in str(info.value)


def test_host_lists_accept_ports_and_ipv6():
    patterns = parse_host_list("registry.lab:5000, [fd00::1]:443 fd00::2 *.lab.example")
    assert [str(p) for p in patterns] == ["registry.lab:5000", "[fd00::1]:443", "[fd00::2]", "*.lab.example"]
    assert patterns[3].matches("a.b.lab.example", 1) and not patterns[3].matches("lab.example", 1)


def resolver(answers: dict[str, list[list[str]]]):
    """A stub DNS: each lookup of a name takes the next answer (a rebinding server changes its mind)."""
    async def resolve(host: str, port: int) -> list[str]:
        return answers[host].pop(0) if len(answers[host]) > 1 else answers[host][0]
    return resolve


class RecordingBackend(httpcore.AsyncNetworkBackend):
    def __init__(self):
        self.connected: list[str] = []

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        self.connected.append(host)
        raise httpcore.ConnectError("recorded, not connected")


@pytest.mark.anyio
async def test_a_name_is_checked_after_resolution_and_connected_at_the_checked_address():
    answers = {"evil.test": [["93.184.216.34"], ["169.254.169.254"]],  # rebinding: public first, metadata next
               "mixed.test": [["93.184.216.34", "169.254.169.254"]],
               "ok.test": [["93.184.216.34", "10.0.0.7"]]}
    backend = GuardedBackend(parse_allowed_hosts("", resolver(answers)))
    backend.inner = RecordingBackend()
    with pytest.raises(httpcore.ConnectError):
        await backend.connect_tcp("evil.test", 443)
    assert backend.inner.connected == ["93.184.216.34"]  # the address checked, not the name (no second lookup)
    with pytest.raises(NotAllowed) as info:
        await backend.connect_tcp("evil.test", 443)  # the next lookup says metadata: refused before connecting
    assert "REGISTRY_ALLOWED_HOSTS" in info.value.message and "169.254" not in info.value.message
    with pytest.raises(NotAllowed):
        await backend.connect_tcp("mixed.test", 443)  # one bad address is enough
    with pytest.raises(httpcore.ConnectError):
        await backend.connect_tcp("ok.test", 443)
    assert backend.inner.connected == ["93.184.216.34", "93.184.216.34", "10.0.0.7"]  # each address tried


@pytest.mark.parametrize("raw, host, port, bypass", [
    ("*", "anything.example", 443, True),
    ("corp.example", "corp.example", 443, True), ("corp.example", "a.corp.example", 443, True),
    ("corp.example", "notcorp.example", 443, False), (".corp.example", "corp.example", 443, True),
    ("10.0.0.0/8,127.0.0.1", "10.3.4.5", 80, True), ("10.0.0.0/8", "11.0.0.1", 80, False),
    ("127.0.0.1", "127.0.0.1", 5000, True), ("localhost:5000", "localhost", 5001, False),
    ("::1", "::1", 80, True), ("", "x.example", 443, False),
])
def test_no_proxy_as_curl_reads_it(raw, host, port, bypass):
    assert NoProxy(raw).bypass(host, port) is bypass


@pytest.mark.anyio
async def test_only_the_guarded_client_checks_and_redirect_hops_are_checked_too():
    """127.0.0.1 is the configured registry (trusted); a rogue registry named by a client may not send us to
    127.0.0.2 (another loopback address) by a redirect: the listener there sees nothing."""
    with RogueRegistry("x/app", "v1", b"{}", "application/json", {}, host="127.0.0.2") as elsewhere, \
            RogueRegistry("x/app", "v1", b"{}", "application/json", {}) as rogue:
        rogue.answers["/v2/x/app/blobs/sha256:aa"] = Answer(307, {"Location": f"{elsewhere.url}/v2/"})
        settings = Settings(registry_url=elsewhere.url, registry_allowed_hosts=f"127.0.0.1:{rogue.port}")
        async with registries_for(settings) as registries:
            assert (await registries.http.get(f"{elsewhere.url}/v2/")).status_code == 200  # trusted: not checked
            assert registries.http_for(elsewhere.url) is registries.http
            assert registries.http_for(rogue.url) is registries.guarded
            response = await registries.guarded.get(f"{rogue.url}/v2/x/app/blobs/sha256:aa", follow_redirects=False)
            assert response.status_code == 307
            with pytest.raises(NotAllowed) as info:
                await registries.guarded.get(f"{rogue.url}/v2/x/app/blobs/sha256:aa", follow_redirects=True)
    assert "127.0.0.2" in info.value.message
    assert elsewhere.requests == [("GET", "/v2/", 200)]  # only the trusted request


@pytest.mark.anyio
async def test_with_a_proxy_a_name_must_resolve_here_unless_allowed_by_name():
    policy = parse_allowed_hosts("*.allowed.test", resolver({"blocked.test": [["127.0.0.1"]]}))
    with pytest.raises(NotAllowed):
        await policy.allowed_addresses("blocked.test", 443, must_resolve=False)

    async def nxdomain(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    policy = parse_allowed_hosts("*.allowed.test", nxdomain)
    assert await policy.allowed_addresses("reg.allowed.test", 443, must_resolve=False) == []  # the proxy resolves
    with pytest.raises(NotAllowed, match="does not resolve here"):
        await policy.allowed_addresses("reg.other.test", 443, must_resolve=False)
    with pytest.raises(OSError):
        await policy.allowed_addresses("reg.other.test", 443)  # direct: a connection error like any other
