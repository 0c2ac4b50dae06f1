"""Deep zoom: building a mosaic's DZI pyramid (core.pyramid, libvips dzsave fed a row stream)
against building the flat full-size render the way build_mosaic does today (every tile at 256 px
in one numpy array, then one JPEG), and serving DZI tiles to 200 concurrent loopback clients
against aiohttp's own static file handler serving the same tile files.

Library: the 1,600 real car photos of ../shared/data/vehicles; target: the bundled panda,
cropped square. Each build runs in its own process, so its peak RSS is its own. A flat render
whose estimated peak exceeds the memory budget is not run: its estimate is shown instead.
Prints one table; run with `python bench/gallery.py`.
"""

import argparse
import asyncio
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from core.context import AppContext
from core.democars import DEMO_TARGET
from core.gallery import mosaic_by_id
from core.images import decode_image
from core.library import ingest_paths
from core.mosaic import (
    MosaicOptions,
    build_mosaic,
    cell_colours,
    crop_to_grid,
    encode_render,
    load_tiles,
    render_grid,
)
from core.pyramid import CELL_PX, level_count, load_pyramid, pyramid_for
from core.settings import Settings
from storage import cars as car_rows
from storage import mosaics as mosaic_rows

VEHICLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "vehicles"
GRIDS = (48, 100, 200)
CLIENTS = 200
REQUESTS = 6_000
WARM_UP = 400
# Requests go to the deepest levels, where a viewer spends its time.
SERVED_LEVELS = 6


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peak_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries the parent's
    peak at fork into the child's ru_maxrss across exec."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def open_ctx(data_dir: Path) -> AppContext:
    return AppContext.open(Settings(data_dir=data_dir, database_url=None))


# In a child process ---------------------------------------------------------------------------


def flat_render(ctx: AppContext, mosaic_id: int) -> dict:
    """The render stage of build_mosaic at 256 px a tile: distinct thumbnails resized, laid out
    by render_grid with the colour treatment, encoded as one JPEG and stored."""
    mosaic = mosaic_by_id(ctx, mosaic_id)
    with ctx.db.engine.connect() as connection:
        cars = [car for car, _ in mosaic_rows.tile_cars(connection, mosaic.id)]
    distinct, slots = np.unique(np.array(cars), return_inverse=True)
    with ctx.db.session() as session:
        thumbnails = car_rows.thumbnails(session, distinct.tolist())
    tiles = load_tiles([thumbnails[int(car)] for car in distinct], CELL_PX)
    target = decode_image(ctx.media.read(mosaic.target_media_key), ctx.settings.max_image_pixels)
    colours = cell_colours(crop_to_grid(target, mosaic.rows, mosaic.cols), mosaic.rows, mosaic.cols)
    options = mosaic.settings["options"]
    pixels = render_grid(tiles, slots, mosaic.rows, mosaic.cols, colours, options["shift"],
                         options["blend"])
    ctx.media.put(encode_render(Image.fromarray(pixels), "JPEG"))
    return {}


def pyramid(ctx: AppContext, mosaic_id: int) -> dict:
    built = pyramid_for(ctx, mosaic_by_id(ctx, mosaic_id))
    return {"tiles": sum(level.cols * level.rows for level in built.levels)}


def child(kind: str, data_dir: Path, mosaic_id: int) -> None:
    ctx = open_ctx(data_dir)
    started = time.perf_counter()
    extra = {"flat": flat_render, "pyramid": pyramid, "idle": lambda ctx, _: {}}[kind](
        ctx, mosaic_id
    )
    print(json.dumps({"s": time.perf_counter() - started, "peak_mb": peak_mb(), **extra}))


def run_child(kind: str, data_dir: Path, mosaic_id: int) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(data_dir), str(mosaic_id)],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


