"""`docker-http-passthrough prewarm`: prepare images on a server before a change window, and wait for them.

Per image: POST the download URL (the server starts one preparation, or says it is prepared), follow
`/status/<job>` (layers and bytes), then HEAD the URL for the exact size and ETag a switch will get. One progress
bar per image on a terminal, a plain line per change otherwise; a summary table at the end. Exit 0 only when
every image is ready.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

import httpx

from docker_http_passthrough.routes import RouteOptions, build, image_line

PASSWORD_ENV = "DHP_REGISTRY_PASSWORD"
BAR_WIDTH = 24

# Error codes of the server (shared/errors.py and the routes) in the words an operator needs.
PLAIN_CAUSES = {
    "not_found": "the registry has no such repository, tag or platform",
    "registry_unauthorized": "the registry wants credentials for this image",
    "credentials_required": "this route needs registry credentials",
    "registry_forbidden": "the registry refused the credentials",
    "registry_unreachable": "the server could not reach the registry",
    "timeout": "it took too long",
    "invalid_content": "the registry sent content that does not verify",
    "unsupported": "the image uses a format the server cannot turn into a docker-save archive",
    "unavailable": "the server cannot prepare images right now",
    "platform_not_found": "the image has no such platform",
    "foreign_layer": "the image has a foreign layer the server may not or cannot fetch",
    "rate_limited": "the registry's pull limit is used up",
}


@dataclass
class Warmup:
    reference: str
    image: str = ""
    url: str | None = None
    state: str = "starting"  # starting, queued, running, done, failed
    progress: dict = field(default_factory=dict)
    size: int | None = None
    etag: str | None = None
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def fail(self, cause: str) -> None:
        self.state, self.error, self.ended = "failed", cause, time.monotonic()


class Failed(Exception):
    """One image's failure, in plain words."""


def explain(response: httpx.Response, has_credentials: bool) -> str:
    try:
        body = response.json()
    except ValueError:
        body = {}
    return cause_in_words(body if isinstance(body, dict) else {}, response.status_code, has_credentials)


def cause_in_words(error: dict, status: int, has_credentials: bool) -> str:
    code = str(error.get("error", ""))
    if status == 401 and not has_credentials:
        return (f"the registry wants credentials for this image: pass --user NAME (the password comes from "
                f"${PASSWORD_ENV} or a prompt)")
    cause = PLAIN_CAUSES.get(code) or ("the filename breaks a rule" if code.startswith("bad_filename") else
                                       "the reference breaks a rule" if code.startswith("bad_reference") else "")
    detail = error.get("message") or f"the server answered HTTP {status}"
    return f"{cause} ({detail})" if cause else str(detail)


async def warm(client: httpx.AsyncClient, item: Warmup, auth: httpx.BasicAuth | None, interval: float,
               deadline: float, changed) -> None:
    """Start the preparation, follow it, then ask the exact size and ETag. Sets item.state to done or failed."""
    try:
        started = await client.post(item.url, auth=auth)
        if started.status_code not in (200, 202):
            raise Failed(explain(started, auth is not None))
        status = started.json()
        status_url = status.get("status_url")
        while status.get("state") not in ("done", "failed"):
            item.state = status.get("state", "queued")
            item.progress = {k: v for k, v in status.items() if k.startswith(("layers_", "bytes_"))}
            if status.get("problem"):
                item.progress["problem"] = status["problem"]
            changed(item)
            if time.monotonic() > deadline:
                raise Failed("still preparing when --timeout ran out; the server goes on, run prewarm again to watch")
            await asyncio.sleep(interval)
            polled = await client.get(status_url)
            if polled.status_code != 200:
                raise Failed(explain(polled, auth is not None))
            status = polled.json()
        if status["state"] == "failed":
            raise Failed(cause_in_words(status.get("error") or {}, 502, auth is not None))
        head = await client.head(item.url, auth=auth)
        if head.status_code != 200:
            raise Failed(explain(head, auth is not None))
        item.size, item.etag = int(head.headers["content-length"]), head.headers.get("etag")
        item.state, item.ended = "done", time.monotonic()
    except Failed as exc:
        item.fail(str(exc))
    except httpx.HTTPError as exc:
        item.fail(f"the server did not answer ({type(exc).__name__}: {exc})")
    changed(item)


