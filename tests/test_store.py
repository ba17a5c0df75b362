"""Unit tests for shared.store: atomic writes, verification on put, image completeness, sweeping, links, seen."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from docker_http_passthrough.shared.errors import StoreFull
from docker_http_passthrough.shared.owners import temp_name
from docker_http_passthrough.shared.store import TEMP_MARK, ImageRecord, PreparedLayer, Store
from tests.support.images import sha


def partials(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if TEMP_MARK in p.name]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "cache")


def test_atomic_writer_publishes_only_on_success(store: Store):
    final = store.blob_path(sha(b"x"))
    with store.atomic_writer(final) as handle:
        handle.write(b"hello")
        # Not visible under its final name while being written.
        assert not final.exists()
        assert len(partials(store.root)) == 1
    assert final.read_bytes() == b"hello"
    assert partials(store.root) == []


def test_atomic_writer_leaves_nothing_on_exception(store: Store):
    final = store.layer_path(sha(b"layer"))
    with pytest.raises(RuntimeError):
        with store.atomic_writer(final) as handle:
            handle.write(b"half a layer")
            raise RuntimeError("download failed")
    assert not final.exists()
    assert partials(store.root) == []
    assert list(final.parent.iterdir()) == []


def test_atomic_writer_never_overwrites_an_existing_file(store: Store):
    final = store.blob_path(sha(b"first"))
    final.write_bytes(b"first")
    inode = final.stat().st_ino
    with store.atomic_writer(final) as handle:
        handle.write(b"second")
    assert final.read_bytes() == b"first"
    assert final.stat().st_ino == inode
    assert partials(store.root) == []


def test_put_blob_refuses_bytes_that_do_not_match_their_digest(store: Store):
    data = b'{"config": true}'
    with pytest.raises(ValueError):
        store.put_blob(sha(b"other content"), data)
    assert store.get_blob(sha(b"other content")) is None
    assert list((store.root / "blobs" / "sha256").iterdir()) == []
    store.put_blob(sha(data), data)
    assert store.get_blob(sha(data)) == data
    store.put_blob(sha(data), data)  # idempotent
    assert store.get_blob(sha(data)) == data


@pytest.mark.parametrize("digest", ["md5:abc", "sha256:../../etc/passwd", "sha256:" + "A" * 64, "sha256:" + "0" * 63])
def test_paths_refuse_bad_digests(store: Store, digest: str):
    for path_of in (store.blob_path, store.layer_path):
        with pytest.raises(ValueError):
            path_of(digest)


def _image(store: Store, layers: list[bytes]) -> ImageRecord:
    config = b'{"rootfs": {}}'
    store.put_blob(sha(config), config)
    prepared = []
    for data in layers:
        with store.atomic_writer(store.layer_path(sha(data))) as handle:
            handle.write(data)
        prepared.append(PreparedLayer(sha(data), len(data), sha(b"gz" + data)))
    record = ImageRecord("https://reg.example", "team/app", sha(b"manifest"), sha(config), tuple(prepared))
    store.put_image("key1", record)
    return record


def test_a_complete_image_record_comes_back_with_its_layer_files(store: Store):
    record = _image(store, [b"layer one", b"layer two!"])
    assert store.get_image("key1") == record
    assert store.get_image("other") is None
    assert [f.path for f in store.layer_files(record)] == [str(store.layer_path(sha(b"layer one"))),
                                                          str(store.layer_path(sha(b"layer two!")))]


def test_get_image_none_when_a_layer_is_missing(store: Store):
    _image(store, [b"layer one", b"layer two!"])
    store.layer_path(sha(b"layer two!")).unlink()
    assert store.get_image("key1") is None


def test_get_image_none_when_a_layer_has_the_wrong_size(store: Store):
    _image(store, [b"layer one", b"layer two!"])
    with open(store.layer_path(sha(b"layer one")), "ab") as handle:
        handle.write(b"extra")
    assert store.get_image("key1") is None


def test_get_image_none_when_the_config_is_missing(store: Store):
    record = _image(store, [b"layer one"])
    store.blob_path(record.config_digest).unlink()
    assert store.get_image("key1") is None


def test_sweep_partials_removes_only_old_partials(store: Store):
    old = time.time() - 3600
    old_layer = store.root / "layers" / "sha256" / f"{'a' * 64}.tar{TEMP_MARK}0123456789ab"
    old_blob = store.root / "blobs" / "sha256" / f"{'b' * 64}{TEMP_MARK}0123456789ab"
    fresh = store.root / "layers" / "sha256" / f"{'c' * 64}.tar{TEMP_MARK}0123456789ab"
    old_final = store.root / "layers" / "sha256" / f"{'d' * 64}.tar"
    for path in (old_layer, old_blob, fresh, old_final):
        path.write_bytes(b"x")
    for path in (old_layer, old_blob, old_final):
        os.utime(path, (old, old))
    recent = time.time() - 100
    os.utime(fresh, (recent, recent))
    assert store.sweep_partials(min_age=900) == 2
    assert not old_layer.exists() and not old_blob.exists()
    assert fresh.exists() and old_final.exists()
    assert store.sweep_partials(min_age=900) == 0
    assert store.sweep_partials(min_age=50) == 1
    assert not fresh.exists() and old_final.exists()


def test_a_verified_layer_link_is_never_replaced(store: Store):
    blob, diff_id, other = sha(b"gzip blob"), sha(b"tar"), sha(b"another tar")
    assert store.linked_diff_id(blob) is None
    store.link_layer(blob, diff_id, 9, b"zip blob")
    assert store.linked_diff_id(blob) == diff_id
    assert store.layer_link(blob) == {"diff_id": diff_id, "size": 9, "tail": b"zip blob".hex()}
    assert store.linked_diff_id(sha(b"unrelated blob")) is None
    store.link_layer(blob, other, 9, b"other")  # a verified link is never replaced
    assert store.linked_diff_id(blob) == diff_id
    with pytest.raises(ValueError):
        store.link_layer(sha(b"x"), "not-a-digest", 1, b"x")
    assert store.linked_diff_id(sha(b"x")) is None


def test_seen_is_keyed_by_registry_repository_and_digest(store: Store):
    reg, repo, digest = "https://reg.example", "team/app", sha(b"blob")
    assert not store.seen(reg, repo, digest)
    store.mark_seen(reg, repo, digest)
    assert store.seen(reg, repo, digest)
    assert not store.seen("https://evil.example", repo, digest)
    assert not store.seen(reg, "team/other", digest)
    assert not store.seen(reg, repo, sha(b"other blob"))
    store.mark_seen(reg, repo, digest)  # idempotent
    assert store.seen(reg, repo, digest)


def test_temp_files_carry_their_writers_token_and_only_a_dead_writers_are_removed(tmp_path: Path):
    store = Store(tmp_path / "cache", owner="live0123")
    final = store.layer_path(sha(b"dead's layer"))
    abandoned = final.with_name(temp_name(final.name, "dead4567"))
    abandoned.write_bytes(b"half a layer")  # what a SIGKILLed writer leaves
    with store.atomic_writer(store.layer_path(sha(b"live layer"))) as handle:
        handle.write(b"live layer")
        assert store.remove_abandoned("dead4567") == 1
        assert [p.name.split(TEMP_MARK)[1].split("-")[0] for p in partials(store.root)] == ["live0123"]
    assert store.has_layer(sha(b"live layer")) and partials(store.root) == []


def test_a_full_volume_is_store_full_naming_the_store_and_leaves_no_temp_file(store: Store):
    final = store.layer_path(sha(b"too big"))
    with pytest.raises(StoreFull) as info:
        with store.atomic_writer(final) as handle:
            handle.write(b"x" * 1000)
            handle.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (info.value.status, info.value.code, info.value.written) == (507, "store_full", 1000)
    assert str(store.root) in info.value.message and "CACHE_DIR" in info.value.message
    assert partials(store.root) == [] and not final.exists()


def test_a_tag_not_remembered_on_a_full_volume_is_no_error(store: Store, monkeypatch):
    def full(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    store.remember_tag("https://r", "team/app", "v1", "linux/amd64", "sha256:" + "1" * 64)
    assert store.tag_digest("https://r", "team/app", "v1", "linux/amd64") is None and partials(store.root) == []
