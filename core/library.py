"""The car tile library: ingest photos (dedup by hash, safe decode, thumbnail, Lab-grid feature,
metadata from a labels CSV) and hand the feature matrix to the mosaic matcher.
"""

import csv
import os
import sys
import time
import weakref
from collections.abc import Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from sqlalchemy.exc import IntegrityError
from tqdm import tqdm

from core.context import AppContext
from core.errors import BadImage
from core.images import LAB_GRID, decode_image, encode_jpeg, lab_grid, square_thumbnail
from storage import cars as car_rows
from storage.db import Database
from storage.media import MediaStore, sha256_hex
from storage.models import Car

# Stored tile thumbnails: 96 px renders sharply at tile sizes up to 96 px and downsamples
# cleanly (JPEG draft halves it for free) to the usual 16-64 px; about 3-4 KB each.
THUMBNAIL_PX = 96
THUMBNAIL_QUALITY = 88
# Photos per transaction: an interrupted ingest keeps every finished batch.
BATCH_SIZE = 64
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
METADATA_FIELDS = ("make", "model", "year", "fuel", "co2_g_km", "emission_standard", "source")
_TEXT_LIMITS = {"make": 80, "model": 120, "fuel": 40, "emission_standard": 40, "source": 255}


@dataclass
class IngestReport:
    added: int = 0
    skipped_duplicates: int = 0
    labels_updated: int = 0  # photos already in the library whose labels changed
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    # Files under the directory that are not photos by their suffix (e.g. .svg drawings).
    not_photos: list[str] = field(default_factory=list)
    label_problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def photos_per_second(self) -> float:
        return self.added / self.seconds if self.seconds else 0.0


@dataclass
class LibraryStats:
    photos: int
    original_bytes: int
    thumbnail_bytes: int
    by_fuel: list[tuple[str | None, int]]
    by_make: list[tuple[str | None, int]]


# Metadata ------------------------------------------------------------------------------------


def clean_metadata(raw: dict) -> tuple[dict, list[str]]:
    """Raw text fields -> typed Car columns, and one sentence per value that was dropped.

    Unknown keys are ignored; empty values mean unknown."""
    clean: dict = {}
    problems: list[str] = []
    for name in METADATA_FIELDS:
        value = raw.get(name)
        if value is None or str(value).strip() == "":
            continue
        text = str(value).strip()
        if name == "year":
            try:
                year = int(float(text))
            except ValueError:
                problems.append(f"year {text!r} is not a number")
                continue
            if not 1885 <= year <= 2100:
                problems.append(f"year {year} is not a plausible model year")
                continue
            clean[name] = year
        elif name == "co2_g_km":
            try:
                co2 = float(text)
            except ValueError:
                problems.append(f"co2_g_km {text!r} is not a number")
                continue
            if not 0 <= co2 < 2000:
                problems.append(f"co2_g_km {co2:g} is out of range")
                continue
            clean[name] = co2
        else:
            clean[name] = text[: _TEXT_LIMITS[name]]
    return clean, problems


def read_labels(path: Path) -> tuple[dict[str, dict], list[str]]:
    """labels CSV -> ({file name: metadata}, problems). Columns: file, make, model, year, fuel,
    co2_g_km, emission_standard, source; any may be missing except `file`, extra ones ignored.
    A bad value is reported and dropped; the rest of its row still applies."""
    labels: dict[str, dict] = {}
    problems: list[str] = []
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = {(name or "").strip().lower(): name for name in reader.fieldnames or []}
        if "file" not in columns:
            return {}, [f"{path.name} has no 'file' column, so no metadata was applied."]
        for line, row in enumerate(reader, start=2):
            raw = {key: row.get(original) for key, original in columns.items()}
            file_name = Path((raw.get("file") or "").strip()).name
            if not file_name:
                problems.append(f"{path.name} line {line}: no file name, row skipped.")
                continue
            metadata, bad = clean_metadata(raw)
            problems += [f"{path.name} line {line} ({file_name}): {why}, dropped." for why in bad]
            if file_name in labels:
                problems.append(
                    f"{path.name} line {line}: {file_name} listed again, this row wins."
                )
            labels[file_name] = metadata
    return labels, problems


# Ingest --------------------------------------------------------------------------------------


def prepare_photo(data: bytes, media: MediaStore, max_pixels: int, max_bytes: int) -> dict:
    """Decode, thumbnail and featurise one photo and store its original; returns Car columns
    (all but file name and metadata). Raises BadImage. Runs in worker threads."""
    image = decode_image(data, max_pixels, max_bytes=max_bytes, draft_px=THUMBNAIL_PX)
    thumbnail = square_thumbnail(image, THUMBNAIL_PX)
    width, height = image.info["original_size"]
    key = media.put(data)  # the media key is the bytes' sha256
    return {
        "sha256": key,
        "media_key": key,
        "width": width,
        "height": height,
        "byte_size": len(data),
        "thumbnail": encode_jpeg(thumbnail, THUMBNAIL_QUALITY),
        "features": lab_grid(thumbnail, LAB_GRID).tobytes(),
        "feature_grid": LAB_GRID,
    }


