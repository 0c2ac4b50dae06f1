"""Deep-zoom pyramids (DZI) of mosaics: the deepest level shows every car at CELL_PX, so a 200x200
mosaic is a 51,200 px square; libvips' dzsave cuts it, and the tiles live in the media store.

The full-size image is never held: it reaches dzsave as a PNG stream generated one row of cells at
a time (libvips reads it sequentially), so memory stays bounded for any grid up to MAX_TILES.

Memory budget: one row of cells three times over (the strip, its PNG lines, their deflate
blocks: 3 x cols x 192 KiB, 112 MiB at 200 columns), PHOTO_CACHE_BYTES of resized photos, and
dzsave's few rows of tiles per level (proportional to the width). It grows with the columns,
never with the rows: measured peaks are 375 MB at 48x48, 592 MB at 100x100 and 903 MB at
200x200 (a 51,200 px square), against 1.2 GB, 4.7 GB and ~16 GB for the flat full-size render
(bench/results/gallery-cpu.txt). The budget is 1 GiB up to 200 columns, about 1.3 GiB at the
widest grid (300 columns).
"""

import io
import json
import logging
import math
import shutil
import struct
import tempfile
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyvips
from PIL import Image

from core.context import AppContext
from core.errors import BadImage
from core.images import decode_image, square_thumbnail
from core.mosaic import cell_colours, crop_to_grid, load_tiles
from storage import cars as car_rows
from storage import mosaics as mosaic_rows
from storage.media import MediaMissing
from storage.models import Mosaic

# libvips reports every finished thread pool at INFO (hundreds a pyramid): keep its warnings only.
logging.getLogger("pyvips").setLevel(logging.WARNING)

# Each car on the deepest level, and the DZI tile size: one deepest tile is one car.
CELL_PX = 256
TILE_PX = 256
# One pixel of the neighbours around each tile, so tiles drawn side by side show no seams.
OVERLAP = 1
JPEG_QUALITY = 85
# Bumped when the pyramid's layout or look changes: older pyramids are then rebuilt on view.
PYRAMID_VERSION = 1
SETTING = "pyramid"
# Resized car photos kept while the rows are generated (192 KiB each at 256 px).
PHOTO_CACHE_BYTES = 192 * 1024 * 1024
# Media-store writes run side by side: each one waits on its own fsync.
PUT_THREADS = 4
# A build folder older than this was left by a crash.
STALE_BUILD_S = 6 * 3600


@dataclass(frozen=True)
class Level:
    cols: int
    rows: int
    keys: str  # the tiles' media keys, 64 hex characters each, row-major


@dataclass(frozen=True)
class Pyramid:
    """A built pyramid: the DZI descriptor and where each tile is stored."""

    manifest_key: str
    descriptor: str  # the .dzi XML, as DZI viewers read it
    tile_format: str  # the tiles' file extension: "jpeg" or "png"
    width: int
    height: int
    levels: tuple[Level, ...]

    def tile_key(self, level: int, col: int, row: int) -> str | None:
        """The media key of one tile, or None if the pyramid has no such tile."""
        if not 0 <= level < len(self.levels):
            return None
        grid = self.levels[level]
        if not (0 <= col < grid.cols and 0 <= row < grid.rows):
            return None
        start = 64 * (row * grid.cols + col)
        return grid.keys[start : start + 64]


def level_count(width: int, height: int) -> int:
    """DZI levels: level 0 is 1x1 px, each next level doubles, the last is full size."""
    return math.ceil(math.log2(max(width, height, 1))) + 1


def level_size(width: int, height: int, level: int) -> tuple[int, int]:
    scale = 2 ** (level_count(width, height) - 1 - level)
    return math.ceil(width / scale), math.ceil(height / scale)


def stored_pyramid(ctx: AppContext, mosaic: Mosaic) -> Pyramid | None:
    """The mosaic's pyramid if one of the current version is stored, else None."""
    stored = (mosaic.settings or {}).get(SETTING) or {}
    if stored.get("version") != PYRAMID_VERSION:
        return None
    try:
        return load_pyramid(ctx, stored["manifest"])
    except MediaMissing:
        return None


