"""Mosaic builder vs the peer `phomo` and a naive per-cell loop, measured in one run on one data.

Library: the 1,600 real car photos of ../shared/data/vehicles, plus flipped / cropped / recoloured
variants of them to reach 5k and 10k photos. Target: the bundled animal. Quality is measured
between the target and the mosaic scaled down to the grid (PSNR, mean CIEDE2000) and at a viewing
size (SSIM). Prints one table; run with `python bench/mosaic.py` (`make bench`).
"""

import io
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from skimage.color import deltaE_ciede2000, rgb2lab
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from core.context import AppContext
from core.democars import DEMO_TARGET
from core.gallery import render_bytes, tile_lookup
from core.library import ingest_paths
from core.mosaic import (
    MosaicOptions,
    build_mosaic,
    cell_colours,
    cell_features,
    crop_to_grid,
    format_coordinate,
    grid_rows,
    load_tiles,
    render_grid,
)
from core.settings import Settings
from storage.models import Car

VEHICLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "vehicles"
LIBRARY_SIZES = (1_000, 5_000, 10_000)
CELL_COUNTS = (2_000, 5_000, 10_000)
TILE_PX = 16  # phomo compares every tile pixel, so its time grows with the tile area
VIEW_WIDTH = 800
PHOMO_MAX_PREDICTED_S = 160.0  # phomo runs only where its measured rate predicts less than this
LOOKUPS = 2_000


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def variant(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A flipped, cropped and recoloured copy of a real photo: new colours, same kind of scene."""
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    side = int(image.width * rng.uniform(0.75, 1.0))
    left, top = rng.integers(0, image.width - side + 1, 2)
    image = image.crop((left, top, left + side, top + side)).resize(image.size)
    hsv = np.asarray(image.convert("HSV")).astype(np.int16)
    hsv[..., 0] = (hsv[..., 0] + rng.integers(0, 256)) % 256
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(1.0, 3.0) + rng.integers(0, 60), 0, 255)
    hsv[..., 2] = np.clip(hsv[..., 2] * rng.uniform(0.6, 1.3), 0, 255)
    return Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")


def write_library(folder: Path, count: int) -> list[Path]:
    """The real photos first, then variants of them, as JPEG files in `folder`."""
    real = sorted(VEHICLES.glob("*/*.jpg"))
    if not real:
        sys.exit(f"no photos in {VEHICLES}")
    paths = list(real[:count])
    rng = np.random.default_rng(0)
    for i in range(count - len(paths)):
        source = real[i % len(real)]
        path = folder / f"variant{i:05d}-{source.stem}.jpg"
        variant(Image.open(source).convert("RGB"), rng).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def grid_for(target: Image.Image, cells: int) -> tuple[int, int]:
    cols = max(1, round(math.sqrt(cells * target.width / target.height)))
    return grid_rows(target.width, target.height, cols), cols


def quality(target: Image.Image, mosaic: Image.Image, rows: int, cols: int) -> tuple[float, ...]:
    reference = crop_to_grid(target, rows, cols)
    small_ref = np.asarray(reference.resize((cols, rows), Image.Resampling.BOX))
    small_out = np.asarray(mosaic.convert("RGB").resize((cols, rows), Image.Resampling.BOX))
    psnr = peak_signal_noise_ratio(small_ref, small_out, data_range=255)
    delta_e = float(deltaE_ciede2000(rgb2lab(small_ref), rgb2lab(small_out)).mean())
    view = (VIEW_WIDTH, round(VIEW_WIDTH * rows / cols))
    big_ref = np.asarray(reference.resize(view, Image.Resampling.LANCZOS))
    big_out = np.asarray(mosaic.convert("RGB").resize(view, Image.Resampling.LANCZOS))
    ssim = structural_similarity(big_ref, big_out, channel_axis=2, data_range=255)
    return psnr, delta_e, ssim


class Library:
    """Tiles and features as the index holds them, for the peers (loaded untimed)."""

    def __init__(self, ctx: AppContext):
        with ctx.db.session() as session:
            cars = session.query(Car).order_by(Car.id).all()
        self.grid = cars[0].feature_grid
        self.features = np.stack([np.frombuffer(c.features, np.float32) for c in cars])
        self.tiles = load_tiles([c.thumbnail for c in cars], TILE_PX)


def naive_build(target: Image.Image, library: Library, rows: int, cols: int) -> Image.Image:
    """The obvious loop: for each cell, the closest photo by Lab-grid distance; no limits."""
    image = crop_to_grid(target, rows, cols)
    cells = cell_features(image, rows, cols, library.grid)
    choice = np.empty(len(cells), np.int64)
    for i, cell in enumerate(cells):
        choice[i] = int(np.argmin(((library.features - cell) ** 2).sum(1)))
    pixels = render_grid(library.tiles, choice, rows, cols, cell_colours(image, rows, cols), 0, 0)
    return Image.fromarray(pixels)


def phomo_build(target: Image.Image, library: Library, rows: int, cols: int) -> Image.Image:
    """phomo's documented path: Master + Pool, d_matrix on both cores, greedy assignment with
    the fewest repeats that fill the grid."""
    from phomo import Master, Mosaic, Pool

    master = Master.from_image(
        crop_to_grid(target, rows, cols).resize((cols * TILE_PX, rows * TILE_PX))
    )
    repeats = math.ceil(rows * cols / len(library.tiles))
    mosaic = Mosaic(master, Pool(library.tiles), n_appearances=repeats)
    return mosaic.build_greedy(mosaic.d_matrix(workers=2))


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - started, result


@dataclass
class Row:
    photos: int
    cells: int
    builder: str
    seconds: float | None  # None: not run
    first_seconds: float | None = None  # talkmosaic's first build (cold tile cache)
    metrics: tuple[float, float, float] | None = None  # PSNR, mean CIEDE2000, SSIM
    predicted: float | None = None  # phomo's predicted time where it was not run


def main() -> None:
    logging.disable(logging.WARNING)
    target_bytes = DEMO_TARGET.read_bytes()
    target = Image.open(io.BytesIO(target_bytes)).convert("RGB")
    rows: list[Row] = []
    lookups: list[tuple[float, float]] = []
    phomo_rate = None  # seconds per (cell x photo) of phomo's latest run
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        ctx = AppContext.open(Settings(data_dir=Path(tmp) / "data", database_url=None))
        photos = write_library(Path(tmp), max(LIBRARY_SIZES))
        for previous, size in zip((0, *LIBRARY_SIZES), LIBRARY_SIZES, strict=False):
            log(f"ingesting up to {size} photos")
            ingest_paths(ctx, photos[previous:size], progress=False)
            library = Library(ctx)
            for cells in CELL_COUNTS:
                n_rows, cols = grid_for(target, cells)
                n = n_rows * cols
                log(f"library {size}, {n} cells ({cols}x{n_rows})")
                # phomo's limits: each photo at most ceil(cells / photos) times, no spacing,
                # no colour adaptation: the like-for-like comparison.
                like_phomo = MosaicOptions(cols=cols, tile_px=TILE_PX, max_uses=math.ceil(n / size),
                                           spacing=0, adapt=0, shift=0, blend=0)
                for label, options in (
                    ("talkmosaic", MosaicOptions(cols=cols, tile_px=TILE_PX)),
                    ("talkmosaic as phomo", like_phomo),
                ):
                    name = f"{label}-{size}-{cells}"
                    first, _ = timed(build_mosaic, ctx, target_bytes, name + "-first",
                                     options=options)
                    seconds, mosaic = timed(build_mosaic, ctx, target_bytes, name,
                                            options=options)
                    render = Image.open(io.BytesIO(render_bytes(ctx, mosaic)))
                    rows.append(Row(size, n, label, seconds, first,
                                    quality(target, render, n_rows, cols)))
                    if label == "talkmosaic" and size == max(LIBRARY_SIZES):
                        lookups += measure_lookups(ctx, mosaic)
                seconds, render = timed(naive_build, target, library, n_rows, cols)
                rows.append(Row(size, n, "naive loop", seconds,
                                metrics=quality(target, render, n_rows, cols)))
                predicted = phomo_rate * n * size if phomo_rate else 0.0
                if predicted > PHOMO_MAX_PREDICTED_S:
                    rows.append(Row(size, n, "phomo", None, predicted=predicted))
                    continue
                seconds, render = timed(phomo_build, target, library, n_rows, cols)
                phomo_rate = seconds / (n * size)
                rows.append(Row(size, n, "phomo", seconds,
                                metrics=quality(target, render, n_rows, cols)))
        ctx.close()
    print_table(rows, lookups, time.perf_counter() - started, load_at_start)


def measure_lookups(ctx: AppContext, mosaic) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of each look-up of a random tile."""
    rng = np.random.default_rng(0)
    times = []
    for _ in range(LOOKUPS):
        label = format_coordinate(int(rng.integers(mosaic.rows)), int(rng.integers(mosaic.cols)))
        wall, cpu = time.perf_counter(), time.process_time()
        found = tile_lookup(ctx, mosaic, label)
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
        assert found.is_original and found.image_bytes
    return times


def print_table(
    rows: list[Row], lookups: list[tuple[float, float]], total_s: float, load_at_start: float
) -> None:
    phomo = {(r.photos, r.cells): r.seconds for r in rows if r.builder == "phomo" and r.seconds}
    print(f"Mosaic build: bundled panda target, tiles {TILE_PX} px; library = real photos + "
          f"variants; {os.cpu_count()} cores, load average {load_at_start:.1f} at the start.")
    print("talkmosaic = build_mosaic() end to end (match, render, store render + preview + tile "
          "rows), second build (first build in brackets, cold tile cache);")
    print("talkmosaic as phomo = same builder under phomo's limits (ceil(cells/photos) uses, no "
          "spacing, no colour adaptation, shift or blend);")
    print("naive = per-cell Python argmin on the same Lab features, no limits; "
          "phomo = d_matrix(workers=2) + build_greedy, n_appearances = ceil(cells/photos).")
    print(f"{'photos':>6} {'cells':>6}  {'builder':<19} {'build s':>15} {'vs phomo':>9} "
          f"{'PSNR dB':>8} {'ΔE00':>6} {'SSIM':>6}")
    for row in rows:
        head = f"{row.photos:>6} {row.cells:>6}  {row.builder:<19}"
        if row.seconds is None:
            print(f"{head} {'not run':>15}  (phomo's latest measured rate predicts "
                  f"{row.predicted:.0f} s > {PHOMO_MAX_PREDICTED_S:.0f} s)")
            continue
        first = f"({row.first_seconds:.2f}) " if row.first_seconds is not None else ""
        reference = phomo.get((row.photos, row.cells))
        speed = f"{reference / row.seconds:.1f}x" if reference and row.builder != "phomo" else ""
        psnr, delta_e, ssim = row.metrics
        print(f"{head} {first + f'{row.seconds:.2f}':>15} {speed:>9} {psnr:>8.2f} "
              f"{delta_e:>6.2f} {ssim:>6.3f}")
    if lookups:
        wall = np.array([w for w, _ in lookups]) * 1000
        cpu = np.array([c for _, c in lookups]) * 1000
        print(f"Tile look-up (coordinate -> original bytes + car info), {len(lookups)} random "
              f"tiles on {max(LIBRARY_SIZES)}-photo mosaics: wall p50 "
              f"{np.percentile(wall, 50):.2f} ms, p99 {np.percentile(wall, 99):.2f} ms; "
              f"CPU p99 {np.percentile(cpu, 99):.2f} ms")
    print(f"Whole benchmark: {total_s / 60:.1f} min; load average at the end "
          f"{os.getloadavg()[0]:.1f} (other jobs share the cores: wall times include waiting).")


if __name__ == "__main__":
    main()