def find_photos(paths_or_dir: Path | str | Iterable[Path | str]) -> list[Path]:
    """A directory -> its image files (recursively, by suffix, hidden ones left out, sorted);
    a list of files -> those files as given."""
    return _find_files(paths_or_dir)[0]


def _find_files(paths_or_dir: Path | str | Iterable[Path | str]) -> tuple[list[Path], list[Path]]:
    """(photos, other files): a directory's visible files split by suffix, each list sorted; a
    file or a list of files are all taken as photos."""
    if isinstance(paths_or_dir, str | os.PathLike):
        root = Path(paths_or_dir)
        if not root.is_dir():
            return [root], []
        photos, others = [], []
        for path in sorted(root.rglob("*")):
            if any(part.startswith(".") for part in path.relative_to(root).parts):
                continue
            if path.is_file():
                (photos if path.suffix.lower() in IMAGE_SUFFIXES else others).append(path)
        return photos, others
    return [Path(path) for path in paths_or_dir], []


def _read(path: Path, max_bytes: int) -> tuple[bytes | None, str | None, str | None]:
    """(bytes, sha256, None) or (None, None, why not)."""
    try:
        if path.stat().st_size > max_bytes:
            return None, None, f"larger than {max_bytes // (1024 * 1024)} MiB"
        data = path.read_bytes()
    except FileNotFoundError:
        return None, None, "file not found"
    except OSError as error:
        return None, None, f"cannot be read ({error.strerror or error})"
    return data, sha256_hex(data), None


def _prepare_or_reason(data: bytes, media: MediaStore, max_pixels: int, max_bytes: int):
    try:
        return prepare_photo(data, media, max_pixels, max_bytes), None
    except BadImage as error:
        return None, str(error)


def ingest_paths(
    ctx: AppContext,
    paths_or_dir: Path | str | Iterable[Path | str],
    labels_csv: Path | str | None = None,
    progress: bool = True,
    *,
    batch_size: int = BATCH_SIZE,
    workers: int | None = None,
) -> IngestReport:
    """Add every new photo under a directory (or in a list of files) to the library.

    Known hashes are skipped before decoding, so a second run adds nothing and an interrupted
    run resumes where it stopped (each batch commits on its own). Unreadable files land in
    `report.failed` with the reason; they never stop the others. Files of a directory that are
    not photos by their suffix are listed in `report.not_photos`.
    """
    started = time.perf_counter()
    report = IngestReport()
    labels: dict[str, dict] = {}
    if labels_csv is not None:
        labels, report.label_problems = read_labels(Path(labels_csv))
    paths, others = _find_files(paths_or_dir)
    report.not_photos = [str(path) for path in others]
    seen: set[str] = set()
    bar = tqdm(
        total=len(paths),
        unit="photo",
        desc="Adding photos",
        disable=not progress or not sys.stderr.isatty(),
    )
    with bar, _executor(workers) as pool:
        for start in range(0, len(paths), batch_size):
            batch = paths[start : start + batch_size]
            _ingest_batch(ctx, pool, batch, labels, seen, report)
            bar.update(len(batch))
    report.seconds = time.perf_counter() - started
    return report


def _ingest_batch(
    ctx: AppContext,
    pool: Executor,
    batch: list[Path],
    labels: dict[str, dict],
    seen: set[str],
    report: IngestReport,
) -> None:
    """Read and hash the batch, drop known photos, decode the rest, insert them in one go."""
    settings = ctx.settings
    read = list(pool.map(partial(_read, max_bytes=settings.max_upload_bytes), batch))
    with ctx.db.session() as session:
        seen |= car_rows.known_shas(session, [sha for _, sha, _ in read if sha])
    fresh: list[tuple[Path, bytes]] = []
    relabel: dict[str, dict] = {}
    for path, (data, sha, reason) in zip(batch, read, strict=True):
        if reason:
            report.failed.append((str(path), reason))
        elif sha in seen:
            report.skipped_duplicates += 1
            if labels.get(path.name):
                relabel[sha] = labels[path.name]
        else:
            seen.add(sha)
            fresh.append((path, data))
    prepare = partial(
        _prepare_or_reason,
        media=ctx.media,
        max_pixels=settings.max_image_pixels,
        max_bytes=settings.max_upload_bytes,
    )
    rows = []
    for (path, _), (columns, reason) in zip(
        fresh, pool.map(prepare, [data for _, data in fresh]), strict=True
    ):
        if reason:
            report.failed.append((str(path), reason))
        else:
            rows.append({**columns, "file_name": path.name[:255], **labels.get(path.name, {})})
    if relabel:
        with ctx.db.session() as session:
            report.labels_updated += car_rows.update_metadata(session, relabel)
    report.added += _insert(ctx, rows, report)


