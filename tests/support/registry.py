"""Run a real CNCF distribution registry (Debian's ``docker-registry``) for tests.

The registry listens on a free loopback port, keeps its storage under a
caller-provided work directory and is stopped explicitly (fixtures do that).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REGISTRY_BINARY = "/usr/bin/docker-registry"
STARTUP_TIMEOUT_SECONDS = 15.0


def free_port() -> int:
    """Return a currently free TCP port on 127.0.0.1.

    The port is released before returning, so another process could grab it
    in between; ``start_registry`` retries on "address already in use".
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RegistryProcess:
    """A running ``docker-registry serve`` subprocess."""

    process: subprocess.Popen[bytes]
    port: int
    workdir: Path
    config_path: Path
    log_path: Path
    _log_file: Any = field(repr=False, default=None)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def storage_dir(self) -> Path:
        return self.workdir / "storage"

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def stop(self) -> None:
        """Terminate the registry (SIGTERM, then SIGKILL after 5 s). Idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> RegistryProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def registry_config(storage_dir: Path, port: int, auth: dict[str, Any] | None) -> dict[str, Any]:
    """The distribution configuration used by ``start_registry``."""
    config: dict[str, Any] = {
        "version": "0.1",
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage_dir)},
            "delete": {"enabled": True},
        },
        # An explicit secret silences distribution's startup warning about it.
        "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16)},
    }
    if auth is not None:
        config["auth"] = auth  # verbatim: htpasswd / token / silly
    return config


def start_registry(
    workdir: Path,
    *,
    auth: dict[str, Any] | None = None,
    timeout: float = STARTUP_TIMEOUT_SECONDS,
) -> RegistryProcess:
    """Start a registry storing data under ``workdir`` and wait until it answers.

    ``auth`` is copied verbatim into the config's ``auth`` section.
    Raises ``RuntimeError`` (with the registry's log tail) if it does not come up.
    """
    if not os.access(REGISTRY_BINARY, os.X_OK):
        raise RuntimeError(
            f"{REGISTRY_BINARY} not found; install Debian's docker-registry package"
        )
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    last_error: RuntimeError | None = None
    for _attempt in range(3):  # free_port() is racy; retry a taken port
        try:
            return _start_once(workdir, auth, timeout)
        except _PortTaken as exc:
            last_error = RuntimeError(str(exc))
    assert last_error is not None
    raise last_error


class _PortTaken(RuntimeError):
    pass


def _start_once(workdir: Path, auth: dict[str, Any] | None, timeout: float) -> RegistryProcess:
    port = free_port()
    storage_dir = workdir / "storage"
    storage_dir.mkdir(exist_ok=True)
    config_path = workdir / "config.yml"
    # JSON is valid YAML, and saves us a YAML writer.
    config_path.write_text(json.dumps(registry_config(storage_dir, port, auth), indent=2))
    log_path = workdir / "registry.log"

    # REGISTRY_* variables override the config file in distribution; drop any
    # inherited ones so the config above is the whole truth.
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    log_file = open(log_path, "ab")
    process = subprocess.Popen(
        [REGISTRY_BINARY, "serve", str(config_path)],
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
    )
    registry = RegistryProcess(process, port, workdir, config_path, log_path, log_file)
    try:
        _wait_until_ready(registry, timeout)
    except BaseException:
        registry.stop()
        raise
    return registry


def _wait_until_ready(registry: RegistryProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last_problem = "no answer yet"
    # trust_env=False: never route loopback traffic through an HTTP(S)_PROXY.
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if registry.process.poll() is not None:
                tail = registry.log_tail()
                if "address already in use" in tail:
                    raise _PortTaken(f"port {registry.port} was taken:\n{tail}")
                raise RuntimeError(
                    f"docker-registry exited with code {registry.process.returncode} "
                    f"during startup; log tail ({registry.log_path}):\n{tail}"
                )
            try:
                response = client.get(f"{registry.url}/v2/")
                if response.status_code in (200, 401):
                    return
                last_problem = f"GET /v2/ answered {response.status_code}"
            except httpx.TransportError as exc:
                last_problem = repr(exc)
            time.sleep(0.05)
    raise RuntimeError(
        f"docker-registry did not answer GET /v2/ on {registry.url} within {timeout} s "
        f"({last_problem}); log tail ({registry.log_path}):\n{registry.log_tail()}"
    )


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])



def htpasswd_auth(
    workdir: Path, users: dict[str, str], *, realm: str = "test-registry"
) -> dict[str, Any]:
    """Write a bcrypt htpasswd file under ``workdir``; return the config ``auth`` section.

    Uses Apache's ``htpasswd`` (apache2-utils), since distribution only accepts bcrypt.
    """
    htpasswd = "/usr/bin/htpasswd"
    if not os.access(htpasswd, os.X_OK):
        raise RuntimeError(f"{htpasswd} not found; install Debian's apache2-utils package")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lines = []
    for user, password in users.items():
        # -B bcrypt, -b password from argv, -n print instead of writing a file;
        # cost 4 (the minimum) keeps test startup fast.
        result = subprocess.run(
            [htpasswd, "-nbB", "-C", "4", user, password],
            check=True,
            capture_output=True,
            text=True,
        )
        lines.append(result.stdout.strip())
    path = workdir / "htpasswd"
    path.write_text("\n".join(lines) + "\n")
    return {"htpasswd": {"realm": realm, "path": str(path)}}
