"""Photomosaic builder: a target image becomes a grid of cells, each filled with the car photo whose
CIELAB grid matches it best under repeat limits; plus tile coordinates and the chat preview.
"""

import io
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from sqlalchemy.exc import IntegrityError
from tqdm import tqdm

from core.context import AppContext
from core.errors import (
    BadCoordinate,
    BadMosaicName,
    BadMosaicOptions,
    EmptyLibrary,
    LibraryTooSmall,
    MosaicExists,
)
from core.images import decode_image, rgb_to_lab
from core.library import LibraryIndex
from storage import mosaics as mosaic_rows
from storage.media import sha256_hex
from storage.models import Mosaic

# progress(stage, done, total): the CLI draws it as a bar, the bots as a status line.
Progress = Callable[[str, int, int], None]

MAX_NAME_CHARS = 80
MAX_COLS = 300
MAX_TILES = 40_000
# Distance chunks stay under this many bytes however large the library and the grid are.
DISTANCE_BUDGET_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class MosaicOptions:
    """How a mosaic is built. The defaults make an animal readable from grey real-car photos."""

    cols: int = 60
    tile_px: int = 32
    # Copies of one photo allowed in the mosaic; None lets the best photos repeat freely.
    max_uses: int | None = None
    # Two copies of the same photo are more than this many cells apart (rows and columns).
    spacing: int = 3
    # Mix of each rendered tile with the flat colour of its target cell (0 keeps the photo).
    blend: float = 0.15
    # How far each tile's mean colour is moved onto its cell's mean colour (0 none, 1 fully).
    shift: float = 0.8
    # How far the target's Lab distribution is mapped onto the library's before matching.
    adapt: float = 1.0
    # Softmax temperature in Lab distance units: candidates closer than this tie, broken at random.
    temperature: float = 1.0
    # Best matches per cell the placement may choose from before searching the whole library.
    candidates: int = 32
    seed: int = 0

    def checked(self) -> "MosaicOptions":
        """Self, or BadMosaicOptions naming the first value out of range."""
        problems = [
            (not 1 <= self.cols <= MAX_COLS, f"Columns must be between 1 and {MAX_COLS}."),
            (not 4 <= self.tile_px <= 256, "The tile size must be between 4 and 256 pixels."),
            (self.max_uses is not None and self.max_uses < 1, "Max uses must be at least 1."),
            (not 0 <= self.spacing <= 50, "The spacing must be between 0 and 50 tiles."),
            (not 1 <= self.candidates <= 1024, "Candidates must be between 1 and 1024."),
            (not 0 < self.temperature <= 100, "The temperature must be above 0, at most 100."),
            *((not 0 <= getattr(self, name) <= 1, f"{name.capitalize()} must be between 0 and 1.")
              for name in ("blend", "shift", "adapt")),
        ]
        for failed, sentence in problems:
            if failed:
                raise BadMosaicOptions(sentence)
        return self


# Coordinates ---------------------------------------------------------------------------------

_LETTERS_NUMBER = re.compile(r"^([A-Za-z]{1,3})\s*(\d{1,6})$")
_ROW_COMMA_COL = re.compile(r"^(\d{1,6})\s*[,;]\s*(\d{1,6})$")


def column_label(col: int) -> str:
    """0 -> A, 25 -> Z, 26 -> AA, 27 -> AB (spreadsheet columns)."""
    label = ""
    col += 1
    while col:
        col, rest = divmod(col - 1, 26)
        label = chr(ord("A") + rest) + label
    return label


def column_index(label: str) -> int:
    index = 0
    for letter in label.upper():
        index = index * 26 + ord(letter) - ord("A") + 1
    return index - 1


def format_coordinate(row: int, col: int) -> str:
    """0-based (row, col) -> the label the preview shows, e.g. (6, 2) -> "C7"."""
    return f"{column_label(col)}{row + 1}"


