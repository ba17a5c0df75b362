"""Benchmark images, generated here: layers of random (incompressible) bytes mixed with word-salad text
(compressible), built streaming into temporary files, gzip level 1, pushed with a streaming monolithic upload."""

from __future__ import annotations

import hashlib
import json
import os
import random
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.checks import fastz
from bench.report import MiB, mib, say
from tests.support.downloads import filename_for
from tests.support.images import DOCKER_CONFIG, DOCKER_LAYER_GZIP, DOCKER_MANIFEST, make_config, sha
from tests.support.pushing import push_blob



@dataclass(frozen=True)
class GenLayer:
    diff_id: str
    digest: str
    size: int  # compressed
    tar_size: int
    path: Path


@dataclass
class Image:
    repository: str
    tag: str
    layers: list[GenLayer]
    config_digest: str = ""
    manifest_digest: str = ""

    @property
    def filename(self) -> str:
        return filename_for(self.repository, self.tag)

    @property
    def diff_ids(self) -> list[str]:
        return [layer.diff_id for layer in self.layers]

    @property
    def blob_digests(self) -> list[str]:
        return [layer.digest for layer in self.layers] + [self.config_digest]

    @property
    def compressed_size(self) -> int:
        return sum(layer.size for layer in self.layers)


_WORDS = (
    "the of and to in is for on with as by at from this that be are or an was it not which layer image "
    "registry docker switch flash copy http tar gzip config manifest digest blob cache worker server "
    "client stream buffer socket kernel module library binary python nginx redis queue job bytes"
).split()


def _text_block(rng: random.Random) -> bytes:
    """~1 MiB of word salad: gzip shrinks it about 3x, like source code or text files."""
    text = b""
    while len(text) < MiB:
        words = rng.choices(_WORDS, k=12 * 1024)
        text += ("\n".join(" ".join(words[i:i + 12]) for i in range(0, len(words), 12)) + "\n").encode()
    return text[:MiB]


def _tar_header(name: str, size: int, is_dir: bool = False) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = 0 if is_dir else size
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.mode = 0o755 if is_dir else 0o644
    info.mtime = 0
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _file_sizes(payload: int) -> list[int]:
    return [min(8 * MiB, payload - start) for start in range(0, payload, 8 * MiB)]


def build_layer(path: Path, payload: int, seed: int) -> GenLayer:
    """A gzip layer of ``payload`` bytes in 8 MiB files, 3 of 4 random, streamed to ``path``."""
    rng = random.Random(seed)
    text = _text_block(rng)
    tar_hash, blob_hash = hashlib.sha256(), hashlib.sha256()
    compressor = fastz.compressobj(1, fastz.DEFLATED, 31)
    sizes = {"tar": 0, "blob": 0}

    with open(path, "wb") as out:
        def put(data: bytes) -> None:
            tar_hash.update(data)
            sizes["tar"] += len(data)
            packed = compressor.compress(data)
            if packed:
                blob_hash.update(packed)
                sizes["blob"] += len(packed)
                out.write(packed)

        put(_tar_header(f"layer{seed}", 0, is_dir=True))
        left, index = payload, 0
        while left > 0:
            size = min(8 * MiB, left)
            incompressible = index % 4 != 3
            put(_tar_header(f"layer{seed}/{index:05d}.{'bin' if incompressible else 'txt'}", size))
            done = 0
            while done < size:
                n = min(MiB, size - done)
                if incompressible:
                    piece = os.urandom(n)
                else:
                    stamp = f"{seed}:{index}:{done}\n".encode()
                    piece = stamp + text[: n - len(stamp)]
                assert len(piece) == n, (len(piece), n)
                put(piece)
                done += n
            put(bytes(-size % 512))
            left -= size
            index += 1
        put(bytes(1024))
        tail = compressor.flush()
        blob_hash.update(tail)
        sizes["blob"] += len(tail)
        out.write(tail)
    expected = 512 + sum(512 + size + (-size % 512) for size in _file_sizes(payload)) + 1024
    if sizes["tar"] != expected:
        raise AssertionError(f"generated layer tar is {sizes['tar']} bytes, its headers promise {expected}")
    return GenLayer("sha256:" + tar_hash.hexdigest(), "sha256:" + blob_hash.hexdigest(), sizes["blob"],
                    sizes["tar"], path)


def _check(response: httpx.Response, what: str) -> httpx.Response:
    if not response.is_success:
        raise RuntimeError(f"{what}: {response.request.method} {response.request.url} -> "
                           f"{response.status_code} {response.text[:500]}")
    return response


def push_file_blob(client: httpx.Client, base: str, repository: str, layer: GenLayer) -> None:
    """Monolithic upload streamed from the file: POST uploads/, then PUT ?digest= with the body."""
    started = _check(client.post(f"{base}/v2/{repository}/blobs/uploads/"), "start upload")
    url = httpx.URL(base + "/").join(started.headers["Location"]).copy_merge_params({"digest": layer.digest})
    with open(layer.path, "rb") as body:
        _check(client.put(url, content=body, headers={"Content-Type": "application/octet-stream",
                                                       "Content-Length": str(layer.size)}), "upload blob")


def make_image(workdir: Path, registry_url: str, repository: str, tag: str, total_mib: int, seed: int) -> Image:
    """4 layers (fewer for tiny images) adding up to ``total_mib`` MiB uncompressed; pushed, files removed."""
    count = 4 if total_mib >= 16 else 1
    payload = total_mib * MiB // count
    layers = []
    started = time.monotonic()
    for i in range(count):
        layers.append(build_layer(workdir / f"{seed}-{i}.tar.gz", payload, seed * 100 + i))
    built = time.monotonic()
    image = Image(repository, tag, layers)
    with httpx.Client(timeout=httpx.Timeout(600.0, connect=5.0), trust_env=False) as client:
        for layer in layers:
            push_file_blob(client, registry_url, repository, layer)
        config = make_config(layers)  # uses .diff_id only
        image.config_digest = push_blob(registry_url, repository, config)
        manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": DOCKER_CONFIG, "digest": image.config_digest, "size": len(config)},
            "layers": [{"mediaType": DOCKER_LAYER_GZIP, "digest": lay.digest, "size": lay.size} for lay in layers],
        }, indent=3).encode()
        _check(client.put(f"{registry_url}/v2/{repository}/manifests/{tag}", content=manifest,
                          headers={"Content-Type": DOCKER_MANIFEST}), "put manifest")
        image.manifest_digest = sha(manifest)
    for layer in layers:
        layer.path.unlink()
    say(f"image {repository}:{tag}: {count} layers, {mib(sum(x.tar_size for x in layers))} uncompressed, "
        f"{mib(image.compressed_size)} gzip; built in {built - started:.1f}s, pushed in "
        f"{time.monotonic() - built:.1f}s")
    return image