async def serve(data_dir: Path | None, static: Path | None) -> None:
    """The gallery (or a plain static file server) on a free loopback port until stdin closes."""
    from aiohttp import web

    from bot.web import bound_port, start_gallery

    if static is not None:
        app = web.Application()
        app.add_routes([web.static("/t", static)])
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, backlog=1024).start()
    else:
        runner = await start_gallery(open_ctx(data_dir), "127.0.0.1", 0)
    print(bound_port(runner), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runner.cleanup()


# In the parent --------------------------------------------------------------------------------


def square_target() -> bytes:
    image = Image.open(io.BytesIO(DEMO_TARGET.read_bytes())).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    out = io.BytesIO()
    image.crop((left, top, left + side, top + side)).save(out, "PNG")
    return out.getvalue()


def memory_budget_mb() -> float:
    """What a flat render may use here: 40% of the memory available now, at most 8 GiB (the
    machine is shared; a larger render would push others into swapless OOM)."""
    with open("/proc/meminfo") as handle:
        available = next(int(line.split()[1]) for line in handle if line.startswith("MemAvailable"))
    return min(0.4 * available / 1024, 8 * 1024)


def flat_estimate_mb(cols: int, rows: int, distinct: int, baseline_mb: float) -> float:
    """The array, Pillow's copy of it (fromarray copies RGB), the resized tiles and the JPEG."""
    pixels = cols * rows * CELL_PX * CELL_PX * 3
    return baseline_mb + (2.1 * pixels + distinct * CELL_PX * CELL_PX * 3) / 2**20


async def load(base: str, paths: list[str]) -> dict:
    """Latency percentiles and throughput of CLIENTS clients sharing the request list."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=CLIENTS)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def client(queue) -> None:
            nonlocal errors
            for path in queue:
                started = time.perf_counter()
                try:
                    async with http.get(base + path) as response:
                        await response.read()
                        errors += response.status != 200
                except aiohttp.ClientError:
                    errors += 1
                latencies.append(time.perf_counter() - started)

        async def run(part: list[str]) -> float:
            queue = iter(part)
            started = time.perf_counter()
            await asyncio.gather(*(client(queue) for _ in range(CLIENTS)))
            return time.perf_counter() - started

        await run(paths[:WARM_UP])  # connections opened, the manifest loaded
        latencies.clear()
        errors = 0
        wall = await run(paths[WARM_UP:])
    ms = np.array(latencies) * 1000
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "rps": len(latencies) / wall, "errors": errors}


def start_server(args: list[str]) -> tuple[subprocess.Popen, int]:
    server = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    return server, int(server.stdout.readline())


def serving_rows(ctx: AppContext, data_dir: Path, mosaic, work: Path) -> list[str]:
    built = load_pyramid(ctx, mosaic.settings["pyramid"]["manifest"])
    deepest = len(built.levels) - 1
    rng = random.Random(5)
    picks = []
    for _ in range(REQUESTS + WARM_UP):
        level = rng.randrange(deepest - SERVED_LEVELS + 1, deepest + 1)
        grid = built.levels[level]
        picks.append((level, rng.randrange(grid.cols), rng.randrange(grid.rows)))
    # The static peer serves the same tiles, written out as files.
    folder = work / "static"
    for level, col, row in set(picks):
        target = folder / str(level) / f"{col}_{row}.jpeg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(ctx.media.read(built.tile_key(level, col, row)))
    results = {}
    for name, args, prefix in (
        ("talkmosaic DZI route", ["--serve", str(data_dir)], f"/api/mosaics/{mosaic.id}_files"),
        ("aiohttp static files", ["--serve-static", str(folder)], "/t"),
    ):
        server, port = start_server(args)
        try:
            paths = [f"{prefix}/{level}/{col}_{row}.jpeg" for level, col, row in picks]
            results[name] = asyncio.run(load(f"http://127.0.0.1:{port}", paths))
        finally:
            server.stdin.close()
            server.wait(timeout=30)
    static = results["aiohttp static files"]["rps"]
    lines = [
        f"DZI tile serving: {mosaic.cols}x{mosaic.rows} mosaic ({deepest + 1} levels), "
        f"{CLIENTS} concurrent loopback clients, {REQUESTS:,} requests (after {WARM_UP} warm-up) "
        f"for random tiles of the deepest {SERVED_LEVELS} levels; server and clients share the "
        "2 cores.",
        f"{'server':<22} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'errors':>7} {'vs static':>10}",
    ]
    for name, row in results.items():
        lines.append(f"{name:<22} {row['p50']:8.1f} {row['p99']:8.1f} {row['rps']:8.0f} "
                     f"{row['errors']:7d} {row['rps'] / static:9.2f}x")
    return lines


def main(grids: tuple[int, ...]) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-gallery-", dir=Path.cwd()))
    data_dir = work / "data"
    try:
        ctx = open_ctx(data_dir)
        photos = sorted(VEHICLES.glob("*/*.jpg"))
        if not photos:
            sys.exit("../shared/data/vehicles is not beside the project")
        load_average = os.getloadavg()[0]
        log(f"ingesting {len(photos)} photos")
        ingest_paths(ctx, photos, progress=False)
        target = square_target()
        mosaics = {}
        for cols in grids:
            log(f"building the {cols}x{cols} mosaic")
            options = MosaicOptions(cols=cols, tile_px=16)
            mosaics[cols] = build_mosaic(ctx, target, f"panda {cols}", options=options)
        baseline = run_child("idle", data_dir, 0)["peak_mb"]
        budget = memory_budget_mb()
        rows, largest_flat = [], None
        for cols, mosaic in mosaics.items():
            log(f"pyramid {cols}x{cols}")
            built = run_child("pyramid", data_dir, mosaic.id)
            with ctx.db.engine.connect() as connection:
                distinct = len({c for c, _ in mosaic_rows.tile_cars(connection, mosaic.id)})
            estimate = flat_estimate_mb(mosaic.cols, mosaic.rows, distinct, baseline)
            flat = None
            if estimate <= budget:
                log(f"flat render {cols}x{cols}")
                flat = run_child("flat", data_dir, mosaic.id)
                largest_flat = (flat["s"], mosaic.cols * mosaic.rows)
            rows.append((mosaic, built, flat, estimate))
        served = mosaic_by_id(ctx, mosaics[grids[len(grids) // 2]].id)
        log("serving")
        serving = serving_rows(ctx, data_dir, served, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"Deep-zoom pyramid vs today's flat full-size render, {CELL_PX} px a car, on the "
          f"bundled panda with {len(photos):,} real car photos; 2 cores, load average "
          f"{load_average:.1f} at the start.")
    print("pyramid = core.pyramid (row-strip PNG stream -> libvips dzsave, JPEG Q85 256 px tiles "
          "with 1 px overlap, every tile stored in the media store);")
    print("flat = build_mosaic's render stage at 256 px a tile (render_grid into one array, "
          "Pillow JPEG, stored) - it makes one image, no tiles.")
    print(f"Peak = the process's max RSS (an idle process: {baseline:.0f} MB). Flat renders run "
          f"only under a budget of {budget:,.0f} MB (40% of available memory, at most 8 GiB).")
    print(f"{'grid':<8} {'cells':>6} {'full size':>13} {'pyramid s':>10} {'peak MB':>8} "
          f"{'tiles':>7} {'flat s':>9} {'peak MB':>9} {'time vs flat':>13}")
    for mosaic, built, flat, estimate in rows:
        cells = mosaic.cols * mosaic.rows
        side = f"{mosaic.cols * CELL_PX}x{mosaic.rows * CELL_PX}"
        if flat is not None:
            flat_s, flat_mb = f"{flat['s']:9.1f}", f"{flat['peak_mb']:9.0f}"
            ratio = f"{built['s'] / flat['s']:12.2f}x"
        else:
            guess = largest_flat[0] * cells / largest_flat[1] if largest_flat else math.nan
            flat_s, flat_mb, ratio = f"~{guess:8.0f}", f"~{estimate:8,.0f}", "  (estimate)"
        print(f"{mosaic.cols}x{mosaic.rows:<5} {cells:6d} {side:>13} {built['s']:10.1f} "
              f"{built['peak_mb']:8.0f} {built['tiles']:7d} {flat_s} {flat_mb} {ratio}")
    skipped = [m for m, _, flat, _ in rows if flat is None]
    for mosaic in skipped:
        print(f"The {mosaic.cols}x{mosaic.rows} flat render would need about "
              f"{flat_estimate_mb(mosaic.cols, mosaic.rows, 1600, baseline) / 1024:.1f} GiB "
              "(the array and Pillow's copy): over the budget, so not run; its time is "
              "extrapolated from the largest flat render per cell.")
    print(f"Pyramid levels for the {grids[-1]}x{grids[-1]} grid: "
          f"{level_count(grids[-1] * CELL_PX, grids[-1] * CELL_PX)}.")
    print()
    print("\n".join(serving))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=3, metavar=("KIND", "DATA_DIR", "MOSAIC_ID"))
    parser.add_argument("--serve", type=Path)
    parser.add_argument("--serve-static", type=Path)
    parser.add_argument("--grids", default=",".join(map(str, GRIDS)),
                        help="square grids to build, columns each (default %(default)s)")
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), int(args.child[2]))
    elif args.serve or args.serve_static:
        asyncio.run(serve(args.serve, args.serve_static))
    else:
        main(tuple(int(cols) for cols in args.grids.split(",")))