def pyramid_for(ctx: AppContext, mosaic: Mosaic) -> Pyramid:
    """The mosaic's stored pyramid, built (and recorded on the mosaic) if it has none."""
    if (pyramid := stored_pyramid(ctx, mosaic)) is not None:
        return pyramid
    pyramid = build_pyramid(ctx, mosaic)
    with ctx.db.session() as session:
        mosaic_rows.set_mosaic_setting(
            session, mosaic.id, SETTING,
            {"version": PYRAMID_VERSION, "manifest": pyramid.manifest_key},
        )
    return pyramid


_loaded: OrderedDict[str, Pyramid] = OrderedDict()
_loaded_lock = threading.Lock()
# A 200x200 mosaic's manifest is 3.4 MB of keys; this many stay parsed.
LOADED_PYRAMIDS = 16


def load_pyramid(ctx: AppContext, manifest_key: str) -> Pyramid:
    """A stored pyramid by its manifest's key (kept parsed for the next tile). MediaMissing if
    the manifest is gone."""
    with _loaded_lock:
        if (found := _loaded.get(manifest_key)) is not None:
            _loaded.move_to_end(manifest_key)
            return found
    manifest = json.loads(ctx.media.read(manifest_key))
    pyramid = Pyramid(
        manifest_key=manifest_key,
        descriptor=manifest["descriptor"],
        tile_format=manifest["format"],
        width=manifest["width"],
        height=manifest["height"],
        levels=tuple(Level(**level) for level in manifest["levels"]),
    )
    with _loaded_lock:
        _loaded[manifest_key] = pyramid
        while len(_loaded) > LOADED_PYRAMIDS:
            _loaded.popitem(last=False)
    return pyramid


def build_pyramid(ctx: AppContext, mosaic: Mosaic, tile_format: str = "jpeg") -> Pyramid:
    """Cut the mosaic's full-size image into a DZI pyramid with dzsave and store every tile and
    a manifest in the media store. tile_format is "jpeg" (the gallery's) or "png" (lossless)."""
    suffix = {"jpeg": f".jpeg[Q={JPEG_QUALITY}]", "png": ".png"}[tile_format]
    width, height = mosaic.cols * CELL_PX, mosaic.rows * CELL_PX
    with ctx.db.engine.connect() as connection:
        cars = mosaic_rows.tile_cars(connection, mosaic.id)
    treatment = _treatment(ctx, mosaic, cars)
    stream = _PngStream(_cell_rows(ctx, mosaic, cars), width, height)
    workspace = ctx.settings.data_dir / ".pyramids"
    workspace.mkdir(parents=True, exist_ok=True)
    _sweep_stale_builds(workspace)
    with tempfile.TemporaryDirectory(dir=workspace, prefix="build-") as folder:
        # Under the data directory, not /tmp: /tmp may be memory, and a pyramid is large.
        source = pyvips.SourceCustom()
        source.on_read(stream.read)
        image = pyvips.Image.new_from_source(source, "", access="sequential", fail_on="error")
        if treatment is not None:
            # Per cell: pixel * scale + offset, clipped to 0-255, computed by libvips on every
            # core as dzsave pulls the rows; the two small grids are stretched to cells.
            scale, offset = (pyvips.Image.new_from_array(grid).zoom(CELL_PX, CELL_PX)
                             for grid in treatment)
            image = (image * scale + offset).cast("uchar")
        try:
            image.dzsave(
                str(Path(folder) / "mosaic"), tile_size=TILE_PX, overlap=OVERLAP,
                suffix=suffix, layout="dz",
            )
        except pyvips.Error:
            if stream.error is None:
                raise
        # A photo that failed to load ends the stream early: the pyramid would be cut short.
        if stream.error is not None:
            raise stream.error
        descriptor = (Path(folder) / "mosaic.dzi").read_text(encoding="utf-8")
        levels = _store_tiles(ctx, Path(folder) / "mosaic_files", width, height, tile_format)
    manifest = {
        "version": PYRAMID_VERSION,
        "descriptor": descriptor,
        "format": tile_format,
        "width": width,
        "height": height,
        "levels": [level.__dict__ for level in levels],
    }
    key = ctx.media.put(json.dumps(manifest, separators=(",", ":")).encode())
    return Pyramid(key, descriptor, tile_format, width, height, tuple(levels))


