"""What crashed writers leave in the media store: half-written objects, and whole ones no row
points at (a `mosaic build` killed between saving its render and committing its row)."""

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select, union

from storage.db import Database
from storage.media import MediaStore
from storage.models import Base


@dataclass
class SweepReport:
    incomplete: int
    orphans: int
    orphan_bytes: int


def media_key_columns() -> list:
    """Every column that holds a media key: the columns named `media_key` or `*_media_key`."""
    return [column for table in Base.metadata.sorted_tables for column in table.columns
            if column.name == "media_key" or column.name.endswith("_media_key")]


def referenced_keys(db: Database) -> set[str]:
    query = union(*(select(column).where(column.is_not(None))
                    for column in media_key_columns()))
    with db.session() as session:
        return set(session.scalars(query))


def sweep_media(db: Database, media: MediaStore, older_than: timedelta,
                dry_run: bool = False) -> SweepReport:
    """Removes leftovers older than `older_than` (younger ones may belong to a running writer).

    Keys are listed before the rows are read, so an object whose row commits in between is
    seen as referenced and kept."""
    incomplete = 0 if dry_run else media.sweep_incomplete(older_than, thorough=True)
    candidates = set(media.keys(older_than))
    orphans = candidates - referenced_keys(db)
    size = 0
    for key in sorted(orphans):
        size += media.size(key)
        if not dry_run:
            media.delete(key)
    return SweepReport(incomplete, len(orphans), size)
