"""Schema migrations on SQLite and PostgreSQL: the revisions build exactly the models' tables,
and databases made by `create_all` before migrations are adopted and upgraded with every row."""

import shutil
import threading

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, func, inspect, select

from storage.db import Database, make_engine
from storage.jobs import unposted_outcomes
from storage.migrate import (
    SCRIPTS,
    alembic_config,
    current_revision,
    head_revision,
    include_name,
    write_revision,
)
from storage.models import (
    AnswerMessage,
    Base,
    Car,
    FollowUp,
    Job,
    Mosaic,
    MosaicMessage,
    Tile,
    utcnow,
)

BEFORE_FOLLOW_UPS = [t for name, t in Base.metadata.tables.items()
                     if name not in ("follow_ups", "answer_messages")]


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tm.db'}"
    return request.getfixturevalue("pg_url")


def _differences(engine) -> list:
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "include_name": include_name})
        return compare_metadata(context, Base.metadata)


def _fill(session, with_follow_ups: bool) -> None:
    car = Car(sha256="a" * 64, media_key="a" * 64, file_name="a.jpg", width=4, height=4,
              byte_size=10, thumbnail=b"t", features=b"f", feature_grid=1, make="Renault")
    mosaic = Mosaic(name="tiger", target_sha256="b" * 64, rows=1, cols=1, tile_px=8,
                    render_media_key="c" * 64, settings={"cols": 1})
    session.add_all([car, mosaic])
    session.flush()
    first = Job(platform="web", user_id="u", question="Which parts pollute?", answer="The exhaust.")
    session.add_all([Tile(mosaic_id=mosaic.id, row=0, col=0, car_id=car.id, x0=0, y0=0, x1=8,
                          y1=8, score=0.5),
                     first,
                     MosaicMessage(platform="slack", channel_id="C1", message_id="1.2",
                                   mosaic_id=mosaic.id)])
    session.flush()
    if with_follow_ups:
        later = Job(platform="web", user_id="u", question="And the tyres?")
        session.add(later)
        session.flush()
        session.add_all([FollowUp(job_id=later.id, parent_job_id=first.id),
                         AnswerMessage(platform="slack", channel_id="C1", message_id="1.3",
                                       job_id=first.id)])


def _counts(db: Database, models) -> dict[str, int]:
    with db.session() as session:
        return {model.__tablename__: session.scalar(select(func.count()).select_from(model))
                for model in models}


def test_the_revisions_build_exactly_the_models_tables(db_url):
    engine = make_engine(db_url)
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "head")
    assert _differences(engine) == []
    engine.dispose()


def test_a_new_database_starts_at_the_newest_revision_with_the_models_tables(db_url):
    db = Database.open(db_url)
    with db.engine.connect() as connection:
        assert current_revision(connection) == head_revision()
    assert _differences(db.engine) == []
    db.close()


def test_a_create_all_database_is_adopted_without_losing_rows(db_url):
    engine = create_engine(db_url)
    Base.metadata.create_all(engine)
    old = Database(engine)
    with old.session() as session:
        _fill(session, with_follow_ups=True)
    models = [Car, Mosaic, Tile, Job, FollowUp, MosaicMessage, AnswerMessage]
    before = _counts(old, models)
    old.close()

    db = Database.open(db_url)
    assert _counts(db, models) == before
    assert all(before.values())
    with db.engine.connect() as connection:
        assert current_revision(connection) == head_revision()
    assert _differences(db.engine) == []
    db.close()


def test_a_database_from_before_follow_ups_is_upgraded_to_them_keeping_its_rows(db_url):
    engine = create_engine(db_url)
    Base.metadata.create_all(engine, tables=BEFORE_FOLLOW_UPS)
    old = Database(engine)
    with old.session() as session:
        _fill(session, with_follow_ups=False)
    with engine.begin() as connection:  # jobs as they were then, too
        connection.exec_driver_sql("DROP INDEX ix_jobs_unposted")
        connection.exec_driver_sql("ALTER TABLE jobs DROP COLUMN posted_at")
    models = [Car, Mosaic, Tile, Job, MosaicMessage]
    before = _counts(old, models)
    old.close()

    db = Database.open(db_url)
    assert _counts(db, models) == before
    assert {"follow_ups", "answer_messages"} <= set(inspect(db.engine).get_table_names())
    assert _differences(db.engine) == []
    with db.session() as session:
        first = session.scalars(select(Job)).one()
        later = Job(platform="web", user_id="u", question="And the tyres?")
        session.add(later)
        session.flush()
        session.add(FollowUp(job_id=later.id, parent_job_id=first.id))
    db.close()


def test_jobs_finished_before_posted_at_count_as_posted(db_url):
    engine = make_engine(db_url)
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "0002")
        connection.execute(Job.__table__.insert(), [
            {"platform": "discord", "user_id": "u", "question": "Why?", "status": status,
             "reply_to": {}, "kind": "ask", "attempts": 1, "created_at": utcnow()}
            for status in ("done", "failed", "queued")
        ])
        command.upgrade(alembic_config(connection), "head")
    with Database(engine).session() as session:
        posted = dict(session.execute(select(Job.status, Job.posted_at.is_not(None))).all())
        assert posted == {"done": True, "failed": True, "queued": False}
        # So a gateway's first poll after the upgrade posts none of the old answers again.
        assert unposted_outcomes(session, ["discord"]) == []
    engine.dispose()


def test_hosts_starting_together_migrate_once(db_url):
    errors: list[BaseException] = []

    def start() -> None:
        try:
            Database.open(db_url).close()
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    starters = [threading.Thread(target=start) for _ in range(4)]
    for starter in starters:
        starter.start()
    for starter in starters:
        starter.join()
    assert errors == []
    engine = make_engine(db_url)
    with engine.connect() as connection:
        assert current_revision(connection) == head_revision()
    engine.dispose()


def test_db_revision_writes_nothing_when_the_models_agree(tmp_path):
    db = Database.open(f"sqlite:///{tmp_path / 'tm.db'}")
    assert write_revision(db.engine, "nothing") is None
    db.close()


def test_db_revision_writes_the_next_migration_for_a_change(tmp_path):
    scripts = tmp_path / "migrations"
    shutil.copytree(SCRIPTS, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    url = f"sqlite:///{tmp_path / 'tm.db'}"
    db = Database.open(url)
    with db.engine.begin() as connection:  # a database one table behind the models
        connection.exec_driver_sql("DROP TABLE answer_messages")
    path = write_revision(db.engine, "answer messages again", scripts)
    assert path.name == "0004_answer_messages_again.py"
    assert 'down_revision: str | None = "0003"' in path.read_text()
    assert "op.create_table(" in path.read_text() and "answer_messages" in path.read_text()
    with db.engine.begin() as connection:
        command.upgrade(alembic_config(connection, scripts), "head")
    assert _differences(db.engine) == []
    db.close()
