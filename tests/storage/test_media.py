"""The media store, the same behaviour on every backend (folder, PostgreSQL, S3 on moto):
content addressing, streaming, typed misses, and no partial object after a writer is killed."""

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from storage.media import (
    CHUNK_BYTES,
    BadMediaUrl,
    FolderMediaStore,
    MediaMissing,
    open_media_store,
    sha256_hex,
)

ROOT = Path(__file__).resolve().parents[2]


def test_bytes_are_stored_once_under_their_sha256(store):
    key = store.put(b"hello")
    assert key == sha256_hex(b"hello")
    assert store.put(b"hello") == key
    assert store.read(key) == b"hello"
    assert list(store.keys()) == [key]


def test_a_large_object_streams_in_and_out_in_bounded_chunks(store):
    data = os.urandom(3 * CHUNK_BYTES + 12345)
    pieces = (data[start:start + 300_000] for start in range(0, len(data), 300_000))
    key = store.put_chunks(pieces)
    assert key == sha256_hex(data)
    chunks = list(store.chunks(key))
    assert max(len(chunk) for chunk in chunks) <= CHUNK_BYTES
    assert b"".join(chunks) == data
    assert store.read(key) == data
    assert store.size(key) == len(data)


def test_an_empty_object_round_trips(store):
    key = store.put(b"")
    assert store.has(key)
    assert store.read(key) == b""


def test_keys_that_are_not_digests_are_refused(store):
    for bad in ("../../etc/passwd", "A" * 64, "a" * 63, ""):
        with pytest.raises(ValueError):
            store.read(bad)
        with pytest.raises(ValueError):
            store.has(bad)


def test_a_deleted_object_raises_the_typed_miss(store):
    key = store.put(b"gone")
    store.delete(key)
    assert not store.has(key)
    with pytest.raises(MediaMissing):
        store.read(key)
    with pytest.raises(MediaMissing):
        store.chunks(key)
    store.delete(key)


def test_fresh_objects_are_not_listed_as_old(store):
    store.put(b"just written")
    assert list(store.keys(older_than=timedelta(minutes=10))) == []


def _kill_mid_write(media_url: str, tmp_path: Path, *flags: str) -> None:
    marker = tmp_path / "stalled"
    writer = subprocess.Popen(
        [sys.executable, "-m", "tests.storage.media_writer", media_url, str(marker), *flags],
        cwd=ROOT, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not marker.exists():
        if writer.poll() is not None:
            raise AssertionError(f"the writer ended early: {writer.stderr.read().decode()}")
        assert time.monotonic() < deadline, "the writer never reached the middle of its write"
        time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    writer.stderr.close()


def test_a_writer_killed_mid_write_leaves_no_object(store, media_url, tmp_path):
    kept = store.put(b"written before the crash")
    _kill_mid_write(media_url, tmp_path)
    assert list(store.keys()) == [kept]
    assert store.read(kept) == b"written before the crash"
    store.sweep_incomplete(older_than=timedelta(0))
    assert list(store.keys()) == [kept]


def test_a_folder_writer_killed_mid_write_leaves_a_temporary_the_sweep_removes(tmp_path):
    media = tmp_path / "media"
    _kill_mid_write(str(media), tmp_path)
    store = FolderMediaStore(media)
    assert len(list(media.rglob(".tmp-*"))) == 1
    assert store.sweep_incomplete(older_than=timedelta(minutes=10)) == 0
    assert store.sweep_incomplete(older_than=timedelta(0)) == 1
    assert list(media.rglob(".tmp-*")) == []
    assert list(store.keys()) == []


def test_an_s3_writer_killed_mid_upload_leaves_only_an_upload_the_sweep_aborts(s3_url, tmp_path):
    _kill_mid_write(s3_url, tmp_path, "--mid-upload")
    store = open_media_store(s3_url, tmp_path)
    assert list(store.keys()) == []
    assert len(store.incomplete_uploads()) == 1
    assert store.sweep_incomplete(older_than=timedelta(0)) == 1
    assert store.incomplete_uploads() == []


def test_two_postgres_writers_of_the_same_bytes_keep_one_copy(pg_url, tmp_path):
    first = open_media_store(pg_url, tmp_path)
    second = open_media_store(pg_url, tmp_path)
    data = os.urandom(2 * CHUNK_BYTES)
    assert first.put_chunks([data]) == second.put_chunks([data]) == sha256_hex(data)
    with first.engine.connect() as conn:
        chunk_rows = conn.exec_driver_sql("SELECT count(*) FROM media_chunks").scalar()
    assert chunk_rows == 2
    first.close()
    second.close()


def test_media_url_chooses_the_backend(tmp_path):
    assert isinstance(open_media_store(None, tmp_path / "a"), FolderMediaStore)
    assert open_media_store(f"file://{tmp_path}/b", tmp_path).root == tmp_path / "b"
    with pytest.raises(BadMediaUrl, match="postgresql:// or s3://"):
        open_media_store("ftp://example.org/media", tmp_path)
    with pytest.raises(BadMediaUrl, match="bucket"):
        open_media_store("s3:///prefix", tmp_path)