def parse_coordinate(text: str, rows: int, cols: int) -> tuple[int, int]:
    """A tile coordinate -> 0-based (row, col).

    "C7" (any case) is column C, row 7, as labelled on the preview; "7,3" is row 7, column 3 (C7),
    both counted from 1. Raises BadCoordinate if it does not parse or lies off the grid.
    """
    cleaned = text.strip()
    if match := _LETTERS_NUMBER.match(cleaned):
        col, row = column_index(match[1]), int(match[2]) - 1
    elif match := _ROW_COMMA_COL.match(cleaned):
        row, col = int(match[1]) - 1, int(match[2]) - 1
    else:
        raise BadCoordinate(
            f'"{cleaned[:20]}" is not a tile coordinate: write a column letter and a row number '
            "such as C7, or row,column such as 7,3 (the same tile)."
        )
    if not (0 <= row < rows and 0 <= col < cols):
        raise BadCoordinate(
            f"{cleaned.upper()} is off the grid: columns run from A to {column_label(cols - 1)} "
            f"and rows from 1 to {rows}."
        )
    return row, col


# Cells and features --------------------------------------------------------------------------


def grid_rows(width: int, height: int, cols: int) -> int:
    """Rows of square cells that keep the target's aspect ratio."""
    return max(1, round(cols * height / width))


def crop_to_grid(image: Image.Image, rows: int, cols: int) -> Image.Image:
    """Centre-crop the target to the grid's aspect ratio so cells stay square."""
    width, height = image.size
    if width * rows > height * cols:
        new_width = max(1, round(height * cols / rows))
        left = (width - new_width) // 2
        return image.crop((left, 0, left + new_width, height))
    new_height = max(1, round(width * rows / cols))
    top = (height - new_height) // 2
    return image.crop((0, top, width, top + new_height))


def cell_features(image: Image.Image, rows: int, cols: int, k: int) -> np.ndarray:
    """(rows*cols, k*k*3) float32: each cell's k x k grid of CIELAB colours, row-major cells,
    laid out like the library's features (k rows, k columns, L a b)."""
    small = np.asarray(image.resize((cols * k, rows * k), Image.Resampling.BOX))
    lab = rgb_to_lab(small).astype(np.float32)
    return lab.reshape(rows, k, cols, k, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, -1)


def cell_colours(image: Image.Image, rows: int, cols: int) -> np.ndarray:
    """(rows*cols, 3) float32 mean RGB of each cell, the colour tiles are shifted toward."""
    small = image.resize((cols, rows), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32).reshape(rows * cols, 3)


def adapt_palette(cells: np.ndarray, library: np.ndarray, strength: float) -> np.ndarray:
    """Map the target's per-channel Lab mean and spread onto the library's (Reinhard transfer).

    Real car photos are mostly grey: matched as it is, a colourful animal finds the same few
    grey cars everywhere. Mapped onto the library's own range, the animal's light and dark
    parts pick light and dark cars, so its shape survives; the render shifts the colour back.
    """
    if strength == 0:
        return cells
    source, palette = cells.reshape(-1, 3), library.reshape(-1, 3)
    scale = palette.std(0) / np.maximum(source.std(0), 1e-3)
    mapped = (source - source.mean(0)) * scale + palette.mean(0)
    mixed = (1 - strength) * source + strength * mapped
    return mixed.reshape(cells.shape).astype(np.float32)


# Matching ------------------------------------------------------------------------------------


