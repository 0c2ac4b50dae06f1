"""Storage basics: schema on first start, SQLite tuning, the content-addressed media store."""

import pytest
from sqlalchemy import create_engine, text

from storage.db import Database
from storage.media import MediaMissing, MediaStore, sha256_hex
from storage.messages import job_for_answer_message, remember_answer
from storage.models import Base, Car, Job


def test_first_start_creates_schema_with_wal(tmp_path):
    db = Database.open(f"sqlite:///{tmp_path / 'sub' / 'tm.db'}")
    with db.session() as session:
        mode = session.execute(text("PRAGMA journal_mode")).scalar()
        tables = set(session.execute(text("SELECT name FROM sqlite_master")).scalars())
    assert mode == "wal"
    assert {"cars", "mosaics", "tiles", "jobs", "mosaic_messages"} <= tables


def test_a_database_from_before_follow_ups_gains_their_tables_on_start(tmp_path):
    url = f"sqlite:///{tmp_path / 'tm.db'}"
    old = [t for name, t in Base.metadata.tables.items()
           if name not in ("follow_ups", "answer_messages")]
    engine = create_engine(url)
    Base.metadata.create_all(engine, tables=old)
    engine.dispose()
    db = Database.open(url)
    with db.session() as session:
        tables = set(session.execute(text("SELECT name FROM sqlite_master")).scalars())
    assert {"follow_ups", "answer_messages"} <= tables


def test_an_answer_message_leads_to_its_job_and_can_be_pointed_at_a_later_one(tmp_path):
    db = Database.open(f"sqlite:///{tmp_path / 'tm.db'}")
    with db.session() as session:
        first, later = Job(platform="slack", user_id="u", question="Q1?"), Job(
            platform="slack", user_id="u", question="Q2?")
        session.add_all([first, later])
        session.flush()
        remember_answer(session, "slack", "C1", "1790000001.000100", first.id)
    with db.session() as session:
        assert job_for_answer_message(session, "slack", "C1", "1790000001.000100") == first.id
        remember_answer(session, "slack", "C1", "1790000001.000100", later.id)
    with db.session() as session:
        assert job_for_answer_message(session, "slack", "C1", "1790000001.000100") == later.id
        assert job_for_answer_message(session, "discord", "C1", "1790000001.000100") is None


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
