"""Storage basics: schema on first start, SQLite tuning, sessions, answer messages."""

import pytest
from sqlalchemy import text

from storage.db import Database
from storage.messages import job_for_answer_message, remember_answer
from storage.models import Car, Job


def test_first_start_creates_schema_with_wal(tmp_path):
    db = Database.open(f"sqlite:///{tmp_path / 'sub' / 'tm.db'}")
    with db.session() as session:
        mode = session.execute(text("PRAGMA journal_mode")).scalar()
        tables = set(session.execute(text("SELECT name FROM sqlite_master")).scalars())
    assert mode == "wal"
    assert {"cars", "mosaics", "tiles", "jobs", "mosaic_messages"} <= tables


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
