"""Start and stop what tests run on this machine: threaded HTTP servers on a free loopback port, and child processes.

Every server or process the test support starts goes through here, so "bind a free loopback port", "wait until it
answers" and "stop it, also when it hangs" are written once:

- ``ThreadedServer``: an ``http.server`` handler served from a daemon thread on 127.0.0.1:<port the kernel picked>
  (or another loopback address; HTTPS with a context), with ``start()``/``stop()`` (idempotent) and ``url``; the
  proxies, the token server and the rogue registry use it.
- ``free_port``, ``wait_until``, ``terminate``, ``tail``: for child processes (redis-server, docker-registry,
  dockerd, the project's server and workers), which are started in a session of their own so that ``terminate``
  reaches everything they fork.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any, Self

# Environment variables worth passing to child processes. Everything else (REDIS_URL, CACHE_DIR, DOCKER_HOST,
# proxies, ...) is dropped so that a developer's shell cannot silently change what a test exercises.
_INHERITED_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "VIRTUAL_ENV",
                  "PYTHONPATH", "SSL_CERT_FILE", "SSL_CERT_DIR")
_INHERITED_ENV_PREFIXES = ("LC_", "COVERAGE_")


# --------------------------------------------------------------------------- threaded HTTP servers


class LoopbackHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that takes a fleet's connections and can drop its keep-alive connections on stop."""

    daemon_threads = True
    # A fleet connects at once: the default listen backlog of 5 would drop SYNs and stall clients for seconds.
    request_queue_size = 1024
    block_on_close = False  # idle keep-alive connections must not block stop()

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        with self._connections_lock:
            self._connections.add(sock)
        return sock, address

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_all_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-stream is normal in tests; only report real bugs.
        if isinstance(sys.exc_info()[1], OSError):  # resets, broken pipes, timeouts
            return
        traceback.print_exc()


class ThreadedServer:
    """``handler`` served on 127.0.0.1:<free port> from a daemon thread.

    ``attributes`` are set on the server object before it serves, so a handler reaches its owner as
    ``self.server.<name>``; a test server subclasses this and passes itself (``super().__init__(_ProxyHandler,
    "CountingProxy", proxy=self)``). Binding port 0 lets the kernel pick the port, so there is no race with other
    processes.
    """

    def __init__(self, handler: type[BaseHTTPRequestHandler], name: str = "test-server", *, bind: str = "127.0.0.1",
                 tls: ssl.SSLContext | None = None, **attributes: Any) -> None:
        self.handler = handler
        self.name = name
        self.bind = bind  # any loopback address (127.0.0.2 is another "host" on this machine)
        self.tls = tls  # serve HTTPS with this server-side context
        self.attributes = attributes
        self._server: LoopbackHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        if self._server is not None:
            return self
        server = LoopbackHTTPServer((self.bind, 0), self.handler)
        if self.tls is not None:
            # The handshake happens in the handler's thread, on its first read: a slow client blocks no one else.
            server.socket = self.tls.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        for key, value in self.attributes.items():
            setattr(server, key, value)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"{self.name}:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, cut open keep-alive connections and release the port; safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_all_connections()  # don't leave keep-alive handler threads behind
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError(f"{self.name} is not started")
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        return f"{self.bind}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- ports, binaries, environment


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now. It is released before returning, so another process could take
    it in between: starters of child processes retry on "address already in use"."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Could a server listen on 127.0.0.1:port now? (TIME_WAIT leftovers don't count.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def find_binary(name: str) -> str | None:
    """``name`` on PATH, or in the sbin/bin dirs a non-login PATH may lack (dockerd)."""
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A minimal copy of os.environ with ``env`` merged over it."""
    base = {key: value for key, value in os.environ.items()
            if key in _INHERITED_ENV or key.startswith(_INHERITED_ENV_PREFIXES)}
    base.update(env or {})
    base["PYTHONUNBUFFERED"] = "1"  # logs must reach the log file even when the process is SIGKILLed
    return base


# --------------------------------------------------------------------------- child processes


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        return f"<no log at {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def open_log(path: Path) -> IO[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "ab")


def exited(proc: subprocess.Popen) -> bool:
    """Has the process exited? Does not reap it.

    Leaving the exited leader as a zombie keeps its pid (= the process group id) reserved, so a later killpg()
    cannot hit an unrelated process group.
    """
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def wait_until(predicate: Callable[[], bool], timeout: float, proc: subprocess.Popen | None = None,
               interval: float = 0.1) -> bool:
    """Poll a readiness probe until it is true; give up early if ``proc`` has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except Exception:  # not up yet: connection refused, LOADING, ...
            pass
        if proc is not None and exited(proc):
            return False
        time.sleep(interval)
    return False


def terminate(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the process group, wait ``grace`` s for the leader, then SIGKILL the session.

    The final SIGKILL also reaches children that outlive a clean exit of the leader. It targets the whole
    session, not just the group, because an RQ work horse moves itself into a process group of its own
    (os.setpgrp) but stays in the session. Children are started with start_new_session=True, so the session
    holds nothing but processes we started.
    """
    if proc.returncode is not None:
        return  # already stopped and reaped
    _killpg(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while not exited(proc) and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_session(proc, signal.SIGKILL)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


def _killpg(proc: subprocess.Popen, sig: signal.Signals) -> None:
    if proc.returncode is not None:
        return  # reaped: its pgid may no longer be ours
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_session(proc: subprocess.Popen, sig: signal.Signals) -> None:
    """Signal every process in the session led by ``proc`` (which must be unreaped)."""
    if proc.returncode is not None:
        return  # reaped: its session id may no longer be ours
    _killpg(proc, sig)
    for pid, info in process_table().items():
        if info.sid == proc.pid and pid != os.getpid():
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


@dataclass(frozen=True)
class ProcInfo:
    ppid: int
    sid: int
    cmdline: str


def process_table() -> dict[int, ProcInfo]:
    """pid -> parent, session and command line, read from /proc."""
    table: dict[int, ProcInfo] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue  # exited meanwhile
        fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": state ppid pgrp session ...
        table[int(entry.name)] = ProcInfo(ppid=int(fields[1]), sid=int(fields[3]),
                                          cmdline=cmdline.decode(errors="replace"))
    return table
