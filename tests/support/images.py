"""Build test images in memory: deterministic layers, configs, media types and the ``sha()`` digest helper.

No docker involved: layers are deterministic tarballs built with ``tarfile`` and configs are JSON we write
ourselves. ``tests.support.pushing`` puts them into a registry.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Mapping, Sequence, Union

import httpx

try:  # the stdlib's from Python 3.14 on, the same API as the backport the package depends on before
    from compression import zstd
except ImportError:  # pragma: no cover
    from backports import zstd

Flavour = Literal["docker", "oci"]
Compression = Literal["gzip", "zstd", "none"]
# (user, password) or any httpx auth object (e.g. a token-auth flow).
Auth = Union[httpx.Auth, tuple[str, str], None]
# File spec: bytes (0o644 file), ("exec", bytes), ("symlink", target), ("dir",)
FileSpec = Union[bytes, tuple[Any, ...]]

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"  # OCI only: Docker's media types have no zstd

# Send this on manifest GET/HEAD: without it distribution 2.8 down-converts to schema1.
MANIFEST_ACCEPT = ", ".join([DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX])

CREATED = "2026-01-01T00:00:00Z"
DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
HOST_BUSYBOX = Path("/bin/busybox")


def sha(data: bytes) -> str:
    """The ``sha256:<hex>`` digest of ``data``: the one digest helper of the test suite."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canonical_json(document: Any) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


# -- layers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    tar: bytes  # uncompressed tar
    blob: bytes  # bytes as pushed (compressed or not)
    diff_id: str  # sha256 of tar
    digest: str  # sha256 of blob
    compression: Compression = "gzip"
    # Forces the descriptor media type (e.g. to test odd ones); otherwise it is
    # chosen at push time from the flavour and compression, see media_type_for().
    media_type_override: str | None = None

    @property
    def size(self) -> int:
        return len(self.blob)

    @property
    def media_type(self) -> str:
        """Media type as pushed in a Docker-flavoured manifest."""
        return self.media_type_for("docker")

    def media_type_for(self, flavour: Flavour) -> str:
        if self.media_type_override is not None:
            return self.media_type_override
        if self.compression == "zstd":
            return OCI_LAYER_ZSTD
        if flavour == "docker":
            return DOCKER_LAYER_GZIP if self.compression == "gzip" else DOCKER_LAYER_TAR
        return OCI_LAYER_GZIP if self.compression == "gzip" else OCI_LAYER_TAR


def make_layer(
    files: Mapping[str, FileSpec],
    *,
    compression: Compression = "gzip",
    media_type: str | None = None,
) -> Layer:
    """Build a deterministic layer (mtime 0, uid/gid 0, sorted, parents added).

    Values: ``bytes`` for a 0o644 file, ``("exec", bytes)`` for 0o755,
    ``("symlink", target)``, or ``("dir",)``.
    """
    entries: dict[str, FileSpec] = {}
    for raw_path, spec in files.items():
        path = PurePosixPath(raw_path.lstrip("/"))
        if not path.parts or ".." in path.parts:
            raise ValueError(f"bad layer path {raw_path!r}")
        for parent in list(path.parents)[:-1]:  # skip "."
            entries.setdefault(str(parent), ("dir",))
        entries[str(path)] = spec

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name in sorted(entries):
            info, content = _tar_entry(name, entries[name])
            archive.addfile(info, io.BytesIO(content) if content is not None else None)
    tar = buffer.getvalue()

    if compression == "gzip":
        blob = gzip.compress(tar, compresslevel=6, mtime=0)  # mtime=0: deterministic
    elif compression == "zstd":
        # Two frames, as a chunking writer leaves them: readers must go on after the first.
        half = len(tar) // 2
        blob = zstd.compress(tar[:half]) + zstd.compress(tar[half:])
    elif compression == "none":
        blob = tar
    else:
        raise ValueError(f"unknown compression {compression!r}")
    return Layer(
        tar=tar,
        blob=blob,
        diff_id=sha(tar),
        digest=sha(blob),
        compression=compression,
        media_type_override=media_type,
    )


