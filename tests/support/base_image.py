"""A local stand-in for the official slim Python image (no image can be pulled here), cached between runs.

Debian's debootstrap builds a minimal bookworm root with Python, venv and pip; it is made to look like the
official image where our Dockerfiles care (`python` and `pip` on PATH, no EXTERNALLY-MANAGED marker) and
carries this machine's CA bundle so a `--network host` build can reach the package index. The same root has
Debian's redis-server, so it also stands in for the Redis image in the compose test.

The root is built once and kept as a tar under ~/.cache/docker-http-passthrough-tests/, named by a hash of
the recipe below (change the recipe, get a new base); `docker import` of that tar takes seconds.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates", "redis-server")
# Trimmed from the root: documentation, apt's lists and caches (the image never runs apt).
TRIM = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "var/lib/apt/lists",
        "var/cache/apt", "var/log")
CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "docker-http-passthrough-tests"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def recipe_key() -> str:
    recipe = "\n".join([SUITE, *PACKAGES, *TRIM, "v1"])
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def base_tar() -> Path:
    """The cached root filesystem tar, built now if missing (about a minute and ~70 MB of downloads)."""
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    target = CACHE_ROOT / f"base-{SUITE}-{recipe_key()}.tar"
    with open(CACHE_ROOT / "base.lock", "w") as lock:  # two sessions building at once build it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            _build(target)
    return target


def _build(target: Path) -> None:
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    work = Path(tempfile.mkdtemp(prefix="dhp-base-", dir=CACHE_ROOT))
    root = work / "root"
    try:
        subprocess.run([debootstrap, "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(root)],
                       check=True, capture_output=True, timeout=900)
        for path in TRIM:
            shutil.rmtree(root / path, ignore_errors=True)
            (root / path).mkdir(parents=True, exist_ok=True)
        for marker in root.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
            marker.unlink()
        local_bin = root / "usr/local/bin"
        local_bin.mkdir(parents=True, exist_ok=True)
        for name, points_to in (("python", "/usr/bin/python3"), ("pip", "/usr/bin/pip3")):
            (local_bin / name).unlink(missing_ok=True)
            (local_bin / name).symlink_to(points_to)
        if HOST_CA_BUNDLE.exists():  # this machine's bundle: `--network host` builds trust what the host trusts
            shutil.copyfile(HOST_CA_BUNDLE, root / "etc/ssl/certs/ca-certificates.crt")
        partial = target.with_suffix(".partial")
        subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."], check=True,
                       capture_output=True, timeout=600)
        os.replace(partial, target)
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)


def import_base(engine, name: str) -> str:
    """`docker import` the cached root into ``engine`` as ``name`` (skipped when already there)."""
    if engine.run("image", "inspect", name, check=False, timeout=60).returncode == 0:
        return name
    engine.run("import", "--change", "CMD [\"python3\"]", str(base_tar()), name, timeout=600)
    return name
