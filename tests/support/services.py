"""Real processes for tests: redis-server (from ``redis_server``), dockerd, and the project's server and worker.

Every part here is started on a free loopback port (or a private unix socket) and
has a ``stop()`` that is safe to call twice; the pytest fixtures in
``tests.support.service_fixtures`` make sure it is called at teardown.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import httpx
import pytest
import redis

from tests.support.lifecycle import (  # noqa: F401 - free_port, port_is_free, find_binary: re-exported for tests
    child_env,
    exited,
    find_binary,
    free_port,
    kill_session,
    open_log,
    port_is_free,
    process_table,
    tail,
    terminate,
    wait_until,
)
from tests.support.redis_server import RedisProcess, start_redis  # noqa: F401 - re-exported for tests

REPO_ROOT = Path(__file__).resolve().parents[2]
# Test registries listen on 127.0.0.1, which the default REGISTRY_ALLOWED_HOSTS refuses for /registry/... routes:
# every server and worker the tests start allows loopback, unless a test passes a value of its own.
TEST_ALLOWED_HOSTS = "public,private,loopback"


def require(condition: bool, reason: str) -> None:
    """Skip the current test unless ``condition``; under DHP_REQUIRE_ALL=1 fail instead.

    CI sets DHP_REQUIRE_ALL=1 so that a missing binary or a part that failed to
    start can never turn a red build green by skipping.
    """
    if condition:
        return
    if os.environ.get("DHP_REQUIRE_ALL") == "1":
        pytest.fail(f"{reason} (DHP_REQUIRE_ALL=1 forbids skipping)", pytrace=False)
    pytest.skip(reason)


# --------------------------------------------------------------------------- dockerd


class DockerEngine:
    """A private dockerd (overlay2 or vfs storage, no networking) on its own unix socket."""

    def __init__(self, proc: subprocess.Popen, base_dir: Path, docker: str = "docker") -> None:
        self.proc = proc
        self.base_dir = base_dir
        self.docker = docker  # client binary
        self.socket_path = base_dir / "docker.sock"
        self.host = f"unix://{self.socket_path}"
        self.data_root = base_dir / "root"
        self.exec_root = base_dir / "exec"
        self.log_path = base_dir / "dockerd.log"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def run(
        self, *args: str, check: bool = True, timeout: float = 300, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``docker -H <host> <args>`` (``env`` added to the client's environment); output is captured as text."""
        cmd = [self.docker, "-H", self.host, *args]
        result = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_env({"DOCKER_CONFIG": str(self.base_dir / "client"), **(env or {})}),
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def load(self, tar_path: Path | str, timeout: float = 300) -> str:
        """``docker load -i tar_path``; returns stdout, e.g. 'Loaded image: nginx:latest'."""
        return self.run("load", "-i", str(tar_path), timeout=timeout).stdout

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if not exited(self.proc):
            # Remove containers first so dockerd does not spend its grace period on them.
            try:
                ids = self.run("ps", "-aq", check=False, timeout=15).stdout.split()
                if ids:
                    self.run("rm", "-f", *ids, check=False, timeout=60)
            except (subprocess.TimeoutExpired, OSError):
                pass
        terminate(self.proc, grace=20)
        # dockerd starts containerd in a session of its own; it only goes away by
        # itself when dockerd shuts down cleanly.
        _kill_processes_mentioning(str(self.exec_root))
        _unmount_under(self.base_dir)
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"<DockerEngine {self.host} pid={self.pid}>"


def start_dockerd(timeout: float = 60.0, storage_drivers: tuple[str, ...] = ("overlay2", "vfs")) -> DockerEngine:
    """The first storage driver that works: overlay2 builds and loads images many times faster than vfs (which
    copies the whole file system for every layer and container) and works wherever the kernel allows overlay
    mounts; vfs works everywhere."""
    failures = []
    for driver in storage_drivers:
        try:
            return _start_dockerd(timeout, driver)
        except RuntimeError as exc:
            failures.append(f"--storage-driver={driver}: {exc}")
    raise RuntimeError("\n".join(failures))


