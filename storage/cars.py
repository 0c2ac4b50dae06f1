"""Queries on the car library table: look-ups by hash, inserts in batches, listings and totals."""

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.models import Car


def car_by_sha(session: Session, sha256: str) -> Car | None:
    return session.scalar(select(Car).where(Car.sha256 == sha256))


def car_by_id(session: Session, car_id: int) -> Car | None:
    return session.get(Car, car_id)


def known_shas(session: Session, shas: list[str]) -> set[str]:
    """Which of these hashes the library already holds (asked in chunks under SQLite's limit)."""
    found: set[str] = set()
    for start in range(0, len(shas), 500):
        part = shas[start : start + 500]
        found.update(session.scalars(select(Car.sha256).where(Car.sha256.in_(part))))
    return found


def add_cars(session: Session, rows: list[dict]) -> list[Car]:
    """Insert one Car per dict of column values; ids are assigned on return."""
    cars = [Car(**row) for row in rows]
    session.add_all(cars)
    session.flush()
    return cars


def update_metadata(session: Session, by_sha: dict[str, dict]) -> int:
    """Set metadata columns on the cars with these hashes; returns how many cars changed."""
    changed = 0
    for start in range(0, len(by_sha), 500):
        part = list(by_sha)[start : start + 500]
        for car in session.scalars(select(Car).where(Car.sha256.in_(part))):
            values = by_sha[car.sha256]
            if any(getattr(car, name) != value for name, value in values.items()):
                for name, value in values.items():
                    setattr(car, name, value)
                changed += 1
    return changed


def count_cars(session: Session) -> int:
    return session.scalar(select(func.count(Car.id))) or 0


def list_cars(
    session: Session, *, limit: int, offset: int = 0, newest_first: bool = True
) -> list[Car]:
    order = (Car.added_at.desc(), Car.id.desc()) if newest_first else (Car.id,)
    return list(session.scalars(select(Car).order_by(*order).limit(limit).offset(offset)))


def library_fingerprint(session: Session) -> tuple:
    """Changes whenever a car is added or removed, so a cached feature matrix knows it is stale."""
    return tuple(
        session.execute(select(func.count(Car.id), func.max(Car.id), func.max(Car.added_at))).one()
    )


def feature_rows(session: Session) -> tuple[list[int], list[str], list[bytes], list[int]]:
    """Every car's id, sha256, feature bytes and feature grid size, by id."""
    rows = session.execute(
        select(Car.id, Car.sha256, Car.features, Car.feature_grid).order_by(Car.id)
    ).all()
    return (
        [r.id for r in rows],
        [r.sha256 for r in rows],
        [r.features for r in rows],
        [r.feature_grid for r in rows],
    )


def thumbnails(session: Session, car_ids: list[int]) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    for start in range(0, len(car_ids), 500):
        # numpy integers do not bind as SQLite integers: the query would silently match nothing.
        part = [int(car_id) for car_id in car_ids[start : start + 500]]
        query = select(Car.id, Car.thumbnail).where(Car.id.in_(part))
        found.update((car_id, thumbnail) for car_id, thumbnail in session.execute(query))
    return found


def totals(session: Session) -> dict:
    """Photo count, bytes of originals and of thumbnails."""
    count, original, thumbs = session.execute(
        select(func.count(Car.id), func.sum(Car.byte_size), func.sum(func.length(Car.thumbnail)))
    ).one()
    return {"photos": count or 0, "original_bytes": original or 0, "thumbnail_bytes": thumbs or 0}


def counts_by(session: Session, column_name: str) -> list[tuple[str | None, int]]:
    """(value, photos) for one metadata column ("fuel", "make", ...), most photos first."""
    column = getattr(Car, column_name)
    query = (
        select(column, func.count(Car.id))
        .group_by(column)
        .order_by(func.count(Car.id).desc(), column)
    )
    return [(value, count) for value, count in session.execute(query)]