def _store_tiles(
    ctx: AppContext, files: Path, width: int, height: int, tile_format: str
) -> list[Level]:
    def put(path: Path) -> str:
        return ctx.media.put(path.read_bytes())

    levels = []
    with ThreadPoolExecutor(PUT_THREADS) as pool:
        for level in range(level_count(width, height)):
            level_w, level_h = level_size(width, height, level)
            cols, rows = math.ceil(level_w / TILE_PX), math.ceil(level_h / TILE_PX)
            paths = [
                files / str(level) / f"{col}_{row}.{tile_format}"
                for row in range(rows)
                for col in range(cols)
            ]
            levels.append(Level(cols, rows, "".join(pool.map(put, paths))))
    return levels


def _sweep_stale_builds(workspace: Path) -> None:
    cutoff = time.time() - STALE_BUILD_S
    for leftover in workspace.glob("build-*"):
        if leftover.stat().st_mtime < cutoff:
            shutil.rmtree(leftover, ignore_errors=True)


# The full-size image, one row of cells at a time ----------------------------------------------


def _cell_rows(
    ctx: AppContext, mosaic: Mosaic, cars: list[tuple[int | None, str | None]]
) -> Iterator[np.ndarray]:
    """Each row of the mosaic at CELL_PX: (CELL_PX, cols * CELL_PX, 3) uint8, top to bottom; a
    cell is its car's photo, centre-cropped and resized to CELL_PX."""
    photos = _CellPhotos(ctx, mosaic)
    strip = np.empty((CELL_PX, mosaic.cols, CELL_PX, 3), np.uint8)
    for row in range(mosaic.rows):
        for col in range(mosaic.cols):
            strip[:, col] = photos.get(row, col, *cars[row * mosaic.cols + col])
        yield strip.reshape(CELL_PX, mosaic.cols * CELL_PX, 3)


def _treatment(
    ctx: AppContext, mosaic: Mosaic, cars: list[tuple[int | None, str | None]]
) -> tuple[np.ndarray, np.ndarray] | None:
    """The flat render's colour treatment of each cell as pixel * scale + offset: (rows, cols, 1)
    and (rows, cols, 3) float32, or None when there is none (or its target is gone).

    The render moves each tile `shift` of the way to its target cell's mean colour, then mixes
    it `blend` toward that colour (core.mosaic.render_grid); with the same offsets, computed
    from the same tiles, every deep cell has the colour of its tile in the render. A cell whose
    car left the library shows the render's own (already treated) pixels: scale 1, offset 0."""
    options = (mosaic.settings or {}).get("options", {})
    shift, blend = float(options.get("shift", 0.0)), float(options.get("blend", 0.0))
    colours = _target_colours(ctx, mosaic) if shift or blend else None
    if colours is None:
        return None
    means = _tile_means(ctx, {car for car, _ in cars if car is not None}, mosaic.tile_px)
    known = np.array([car in means for car, _ in cars])[:, None]
    mean = np.array([means.get(car, np.zeros(3, np.float32)) for car, _ in cars], np.float32)
    scale = np.where(known, 1 - blend, 1).astype(np.float32)
    treated = (1 - blend) * shift * (colours - mean) + blend * colours
    offset = np.where(known, treated, 0).astype(np.float32)
    return scale.reshape(mosaic.rows, mosaic.cols, 1), offset.reshape(mosaic.rows, mosaic.cols, 3)


def _tile_means(ctx: AppContext, car_ids: set[int], px: int) -> dict[int, np.ndarray]:
    """Mean RGB of each car's tile as the render drew it (its thumbnail at px), in batches."""
    ids, means = sorted(car_ids), {}
    for start in range(0, len(ids), 500):
        with ctx.db.session() as session:
            thumbnails = car_rows.thumbnails(session, ids[start : start + 500])
        batch = list(thumbnails)
        tiles = load_tiles([thumbnails[car] for car in batch], px)
        for car, mean in zip(batch, tiles.reshape(len(batch), -1, 3).mean(1, dtype=np.float32),
                             strict=True):
            means[car] = mean
    return means


def _target_colours(ctx: AppContext, mosaic: Mosaic) -> np.ndarray | None:
    """The target's cells' mean RGB, as the render used them; None if the target is gone."""
    try:
        data = ctx.media.read(mosaic.target_media_key)
        target = decode_image(data, ctx.settings.max_image_pixels)
    except (MediaMissing, BadImage, ValueError, TypeError):
        return None
    return cell_colours(crop_to_grid(target, mosaic.rows, mosaic.cols), mosaic.rows, mosaic.cols)


