"""Who owns a temporary or lease file on the shared volume.

Every process has a token (`process_token`): the RQ worker named by it beats a presence key in Redis (see
`presence`), and every temp file (`<final>.partial-<token>-<random>`) and lease file (`<hex>.<token>-<random>`)
it creates carries it. So a surviving worker can tell a file whose writer died (its token's presence expired)
from one a live writer on another host is still writing, and remove only the first kind, at once.
"""

from __future__ import annotations

import os
import secrets

TEMP_MARK = ".partial-"

_token: tuple[int, str] | None = None


def process_token() -> str:
    """This process's token: 16 hex digits, new in a forked child."""
    global _token
    if _token is None or _token[0] != os.getpid():
        _token = (os.getpid(), secrets.token_hex(8))
    return _token[1]


def owned_name(owner: str) -> str:
    """A unique name part for a file this owner creates: `<owner>-<random>`."""
    return f"{owner}-{secrets.token_hex(6)}"


def temp_name(final_name: str, owner: str) -> str:
    return f"{final_name}{TEMP_MARK}{owned_name(owner)}"


def temp_owned_by(name: str, owner: str) -> bool:
    """Is `name` a temp file of `owner`?"""
    return f"{TEMP_MARK}{owner}-" in name


def lease_owned_by(name: str, owner: str) -> bool:
    """Is `name` (`<hex>.<owner>-<random>`) a lease of `owner`?"""
    return name.partition(".")[2].startswith(f"{owner}-")
