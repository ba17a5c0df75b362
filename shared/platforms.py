"""Platforms (`os/architecture[/variant]`): read from a request path or a setting, matched against what an image
offers, spelled the way registries spell them.

Names are normalised as containerd and Docker do, so what an engineer types (`linux/aarch64`, `linux/x86_64`,
`linux/arm64/v8`) finds the entry a registry lists (`linux/arm64`, `linux/amd64`, `linux/arm64` with or
without `v8`): architecture aliases are folded, and a variant that is the architecture's default (`v8` for
arm64, `v1` for amd64, `v7` for arm) counts as no variant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# One path segment each: lowercase letters, digits, "_", ".", "-" (os: linux, windows; arch: amd64, ppc64le,
# riscv64, 386; variant: v7, v8). Bounded, so nothing odd reaches logs or file names.
_PART_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")

_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "i386": "386", "i686": "386",
                 "armhf": "arm", "armel": "arm"}
# The variant an alias implies (armhf is ARMv7 hard-float, armel ARMv6 soft-float).
_ALIAS_VARIANTS = {"armhf": "v7", "armel": "v6"}
# Variants that mean the same as none.
_DEFAULT_VARIANTS = {"amd64": "v1", "arm64": "v8", "arm": "v7"}


class PlatformError(ValueError):
    """A platform that is not `os/architecture[/variant]` in the characters platforms use."""


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""  # "" = the architecture's default

    def __str__(self) -> str:
        return "/".join(part for part in (self.os, self.architecture, self.variant) if part)

    @property
    def path_prefix(self) -> str:
        """The path segment that asks a download route for this platform: `/platform/linux/arm64`."""
        return "/platform/" + str(self)


def normalized(os_name: str, architecture: str, variant: str = "") -> Platform:
    """The platform as registries and containerd compare it (aliases folded, default variants dropped)."""
    os_name, architecture, variant = os_name.lower(), architecture.lower(), variant.lower()
    if not variant:
        variant = _ALIAS_VARIANTS.get(architecture, "")
    architecture = _ARCH_ALIASES.get(architecture, architecture)
    if variant and variant[0].isdigit():
        variant = "v" + variant  # "8" → "v8", as containerd accepts
    if variant.removesuffix(".0") == _DEFAULT_VARIANTS.get(architecture):
        variant = ""
    return Platform(os_name, architecture, variant)


def parse_platform(text: str) -> Platform:
    """`linux/arm64`, `linux/arm/v7`, `Linux/AArch64`… → Platform; PlatformError when it is not one."""
    parts = text.strip().split("/")
    if not 2 <= len(parts) <= 3:
        raise PlatformError(f'platform "{text}" must be os/architecture or os/architecture/variant, '
                            'like "linux/arm64" or "linux/arm/v7"')
    for part in parts:
        if not _PART_RE.fullmatch(part.lower()):
            raise PlatformError(f'platform "{text}" has a part "{part}" that is not a platform name (letters, '
                                'digits, ".", "_", "-")')
    return normalized(*parts)


EXACT, LOOSE, NONE = 2, 1, 0


def fit(have: Platform | None, wanted: Platform) -> int:
    """EXACT: the same platform; LOOSE: `wanted` names no variant and `have` has its os and architecture
    (linux/arm takes arm/v6 when no arm/v7 is offered); NONE otherwise."""
    if have == wanted:
        return EXACT
    if have is not None and not wanted.variant and (have.os, have.architecture) == (wanted.os, wanted.architecture):
        return LOOSE
    return NONE


def offered(entry: object) -> Platform | None:
    """The platform an index entry's `platform` object (or an image config) names; None when it names none."""
    if not isinstance(entry, dict):
        return None
    os_name, architecture = entry.get("os"), entry.get("architecture")
    if not isinstance(os_name, str) or not isinstance(architecture, str) or not os_name or not architecture:
        return None
    variant = entry.get("variant")
    return normalized(os_name, architecture, variant if isinstance(variant, str) else "")


def spelled(entry: dict) -> str:
    """How the registry itself spells an entry's platform (for messages: what the user will see elsewhere)."""
    return "/".join(str(entry[k]) for k in ("os", "architecture", "variant") if entry.get(k))
