"""Engine and session set-up: SQLite with WAL and a busy timeout by default, any URL otherwise.

`Database.open(url)` migrates the schema to the newest revision on start (storage/migrate.py),
so a fresh data directory just works and a deployed one follows schema changes.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from storage.migrate import upgrade_schema

SQLITE_BUSY_TIMEOUT_MS = 10_000


def _tune_sqlite(dbapi_connection, _record) -> None:
    # WAL lets readers (chat look-ups) run while a writer (ingest, worker) holds the lock.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
    )
    event.listen(engine, "connect", _tune_sqlite)
    return engine


class Database:
    """One engine and its session factory; `with db.session() as s:` commits or rolls back."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def open(cls, url: str) -> "Database":
        engine = make_engine(url)
        upgrade_schema(engine)
        return cls(engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def close(self) -> None:
        self.engine.dispose()