class _CellPhotos:
    """Car photos at CELL_PX, by car, kept in an LRU bounded by PHOTO_CACHE_BYTES.

    The original photo first; if it is no longer stored, the library's thumbnail enlarged; if
    the car was removed from the library, the tile cropped from the flat render, enlarged."""

    def __init__(self, ctx: AppContext, mosaic: Mosaic):
        self.ctx, self.mosaic = ctx, mosaic
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.limit = max(1, PHOTO_CACHE_BYTES // (CELL_PX * CELL_PX * 3))
        self._render: Image.Image | None = None

    def get(self, row: int, col: int, car_id: int | None, media_key: str | None) -> np.ndarray:
        if car_id is None:
            return self._from_render(row, col)
        if (photo := self.cache.get(car_id)) is not None:
            self.cache.move_to_end(car_id)
            return photo
        photo = self._load(car_id, media_key)
        self.cache[car_id] = photo
        if len(self.cache) > self.limit:
            self.cache.popitem(last=False)
        return photo

    def _load(self, car_id: int, media_key: str | None) -> np.ndarray:
        max_pixels = self.ctx.settings.max_image_pixels
        try:
            image = decode_image(self.ctx.media.read(media_key), max_pixels, draft_px=CELL_PX)
        except (MediaMissing, BadImage, ValueError, TypeError):
            with self.ctx.db.session() as session:
                thumbnail = car_rows.thumbnails(session, [car_id]).get(car_id)
            if thumbnail is None:
                return self._grey()
            image = decode_image(thumbnail, max_pixels)
        return np.asarray(square_thumbnail(image, CELL_PX))

    def _from_render(self, row: int, col: int) -> np.ndarray:
        if self._render is None:
            data = self.ctx.media.read(self.mosaic.render_media_key)
            self._render = Image.open(io.BytesIO(data)).convert("RGB")
        px = self.mosaic.tile_px
        crop = self._render.crop((col * px, row * px, (col + 1) * px, (row + 1) * px))
        return np.asarray(crop.resize((CELL_PX, CELL_PX), Image.Resampling.LANCZOS))

    @staticmethod
    def _grey() -> np.ndarray:
        return np.full((CELL_PX, CELL_PX, 3), 128, np.uint8)


class _PngStream:
    """An uncompressed PNG of rows of pixels, made as libvips reads it (SourceCustom.on_read).

    PNG because every libvips build reads it from a stream (PPM and .v loaders need files or are
    left out of some builds); stored deflate blocks make the encoding a copy plus checksums."""

    def __init__(self, strips: Iterator[np.ndarray], width: int, height: int):
        self.pieces = self._pieces(strips, width, height)
        self.pending = memoryview(b"")
        self.error: BaseException | None = None

    def read(self, size: int) -> bytes:
        try:
            while not self.pending:
                self.pending = memoryview(next(self.pieces))
        except StopIteration:
            return b""
        except Exception as error:  # noqa: BLE001 - handed to the caller once dzsave gives up
            self.error = error
            return b""
        out, self.pending = self.pending[:size], self.pending[size:]
        return bytes(out)

    @staticmethod
    def _pieces(strips: Iterator[np.ndarray], width: int, height: int) -> Iterator[bytes]:
        header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
        yield b"\x89PNG\r\n\x1a\n"
        yield from _chunk(b"IHDR", header)
        deflate = zlib.compressobj(0)
        lines = None
        for strip in strips:
            if lines is None or lines.shape[0] != strip.shape[0]:
                lines = np.zeros((strip.shape[0], 1 + width * 3), np.uint8)  # filter 0: none
            lines[:, 1:] = strip.reshape(strip.shape[0], -1)
            if data := deflate.compress(lines):
                yield from _chunk(b"IDAT", data)
        yield from _chunk(b"IDAT", deflate.flush())
        yield from _chunk(b"IEND", b"")


def _chunk(kind: bytes, data: bytes) -> Iterator[bytes]:
    """A PNG chunk in three pieces, so a row's data is never copied into a bigger buffer."""
    yield struct.pack(">I", len(data)) + kind
    yield data
    yield struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))
