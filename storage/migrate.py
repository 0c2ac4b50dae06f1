"""Schema migrations (Alembic, scripts in storage/migrations): `upgrade_schema(engine)` brings
any database to the newest revision, and adopts one made by `create_all` before migrations.

No alembic.ini: the script location is set here, and Alembic runs on our own connection.
"""

import fcntl
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

from storage.models import Base

SCRIPTS = Path(__file__).resolve().parent / "migrations"
# The revisions that match what `create_all` made before migrations: tables -> revision.
BASELINE = "0001"
WITH_FOLLOW_UPS = "0002"
WITH_POSTED_AT = "0003"
# Any constant shared by every host: one host migrates while the others wait.
_MIGRATION_LOCK = 0x7A1C_0001
# Tables kept by others in the same database (the PostgreSQL media store's own): not ours.
FOREIGN_TABLES = {"media_objects", "media_chunks"}


def include_name(name: str | None, type_: str, _parent_names) -> bool:
    return not (type_ == "table" and name in FOREIGN_TABLES)


def alembic_config(connection: Connection | None = None, scripts: Path = SCRIPTS) -> Config:
    config = Config()
    config.set_main_option("script_location", str(scripts))
    config.attributes["connection"] = connection
    return config


@functools.cache
def head_revision(scripts: Path = SCRIPTS) -> str:
    return ScriptDirectory.from_config(alembic_config(scripts=scripts)).get_current_head()


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _adopted_revision(tables: set[str], job_columns: set[str]) -> str | None:
    """Which revision a database made by create_all is at, or None for an empty database."""
    if "cars" not in tables:
        return None
    if "posted_at" in job_columns:
        return WITH_POSTED_AT
    return WITH_FOLLOW_UPS if "follow_ups" in tables else BASELINE


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    """A transaction only one host at a time holds: a PostgreSQL advisory lock, or for SQLite
    a file lock taken before the transaction begins and released after it commits."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        with engine.begin() as connection:
            if engine.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:k)"),
                                   {"k": _MIGRATION_LOCK})
            yield connection
        return
    with open(f"{database}.migrate-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with engine.begin() as connection:
            yield connection


def upgrade_schema(engine: Engine) -> str:
    """Migrates to the newest revision and returns it; a no-op when already there."""
    head = head_revision()
    with engine.begin() as connection:
        if current_revision(connection) == head:
            return head
    with _migration_lock(engine) as connection:
        config = alembic_config(connection)
        if current_revision(connection) is None:
            inspector = inspect(connection)
            tables = set(inspector.get_table_names())
            job_columns = ({c["name"] for c in inspector.get_columns("jobs")}
                           if "jobs" in tables else set())
            adopted = _adopted_revision(tables, job_columns)
            if adopted is None:
                # An empty database: today's tables at once, then marked as the newest.
                Base.metadata.create_all(connection)
                command.stamp(config, "head")
                return head
            command.stamp(config, adopted)
        command.upgrade(config, "head")
    return head


def write_revision(engine: Engine, message: str, scripts: Path = SCRIPTS) -> Path | None:
    """Autogenerates the next revision (0003, ...) from the models against a database at the
    newest revision; None when they already agree."""
    from alembic.autogenerate import compare_metadata

    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "include_name": include_name})
        if not compare_metadata(context, Base.metadata):
            return None
    with engine.begin() as connection:
        script = command.revision(alembic_config(connection, scripts), message=message,
                                  autogenerate=True,
                                  rev_id=f"{int(head_revision(scripts)) + 1:04d}")
    head_revision.cache_clear()
    return Path(script.path)