def progress_line(item: Warmup) -> str:
    p = item.progress
    if item.state == "done":
        return f"{_bar(1.0)} ready, {item.size:,} bytes"
    if item.state == "failed":
        return f"{_bar(0.0)} failed: {item.error}"
    if item.state == "queued":
        return f"{_bar(0.0)} waiting for a worker" + (f": {p['problem']}" if p.get("problem") else "")
    parts = []
    if p.get("layers_total"):
        parts.append(f"{p.get('layers_done', 0)}/{p['layers_total']} layers")
    if p.get("bytes_total"):
        parts.append(f"{_mb(p.get('bytes_done', 0))} of {_mb(p['bytes_total'])}")
    total, done = (p.get("bytes_total"), p.get("bytes_done", 0)) if p.get("bytes_total") else (
        p.get("layers_total"), p.get("layers_done", 0))
    return f"{_bar(done / total if total else 0.0)} {item.state}" + (": " + ", ".join(parts) if parts else "")


def _bar(fraction: float) -> str:
    filled = int(round(BAR_WIDTH * min(max(fraction, 0.0), 1.0)))
    return "[" + "#" * filled + "-" * (BAR_WIDTH - filled) + "]"


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


class Display:
    """Bars redrawn in place on a terminal; elsewhere one plain line per change."""

    def __init__(self, items: list[Warmup], out: TextIO):
        self.items, self.out = items, out
        self.tty = out.isatty()
        self.width = max((len(item.image or item.reference) for item in items), default=0)
        self.last: dict[int, str] = {}
        self.drawn = False

    def start(self) -> None:
        if self.tty:
            self.redraw()
        for item in self.items:
            if item.state == "failed" and not self.tty:
                self.changed(item)

    def changed(self, item: Warmup) -> None:
        if self.tty:
            self.redraw()
            return
        line = progress_line(item)
        if self.last.get(id(item)) != line:
            self.last[id(item)] = line
            print(f"{item.image or item.reference}: {line}", file=self.out, flush=True)

    def redraw(self) -> None:
        if self.drawn:
            self.out.write(f"\x1b[{len(self.items)}F")
        columns = shutil.get_terminal_size().columns - 1  # a wrapped line would break the redraw
        for item in self.items:
            line = f"{(item.image or item.reference).ljust(self.width)}  {progress_line(item)}"
            self.out.write(f"\x1b[2K{line[:columns]}\n")
        self.out.flush()
        self.drawn = True


def summary(items: list[Warmup]) -> str:
    rows = [("IMAGE", "RESULT", "SIZE (bytes)", "ETAG", "TIME")]
    for item in items:
        rows.append((item.image or item.reference, "ready" if item.state == "done" else "FAILED",
                     f"{item.size:,}" if item.size is not None else "-", item.etag or "-", f"{item.seconds:.1f} s"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines += [f"{item.image or item.reference}: {item.error}" for item in items if item.state == "failed"]
    return "\n".join(lines)


def _credentials(user: str | None) -> httpx.BasicAuth | None:
    if user is None:
        return None
    password = os.environ.get(PASSWORD_ENV)
    if password is None:
        if not sys.stdin.isatty():
            raise SystemExit(f"docker-http-passthrough: --user needs the password in ${PASSWORD_ENV} (no terminal "
                             "to ask on)")
        password = getpass.getpass(f"registry password for {user}: ")
    return httpx.BasicAuth(user, password)


async def _warm_all(items: list[Warmup], server: str, auth, interval: float, timeout: float, display) -> None:
    deadline = time.monotonic() + timeout
    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(base_url=server, timeout=httpx.Timeout(60, connect=10), limits=limits,
                                 trust_env=False) as client:
        await asyncio.gather(*(warm(client, item, auth, interval, deadline, display.changed)
                               for item in items if item.state != "failed"))


def prewarm_command(args: argparse.Namespace, options: RouteOptions) -> int:
    items = []
    for text in args.references:
        result = build(text, options)
        item = Warmup(text, image=image_line(result) + (f" ({result['platform']})" if result["platform"] else "")
                      if result["registry"] else text, url=result["url"])
        if result["problem"]:
            item.fail(result["problem"]["message"])
        items.append(item)
    auth = _credentials(args.user)
    display = Display(items, sys.stdout)
    display.start()
    asyncio.run(_warm_all(items, args.server, auth, args.interval, args.timeout, display))
    print(file=sys.stdout)
    print(summary(items), flush=True)
    return 0 if all(item.state == "done" for item in items) else 1
