"""Leftovers of killed writers: media no row points at (a `mosaic build` killed before its row
committed) and half-written files are swept, on every backend; what rows use is kept."""

import os
from datetime import timedelta

import pytest
from sqlalchemy import create_engine

from core.cli import main
from storage.db import Database
from storage.media import FolderMediaStore
from storage.models import Base, Car, Job, Mosaic
from storage.sweep import media_key_columns, sweep_media


@pytest.fixture
def db(tmp_path):
    database = Database.open(f"sqlite:///{tmp_path / 'tm.db'}")
    yield database
    database.close()


def _keep(db, store) -> set[str]:
    photo, render, preview, target, asked = (store.put(f"{name}".encode() * 100) for name in
                                             ("photo", "render", "preview", "target", "asked"))
    with db.session() as session:
        session.add_all([
            Car(sha256=photo, media_key=photo, file_name="a.jpg", width=1, height=1,
                byte_size=1, thumbnail=b"", features=b"", feature_grid=1),
            Mosaic(name="tiger", target_sha256=target, target_media_key=target, rows=1, cols=1,
                   tile_px=8, render_media_key=render, preview_media_key=preview),
            Job(platform="web", user_id="u", question="Q?", image_media_key=asked),
        ])
    return {photo, render, preview, target, asked}


def test_every_media_key_column_is_checked():
    names = {f"{column.table.name}.{column.name}" for column in media_key_columns()}
    assert names == {"cars.media_key", "mosaics.target_media_key", "mosaics.render_media_key",
                     "mosaics.preview_media_key", "jobs.image_media_key"}


def test_media_of_a_killed_build_is_swept_and_used_media_kept(db, store):
    kept = _keep(db, store)
    orphan_render = store.put(os.urandom(50_000))
    orphan_preview = store.put(os.urandom(20_000))
    report = sweep_media(db, store, older_than=timedelta(0))
    assert (report.orphans, report.orphan_bytes) == (2, 70_000)
    assert set(store.keys()) == kept
    assert not store.has(orphan_render) and not store.has(orphan_preview)


def test_fresh_unused_media_is_spared(db, store):
    kept = _keep(db, store)
    fresh = store.put(b"a render whose row is about to commit")
    assert sweep_media(db, store, older_than=timedelta(minutes=10)).orphans == 0
    assert set(store.keys()) == kept | {fresh}


def test_a_dry_run_removes_nothing(db, store):
    _keep(db, store)
    orphan = store.put(b"orphan")
    assert sweep_media(db, store, timedelta(0), dry_run=True).orphans == 1
    assert store.has(orphan)


def test_half_written_files_of_older_versions_are_swept_too(db, tmp_path):
    store = FolderMediaStore(tmp_path / "media")
    beside = tmp_path / "media" / "ab" / "cd" / ".tmp-x1y2"
    beside.parent.mkdir(parents=True)
    beside.write_bytes(b"half a photo")
    assert store.sweep_incomplete(timedelta(0)) == 0  # the start-up sweep looks only in .incoming
    assert sweep_media(db, store, timedelta(0)).incomplete == 1
    assert not beside.exists()


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TALKMOSAIC_DATA_DIR", str(tmp_path / "data"))
    for name in ("DATABASE_URL", "MEDIA_URL"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "data"


def test_db_upgrade_migrates_a_create_all_database_and_says_so(data_dir, capsys):
    data_dir.mkdir()
    engine = create_engine(f"sqlite:///{data_dir / 'talkmosaic.db'}")
    Base.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(Job.__table__.insert(), {"platform": "web", "user_id": "u",
                                                    "question": "Q?", "reply_to": {},
                                                    "status": "done", "attempts": 1})
    engine.dispose()
    assert main(["db", "upgrade"]) == 0
    assert "revision 0003 (newest: 0003)" in capsys.readouterr().out
    db = Database.open(f"sqlite:///{data_dir / 'talkmosaic.db'}")
    with db.session() as session:
        assert session.query(Job).count() == 1
    db.close()


def test_db_sweep_reports_what_it_removed(data_dir, capsys):
    store = FolderMediaStore(data_dir / "media")
    store.put(b"x" * 2_000_000)
    (store.incoming / ".tmp-killed").write_bytes(b"half")
    assert main(["db", "sweep", "--older-than", "0"]) == 0
    out = capsys.readouterr().out
    assert "Removed 1 unused media objects (2.0 MB) and 1 half-written ones" in out
    assert list(store.keys()) == []


def test_db_sweep_refuses_a_negative_age(data_dir, capsys):
    assert main(["db", "sweep", "--older-than", "-5"]) == 1
    assert "0 or more" in capsys.readouterr().err


def test_a_bad_media_url_is_one_sentence_that_shows_no_password(data_dir, monkeypatch, capsys):
    monkeypatch.setenv("MEDIA_URL", "ftp://talkmosaic:hunter2@files.example/media")
    assert main(["db", "upgrade"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "postgresql:// or s3://" in err
    assert "hunter2" not in err and "Traceback" not in err
