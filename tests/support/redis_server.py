"""A throw-away redis-server for tests on a free loopback port, which can also be restarted with its data (a
Redis restart as clients see it). Re-exported by ``tests.support.services``."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis

from tests.support.lifecycle import find_binary, free_port, open_log, tail, terminate, wait_until


class RedisProcess:
    """A throw-away redis-server with persistence disabled (``restart`` saves once, to come back with its data)."""

    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path, workdir: Path | None = None) -> None:
        self.proc = proc
        self.port = port
        self.log_path = log_path
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{port}/0"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis.from_url(self.url, **kwargs)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        terminate(self.proc, grace=10)

    def restart(self, down_for: float) -> float:
        """Stop with a save (SHUTDOWN SAVE), stay down ``down_for`` seconds, start again on the same port with
        the same data: a Redis restart as clients see it. Returns the seconds Redis did not answer."""
        assert self.workdir is not None, "started by start_redis"
        probe = self.client(socket_timeout=5)
        try:
            probe.shutdown(save=True)
        except redis.ConnectionError:
            pass  # the server closes the connection as it exits
        finally:
            probe.close()
        self.proc.wait(10)
        gone_at = time.monotonic()
        time.sleep(down_for)
        proc, _port = _spawn_redis(self.workdir, self.port)
        if not _answers(RedisProcess(proc, self.port, self.log_path), 10):
            raise RuntimeError(f"redis-server did not come back on port {self.port}:\n{tail(self.log_path)}")
        self.proc = proc
        return time.monotonic() - gone_at

    def __repr__(self) -> str:
        return f"<RedisProcess {self.url} pid={self.pid}>"


def _spawn_redis(workdir: Path, port: int) -> tuple[subprocess.Popen, Path]:
    binary = find_binary("redis-server")
    if binary is None:
        raise RuntimeError("redis-server binary not found")
    log_path = workdir / f"redis-{port}.log"
    with open_log(log_path) as log:
        proc = subprocess.Popen(
            [
                binary,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--protected-mode", "no",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(workdir),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, log_path


def _answers(server: RedisProcess, timeout: float) -> bool:
    probe = server.client(socket_timeout=1)
    try:
        return wait_until(lambda: bool(probe.ping()), timeout, server.proc, interval=0.02)
    finally:
        probe.close()


def start_redis(workdir: Path, timeout: float = 10.0) -> RedisProcess:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    last_error = ""
    for _attempt in range(3):  # free_port() can race with another process
        port = free_port()
        proc, log_path = _spawn_redis(workdir, port)
        server = RedisProcess(proc, port, log_path, workdir)
        if _answers(server, timeout):
            return server
        server.stop()
        last_error = tail(log_path)
    raise RuntimeError(f"redis-server did not start:\n{last_error}")