def _start_dockerd(timeout: float, storage_driver: str) -> DockerEngine:
    binary = find_binary("dockerd")
    docker = find_binary("docker")
    if binary is None or docker is None:
        raise RuntimeError("dockerd or docker client not found")
    # Short path: unix sockets (docker.sock, containerd's sockets under exec-root)
    # are limited to ~108 bytes.
    base_dir = Path(tempfile.mkdtemp(prefix="dhp-dk-"))
    engine_args = [
        binary,
        f"--storage-driver={storage_driver}",
        "--iptables=false",
        "--bridge=none",
        f"--host=unix://{base_dir / 'docker.sock'}",
        f"--data-root={base_dir / 'root'}",
        f"--exec-root={base_dir / 'exec'}",
        f"--pidfile={base_dir / 'pid'}",
    ]
    with open_log(base_dir / "dockerd.log") as log:
        proc = subprocess.Popen(
            engine_args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    engine = DockerEngine(proc, base_dir, docker)

    def answers() -> bool:
        return engine.run("version", check=False, timeout=10).returncode == 0

    if not wait_until(answers, timeout, proc, interval=0.5):
        log_tail = tail(engine.log_path)
        engine.stop()
        raise RuntimeError(f"dockerd did not answer within {timeout:.0f}s:\n{log_tail}")
    return engine


def _kill_processes_mentioning(needle: str) -> None:
    """SIGKILL processes whose command line contains ``needle`` (a path unique to us),
    and all their descendants (containerd-shim -> container processes)."""
    table = process_table()
    doomed = {pid for pid, info in table.items() if needle in info.cmdline}
    doomed.discard(os.getpid())
    while True:  # close over descendants: containers are children of the shims
        children = {pid for pid, info in table.items() if info.ppid in doomed} - doomed
        if not children:
            break
        doomed |= children
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _unmount_under(base: Path) -> None:
    """Lazily unmount leftovers (container shm, netns) below ``base``, deepest first."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    prefix = str(base) + "/"
    targets = [
        line.split()[1].replace("\\040", " ") for line in mounts if len(line.split()) > 1
    ]
    for target in sorted((t for t in targets if t.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True, check=False)


# --------------------------------------------------------------------------- project processes


class _ProjectProcess:
    """Common parts of `python -m docker_http_passthrough <command>` children."""

    # Overridable so the plumbing itself can be tested against a stub module.
    module = "docker_http_passthrough"
    # Run in the child before exec (e.g. to give it other resource limits).
    preexec_fn: Callable[[], None] | None = None
    proc: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return not exited(self.proc)

    def kill(self) -> None:
        """SIGKILL the process and everything it forked (e.g. an RQ work horse)."""
        kill_session(self.proc, signal.SIGKILL)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def _spawn(self, args: list[str], env: Mapping[str, str] | None) -> subprocess.Popen:
        env = {"REGISTRY_ALLOWED_HOSTS": TEST_ALLOWED_HOSTS, **(env or {})}
        with open_log(self.log_path) as log:
            return subprocess.Popen(
                [sys.executable, "-m", self.module, *args],
                cwd=REPO_ROOT,
                env=child_env(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # lets kill()/stop() reach everything it forks
                preexec_fn=self.preexec_fn,
            )


class ServerProcess(_ProjectProcess):
    """The HTTP server (`docker_http_passthrough serve`) on a free loopback port.

    ``env`` is merged over a minimal copy of os.environ; REDIS_URL, CACHE_DIR, ...
    reach the server only when passed here. ``workers``: API processes (API_WORKERS, unless ``env`` sets it);
    tests run one unless they are about several, None leaves the server's default (one per CPU).
    """

    def __init__(
        self,
        env: Mapping[str, str] | None,
        log_path: Path,
        port: int | None = None,
        timeout: float = 30.0,
        workers: int | None = 1,
    ) -> None:
        self.env = dict(env or {})
        if workers is not None:
            self.env.setdefault("API_WORKERS", str(workers))
        self.log_path = Path(log_path)
        fixed_port = port is not None
        for _attempt in range(1 if fixed_port else 3):
            self.port = port if fixed_port else free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self.proc = self._spawn(
                ["serve", "--host", "127.0.0.1", "--port", str(self.port)], self.env
            )
            if wait_until(self._healthy, timeout, self.proc, interval=0.1):
                return
            log = self.log_text()
            self.stop()
            # A port grabbed by someone else between free_port() and bind: retry.
            if "address already in use" not in log.lower():
                break
        raise RuntimeError(
            f"server did not answer GET /health with 200 within {timeout:.0f}s "
            f"(exit code {self.proc.returncode}); log tail:\n{tail(self.log_path)}"
        )

    def _healthy(self) -> bool:
        return httpx.get(f"{self.url}/health", timeout=2).status_code == 200

    def stop(self) -> None:
        terminate(self.proc, grace=10)

    def __repr__(self) -> str:
        return f"<ServerProcess {self.url} pid={self.pid}>"


class WorkerProcess(_ProjectProcess):
    """An RQ worker (`docker_http_passthrough worker`); returns once it is registered."""

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        timeout: float = 20.0,
    ) -> None:
        missing = {"REDIS_URL", "CACHE_DIR"} - set(env)
        if missing:
            raise ValueError(f"WorkerProcess env lacks {sorted(missing)}")
        self.env = dict(env)
        self.log_path = Path(log_path)
        self.redis_url = self.env["REDIS_URL"]
        conn = redis.Redis.from_url(self.redis_url, socket_timeout=2)
        try:
            before = conn.scard("rq:workers")
            self.proc = self._spawn(["worker"], self.env)
            registered = wait_until(
                lambda: self._registered(conn, before), timeout, self.proc, interval=0.1
            )
        finally:
            conn.close()
        if not registered:
            self.stop()
            raise RuntimeError(
                f"worker did not register in rq:workers within {timeout:.0f}s "
                f"(exit code {self.proc.returncode}); log tail:\n{tail(self.log_path)}"
            )

    def _registered(self, conn: redis.Redis, before: int) -> bool:
        # RQ 3 adds each live worker's key to the set rq:workers (hash holds its pid).
        # Match our pid when possible; fall back to "the set grew" for wrapper CLIs.
        for key in conn.smembers("rq:workers"):
            if conn.hget(key, "pid") == str(self.pid).encode():
                return True
        return conn.scard("rq:workers") > before

    def stop(self) -> None:
        """Warm shutdown (SIGTERM lets RQ unregister), after 10 s SIGKILL the whole session."""
        terminate(self.proc, grace=10)

    def __repr__(self) -> str:
        return f"<WorkerProcess pid={self.pid} redis={self.redis_url}>"
