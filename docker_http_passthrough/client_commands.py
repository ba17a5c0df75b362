"""`docker-http-passthrough url` and `prewarm`: operator commands that talk to a server, never to a registry.

Both take image references as `docker pull` does and apply the same rules (`routes.build`) as the page at `/`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable
from urllib.parse import urlsplit

from docker_http_passthrough.routes import DESTINATIONS, RouteOptions, build, notes

DEFAULT_SERVER = "http://localhost:8080"


def server_url(value: str) -> str:
    """--server: http(s)://host[:port][/prefix]; never credentials, a query or a fragment (they end up in logs)."""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f'"{value}" is not a server URL like http://10.20.30.40:8080')
    if parts.username or parts.password:
        raise argparse.ArgumentTypeError("the server URL must not carry credentials")
    if parts.query or parts.fragment:
        raise argparse.ArgumentTypeError("the server URL must not have a query or a fragment")
    try:
        parts.port
    except ValueError:
        raise argparse.ArgumentTypeError(f'"{value}" has a bad port') from None
    return value.strip().rstrip("/")


def _route_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("references", nargs="+", metavar="REF",
                        help="image reference as for docker pull: nginx, ghcr.io/my-org/app:1.0, host:5000/team/api:2")
    parser.add_argument("--server", type=server_url, default=os.environ.get("DHP_SERVER") or DEFAULT_SERVER,
                        help=f"this service's address as the switches reach it (default: $DHP_SERVER or {DEFAULT_SERVER})")
    parser.add_argument("--registry-in-url", action="store_true",
                        help="name the registry in the URL (/registry/...) instead of the server's REGISTRY_URL")
    parser.add_argument("--insecure-registry", action="store_true",
                        help="reach a non-loopback registry over plain HTTP (loopback registries always are)")
    parser.add_argument("--platform", default=None,
                        help="os/arch[/variant] in the URL, e.g. linux/arm64 for IR1101/IR1800 "
                             "(default: the server's PLATFORM)")


def add_client_commands(commands: argparse._SubParsersAction) -> None:
    url = commands.add_parser("url", help="print the download URL and the IOS-XE commands for image references")
    _route_arguments(url)
    url.add_argument("--auth", action="store_true",
                     help="the switch sends registry credentials (ip http client username/password)")
    url.add_argument("--destination", choices=DESTINATIONS, default="flash:", help="where the switch stores the tar")
    url.add_argument("--json", action="store_true", help="one JSON object per reference, for scripts")

    prewarm = commands.add_parser("prewarm", help="prepare images on a server now and wait until they are ready")
    _route_arguments(prewarm)
    prewarm.add_argument("--user", default=None,
                         help="registry username to send; the password comes from $DHP_REGISTRY_PASSWORD or a prompt")
    prewarm.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for all images (default 3600)")
    prewarm.add_argument("--interval", type=float, default=0.5, help=argparse.SUPPRESS)


def route_options(args: argparse.Namespace, client_auth: bool) -> RouteOptions:
    return RouteOptions(server=args.server, registry_in_url=args.registry_in_url, client_auth=client_auth,
                        insecure_registry=args.insecure_registry,
                        destination=getattr(args, "destination", "flash:"), platform=args.platform)


def run_url(args: argparse.Namespace) -> int:
    options = route_options(args, args.auth)
    failed = 0
    for text in args.references:
        result = build(text, options)
        failed += result["problem"] is not None
        if args.json:
            print(json.dumps(result))
            continue
        if result["problem"]:
            print(f"docker-http-passthrough: {text}: {result['problem']['message']}", file=sys.stderr)
            continue
        print(result["url"])
        print()
        print(result["ios"])
        print()
        for note in notes(result, options):
            print(f"note: {note}", file=sys.stderr)
    return 1 if failed else 0


def run_prewarm(args: argparse.Namespace) -> int:
    from docker_http_passthrough.prewarm import prewarm_command

    return prewarm_command(args, route_options(args, client_auth=args.user is not None))


CLIENT_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"url": run_url, "prewarm": run_prewarm}
