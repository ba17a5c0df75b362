"""pytest plugin: fixtures that start real Redis, dockerd and the project's processes.

Fixtures
--------
redis_server   (function) -> RedisProcess: a fresh redis-server on a free port.
docker_engine  (session)  -> DockerEngine: one private dockerd shared by the session
                             (the deployment tests have their own, see deploy_fixtures).
stack          (function) -> factory ``stack(mode, *, workers=2, env=None, cache_dir=None)``
                             returning a running :class:`Stack` (``start_stack`` outside pytest).
mode           (function, parametrized "embedded" / "two-tier") -> str: request it
                             next to ``stack`` to run one test in both modes.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import pytest

from tests.support.services import (
    DockerEngine,
    RedisProcess,
    ServerProcess,
    WorkerProcess,
    find_binary,
    require,
    start_dockerd,
    start_redis,
)

MODES = ("embedded", "two-tier")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    server = start_redis(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    yield from private_docker_engine()


def private_docker_engine() -> Iterator[DockerEngine]:
    """A dockerd of its own for a session fixture (skips, or fails under DHP_REQUIRE_ALL, when none starts)."""
    missing = [name for name in ("dockerd", "docker") if find_binary(name) is None]
    require(not missing, f"Docker engine unavailable: {', '.join(missing)} not found")
    # A rootless dockerd needs a whole different setup; these tests assume root.
    require(os.geteuid() == 0, "Docker engine unavailable: starting dockerd needs root")
    try:
        engine = start_dockerd()
    except (RuntimeError, OSError) as exc:
        require(False, f"dockerd failed to start: {exc}")
        raise  # unreachable: require() always raises here
    try:
        yield engine
    finally:
        engine.stop()


@dataclass
class Stack:
    """A running deployment: the server, plus Redis and RQ workers in two-tier mode."""

    mode: str
    cache_dir: Path
    env: dict[str, str]  # extra env given to every process (not REDIS_URL/CACHE_DIR)
    log_dir: Path
    server: ServerProcess
    redis: RedisProcess | None = None
    workers: list[WorkerProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    def worker_env(self) -> dict[str, str]:
        assert self.redis is not None, "workers exist only in two-tier mode"
        return {**self.env, "REDIS_URL": self.redis.url, "CACHE_DIR": str(self.cache_dir)}

    def server_env(self) -> dict[str, str]:
        env = {**self.env, "CACHE_DIR": str(self.cache_dir)}
        if self.redis is not None:
            env["REDIS_URL"] = self.redis.url
        return env

    def add_worker(self) -> WorkerProcess:
        """Start one more worker (two-tier only); it is stopped at teardown."""
        worker = _start_worker(self.worker_env(), self.log_dir, len(self.workers))
        self.workers.append(worker)
        return worker

    def restart_server(self) -> ServerProcess:
        """Stop the server and start a new one (new port) on the same cache and Redis."""
        self.server.stop()
        self.server = _start_server(self.server_env(), self.log_dir)
        return self.server

    def logs(self) -> str:
        """All log files of this stack, each under a header; handy in assert messages."""
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            parts.append(f"===== {path.name} =====\n{path.read_text(errors='replace')}")
        if self.redis is not None:
            parts.append(f"===== redis =====\n{self.redis.log_text()}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Workers first (they hold jobs), then the server, then Redis; never raises."""
        for worker in self.workers:
            _quietly(worker.stop)
        _quietly(self.server.stop)
        if self.redis is not None:
            _quietly(self.redis.stop)


def _start_worker(env: Mapping[str, str], log_dir: Path, index: int) -> WorkerProcess:
    # Never reuse a log file name: a restarted worker gets a fresh log.
    n = index
    while (log_dir / f"worker-{n}.log").exists():
        n += 1
    return WorkerProcess(env, log_dir / f"worker-{n}.log")


def _start_server(env: Mapping[str, str], log_dir: Path) -> ServerProcess:
    n = 0
    while (log_dir / f"server-{n}.log").exists():
        n += 1
    return ServerProcess(env, log_dir / f"server-{n}.log")


def _quietly(action: Callable[[], object]) -> None:
    try:
        action()
    except Exception:  # teardown must go on to stop the remaining parts
        pass


StackFactory = Callable[..., Stack]


def start_stack(mode: str, base: Path, cache_dir: Path, *, workers: int = 2,
                env: Mapping[str, str] | None = None) -> Stack:
    """A running deployment under ``base`` (logs, Redis data) on ``cache_dir``; stop() it when done."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    log_dir = base / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    extra = dict(env or {})

    # If a part fails to start, stop what this call already started before raising.
    partial: list[Callable[[], None]] = []
    try:
        redis_proc: RedisProcess | None = None
        worker_procs: list[WorkerProcess] = []
        if mode == "two-tier":
            redis_proc = start_redis(base / "redis")
            partial.append(redis_proc.stop)
            worker_env = {**extra, "REDIS_URL": redis_proc.url, "CACHE_DIR": str(cache_dir)}
            for i in range(workers):
                worker = _start_worker(worker_env, log_dir, i)
                partial.append(worker.stop)
                worker_procs.append(worker)

        server_env = {**extra, "CACHE_DIR": str(cache_dir)}
        if redis_proc is not None:
            server_env["REDIS_URL"] = redis_proc.url
        server = _start_server(server_env, log_dir)
    except BaseException:
        for stop in reversed(partial):  # workers, then redis
            _quietly(stop)
        raise
    return Stack(mode=mode, cache_dir=cache_dir, env=extra, log_dir=log_dir, server=server, redis=redis_proc,
                 workers=worker_procs)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[StackFactory]:
    """Factory: ``stack("embedded")`` or ``stack("two-tier", workers=2, env={...})``."""
    started: list[Stack] = []

    def make(
        mode: str,
        *,
        workers: int = 2,
        env: Mapping[str, str] | None = None,
        cache_dir: Path | None = None,
    ) -> Stack:
        # Several stacks in one test each get their own directory (and, unless
        # cache_dir is passed, their own cache: the first one uses tmp_path/"cache").
        base = Path(tempfile.mkdtemp(prefix=f"stack-{mode}-", dir=tmp_path))
        if cache_dir is None:
            cache_dir = tmp_path / "cache" if not started else base / "cache"
        result = start_stack(mode, base, cache_dir, workers=workers, env=env)
        started.append(result)
        return result

    try:
        yield make
    finally:
        for item in reversed(started):
            item.stop()


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    """Parametrizes a test over both deployment modes; pair it with ``stack(mode)``."""
    return request.param
