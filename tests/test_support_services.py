"""Tests of the test-support services themselves (no project server needed)."""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path

import httpx
import pytest
import redis
from rq import Queue

from tests.support import service_fixtures
from tests.support.services import (
    DockerEngine,
    RedisProcess,
    ServerProcess,
    WorkerProcess,
    child_env,
    port_is_free,
    require,
    start_redis,
)

# A stand-in for `python -m docker_http_passthrough`, so the process plumbing can be
# tested without the real application: `serve` answers /health (and echoes its
# environment), `worker` is a real RQ worker whose jobs run in a forked work horse.
STUB_MODULE = textwrap.dedent(
    """
    import json, os, sys, time
    from http.server import BaseHTTPRequestHandler, HTTPServer

    def slow(seconds):
        time.sleep(seconds)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(dict(os.environ)).encode()
            self.send_response(200 if self.path in ("/health", "/env") else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def main():
        command = sys.argv[1]
        if command == "serve":
            host, port = sys.argv[sys.argv.index("--host") + 1], sys.argv[sys.argv.index("--port") + 1]
            print("stub serving", flush=True)
            HTTPServer((host, int(port)), Handler).serve_forever()
        elif command == "worker":
            if os.environ.get("STUB_WORKER_CRASH"):
                sys.exit("stub worker crashed on purpose")
            from redis import Redis
            from rq import Worker
            Worker(["default"], connection=Redis.from_url(os.environ["REDIS_URL"])).work()
        elif command == "crash":
            sys.exit("stub crashed on purpose")

    if __name__ == "__main__":
        main()
    """
)


@pytest.fixture
def stub_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    stub_dir = tmp_path / "stub"
    stub_dir.mkdir()
    (stub_dir / "dhp_stub.py").write_text(STUB_MODULE)
    monkeypatch.setattr(ServerProcess, "module", "dhp_stub")
    monkeypatch.setattr(WorkerProcess, "module", "dhp_stub")
    monkeypatch.syspath_prepend(str(stub_dir))  # lets RQ resolve "dhp_stub.slow" here too
    return {"PYTHONPATH": str(stub_dir)}


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _pid_alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("condition, require_all, outcome", [
    (True, "1", None),
    (True, None, None),
    (False, None, pytest.skip.Exception),
    (False, "1", pytest.fail.Exception),
])
def test_require_skips_a_missing_part_but_fails_it_under_require_all(
    monkeypatch: pytest.MonkeyPatch, condition: bool, require_all: str | None, outcome: type | None
) -> None:
    if require_all is None:
        monkeypatch.delenv("DHP_REQUIRE_ALL", raising=False)
    else:
        monkeypatch.setenv("DHP_REQUIRE_ALL", require_all)
    raised: BaseException | None = None
    try:
        require(condition, "no frobnicator")
    except (pytest.skip.Exception, pytest.fail.Exception) as exc:
        raised = exc
    assert type(raised) is outcome if outcome else raised is None, raised
    if outcome is pytest.skip.Exception:
        assert str(raised) == "no frobnicator"
    if outcome is pytest.fail.Exception:
        assert str(raised) == "no frobnicator (DHP_REQUIRE_ALL=1 forbids skipping)"


def test_child_env_drops_the_callers_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://elsewhere:6379/0")
    monkeypatch.setenv("CACHE_DIR", "/somewhere")
    env = child_env({"CACHE_DIR": "/mine"})
    assert "REDIS_URL" not in env
    assert env["CACHE_DIR"] == "/mine"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"] == os.environ["PATH"]


def test_redis_fixture_serves_without_persistence(redis_server: RedisProcess) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    client = redis_server.client()
    assert client.ping()
    client.set("k", "v")
    assert client.get("k") == b"v"
    # Persistence is off: a test must not leave dump.rdb/appendonly files behind.
    assert client.config_get("save") == {"save": ""}
    assert client.config_get("appendonly") == {"appendonly": "no"}
    client.close()


def test_redis_stop_frees_port_and_process(tmp_path: Path) -> None:
    server = start_redis(tmp_path)
    try:
        assert server.client().ping()
        assert not port_is_free(server.port)
    finally:
        server.stop()
    assert not _pid_alive(server.pid)
    assert port_is_free(server.port)
    with pytest.raises(redis.ConnectionError):
        server.client(socket_connect_timeout=1).ping()
    server.stop()  # idempotent


def test_two_redis_servers_are_independent(tmp_path: Path) -> None:
    a = start_redis(tmp_path / "a")
    b = start_redis(tmp_path / "b")
    try:
        assert a.port != b.port
        a.client().set("only-in-a", 1)
        assert b.client().get("only-in-a") is None
    finally:
        a.stop()
        b.stop()


