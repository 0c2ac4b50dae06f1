"""Alembic's environment: run by storage.migrate on the connection it passes in (there is no
alembic.ini; the script location is set in code)."""

from alembic import context

from storage.migrate import include_name
from storage.models import Base


def run_migrations() -> None:
    connection = context.config.attributes["connection"]
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        include_name=include_name,
        # SQLite alters a table by copying it; batch mode does that for future revisions.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
