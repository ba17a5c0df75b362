"""The container images, built for real (offline wheelhouse path) on the test Docker engine, and run."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.support.downloads import archive_manifest, get, image_url
from tests.support.deploy import build_context, build_image
from tests.support.faults import wait_until
from tests.support.images import busybox_layer, make_layer
from tests.support.services import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.deploy]


def inspect(engine, image: str) -> dict:
    return json.loads(engine.run("image", "inspect", image).stdout)[0]


@pytest.mark.parametrize("which, port", [("api", "8080/tcp"), ("worker", "9101/tcp")])
def test_image_is_non_root_labelled_small_and_clean(deploy_engine, deploy_images, which, port):
    image = getattr(deploy_images, which)
    info = inspect(deploy_engine, image)
    config = info["Config"]
    assert config["User"] == "10001:10001"
    assert port in config["ExposedPorts"]
    assert config["Healthcheck"]["Test"][0] == "CMD"
    labels = config["Labels"]
    for key in ("source", "licenses", "version", "revision"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.revision"] == "test"  # the build argument reached the label
    added = info["Size"] - inspect(deploy_engine, deploy_images.base)["Size"]
    assert added < 150 * 2**20, f"the runtime stage adds {added / 2**20:.0f} MiB to the base"
    # Only the venv came from the build stage: no sources, wheels, compilers or pip caches.
    leftovers = deploy_engine.run(
        "run", "--rm", "--network", "none", "--entrypoint", "sh", image, "-c",
        "ls -d /src /wheels /wheelhouse /root/.cache/pip /opt/dhp/bin/pip 2>/dev/null; "
        "command -v gcc cc x86_64-linux-gnu-gcc; id -u; docker-http-passthrough --help >/dev/null && echo cli-ok",
        check=False)
    assert leftovers.stdout.split() == ["10001", "cli-ok"], leftovers


def test_docker_run_api_image_serves_an_image_that_loads_and_runs(deploy_engine, deploy_images, registry,
                                                                  unique_repo, tmp_path):
    """`docker run` of the API image alone (embedded mode) as the README shows it, with a named volume for the store
    and a read-only root file system as on Kubernetes."""
    message = f"served by the container image {unique_repo}"
    registry.push_image(unique_repo, "v1", [busybox_layer(), make_layer({"m.txt": message.encode() + b"\n"})],
                        cmd=["/bin/busybox", "cat", "/m.txt"])
    port = free_port()
    name = f"dhp-run-{port}"
    deploy_engine.run("run", "-d", "--name", name, "--network", "host", "--read-only", "--tmpfs", "/tmp",
                      "--volume", f"{name}:/var/cache/docker-http-passthrough", "-e", f"PORT={port}",
                      # the test registry listens on 127.0.0.1, which the default REGISTRY_ALLOWED_HOSTS refuses
                      "-e", "REGISTRY_ALLOWED_HOSTS=public,private,loopback", "--health-interval", "1s", deploy_images.api,
                      "docker-http-passthrough", "serve", "--host", "127.0.0.1")
    try:
        def health() -> str:
            state = deploy_engine.run("inspect", "--format", "{{.State.Health.Status}}", name).stdout.strip()
            assert state != "unhealthy", deploy_engine.run("logs", name, check=False).stderr
            return state
        assert wait_until(lambda: health() == "healthy", timeout=60), deploy_engine.run("logs", name).stderr
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["mode"] == "embedded"
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)  # the page ships inside the image
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")

        result = get(image_url(f"http://127.0.0.1:{port}", registry.host, unique_repo, "v1"))
        assert result.status == 200, result.body[:300]
        repo_tag = archive_manifest(result.body)[0]["RepoTags"][0]
        archive = tmp_path / "image.tar"
        archive.write_bytes(result.body)
        assert f"Loaded image: {repo_tag}" in deploy_engine.load(archive)
        assert deploy_engine.run("run", "--rm", "--network", "none", repo_tag).stdout.strip() == message
        deploy_engine.run("rmi", "-f", repo_tag, check=False)
    finally:
        deploy_engine.run("rm", "-f", name, check=False)
        deploy_engine.run("volume", "rm", name, check=False)


def test_api_image_builds_from_the_package_index_with_network_host(deploy_engine, deploy_images, tmp_path):
    """The other build path: an empty wheelhouse/, so the build stage asks the package index (reachable here
    only with --network host and the base image's copy of this machine's CA bundle)."""
    context = build_context(tmp_path / "context", wheels=None)
    assert not list((context / "wheelhouse").glob("*.whl"))
    image = build_image(deploy_engine, context, "Dockerfile.api", "dhp-test-api:from-index", deploy_images.base,
                        "--network", "host")
    try:
        ran = deploy_engine.run("run", "--rm", "--network", "none", image, "python", "-c",
                                "from docker_http_passthrough.api.app import create_app; print('imports ok')")
        assert ran.stdout.strip() == "imports ok"
    finally:
        deploy_engine.run("rmi", "-f", image, check=False)
