"""The references every figure stands beside, run on the same machine in the same run: nginx serving the very same
archive with sendfile and one worker process per core (warm), and skopeo copying the same image into a
docker-archive (cold)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

from bench.report import NGINX
from tests.support.lifecycle import free_port, terminate, wait_until

# worker_processes auto: one per core, as a production nginx runs. Connections and descriptors for the
# thousand-client phase and then some.
NGINX_CONFIG = """{user}worker_processes auto;
worker_rlimit_nofile 65536;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {root};
        location / {{ }}
    }}
}}
"""


class Nginx:
    """nginx with a generated minimal config (sendfile on, worker_processes auto) serving ``root`` on a free
    loopback port."""

    def __init__(self, workdir: Path, root: Path) -> None:
        self.prefix = workdir / "nginx"
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        for _attempt in range(3):  # free_port() can race with another process
            self.port = free_port()
            user = "user root root;\n" if os.geteuid() == 0 else ""
            config = self.prefix / "nginx.conf"
            config.write_text(NGINX_CONFIG.format(user=user, prefix=self.prefix, port=self.port, root=root))
            with open(self.prefix / "stdout.log", "ab") as log:
                self.proc = subprocess.Popen([NGINX, "-p", str(self.prefix), "-e", str(self.prefix / "error.log"),
                                              "-c", str(config), "-g", "daemon off;"],
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)
            if wait_until(self._answers, 10, self.proc, interval=0.05):
                return
            self.stop()
        raise RuntimeError(f"nginx did not start: {(self.prefix / 'error.log').read_text(errors='replace')[-2000:]}")

    def _answers(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), 0.5):
            return True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The master; its workers are its children."""
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc, grace=10)


class Skopeo:
    """``skopeo copy docker://… docker-archive:…`` from a plain-http registry, anonymously, accepting any image."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.policy = workdir / "policy.json"
        self.policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        (workdir / "home").mkdir(exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("REGISTRY_", "DOCKER_"))}
        self.env.update(TMPDIR=str(workdir), HOME=str(workdir / "home"))

    def copy(self, registry_url: str, reference: str, out: Path) -> float:
        """Seconds ``skopeo copy`` took for ``reference`` (``repository:tag``) into ``out``."""
        host = registry_url.removeprefix("http://")
        started = time.monotonic()
        done = subprocess.run(["skopeo", "--policy", str(self.policy), "copy", "--src-tls-verify=false",
                               "--src-no-creds", f"docker://{host}/{reference}", f"docker-archive:{out}"],
                              capture_output=True, text=True, env=self.env, timeout=900, check=False)
        elapsed = time.monotonic() - started
        if done.returncode != 0:
            raise RuntimeError(f"skopeo copy failed: {done.stderr[-2000:]}")
        return elapsed
