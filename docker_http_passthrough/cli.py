"""Command line: `serve`, `worker`, `worker-health`, and the operator helpers `url` and `prewarm`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from docker_http_passthrough.client_commands import CLIENT_COMMANDS, add_client_commands
from docker_http_passthrough.shared.settings import SettingsError, load_settings
from docker_http_passthrough.shared.telemetry import configure_logging
from docker_http_passthrough.worker.health import MAX_HEARTBEAT_AGE


def log_level(env: dict | os._Environ) -> int:
    """LOG_LEVEL, or RUST_LOG as deployments of the Rust tool set it ("info", "warn,hyper=info", "app=debug")."""
    raw = env.get("LOG_LEVEL") or env.get("RUST_LOG") or "info"
    first = raw.split(",")[0].rpartition("=")[2].strip().upper()
    first = {"WARN": "WARNING", "TRACE": "DEBUG"}.get(first, first)
    return getattr(logging, first, logging.INFO) if first in logging.getLevelNamesMapping() else logging.INFO


def build_parser() -> argparse.ArgumentParser:
    """The command line (also read by the tests that check container commands and Kubernetes manifests)."""
    parser = argparse.ArgumentParser(prog="docker-http-passthrough",
                                     description="Serve registry images as docker-save tar files over plain HTTP.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP API (embedded mode when REDIS_URL is not set)")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=os.environ.get("PORT") or 8080,
                       help="port to listen on (default: $PORT, else 8080)")
    serve.add_argument("--workers", type=int, default=None, metavar="N",
                       help="API processes, each serving downloads (default: API_WORKERS, else one per usable CPU)")
    serve.add_argument("--socket-fd", type=int, default=None, help=argparse.SUPPRESS)  # one of --workers' processes
    worker = commands.add_parser("worker", help="run a preparation worker (needs REDIS_URL)")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.add_argument("--name", default=None, help="worker name (default: RQ picks one)")
    worker.add_argument("--name-file", default=None, metavar="PATH",
                        help="write the worker's name here, for `worker-health --name-file`")
    health = commands.add_parser("worker-health", help="exit 0 when this host's worker is registered in RQ and "
                                 "beating (a container health check)")
    who = health.add_mutually_exclusive_group()
    who.add_argument("--name", default=None, help="the worker's name (default: any worker on this host)")
    who.add_argument("--name-file", default=None, metavar="PATH", help="read the worker's name from this file")
    health.add_argument("--max-age", type=float, default=MAX_HEARTBEAT_AGE, metavar="SECONDS",
                        help="oldest RQ heartbeat that counts as alive while idle (default: %(default)s)")
    add_client_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in CLIENT_COMMANDS:
        raise SystemExit(CLIENT_COMMANDS[args.command](args))

    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"docker-http-passthrough: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(log_level(os.environ), settings.log_json)

    if args.command == "serve":
        from docker_http_passthrough.api.server import run, serve_socket

        if args.socket_fd is not None:
            raise SystemExit(serve_socket(settings, args.socket_fd))
        if args.workers is not None and args.workers < 1:
            parser.error("--workers must be at least 1")
        raise SystemExit(run(settings, args.host, args.port, args.workers))
    elif args.command == "worker-health":
        from docker_http_passthrough.worker.health import health_check

        health_check(settings, name=args.name, name_file=args.name_file, max_age=args.max_age)
    else:
        from docker_http_passthrough.worker.main import run

        run(settings, burst=args.burst, name=args.name, name_file=args.name_file)


if __name__ == "__main__":
    main()