def _insert(ctx: AppContext, rows: list[dict], report: IngestReport) -> int:
    """Insert one batch in one transaction; returns how many cars were added."""
    if not rows:
        return 0
    try:
        with ctx.db.session() as session:
            car_rows.add_cars(session, rows)
        return len(rows)
    except IntegrityError:
        # Another process added some of these photos since we looked: keep the rest.
        with ctx.db.session() as session:
            known = car_rows.known_shas(session, [row["sha256"] for row in rows])
            new = [row for row in rows if row["sha256"] not in known]
            car_rows.add_cars(session, new)
        report.skipped_duplicates += len(rows) - len(new)
        return len(new)


def _executor(workers: int | None) -> Executor:
    # Threads, and more than cores: Pillow and hashlib release the GIL while decoding and
    # hashing, and most of a photo's time is the media store's fsync of its original, which
    # waits on the disk, not the CPU. A process pool measured slower (it pickles every photo).
    return ThreadPoolExecutor(max_workers=workers or min(32, 8 * (os.cpu_count() or 2)))


def add_car_photo(
    ctx: AppContext, data: bytes, file_name: str, metadata: dict | None = None
) -> Car:
    """Add one photo (bytes) to the library, or return the car already holding these bytes.
    Raises BadImage; bad metadata values raise ValueError with one sentence."""
    with ctx.db.session() as session:
        known = car_rows.car_by_sha(session, sha256_hex(data))
    if known is not None:
        return known
    clean, problems = clean_metadata(metadata or {})
    if problems:
        raise ValueError(f"Bad car metadata: {'; '.join(problems)}.")
    settings = ctx.settings
    columns = prepare_photo(data, ctx.media, settings.max_image_pixels, settings.max_upload_bytes)
    try:
        with ctx.db.session() as session:
            (car,) = car_rows.add_cars(
                session, [{**columns, "file_name": Path(file_name).name[:255], **clean}]
            )
    except IntegrityError:  # the same bytes were added meanwhile
        with ctx.db.session() as session:
            return car_rows.car_by_sha(session, columns["sha256"])
    return car


# Reading the library -------------------------------------------------------------------------


def car_info(car: Car) -> dict:
    """What is known about a car photo, for a chat reply, the gallery or the CLI."""
    return {
        "id": car.id,
        "file_name": car.file_name,
        **{f: getattr(car, f) for f in METADATA_FIELDS},
    }


def list_library(
    ctx: AppContext, *, limit: int = 20, page: int = 1, newest_first: bool = True
) -> list[Car]:
    """One page of cars (pages count from 1)."""
    with ctx.db.session() as session:
        return car_rows.list_cars(
            session, limit=limit, offset=(max(page, 1) - 1) * limit, newest_first=newest_first
        )


def library_stats(ctx: AppContext) -> LibraryStats:
    with ctx.db.session() as session:
        totals = car_rows.totals(session)
        return LibraryStats(
            photos=totals["photos"],
            original_bytes=totals["original_bytes"],
            thumbnail_bytes=totals["thumbnail_bytes"],
            by_fuel=car_rows.counts_by(session, "fuel"),
            by_make=car_rows.counts_by(session, "make"),
        )


@dataclass
class LibraryIndex:
    """The whole library as arrays for matching: row i of `features` is car `car_ids[i]`."""

    car_ids: np.ndarray  # (N,) int64
    shas: list[str]
    features: np.ndarray  # (N, grid * grid * 3) float32, each row a row-major (grid, grid, 3)
    grid: int
    fingerprint: tuple

    def __len__(self) -> int:
        return len(self.car_ids)

    @classmethod
    def load(cls, ctx: AppContext) -> "LibraryIndex":
        """The index for this database, cached and reloaded only when the library changed."""
        with ctx.db.session() as session:
            fingerprint = car_rows.library_fingerprint(session)
            cached = _index_cache.get(ctx.db)
            if cached is not None and cached.fingerprint == fingerprint:
                return cached
            ids, shas, blobs, grids = car_rows.feature_rows(session)
        if len(set(grids)) > 1:
            raise ValueError(
                f"cars were indexed with different feature grids: {sorted(set(grids))}"
            )
        grid = grids[0] if grids else LAB_GRID
        features = np.frombuffer(b"".join(blobs), np.float32).reshape(len(ids), grid * grid * 3)
        index = cls(np.asarray(ids, np.int64), shas, features, grid, fingerprint)
        _index_cache[ctx.db] = index
        return index

    def thumbnails(self, ctx: AppContext, car_ids: list[int]) -> dict[int, bytes]:
        """JPEG thumbnails (THUMBNAIL_PX square) of these cars, fetched on demand."""
        with ctx.db.session() as session:
            return car_rows.thumbnails(session, car_ids)


_index_cache: "weakref.WeakKeyDictionary[Database, LibraryIndex]" = weakref.WeakKeyDictionary()
