"""Content digests (`sha256:<hex>`) and the hashes that name things, each written once."""

from __future__ import annotations

import hashlib

PREFIX = "sha256:"
_HEX_DIGITS = frozenset("0123456789abcdef")


def digest_of(hasher: "hashlib._Hash") -> str:
    """The digest of what a running sha256 hasher has seen."""
    return PREFIX + hasher.hexdigest()


def sha256_digest(data: bytes) -> str:
    return digest_of(hashlib.sha256(data))


def digest_hex(digest: str) -> str:
    """The hex part of a sha256 digest; ValueError for anything else (it becomes a file name)."""
    algorithm, _, value = digest.partition(":")
    if algorithm != "sha256" or len(value) != 64 or not set(value) <= _HEX_DIGITS:
        raise ValueError(f"unsupported digest {digest!r}")
    return value


def name_hash(*parts: str) -> str:
    """A name for a tuple of strings (file names, job keys) that reveals none of them."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()
