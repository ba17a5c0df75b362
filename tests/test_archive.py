"""Tests for shared.archive: legacy docker-save layout, exact size, ranges."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from docker_http_passthrough.shared.archive import MAX_MEMBER_SIZE, ArchivePlan, LayerFile, plan_archive
from docker_http_passthrough.shared.archive_reader import ArchiveReader, ArchiveSourceError, write_archive
from tests.support.images import sha
from tests.support.testdata import DOCKER_SAVE, DOCKER_SAVE_TAG

REPO_TAG = "127.0.0.1:5000/team/app:v1"


def _make_layer(path: Path, files: dict[str, bytes]) -> LayerFile:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = path.read_bytes()
    return LayerFile(sha(raw), len(raw), str(path))


def _config(layers: list[LayerFile]) -> tuple[bytes, str]:
    # Deliberately not compact, so "byte for byte" is actually tested.
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": "2024-05-01T12:00:00Z",
            "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
            "rootfs": {
                "type": "layers",
                "diff_ids": [layer.diff_id for layer in layers],
            },
        },
        indent=2,
    ).encode()
    return config, sha(config)


@pytest.fixture
def image(tmp_path: Path) -> tuple[bytes, str, list[LayerFile]]:
    a = _make_layer(tmp_path / "a.tar", {"bin/tool": os.urandom(3000), "etc/a": b"a\n"})
    # Bigger than a chunk in the range tests, so chunks fall inside layer data.
    b = _make_layer(tmp_path / "b.tar", {"data/blob": os.urandom(300_000)})
    layers = [a, b, a]  # `a` repeated: must still be two regular files
    config, digest = _config(layers)
    return config, digest, layers


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _damage(layer: LayerFile, how: str) -> None:
    path = Path(layer.path)
    if how == "truncate":
        os.truncate(path, layer.size - 512)
    elif how == "remove":
        path.unlink()
    else:
        with path.open("ab") as f:
            f.write(b"x")


def _render(plan: ArchivePlan) -> bytes:
    out = io.BytesIO()
    write_archive(plan, out)
    return out.getvalue()


def test_archive_has_the_docker_save_layout_real_files_and_the_config_byte_for_byte(image: tuple[bytes, str, list[LayerFile]]) -> None:
    config, digest, layers = image
    plan = plan_archive(config, digest, layers, REPO_TAG)
    data = _render(plan)
    assert plan.size == len(data)
    assert len(data) % 512 == 0
    assert data[-1024:] == bytes(1024)  # two end blocks, no extra tarfile padding

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        for m in members:
            assert m.isfile() or m.isdir(), m.name
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
            assert m.mode == (0o755 if m.isdir() else 0o644)

        ids = list(plan.layer_ids)
        assert len(set(ids)) == 3  # repeated layer gets its own id
        expected: list[str] = []
        for layer_id in ids:
            expected += [
                layer_id,
                f"{layer_id}/VERSION",
                f"{layer_id}/json",
                f"{layer_id}/layer.tar",
            ]
        hex_ = digest.removeprefix("sha256:")
        expected += [f"{hex_}.json", "manifest.json", "repositories"]
        assert names == expected

        def read(name: str) -> bytes:
            f = tar.extractfile(name)
            assert f is not None
            return f.read()

        for layer_id, layer in zip(ids, layers):
            assert read(f"{layer_id}/VERSION") == b"1.0"
            assert read(f"{layer_id}/layer.tar") == Path(layer.path).read_bytes()
        assert read(f"{hex_}.json") == config

        v1 = [json.loads(read(f"{i}/json")) for i in ids]
        assert "parent" not in v1[0]
        assert [j["id"] for j in v1] == ids
        assert [j.get("parent") for j in v1[1:]] == ids[:-1]
        assert v1[0]["container_config"]["Cmd"] is None
        assert "config" not in v1[0] and "config" not in v1[1]
        assert v1[2]["config"] == {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]}
        assert (v1[2]["architecture"], v1[2]["os"]) == ("amd64", "linux")

        assert json.loads(read("manifest.json")) == [
            {
                "Config": f"{hex_}.json",
                "RepoTags": [REPO_TAG],
                "Layers": [f"{i}/layer.tar" for i in ids],
            }
        ]
        assert json.loads(read("repositories")) == {
            "127.0.0.1:5000/team/app": {"v1": ids[-1]}
        }


def test_layer_ids_chain_each_diff_id_to_its_parent_and_the_top_one_to_the_config(image: tuple[bytes, str, list[LayerFile]]) -> None:
    config, digest, layers = image
    plan = plan_archive(config, digest, layers, REPO_TAG)
    hexes = [layer.diff_id.removeprefix("sha256:") for layer in layers]
    id0 = _sha(f"{hexes[0]} ")
    id1 = _sha(f"{hexes[1]} {id0}")
    id2 = _sha(f"{hexes[2]} {id1} {digest}")
    assert plan.layer_ids == (id0, id1, id2)


def test_same_image_gives_the_same_bytes_and_another_tag_other_bytes(image: tuple[bytes, str, list[LayerFile]]) -> None:
    config, digest, layers = image
    first = _render(plan_archive(config, digest, layers, REPO_TAG))
    second = _render(plan_archive(config, digest, layers, REPO_TAG))
    assert first == second
    # A different tag must change the output (guards against a constant result).
    assert _render(plan_archive(config, digest, layers, "app:v2")) != first


def _reference(plan: ArchivePlan) -> bytes:
    """The archive assembled from its plan by hand, without the reader: what every read must match."""
    return b"".join(seg.data if seg.data is not None else Path(seg.path).read_bytes() for seg in plan.segments)


async def _collect(plan: ArchivePlan, start: int = 0, end: int | None = None, piece: int = 1 << 20) -> bytes:
    """[start, end) read in pieces of `piece` bytes, as a response would."""
    end = plan.size if end is None else end
    with ArchiveReader(plan) as reader:
        return b"".join([bytes(await reader.read(p, min(p + piece, end))) for p in range(start, end, piece)])


def test_written_archive_is_the_plan_byte_for_byte(image: tuple[bytes, str, list[LayerFile]]) -> None:
    config, digest, layers = image
    plan = plan_archive(config, digest, layers, REPO_TAG)
    assert _render(plan) == _reference(plan)


@pytest.mark.anyio
@pytest.mark.parametrize("nowait", [True, False], ids=["page-cache", "thread"])
async def test_every_byte_range_is_that_slice_of_the_archive(image: tuple[bytes, str, list[LayerFile]], nowait: bool,
                                                             monkeypatch) -> None:
    """Every [start, end) between interesting offsets — each segment boundary and its neighbours, the archive's
    ends, block edges, the middle of layer data — reads exactly the reference bytes, on both read paths."""
    monkeypatch.setattr(ArchiveReader, "nowait_supported", nowait and ArchiveReader.nowait_supported)
    config, digest, layers = image
    plan = plan_archive(config, digest, layers, REPO_TAG)
    full = _reference(plan)
    size = plan.size
    offsets = {0, 1, 100, 511, 512, 513, size - 1024, size - 700, size - 1, size}
    for seg in plan.segments:
        for edge in (seg.offset, seg.offset + seg.length):
            offsets |= {edge - 1, edge, edge + 1}
        if seg.path is not None:
            offsets.add(seg.offset + seg.length // 2)  # inside layer data
    offsets = sorted(k for k in offsets if 0 <= k <= size)
    with ArchiveReader(plan) as reader:
        for i, start in enumerate(offsets):
            for end in offsets[i:]:
                assert bytes(await reader.read(start, end)) == full[start:end], (start, end)
        assert len(reader.fds) == 2, "each layer file opened once per reader, however often it is read"
        with pytest.raises(ValueError):
            await reader.read(10, 5)
        with pytest.raises(ValueError):
            await reader.read(0, size + 1)


@pytest.mark.anyio
async def test_streamed_archive_equals_the_written_one_at_any_piece_size(
    image: tuple[bytes, str, list[LayerFile]],
) -> None:
    config, digest, layers = image
    plan = plan_archive(config, digest, layers, REPO_TAG)
    full = _render(plan)
    for piece in (1 << 20, 65536, 4097):  # pieces that cut headers, file data and padding anywhere
        assert await _collect(plan, piece=piece) == full
    seg = next(s for s in plan.segments if s.path is not None)
    for start, end in ((seg.offset - 600, seg.offset + 600), (seg.offset + seg.length - 600, seg.offset + seg.length + 600)):
        assert await _collect(plan, start, end, piece=7) == full[start:end]


@pytest.mark.anyio
@pytest.mark.parametrize("damage", ["truncate", "remove", "grow"])
async def test_damaged_layer_file_stops_the_stream_but_ranges_before_it_work(
    image: tuple[bytes, str, list[LayerFile]], damage: str
) -> None:
    config, digest, layers = image
    plan = plan_archive(config, digest, layers, REPO_TAG)
    intact = _render(plan)
    _damage(layers[1], damage)
    with pytest.raises(ArchiveSourceError):
        await _collect(plan)
    with pytest.raises(ArchiveSourceError):
        _render(plan)
    # A range that does not touch the damaged file still works, byte for byte.
    first_file = next(s for s in plan.segments if s.path is not None)
    assert first_file.path == layers[0].path
    end = first_file.offset + first_file.length
    assert await _collect(plan, 0, end) == intact[:end]


@pytest.mark.anyio
async def test_layer_truncated_while_streaming_stops_the_stream(
    image: tuple[bytes, str, list[LayerFile]],
) -> None:
    # Truncation after the file was opened and checked: the short read is caught.
    config, digest, layers = image
    plan = plan_archive(config, digest, layers, REPO_TAG)
    seg = next(s for s in plan.segments if s.path == layers[1].path)
    with ArchiveReader(plan) as reader:
        await reader.read(seg.offset, seg.offset + 4096)  # file is open now
        os.truncate(seg.path, 8192)
        with pytest.raises(ArchiveSourceError):
            await reader.read(seg.offset + 4096, seg.offset + seg.length)


def test_plan_refuses_a_config_layers_or_tag_that_do_not_match(image: tuple[bytes, str, list[LayerFile]]) -> None:
    config, digest, layers = image
    with pytest.raises(ValueError, match="digest"):
        plan_archive(config, "sha256:" + "0" * 64, layers, REPO_TAG)
    with pytest.raises(ValueError, match="digest"):
        plan_archive(config, "md5:abc", layers, REPO_TAG)
    with pytest.raises(ValueError, match="layers"):
        plan_archive(config, digest, layers[:2], REPO_TAG)
    swapped = [layers[1], layers[0], layers[2]]
    with pytest.raises(ValueError, match="diff_id"):
        plan_archive(config, digest, swapped, REPO_TAG)
    for bad_tag in ("app", "127.0.0.1:5000/team/app", "app:", ":v1"):
        with pytest.raises(ValueError, match="repo_tag"):
            plan_archive(config, digest, layers, bad_tag)


def test_layer_over_the_ustar_limit_is_refused_and_one_at_the_limit_fits(image: tuple[bytes, str, list[LayerFile]]) -> None:
    config, digest, layers = image
    huge = LayerFile(layers[1].diff_id, 8 << 30, "/nonexistent/huge.tar")
    with pytest.raises(ValueError, match="ustar"):
        plan_archive(config, digest, [layers[0], huge, layers[2]], REPO_TAG)
    # Exactly the limit is allowed (planning never touches the file), and sizes the plan exactly.
    edge = LayerFile(layers[1].diff_id, MAX_MEMBER_SIZE, "/nonexistent/edge.tar")
    plan = plan_archive(config, digest, [layers[0], edge, layers[2]], REPO_TAG)
    real = plan_archive(config, digest, layers, REPO_TAG)

    def padded(size: int) -> int:
        return size + -size % 512

    assert plan.size - real.size == padded(MAX_MEMBER_SIZE) - padded(layers[1].size)


# --------------------------------------------------------------------------- against `docker save` itself


def _docker_saved() -> tuple[tarfile.TarFile, dict]:
    docker = tarfile.open(DOCKER_SAVE)
    return docker, json.loads(docker.extractfile("manifest.json").read())[0]


def _plan_like_docker(tmp_path: Path, docker: tarfile.TarFile, entry: dict) -> ArchivePlan:
    """Our plan for the image Docker saved: its config, its layer tars, its tag."""
    layers = []
    for index, name in enumerate(entry["Layers"]):
        path = tmp_path / f"layer{index}.tar"
        path.write_bytes(docker.extractfile(name).read())
        layers.append(LayerFile(sha(path.read_bytes()), path.stat().st_size, str(path)))
    config = docker.extractfile(entry["Config"]).read()
    return plan_archive(config, sha(config), layers, entry["RepoTags"][0])


def test_archive_matches_what_docker_save_writes_for_the_same_image(tmp_path: Path) -> None:
    """Member for member, header for header and byte for byte against dockerd 20.10's own `docker save`
    (testdata/docker-save-20.10.tar), except where we differ on purpose:

    - layer ids: Docker derives them from its v1 image json; ours chain diff_ids (any unique scheme loads);
    - order: Docker tars its temporary directory in name order; ours goes bottom layer first, so layers can be
      streamed as they verify, then the config, manifest.json and repositories (Docker's last two sort last by
      name too; its config falls wherever its hex name sorts);
    - header mtime (Docker: the image's creation time; ours 0, so every server sends the same bytes), owner names
      (Docker "root"; ours empty, uid/gid 0 alike) and the file-type bits Docker repeats in the mode field.
    """
    docker, entry = _docker_saved()
    assert entry["RepoTags"] == [DOCKER_SAVE_TAG]
    plan = _plan_like_docker(tmp_path, docker, entry)
    data = _render(plan)
    ours = tarfile.open(fileobj=io.BytesIO(data))
    docker_ids = [name.split("/")[0] for name in entry["Layers"]]
    assert len(docker_ids) == 2 and len(set(docker_ids + list(plan.layer_ids))) == 4

    def renamed(text: bytes | str) -> bytes:
        raw = text.encode() if isinstance(text, str) else text
        for theirs, mine in zip(docker_ids, plan.layer_ids):
            raw = raw.replace(theirs.encode(), mine.encode())
        return raw

    theirs = {renamed(m.name).decode(): m for m in docker.getmembers()}
    mine = {m.name: m for m in ours.getmembers()}
    assert sorted(theirs) == sorted(mine)
    assert [m.name for m in docker.getmembers()] == sorted(m.name for m in docker.getmembers())
    expected_order = [f"{layer_id}{suffix}" for layer_id in plan.layer_ids
                      for suffix in ("", "/VERSION", "/json", "/layer.tar")]
    assert list(mine) == expected_order + [entry["Config"], "manifest.json", "repositories"]

    raw = DOCKER_SAVE.read_bytes()
    for name, member in mine.items():
        docker_member = theirs[name]
        assert (member.type, member.size, member.uid, member.gid) == (
            docker_member.type, docker_member.size, docker_member.uid, docker_member.gid), name
        assert member.mode == docker_member.mode & 0o7777, name
        for source, at in ((data, member.offset), (raw, docker_member.offset)):
            assert source[at + 257:at + 265] == b"ustar\x0000", name  # POSIX ustar, no GNU or PAX headers
            assert source[at:at + 100].rstrip(b"\0").endswith(b"/") == member.isdir(), name
        if member.isfile():
            assert ours.extractfile(member).read() == renamed(docker.extractfile(docker_member).read()), name
    assert data[-1024:] == raw[-1024:] == bytes(1024)
