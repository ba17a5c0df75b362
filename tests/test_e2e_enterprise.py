"""End to end, the registries an enterprise has (issue 12, item 5): TLS registries with an internal CA or a
self-signed certificate, Docker Hub through a corporate proxy, and a pull-through mirror in front of it.

Everything is on loopback. CNCF distribution serves TLS (`http.tls`) with certificates from a CA made for the
test; "Docker Hub" is such a registry, reached through a real CONNECT proxy that maps `registry-1.docker.io:443`
and `auth.docker.io:443` to local servers (it is the test's DNS: nothing leaves the machine). The mirror is
distribution in pull-through mode (`proxy.remoteurl`), fetching from that Hub through a proxy of its own.
"""

from __future__ import annotations

import json
import os
from http.server import BaseHTTPRequestHandler

import pytest

from tests.support.downloads import filename_for, get, tar_members
from tests.support.faults import assert_complete_tar, assert_json_error
from tests.support.forward_proxy import ForwardProxy
from tests.support.images import make_layer
from tests.support.lifecycle import ThreadedServer
from tests.support.proxy import CountingProxy
from tests.support.registry import start_registry
from tests.support.tls import TestCA, self_signed

pytestmark = pytest.mark.e2e

HUB, AUTH = "registry-1.docker.io", "auth.docker.io"


@pytest.fixture
def ca(tmp_path) -> TestCA:
    return TestCA(tmp_path / "pki")


@pytest.fixture
def started():
    """Stops what a test starts, last first."""
    parts = []
    yield lambda part: parts.append(part) or part
    for part in reversed(parts):
        part.stop()


def tls_url(registry, host: str, repository: str, tag: str = "v1") -> str:
    return f"/registry/https/{host}/docker/{filename_for(repository, tag)}"


def layer_tars(result) -> list[bytes]:
    return [m for n, m in tar_members(result.body).items() if n.endswith("/layer.tar")]


def test_a_registry_with_an_internal_ca_is_trusted_per_host_or_globally(mode, stack, registry, ca, tmp_path, started,
                                                                       unique_repo):
    image = registry.push_image(unique_repo, "v1", [make_layer({"a.bin": os.urandom(100_000)})])
    # Two TLS registries serving the session registry's storage, both with certificates from the internal CA.
    one, two = (started(start_registry(tmp_path / name, tls=ca.issue(["localhost", "127.0.0.1"], tmp_path / name),
                                       storage_dir=registry.registry.storage_dir)) for name in ("one", "two"))
    running = stack(mode, workers=1, env={"REGISTRY_CA_BUNDLES": f"127.0.0.1:{one.port}={ca.cert}"})

    trusted = get(running.url + tls_url(one, one.host, unique_repo))
    assert_complete_tar(trusted)
    untrusted = get(running.url + tls_url(two, two.host, unique_repo))
    assert_json_error(untrusted, 502, error="registry_tls", words=("REGISTRY_CA_BUNDLE", "verif"))

    if mode == "embedded":  # the global bundle: every host
        everywhere = stack("embedded", env={"REGISTRY_CA_BUNDLE": str(ca.cert)})
        assert_complete_tar(get(everywhere.url + tls_url(two, two.host, unique_repo)))
    assert layer_tars(trusted) == [image.layers[0].tar]


def test_a_self_signed_lab_registry_works_only_when_listed_as_insecure(stack, registry, tmp_path, started,
                                                                      unique_repo):
    registry.push_image(unique_repo, "v1", [make_layer({"a.txt": b"lab"})])
    lab, other = (started(start_registry(tmp_path / name, tls=self_signed(["127.0.0.1"], tmp_path / name),
                                         storage_dir=registry.registry.storage_dir)) for name in ("lab", "other"))
    running = stack("embedded", env={"REGISTRY_INSECURE_HOSTS": f"127.0.0.1:{lab.port}"})

    assert_complete_tar(get(running.url + tls_url(lab, lab.host, unique_repo)))
    assert_json_error(get(running.url + tls_url(other, other.host, unique_repo)), 502, error="registry_tls",
                      words=("REGISTRY_INSECURE_HOSTS",))
    log = running.logs()
    assert "NOT verified" in log and f"127.0.0.1:{lab.port}" in log  # at start
    assert "not verifying the TLS certificate of 127.0.0.1" in log  # on first use