def nearest_candidates(
    cells: np.ndarray, library: np.ndarray, k: int, progress: Progress | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The k library rows closest to each cell: (indices int64, mean squared Lab distance).

    Distances come from one float32 matmul per chunk of cells, ||a||^2 - 2ab + ||b||^2, with
    chunks sized to DISTANCE_BUDGET_BYTES. Selecting the k best from N per cell is the costly
    part, so columns are split into blocks: the k best of a row lie in the k blocks with the
    smallest minima (any other block's minimum already loses to k smaller values), and only
    those k blocks are searched.
    """
    count, n = cells.shape[0], library.shape[0]
    k = min(k, n)
    width = cells.shape[1]
    blocks = max(k, min(n, int(math.sqrt(n * k))))
    block_len = -(-n // blocks)
    padded = blocks * block_len
    # Augmented rows fold -2ab + ||b||^2 into one product; padding rows can never win.
    lib_aug = np.zeros((padded, width + 1), np.float32)
    lib_aug[:n, :width] = library
    lib_aug[:n, width] = (library.astype(np.float64) ** 2).sum(1)
    lib_aug[n:, width] = np.float32(1e30)
    lib_aug_t = np.ascontiguousarray(lib_aug.T)
    cell_norms = (cells.astype(np.float64) ** 2).sum(1)

    chunk = max(1, DISTANCE_BUDGET_BYTES // (padded * 4))
    indices = np.empty((count, k), np.int64)
    distances = np.empty((count, k), np.float32)
    for start in range(0, count, chunk):
        part = cells[start : start + chunk]
        rows = part.shape[0]
        query = np.empty((rows, width + 1), np.float32)
        query[:, :width] = -2 * part
        query[:, width] = 1
        scores = query @ lib_aug_t  # (rows, padded); column j*blocks + b lies in block b
        strided = scores.reshape(rows, block_len, blocks)
        best_blocks = np.argpartition(strided.min(1), k - 1, axis=1)[:, :k]
        # Columns of the k best blocks, as (rows, block_len * k); a flat take is the fast gather.
        columns = (np.arange(block_len)[None, :, None] * blocks + best_blocks[:, None, :]).reshape(
            rows, -1
        )
        pool = np.take(scores.ravel(), columns + (np.arange(rows) * padded)[:, None])
        top = np.argpartition(pool, k - 1, axis=1)[:, :k]
        values = np.take_along_axis(pool, top, axis=1)
        indices[start : start + rows] = np.take_along_axis(columns, top, axis=1)
        distances[start : start + rows] = values + cell_norms[start : start + rows, None]
        if progress:
            progress("matching", start + rows, count)
    np.maximum(distances, 0, out=distances)
    distances /= width
    return indices, distances


def attention_logits(mean_sq_distance: np.ndarray, temperature: float) -> np.ndarray:
    """The paper's pixel-level attention score before the softmax: -RMS Lab distance / T."""
    return -np.sqrt(mean_sq_distance) / temperature


@dataclass
class Placement:
    choice: np.ndarray  # (cells,) library row per cell
    score: np.ndarray  # (cells,) softmax attention weight of the chosen photo in its cell
    searched_whole_library: int  # cells whose candidates were all used up or too close
    spacing_relaxed: int  # cells where no photo could honour the spacing


def place_tiles(
    cells: np.ndarray,
    library: np.ndarray,
    rows: int,
    cols: int,
    options: MosaicOptions,
    rng: np.random.Generator,
    progress: Progress | None = None,
) -> Placement:
    """Choose one library photo per cell under the use limit and the spacing.

    Each cell samples among its candidates by the Gumbel-max trick, which draws from
    softmax(logits): near-ties break at random with the seed while clear winners win. Cells whose
    sampled best match is closest go first (a raster order would leave the last rows the worst
    photos), each taking its first sampled photo still allowed. Cells whose candidates were all
    used up or too close are then filled from every photo left (see _fill_from_whole_library).
    """
    count, n = rows * cols, library.shape[0]
    max_uses = options.max_uses or count
    if max_uses * n < count:
        raise LibraryTooSmall(
            f"The library has {n} photos, and at {max_uses} uses each they fill only "
            f"{max_uses * n} of {count} cells: allow more uses or use fewer columns."
        )
    grid = _Grid(rows, cols, options.spacing, n)
    choice = np.empty(count, np.int64)
    score = np.empty(count, np.float32)
    indices, distances = nearest_candidates(cells, library, options.candidates, progress)
    logits = attention_logits(distances, options.temperature)
    weights = np.exp(logits - logits.max(1, keepdims=True))
    weights /= weights.sum(1, keepdims=True)
    perturbed = logits + rng.gumbel(size=logits.shape)
    order = np.argsort(-perturbed, axis=1, kind="stable")
    ranked = np.take_along_axis(indices, order, axis=1).tolist()
    ranked_weights = np.take_along_axis(weights, order, axis=1)
    priority = np.take_along_axis(perturbed, order[:, :1], axis=1)[:, 0]

    blocked = []
    for cell in np.argsort(-priority, kind="stable").tolist():
        near = grid.near(cell)
        for rank, car in enumerate(ranked[cell]):
            if grid.uses[car] < max_uses and car not in near:
                choice[cell], score[cell] = car, ranked_weights[cell, rank]
                grid.place(cell, car)
                break
        else:
            blocked.append(cell)
    relaxed = _fill_from_whole_library(blocked, cells, library, grid, max_uses, choice, score)
    if progress:
        progress("placing", count, count)
    return Placement(choice, score, len(blocked), relaxed)


class _Grid:
    """Which photo sits where, and how often each is used, for the spacing and the use limit."""

    def __init__(self, rows: int, cols: int, reach: int, photos: int):
        self.cols, self.reach = cols, reach
        self.placed = np.full((rows + 2 * reach, cols + 2 * reach), -1, np.int64)
        self.uses = np.zeros(photos, np.int64)

    def near(self, cell: int) -> set[int]:
        row, col = divmod(cell, self.cols)
        span = 2 * self.reach + 1
        return set(self.placed[row : row + span, col : col + span].ravel().tolist())

    def place(self, cell: int, car: int) -> None:
        row, col = divmod(cell, self.cols)
        self.placed[row + self.reach, col + self.reach] = car
        self.uses[car] += 1


def _fill_from_whole_library(
    blocked: list[int],
    cells: np.ndarray,
    library: np.ndarray,
    grid: _Grid,
    max_uses: int,
    choice: np.ndarray,
    score: np.ndarray,
    batch: int = 256,
) -> int:
    """Give each blocked cell the closest photo still under its use limit and outside its
    neighbourhood, scoring a batch of cells against every photo left in one product. If every
    photo left is nearby (a tiny library), the spacing gives way; returns how often it did."""
    relaxed = 0
    norms = (library.astype(np.float64) ** 2).sum(1).astype(np.float32)
    for start in range(0, len(blocked), batch):
        part = blocked[start : start + batch]
        available = np.flatnonzero(grid.uses < max_uses)
        distance = norms[available] - 2 * (cells[part] @ library[available].T)
        for i, cell in enumerate(part):
            row = distance[i]
            near = np.fromiter((car for car in grid.near(cell) if car >= 0), np.int64)
            columns = np.minimum(np.searchsorted(available, near), len(available) - 1)
            columns = columns[available[columns] == near]
            kept = row[columns].copy()
            row[columns] = np.inf
            best = int(np.argmin(row))
            if not np.isfinite(row[best]):
                row[columns] = kept
                best = int(np.argmin(row))
                relaxed += 1
            car = int(available[best])
            # The only candidate left for this cell: its attention weight is 1.
            choice[cell], score[cell] = car, 1.0
            grid.place(cell, car)
            if grid.uses[car] >= max_uses:
                distance[:, best] = np.inf
    return relaxed


# Rendering -----------------------------------------------------------------------------------


def render_grid(
    tiles: np.ndarray,
    slots: np.ndarray,
    rows: int,
    cols: int,
    colours: np.ndarray,
    shift: float,
    blend: float,
) -> np.ndarray:
    """Lay tiles out as an image: (rows*px, cols*px, 3) uint8.

    tiles (U, px, px, 3) uint8 are the distinct photos, slots (cells,) picks one per cell and
    colours (cells, 3) are the target cells' mean RGB. Each tile is moved by `shift` of the gap
    between its mean and its cell's, then mixed `blend` toward the cell colour: together one
    multiply and one add per pixel, (1 - blend) * tile + offset.
    """
    px = tiles.shape[1]
    means = tiles.reshape(len(tiles), -1, 3).mean(1, dtype=np.float32)
    offsets = (1 - blend) * shift * (colours - means[slots]) + blend * colours
    out = np.empty((rows * px, cols * px, 3), np.uint8)
    for row in range(rows):
        cells = slice(row * cols, (row + 1) * cols)
        strip = tiles[slots[cells]].astype(np.float32)
        strip *= 1 - blend
        strip += offsets[cells, None, None, :]
        np.clip(strip, 0, 255, out=strip)
        out[row * px : (row + 1) * px] = strip.transpose(1, 0, 2, 3).reshape(px, cols * px, 3)
    return out


def load_tiles(thumbnails: list[bytes], px: int) -> np.ndarray:
    """Decode thumbnails and resize them to px x px: (U, px, px, 3) uint8."""
    out = np.empty((len(thumbnails), px, px, 3), np.uint8)
    for i, data in enumerate(thumbnails):
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (px, px))
        image = image.convert("RGB")
        if image.size != (px, px):
            image = image.resize((px, px), Image.Resampling.LANCZOS)
        out[i] = np.asarray(image)
    return out


class TileCache:
    """Resized tiles kept between builds (a chat bot builds many mosaics from one library),
    keyed by the photo's sha256 and the size, evicting the oldest past a byte budget."""

    def __init__(self, max_bytes: int = 256 * 1024 * 1024):
        self.max_bytes = max_bytes
        self._tiles: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._bytes = 0

    def tiles(
        self, shas: list[str], px: int, thumbnails: Callable[[list[int]], dict[int, bytes]]
    ) -> np.ndarray:
        """(len(shas), px, px, 3) uint8; thumbnails(positions) fetches only the missing ones."""
        found = [self._tiles.get((sha, px)) for sha in shas]
        missing = [i for i, tile in enumerate(found) if tile is None]
        if missing:
            fetched = thumbnails(missing)
            loaded = load_tiles([fetched[i] for i in missing], px)
            for i, tile in zip(missing, loaded, strict=True):
                found[i] = tile
                self._tiles[(shas[i], px)] = tile
                self._bytes += tile.nbytes
        for sha in shas:
            self._tiles.move_to_end((sha, px))
        while self._bytes > self.max_bytes and self._tiles:
            self._bytes -= self._tiles.popitem(last=False)[1].nbytes
        return np.stack(found)


_tile_cache = TileCache()


def console_progress() -> Progress:
    """A progress bar per stage on stderr, for the command line."""
    bars: dict[str, tqdm] = {}

    def update(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="cell", leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


# Building ------------------------------------------------------------------------------------


def build_mosaic(
    ctx: AppContext,
    target: bytes,
    name: str,
    *,
    scope: str = "local",
    created_by: str | None = None,
    options: MosaicOptions = MosaicOptions(),
    progress: Progress | None = None,
) -> Mosaic:
    """Build, render and store a mosaic of `target` (image bytes) from the car library.

    Raises BadMosaicName, MosaicExists, BadImage, EmptyLibrary or LibraryTooSmall, all before
    anything is stored.
    """
    started = time.perf_counter()
    options = options.checked()
    name = _checked_name(name)
    with ctx.db.session() as session:
        if mosaic_rows.mosaic_by_name(session, scope, name) is not None:
            raise MosaicExists(f'There is already a mosaic named "{name}" here.')
    image = decode_image(target, ctx.settings.max_image_pixels)
    rows = grid_rows(image.width, image.height, options.cols)
    _check_grid(rows, options, ctx.settings.max_image_pixels)
    image = crop_to_grid(image, rows, options.cols)
    library = LibraryIndex.load(ctx)
    if len(library.car_ids) == 0:
        raise EmptyLibrary("The car library is empty: add car photos before building a mosaic.")

    features = library.features
    cells = cell_features(image, rows, options.cols, library.grid)
    cells = adapt_palette(cells, features, options.adapt)
    rng = np.random.default_rng(options.seed)
    placement = place_tiles(cells, features, rows, options.cols, options, rng, progress)

    distinct, slots = np.unique(placement.choice, return_inverse=True)
    tile_stack = _tile_cache.tiles(
        [library.shas[i] for i in distinct.tolist()],
        options.tile_px,
        lambda positions: _thumbnails(ctx, library, library.car_ids[distinct[positions]].tolist(),
                                      positions),
    )
    colours = cell_colours(image, rows, options.cols)
    pixels = render_grid(tile_stack, slots, rows, options.cols, colours, options.shift,
                         options.blend)
    render = Image.fromarray(pixels)
    render_key = ctx.media.put(encode_render(render, "JPEG"))
    preview_key = ctx.media.put(
        draw_preview(render, rows, options.cols, ctx.settings.preview_max_bytes)
    )
    tiles_rows = _tile_rows(placement, library.car_ids, rows, options.cols, options.tile_px)
    stats = {
        "library_photos": int(len(library.car_ids)),
        "distinct_photos": int(len(distinct)),
        "most_uses": int(np.bincount(placement.choice).max()),
        "searched_whole_library": placement.searched_whole_library,
        "spacing_relaxed": placement.spacing_relaxed,
        "build_s": round(time.perf_counter() - started, 3),
    }
    mosaic = Mosaic(
        name=name,
        owner_scope=scope,
        target_sha256=sha256_hex(target),
        target_media_key=ctx.media.put(target),
        rows=rows,
        cols=options.cols,
        tile_px=options.tile_px,
        render_media_key=render_key,
        preview_media_key=preview_key,
        settings={"options": asdict(options), "stats": stats},
        created_by=created_by,
    )
    try:
        with ctx.db.session() as session:
            mosaic_rows.add_mosaic(session, mosaic, tiles_rows)
    except IntegrityError:
        raise MosaicExists(f'There is already a mosaic named "{name}" here.') from None
    return mosaic


def _thumbnails(
    ctx: AppContext, library: LibraryIndex, car_ids: list[int], positions: list[int]
) -> dict[int, bytes]:
    by_car = library.thumbnails(ctx, car_ids)
    return {position: by_car[car] for position, car in zip(positions, car_ids, strict=True)}


def _check_grid(rows: int, options: MosaicOptions, max_pixels: int) -> None:
    tiles, pixels = rows * options.cols, rows * options.cols * options.tile_px**2
    if tiles > MAX_TILES or pixels > max_pixels:
        raise BadMosaicOptions(
            f"At {options.cols} columns this image needs {rows} rows, {tiles:,} tiles and a "
            f"{pixels / 1e6:.0f} MP render; the limits are {MAX_TILES:,} tiles and "
            f"{max_pixels / 1e6:.0f} MP: use fewer columns or smaller tiles."
        )


def _checked_name(name: str) -> str:
    name = " ".join(name.split())
    if not name or len(name) > MAX_NAME_CHARS:
        raise BadMosaicName(f"A mosaic name needs 1 to {MAX_NAME_CHARS} characters.")
    return name


def _tile_rows(
    placement: Placement, car_ids: np.ndarray, rows: int, cols: int, px: int
) -> list[dict]:
    row, col = np.divmod(np.arange(rows * cols), cols)
    return [
        {"row": r, "col": c, "car_id": car, "x0": c * px, "y0": r * px,
         "x1": (c + 1) * px, "y1": (r + 1) * px, "score": s}
        for r, c, car, s in zip(
            row.tolist(), col.tolist(), car_ids[placement.choice].tolist(),
            placement.score.tolist(), strict=True,
        )
    ]


def encode_render(image: Image.Image, kind: str) -> bytes:
    """PNG (lossless, slow on large grids) or a high-quality JPEG (the stored default)."""
    out = io.BytesIO()
    if kind.upper() == "PNG":
        image.save(out, "PNG", compress_level=1)
    else:
        image.save(out, "JPEG", quality=92, subsampling=0)
    return out.getvalue()


# Preview -------------------------------------------------------------------------------------

PREVIEW_MAX_WIDTH = 4096
_LABEL_STEPS = (1, 2, 5, 10, 20, 50, 100)


def preview_image(ctx: AppContext, mosaic: Mosaic, max_bytes: int | None = None) -> bytes:
    """The grid-labelled JPEG for chat, under max_bytes (default settings.preview_max_bytes)."""
    max_bytes = max_bytes or ctx.settings.preview_max_bytes
    if mosaic.preview_media_key and ctx.media.has(mosaic.preview_media_key):
        stored = ctx.media.read(mosaic.preview_media_key)
        if len(stored) <= max_bytes:
            return stored
    render = Image.open(io.BytesIO(ctx.media.read(mosaic.render_media_key))).convert("RGB")
    return draw_preview(render, mosaic.rows, mosaic.cols, max_bytes)


def draw_preview(render: Image.Image, rows: int, cols: int, max_bytes: int) -> bytes:
    """Render + light cell lines + column letters on top and row numbers on the left, as a JPEG
    under max_bytes: lower quality first, then smaller, labels redrawn crisp at each size."""
    cell = min(render.width // cols, max(1, PREVIEW_MAX_WIDTH // cols))
    while True:
        labelled = _labelled(render, rows, cols, cell)
        for quality in (88, 78, 65, 50):
            out = io.BytesIO()
            labelled.save(out, "JPEG", quality=quality, optimize=True)
            if out.tell() <= max_bytes:
                return out.getvalue()
        if cell == 1:
            raise ValueError(f"no preview of a {cols}x{rows} grid fits in {max_bytes} bytes")
        cell = max(1, min(cell - 1, int(cell * math.sqrt(max_bytes / out.tell()) * 0.95)))


def _labelled(render: Image.Image, rows: int, cols: int, cell: int) -> Image.Image:
    font = ImageFont.load_default(size=max(8, min(16, round(cell * 0.5))))
    widest = max(font.getlength(column_label(cols - 1)), font.getlength(str(rows)))
    step = next((s for s in _LABEL_STEPS if s * cell >= widest + 4), _LABEL_STEPS[-1])
    line_step = 1 if cell >= 10 else step
    top, left = round(font.size * 1.6), round(widest + 8)
    grid = render.resize((cols * cell, rows * cell), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (left + grid.width, top + grid.height), (246, 246, 246))
    canvas.paste(grid, (left, top))
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    lines = ImageDraw.Draw(overlay)
    for col in range(0, cols + 1, line_step):
        x = left + col * cell
        lines.line([(x, top), (x, canvas.height)], fill=(255, 255, 255, 90))
    for row in range(0, rows + 1, line_step):
        y = top + row * cell
        lines.line([(left, y), (canvas.width, y)], fill=(255, 255, 255, 90))
    canvas = Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB")
    text = ImageDraw.Draw(canvas)
    for col in range(0, cols, step):
        x = left + col * cell + cell / 2
        text.text((x, top / 2), column_label(col), fill=(50, 50, 50), font=font, anchor="mm")
    for row in range(0, rows, step):
        y = top + row * cell + cell / 2
        text.text((left - 4, y), str(row + 1), fill=(50, 50, 50), font=font, anchor="rm")
    return canvas
