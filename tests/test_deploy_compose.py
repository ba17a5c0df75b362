"""compose.yaml end to end on the test Docker engine, with Debian's docker-compose: the stack comes up with
nothing configured, serves an image that loads and runs and a /registry-auth download, survives a worker
killed mid-preparation, and leaves nothing behind. The engine has no bridge network, so tests/compose/host-network.yaml (test only) puts every
service on the host's loopback with free ports; the images are the session's builds."""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import redis
import yaml
from rq import Worker

from tests.support.downloads import archive_manifest, get, image_url
from tests.support.faults import BackgroundGet, assert_json_error, wait_until
from tests.support.images import busybox_layer, make_layer
from tests.support.registry import htpasswd_auth
from tests.support.services import REPO_ROOT, child_env, free_port, require

pytestmark = [pytest.mark.e2e, pytest.mark.deploy]

LOST_TIMEOUT = 5


class ComposeStack:
    def __init__(self, engine, images, workdir: Path, env: dict[str, str]):
        self.engine = engine
        self.project = f"dhp-test-{secrets.token_hex(3)}"
        self.redis_port, self.api_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.api_port}"
        empty_env_file = workdir / "empty.env"  # never a developer's .env from the checkout
        empty_env_file.write_text("")
        compose = [shutil.which("docker-compose") or "docker-compose", "--project-name", self.project,
                   "--env-file", str(empty_env_file)]
        self.env = child_env({
            "DOCKER_HOST": engine.host, "DOCKER_CONFIG": str(engine.base_dir / "client"),
            "API_IMAGE": images.api, "WORKER_IMAGE": images.worker, "REDIS_IMAGE": images.redis,
            "TEST_REDIS_PORT": str(self.redis_port), "TEST_API_PORT": str(self.api_port), **env})
        # compose.yaml with the host-network override, merged by compose itself; published ports are dropped
        # (Docker refuses them with host networking, and a merge cannot remove a list).
        merged = subprocess.run([*compose, "--file", str(REPO_ROOT / "compose.yaml"), "--file",
                                 str(REPO_ROOT / "tests/compose/host-network.yaml"), "config"], env=self.env,
                                capture_output=True, text=True, check=True, timeout=60)
        config = yaml.safe_load(merged.stdout)
        for service in config["services"].values():
            service.pop("ports", None)
        (workdir / "compose.yaml").write_text(yaml.safe_dump(config))
        self.base = [*compose, "--file", str(workdir / "compose.yaml")]

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*self.base, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"docker-compose {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        return result

    def containers(self, service: str | None = None, all_states: bool = False) -> list[str]:
        filters = ["--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            filters += ["--filter", f"label=com.docker.compose.service={service}"]
        return self.engine.run("ps", "-q", *(["-a"] if all_states else []), *filters).stdout.split()

    def leftovers(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.project}"
        return (self.containers(all_states=True) + self.engine.run("volume", "ls", "-q", "--filter", label).stdout.split()
                + self.engine.run("network", "ls", "-q", "--filter", label).stdout.split())

    def logs(self) -> str:
        return subprocess.run([*self.base, "logs", "--no-color"], env=self.env, capture_output=True, text=True,
                              timeout=60).stdout[-6000:]


@pytest.fixture
def compose_stack(deploy_engine, deploy_images, tmp_path):
    require(shutil.which("docker-compose") is not None, "docker-compose is not installed (apt-get install docker-compose)")
    stacks: list[ComposeStack] = []

    def make(**env: str) -> ComposeStack:
        stack = ComposeStack(deploy_engine, deploy_images, tmp_path, env)
        stacks.append(stack)
        stack.run("up", "--detach", "--no-build")
        return stack

    yield make
    for stack in stacks:
        subprocess.run([*stack.base, "down", "--volumes", "--remove-orphans", "--timeout", "20"], env=stack.env,
                       capture_output=True, timeout=120)


def healthy(engine, container: str) -> bool:
    return engine.run("inspect", "--format", "{{.State.Health.Status}}", container).stdout.strip() == "healthy"


def busy_worker_container(stack: ComposeStack, client: redis.Redis) -> str:
    """The worker container whose RQ worker is running a job (each container writes its worker's name)."""
    busy = {worker.name for worker in Worker.all(connection=client) if worker.get_current_job_id()}
    for container in stack.containers("worker"):
        name = stack.engine.run("exec", container, "cat", "/tmp/worker-name").stdout.strip()
        if name in busy:
            return container
    raise AssertionError(f"no worker container runs a job (busy: {busy})")


def test_compose_stack_serves_survives_a_killed_worker_and_leaves_nothing(compose_stack, deploy_engine, registry,
                                                                          registry_factory, unique_repo, tmp_path):
    message = f"hello from the compose stack {unique_repo}"
    registry.push_image(unique_repo, "v1", [busybox_layer(), make_layer({"m.txt": message.encode() + b"\n"})],
                        cmd=["/bin/busybox", "cat", "/m.txt"])
    big = f"{unique_repo}-big"
    big_layer = make_layer({"big.bin": os.urandom(2_000_000)})  # random: stays ~2 MB gzipped
    registry.push_image(big, "v1", [big_layer])
    stack = compose_stack(WORKER_LOST_TIMEOUT=str(LOST_TIMEOUT), PREPARE_GRACE="0")

    # 1. Up, with nothing configured: Redis, the API and two workers, all healthy by their own health checks.
    workers = stack.containers("worker")
    assert len(workers) == 2 and len(stack.containers("api")) == 1 and len(stack.containers("redis")) == 1
    every = stack.containers()
    assert len(every) == 4  # no collector without --profile otel
    assert wait_until(lambda: all(healthy(deploy_engine, c) for c in every), timeout=90), stack.logs()
    assert httpx.get(f"{stack.url}/health", timeout=5).json()["mode"] == "two-tier"

    # 2./3. A download through the stack, then docker load and docker run.
    def url(repository: str) -> str:
        return image_url(stack.url, registry.host, repository, "v1")

    result = get(url(unique_repo))
    assert result.status == 200, result.body[:300]
    repo_tag = archive_manifest(result.body)[0]["RepoTags"][0]
    (tmp_path / "image.tar").write_bytes(result.body)
    assert f"Loaded image: {repo_tag}" in deploy_engine.load(tmp_path / "image.tar")
    assert deploy_engine.run("run", "--rm", "--network", "none", repo_tag).stdout.strip() == message
    deploy_engine.run("rmi", "-f", repo_tag, check=False)

    # ... and /registry-auth with the client's own credentials works with nothing configured (no
    # CREDENTIALS_KEY): prepared in the API container, the password never reaches Redis.
    private = registry_factory(auth=htpasswd_auth(tmp_path / "htpasswd", {"bob": "builder"}),
                               push_auth=("bob", "builder"))
    private.push_image(unique_repo, "v1", [make_layer({"private.txt": b"for bob only"})])
    auth_url = image_url(stack.url, private.host, unique_repo, "v1", route="registry-auth")
    assert get(auth_url).status == 401
    private_download = get(auth_url, auth=("bob", "builder"))
    assert private_download.status == 200, private_download.body[:300]
    client = redis.Redis.from_url(f"redis://127.0.0.1:{stack.redis_port}/0")
    stored = b"".join(key + repr(client.dump(key)).encode() for key in client.scan_iter())
    assert b"builder" not in stored and base64.b64encode(b"bob:builder") not in stored

    # 4. Kill the worker container running a preparation: the waiting download gets a clear error within
    #    WORKER_LOST_TIMEOUT (or its archive), and the next request succeeds on the other worker.
    registry.proxy.throttle_bytes_per_second = 300_000  # ~7 s for the big layer
    pending = BackgroundGet(url(big), timeout=120)
    assert wait_until(lambda: client.keys("dhp:heartbeat:*"), timeout=30), stack.logs()
    victim = busy_worker_container(stack, client)
    deploy_engine.run("kill", victim)
    killed_at = time.monotonic()
    lost = pending.join(timeout=LOST_TIMEOUT + 30)
    if lost.status != 200:
        assert_json_error(lost, 504, error="worker_lost")
        assert pending.answered_at - killed_at < LOST_TIMEOUT + 5
    registry.proxy.throttle_bytes_per_second = None
    again = get(url(big))
    assert again.status == 200, again.body[:300]
    registry.proxy.reset()

    # 5. Down: no container, volume or network of the project remains.
    stack.run("down", "--volumes", "--remove-orphans", "--timeout", "20")
    assert stack.leftovers() == []


def test_compose_file_is_standard_with_an_otel_profile(tmp_path):
    """Users' compose.yaml: bridge networking by service name, one named volume, Redis and the collector as
    image variables, the collector in the otel profile."""
    require(shutil.which("docker-compose") is not None, "docker-compose is not installed")
    empty = tmp_path / "empty.env"
    empty.write_text("")

    def config(*args: str) -> dict:
        out = subprocess.run(["docker-compose", "--env-file", str(empty), "--file", str(REPO_ROOT / "compose.yaml"),
                              *args, "config"], capture_output=True, text=True, env=child_env(), check=True)
        return yaml.safe_load(out.stdout)

    plain = config()
    always = sorted(name for name, service in plain["services"].items() if not service.get("profiles"))
    assert always == ["api", "redis", "worker"]
    collector = plain["services"]["otel-collector"]
    assert collector["profiles"] == ["otel"] and collector["image"].startswith("otel/opentelemetry-collector")
    assert plain["volumes"] == {"store": {}} or list(plain["volumes"]) == ["store"]
    for name in ("api", "worker"):
        service = plain["services"][name]
        assert "network_mode" not in service
        assert service["environment"]["REDIS_URL"] == "redis://redis:6379/0"
        assert any(v.startswith("store:/var/cache/docker-http-passthrough") for v in service["volumes"])
    assert plain["services"]["worker"]["deploy"]["replicas"] in (2, "2")
    assert plain["services"]["redis"]["image"] == "redis:7-alpine"
    assert json.dumps(plain).count("CREDENTIALS_KEY") == 2  # passed through to API and workers, no value


# Settings compose fixes itself (the port, the store, Redis) or that only make sense outside a container.
NOT_FROM_ENV_FILE = {"REDIS_URL", "CACHE_DIR", "PORT", "WORKER_METRICS_PORT", "PROMETHEUS_MULTIPROC_DIR"}


def test_every_setting_reaches_compose_and_is_explained_in_env_example():
    """A setting documented in docs/settings.md can be set in .env and reaches both services."""
    documented = set()
    for line in (REPO_ROOT / "docs" / "settings.md").read_text().splitlines():
        if line.startswith("| `"):
            documented |= {name for name in line.split("|")[1].replace("`", " ").replace(",", " ").split()
                           if name.isupper()}
    documented -= NOT_FROM_ENV_FILE | {"RUST_LOG", "WEB_CONCURRENCY", "REGISTRY_TOKEN"}  # aliases
    example = (REPO_ROOT / ".env.example").read_text()
    passed = yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())["x-settings"]
    assert sorted(name for name in documented if f"#{name}=" not in example) == []
    assert sorted(documented - set(passed)) == []