def test_server_process_waits_for_health_and_gets_only_its_env(
    stub_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://leaked:1/0")  # must not reach the child
    server = ServerProcess({**stub_env, "CACHE_DIR": "/c"}, tmp_path / "server.log")
    try:
        assert server.url == f"http://127.0.0.1:{server.port}"
        env = httpx.get(f"{server.url}/env").json()
        assert env["CACHE_DIR"] == "/c"
        assert env["PYTHONUNBUFFERED"] == "1"
        assert "REDIS_URL" not in env
        assert "stub serving" in server.log_text()
    finally:
        server.stop()
    assert not server.alive()
    assert port_is_free(server.port)


def test_server_process_reports_early_exit(stub_env: dict[str, str], tmp_path: Path) -> None:
    class CrashingServer(ServerProcess):
        def _spawn(self, args, env):
            return super()._spawn(["crash"], env)

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="stub crashed on purpose"):
        CrashingServer(stub_env, tmp_path / "server.log")
    assert time.monotonic() - started < 10  # no waiting out the full timeout


def test_worker_process_registers_and_kill_takes_the_work_horse(
    stub_env: dict[str, str], tmp_path: Path, redis_server: RedisProcess
) -> None:
    env = {**stub_env, "REDIS_URL": redis_server.url, "CACHE_DIR": str(tmp_path)}
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        client = redis_server.client()
        assert client.scard("rq:workers") == 1
        Queue("default", connection=client).enqueue("dhp_stub.slow", 60)
        deadline = time.monotonic() + 20
        while not (horses := _children(worker.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert horses, worker.log_text()
        worker.kill()
        time.sleep(0.2)
        assert not worker.alive()
        assert not any(_pid_alive(pid) for pid in horses)
    finally:
        worker.stop()


def test_worker_process_needs_redis_and_cache(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CACHE_DIR"):
        WorkerProcess({"REDIS_URL": "redis://127.0.0.1:1/0"}, tmp_path / "w.log")


def test_two_tier_stack_shares_redis_and_cache_and_stops_everything(stub_env: dict[str, str], stack) -> None:
    s = stack("two-tier", workers=2, env=stub_env)
    assert s.mode == "two-tier" and s.redis is not None and len(s.workers) == 2
    env = httpx.get(f"{s.url}/env").json()
    assert env["REDIS_URL"] == s.redis.url
    assert env["CACHE_DIR"] == str(s.cache_dir) and s.cache_dir.is_dir()
    s.add_worker()
    assert s.redis.client().scard("rq:workers") == 3
    old_port = s.server.port
    s.restart_server()
    assert httpx.get(f"{s.url}/health").status_code == 200
    assert port_is_free(old_port)
    assert "stub serving" in s.logs()
    # Stop everything as the fixture teardown does, then check nothing is left.
    pids = [w.pid for w in s.workers] + [s.server.pid, s.redis.pid]
    s.stop()
    assert not any(_pid_alive(pid) for pid in pids)


def test_embedded_stack_has_no_redis_and_no_workers(stub_env: dict[str, str], stack) -> None:
    s = stack("embedded", env=stub_env)
    assert s.redis is None and s.workers == []
    env = httpx.get(f"{s.url}/env").json()
    assert "REDIS_URL" not in env
    assert env["CACHE_DIR"] == str(s.cache_dir)


def test_stack_cleans_up_a_half_started_stack(
    stub_env: dict[str, str], stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[RedisProcess] = []
    real_start_redis = service_fixtures.start_redis

    def recording_start_redis(workdir: Path) -> RedisProcess:
        started.append(real_start_redis(workdir))
        return started[-1]

    monkeypatch.setattr(service_fixtures, "start_redis", recording_start_redis)
    with pytest.raises(RuntimeError, match="stub worker crashed on purpose"):
        stack("two-tier", env={**stub_env, "STUB_WORKER_CRASH": "1"})
    assert len(started) == 1
    assert not _pid_alive(started[0].pid)


def test_stack_rejects_unknown_mode(stack) -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        stack("three-tier")


@pytest.mark.e2e
def test_private_docker_engine_starts_empty_and_reports_failures(docker_engine: DockerEngine) -> None:
    assert docker_engine.host.startswith("unix:///")
    version = docker_engine.run("version", "--format", "{{.Server.Version}}")
    assert version.stdout.strip()
    images = docker_engine.run("images", "-q")
    assert images.stdout.strip() == ""
    # check=False hands back failures instead of raising.
    failed = docker_engine.run("image", "inspect", "no-such-image:0", check=False)
    assert failed.returncode != 0
    with pytest.raises(AssertionError, match="no-such-image"):
        docker_engine.run("image", "inspect", "no-such-image:0")