class _TokenStub(BaseHTTPRequestHandler):
    """Docker Hub's token endpoint, as far as an anonymous registry cares: any token will do."""

    def do_GET(self) -> None:  # noqa: N802
        body = json.dumps({"token": "anonymous-pull", "expires_in": 300}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_docker_hub_through_a_corporate_proxy_with_a_pull_through_mirror_first(mode, stack, registry_factory, ca,
                                                                               tmp_path, started):
    # "Docker Hub": pushed to over plain HTTP, served over TLS as registry-1.docker.io (and registry.dhp.test).
    hub = registry_factory()
    hub_tls = started(start_registry(tmp_path / "hub", tls=ca.issue([HUB, "registry.dhp.test"], tmp_path / "hub"),
                                     storage_dir=hub.registry.storage_dir))
    token = started(ThreadedServer(_TokenStub, "TokenStub", tls=ca.issue([AUTH], tmp_path).server_context()).start())
    dns = {f"{HUB}:443": ("127.0.0.1", hub_tls.port), f"{AUTH}:443": ("127.0.0.1", token.port),
           "registry.dhp.test:443": ("127.0.0.1", hub_tls.port)}
    ours, the_mirrors = started(ForwardProxy(dns).start()), started(ForwardProxy(dns).start())
    # The mirror: distribution as a pull-through cache of Docker Hub, through its own proxy.
    mirror = started(start_registry(tmp_path / "mirror", extra={"proxy": {"remoteurl": f"https://{HUB}"}},
                                    env={"HTTPS_PROXY": the_mirrors.url, "SSL_CERT_FILE": str(ca.cert)}))
    mirror_front = started(CountingProxy(mirror.url).start())
    images = {name: hub.push_image(f"library/{name}", "v1", [make_layer({f"{name}.bin": os.urandom(50_000)})])
              for name in ("cached", "fallback", "private", "named")}
    running = stack(mode, workers=1, env={
        "HTTPS_PROXY": ours.url, "NO_PROXY": "127.0.0.1,localhost", "REGISTRY_CA_BUNDLE": str(ca.cert),
        "REGISTRY_MIRROR": mirror_front.url, "REGISTRY_ALLOWED_HOSTS": "*.dhp.test",
        "CREDENTIALS_KEY": "test-key"})

    # 1. The mirror has it (it pulls from Hub through its own proxy): our proxy never sees Docker Hub.
    cached = get(f"{running.url}/docker/cached_v1.tar")
    assert_complete_tar(cached)
    assert layer_tars(cached) == [images["cached"].layers[0].tar]
    assert ours.count(contains=HUB) == 0 and ours.count(contains=AUTH) == 0
    assert mirror_front.count(path_contains="library/cached/blobs/") == 2  # config and layer, from the mirror
    assert the_mirrors.count("CONNECT", HUB) >= 1

    # 2. The mirror fails (5xx): Docker Hub itself, through our proxy, with a token from auth.docker.io.
    mirror_front.fail("library/fallback", 503, times=100)
    fallback = get(f"{running.url}/docker/fallback_v1.tar")
    assert_complete_tar(fallback)
    assert layer_tars(fallback) == [images["fallback"].layers[0].tar]
    assert ours.count("CONNECT", HUB) >= 1 and ours.count("CONNECT", AUTH) >= 1

    # 3. A client's own credentials skip the mirror: only Docker Hub can check them.
    before = mirror_front.count()
    private = get(f"{running.url}/docker/private_v1.tar", auth=("someone", "their-hub-token"))
    assert_complete_tar(private)
    assert mirror_front.count() == before

    # 4. Registries named in the URL go through the proxy too; by name, they need not resolve here.
    named = get(f"{running.url}/registry/https/registry.dhp.test/docker/library__named_v1.tar")
    assert_complete_tar(named)
    assert ours.count("CONNECT", "registry.dhp.test:443") >= 1
    refused = get(f"{running.url}/registry/https/other.dhp.example/docker/library__named_v1.tar")
    assert_json_error(refused, 403, error="registry_not_allowed", words=("other.dhp.example",))
    assert ours.count(contains="other.dhp.example") == 0
