"""Waiting on behalf of a client only while it is there: a device that hangs up while its image is prepared
stops waiting at once, so nothing keeps the preparation alive for it (see `embedded_preparer`)."""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

from starlette.requests import Request

T = TypeVar("T")


class ClientLeft(Exception):
    """The client hung up before its answer was ready."""


async def _hung_up(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(request: Request, awaitable: Awaitable[T]) -> T:
    """`awaitable`'s result; if the client hangs up first, it is cancelled and ClientLeft raised."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_hung_up(request))
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        raise ClientLeft()
    return work.result()
