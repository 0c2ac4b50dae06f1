"""Storage basics: schema on first start, SQLite tuning, the content-addressed media store."""

import pytest
from sqlalchemy import text

from storage.db import Database
from storage.media import MediaMissing, MediaStore, sha256_hex
from storage.models import Car


def test_first_start_creates_schema_with_wal(tmp_path):
    db = Database.open(f"sqlite:///{tmp_path / 'sub' / 'tm.db'}")
    with db.session() as session:
        mode = session.execute(text("PRAGMA journal_mode")).scalar()
        tables = set(session.execute(text("SELECT name FROM sqlite_master")).scalars())
    assert mode == "wal"
    assert {"cars", "mosaics", "tiles", "jobs", "mosaic_messages"} <= tables


def test_session_rolls_back_on_error(tmp_path):
    db = Database.open(f"sqlite:///{tmp_path / 'tm.db'}")
    with pytest.raises(RuntimeError), db.session() as session:
        session.add(
            Car(sha256="a" * 64, media_key="a" * 64, file_name="x.jpg", width=1, height=1,
                byte_size=1, thumbnail=b"", features=b"", feature_grid=1)
        )
        session.flush()
        raise RuntimeError("boom")
    with db.session() as session:
        assert session.query(Car).count() == 0


def test_media_store_is_content_addressed(tmp_path):
    store = MediaStore(tmp_path)
    key = store.put(b"hello")
    assert key == sha256_hex(b"hello")
    assert store.put(b"hello") == key
    assert store.read(key) == b"hello"
    assert list(tmp_path.rglob(".tmp-*")) == []


def test_media_store_refuses_paths_as_keys(tmp_path):
    store = MediaStore(tmp_path)
    with pytest.raises(ValueError):
        store.read("../../etc/passwd")


def test_missing_media_raises_typed_error(tmp_path):
    store = MediaStore(tmp_path)
    key = store.put(b"gone")
    store.delete(key)
    with pytest.raises(MediaMissing):
        store.read(key)
