"""Run a real CNCF distribution registry (Debian's ``docker-registry``) for tests.

The registry listens on a free loopback port, keeps its storage under a
caller-provided work directory and is stopped explicitly (fixtures do that).
With ``tls`` (a ``tests.support.tls.CertPair``) it serves HTTPS (distribution's
``http.tls``); with ``storage_dir`` it serves another registry's storage (push
over plain HTTP to one, read over TLS from the other); ``extra`` adds config
sections (e.g. ``{"proxy": {"remoteurl": ...}}`` for a pull-through mirror) and
``env`` environment variables (HTTPS_PROXY, SSL_CERT_FILE for its own requests).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.lifecycle import free_port, open_log, tail, terminate, wait_until
from tests.support.tls import CertPair

REGISTRY_BINARY = "/usr/bin/docker-registry"
STARTUP_TIMEOUT_SECONDS = 15.0


@dataclass
class RegistryProcess:
    """A running ``docker-registry serve`` subprocess."""

    process: subprocess.Popen[bytes]
    port: int
    workdir: Path
    config_path: Path
    log_path: Path
    tls: bool = False
    storage: Path | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    @property
    def storage_dir(self) -> Path:
        return self.storage or self.workdir / "storage"

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)

    def stop(self) -> None:
        """Terminate the registry (SIGTERM, then SIGKILL after 5 s). Idempotent."""
        terminate(self.process, grace=5)

    def __enter__(self) -> RegistryProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def registry_config(storage_dir: Path, port: int, auth: dict[str, Any] | None,
                    tls: CertPair | None = None) -> dict[str, Any]:
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
    if tls is not None:
        config["http"]["tls"] = {"certificate": str(tls.cert), "key": str(tls.key)}
    return config


def start_registry(
    workdir: Path,
    *,
    auth: dict[str, Any] | None = None,
    timeout: float = STARTUP_TIMEOUT_SECONDS,
    tls: CertPair | None = None,
    storage_dir: Path | None = None,
    extra: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
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
    storage = Path(storage_dir) if storage_dir is not None else workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    log_tail = ""
    for _attempt in range(3):  # free_port() is racy; retry a taken port
        registry = _spawn(workdir, auth, tls, storage, extra, env)
        if wait_until(lambda: _answers(registry), timeout, registry.process, interval=0.05):
            return registry
        registry.stop()
        log_tail = registry.log_tail()
        if "address already in use" not in log_tail:
            break
    raise RuntimeError(
        f"docker-registry did not answer GET /v2/ within {timeout} s (exit code {registry.process.returncode}); "
        f"log tail ({registry.log_path}):\n{log_tail}"
    )


def _spawn(workdir: Path, auth: dict[str, Any] | None, tls: CertPair | None, storage: Path,
           extra: dict[str, Any] | None, extra_env: dict[str, str] | None) -> RegistryProcess:
    port = free_port()
    config_path = workdir / "config.yml"
    # JSON is valid YAML, and saves us a YAML writer.
    config_path.write_text(json.dumps({**registry_config(storage, port, auth, tls), **(extra or {})}, indent=2))
    log_path = workdir / "registry.log"
    # REGISTRY_* variables override the config file in distribution; drop any
    # inherited ones so the config above is the whole truth.
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    env.update(extra_env or {})
    with open_log(log_path) as log:
        process = subprocess.Popen(
            [REGISTRY_BINARY, "serve", str(config_path)],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # lets stop() reach it as a session
        )
    return RegistryProcess(process, port, workdir, config_path, log_path, tls is not None, storage)


def _answers(registry: RegistryProcess) -> bool:
    # trust_env=False: never route loopback traffic through an HTTP(S)_PROXY.
    response = httpx.get(f"{registry.url}/v2/", timeout=2.0, trust_env=False, verify=False)
    return response.status_code in (200, 401)


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
