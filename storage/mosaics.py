"""Mosaic and tile rows: find a mosaic by name in its scope, store one in one transaction, and
look a tile up by its grid position (the unique (mosaic_id, row, col) index makes that one seek).
"""

from sqlalchemy import Connection, RowMapping, bindparam, insert, select
from sqlalchemy.orm import Session

from storage.models import Car, Mosaic, Tile


def mosaic_by_name(session: Session, scope: str, name: str) -> Mosaic | None:
    return session.scalar(select(Mosaic).where(Mosaic.owner_scope == scope, Mosaic.name == name))


def mosaics_in_scope(session: Session, scope: str | None) -> list[Mosaic]:
    """Newest first; scope None means every scope."""
    query = select(Mosaic)
    if scope is not None:
        query = query.where(Mosaic.owner_scope == scope)
    return list(session.scalars(query.order_by(Mosaic.created_at.desc(), Mosaic.id.desc())))


def mosaic_by_id(session: Session, mosaic_id: int) -> Mosaic | None:
    return session.get(Mosaic, mosaic_id)


def add_mosaic(session: Session, mosaic: Mosaic, tiles: list[dict]) -> Mosaic:
    """Insert the mosaic, then its tiles as one executemany (keys: row, col, car_id, x0, y0,
    x1, y1, score). The caller's transaction makes the pair atomic."""
    session.add(mosaic)
    session.flush()
    # Core insert: an executemany without ORM bookkeeping, several times faster for 10k rows.
    session.execute(insert(Tile.__table__), [{**tile, "mosaic_id": mosaic.id} for tile in tiles])
    return mosaic


# Built once: a chat reply or a gallery click runs this point query, and rebuilding the statement
# would cost more than SQLite takes to answer it.
_TILE_AT = (
    select(
        Tile.x0, Tile.y0, Tile.x1, Tile.y1, Tile.score,
        Car.id.label("car_id"), Car.media_key, Car.file_name, Car.make, Car.model, Car.year,
        Car.fuel, Car.co2_g_km, Car.emission_standard, Car.source,
    )
    .outerjoin(Car, Car.id == Tile.car_id)
    .where(
        Tile.mosaic_id == bindparam("mosaic_id"),
        Tile.row == bindparam("row"),
        Tile.col == bindparam("col"),
    )
)


def tile_at(db: Session | Connection, mosaic_id: int, row: int, col: int) -> RowMapping:
    """The tile at (row, col) with its car's columns (car_id None if the car was deleted)."""
    params = {"mosaic_id": mosaic_id, "row": row, "col": col}
    return db.execute(_TILE_AT, params).mappings().one()


def tile_cars(db: Session | Connection, mosaic_id: int) -> list[tuple[int | None, str | None]]:
    """(car id, original photo's media key) of every tile in row-major order; (None, None) where
    the car was removed from the library."""
    query = (
        select(Tile.car_id, Car.media_key)
        .outerjoin(Car, Car.id == Tile.car_id)
        .where(Tile.mosaic_id == mosaic_id)
        .order_by(Tile.row, Tile.col)
    )
    return [(car_id, media_key) for car_id, media_key in db.execute(query)]


def set_mosaic_setting(session: Session, mosaic_id: int, name: str, value: dict) -> None:
    """One entry of the mosaic's settings JSON (e.g. its pyramid), the others kept."""
    mosaic = session.get(Mosaic, mosaic_id)
    if mosaic is not None:
        # A new dict: SQLAlchemy sees a JSON column change only when the value is replaced.
        mosaic.settings = {**(mosaic.settings or {}), name: value}