def _tar_entry(name: str, spec: FileSpec) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    content: bytes | None = None
    if isinstance(spec, (bytes, bytearray)):
        info.mode, content = 0o644, bytes(spec)
    elif spec and spec[0] == "exec":
        info.mode, content = 0o755, bytes(spec[1])
    elif spec and spec[0] == "symlink":
        info.type, info.mode, info.linkname = tarfile.SYMTYPE, 0o777, str(spec[1])
    elif spec and spec[0] == "dir":
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    else:
        raise ValueError(f"bad file spec for {name!r}: {spec!r}")
    if content is not None:
        info.size = len(content)
    return info, content


@functools.lru_cache(maxsize=2)  # ~1 MiB of compression work; every test wants the same one
def busybox_layer(compression: Compression = "gzip") -> Layer:
    """A runnable layer: static /bin/busybox plus sh/echo/cat symlinks and /etc/passwd."""
    if not HOST_BUSYBOX.is_file():
        raise RuntimeError(
            f"{HOST_BUSYBOX} is missing; install Debian's busybox-static package"
        )
    binary = HOST_BUSYBOX.read_bytes()
    if _elf_has_interpreter(binary):
        raise RuntimeError(
            f"{HOST_BUSYBOX} is dynamically linked and would not run in a scratch "
            "image; install Debian's busybox-static package"
        )
    return make_layer(
        {
            "bin/busybox": ("exec", binary),
            "bin/sh": ("symlink", "busybox"),
            "bin/echo": ("symlink", "busybox"),
            "bin/cat": ("symlink", "busybox"),
            "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
            "etc/group": b"root:x:0:\n",
        },
        compression=compression,
    )


def _elf_has_interpreter(binary: bytes) -> bool:
    """True if the ELF file has a PT_INTERP header, i.e. is dynamically linked."""
    if binary[:4] != b"\x7fELF":
        raise RuntimeError(f"{HOST_BUSYBOX} is not an ELF binary")
    is_64 = binary[4] == 2
    endian = "<" if binary[5] == 1 else ">"
    if is_64:
        phoff, = struct.unpack_from(endian + "Q", binary, 0x20)
        phentsize, phnum = struct.unpack_from(endian + "HH", binary, 0x36)
    else:
        phoff, = struct.unpack_from(endian + "I", binary, 0x1C)
        phentsize, phnum = struct.unpack_from(endian + "HH", binary, 0x2A)
    pt_interp = 3
    return any(
        struct.unpack_from(endian + "I", binary, phoff + i * phentsize)[0] == pt_interp
        for i in range(phnum)
    )


# -- config ---------------------------------------------------------------------------


def make_config(
    layers: Sequence[Layer],
    *,
    cmd: list[str] | None = None,
    entrypoint: list[str] | None = None,
    env: list[str] | None = None,
    architecture: str = "amd64",
    os: str = "linux",  # noqa: A002 - mirrors the JSON field
    variant: str | None = None,
    working_dir: str = "/",
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    """Deterministic image config JSON bytes for ``layers``.

    ``extra`` is merged in at the top level; dict values (e.g. ``config``) are
    merged one level deep.
    """
    container_config: dict[str, Any] = {
        "Env": list(DEFAULT_ENV if env is None else env),
        "WorkingDir": working_dir,
    }
    if cmd is not None:
        container_config["Cmd"] = list(cmd)
    if entrypoint is not None:
        container_config["Entrypoint"] = list(entrypoint)
    document: dict[str, Any] = {
        "architecture": architecture,
        "os": os,
        "created": CREATED,
        "config": container_config,
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [
            {"created": CREATED, "created_by": f"tests.support.images layer {index}"}
            for index in range(len(layers))
        ],
    }
    if variant is not None:
        document["variant"] = variant
    for key, value in (extra or {}).items():
        if isinstance(value, Mapping) and isinstance(document.get(key), dict):
            document[key].update(value)
        else:
            document[key] = value
    return _canonical_json(document)
