"""`talkmosaic demo`: on a fresh data directory, draw a demo car library, ingest it, build a mosaic
of the bundled animal and write the files to look at. Running it again reuses what is there.
"""

import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.context import AppContext
from core.democars import DEMO_PHOTOS, DEMO_TARGET, generate_demo_library
from core.errors import UnknownMosaic
from core.gallery import TileLookup, find_mosaic, render_bytes, tile_lookup
from core.library import ingest_paths
from core.mosaic import MosaicOptions, build_mosaic, console_progress, preview_image
from storage.models import Mosaic

DEMO_NAME = "demo"
DEMO_OPTIONS = MosaicOptions(cols=48, tile_px=32, seed=0)
SAMPLE_TILE = "C3"


@dataclass
class DemoResult:
    mosaic: Mosaic
    render_path: Path
    preview_path: Path
    sample: TileLookup
    sample_path: Path
    built: bool  # False: the mosaic already existed


def run_demo(ctx: AppContext, say: Callable[[str], None] = print) -> DemoResult:
    data_dir = ctx.settings.data_dir
    cars_dir, out_dir = data_dir / "demo-cars", data_dir / "demo"
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = cars_dir / "labels.csv"
    if not labels.is_file():
        say(f"Drawing {DEMO_PHOTOS} demo car photos into {cars_dir}")
        labels = generate_demo_library(cars_dir, DEMO_PHOTOS, seed=0).labels_csv
    report = ingest_paths(ctx, cars_dir, labels, progress=True)
    say(f"Library: {report.added} photos added, {report.skipped_duplicates} already there.")
    try:
        mosaic, built = find_mosaic(ctx, DEMO_NAME), False
    except UnknownMosaic:
        say(f"Building the mosaic of {DEMO_TARGET.name}")
        target = DEMO_TARGET.read_bytes()
        mosaic = build_mosaic(ctx, target, DEMO_NAME, options=DEMO_OPTIONS,
                              progress=console_progress())
        built = True
    render_path = out_dir / "mosaic.jpg"
    preview_path = out_dir / "preview.jpg"
    render_path.write_bytes(render_bytes(ctx, mosaic))
    preview_path.write_bytes(preview_image(ctx, mosaic))
    sample = tile_lookup(ctx, mosaic, SAMPLE_TILE)
    extension = {"image/png": "png", "image/webp": "webp", "image/gif": "gif"}
    sample_path = out_dir / f"tile-{sample.label}.{extension.get(sample.content_type, 'jpg')}"
    sample_path.write_bytes(sample.image_bytes)
    say(f"Mosaic \"{mosaic.name}\": {mosaic.cols} x {mosaic.rows} tiles "
        f"({'built now' if built else 'built before'}).")
    say(f"  full render: {render_path}")
    say(f"  chat preview with coordinates: {preview_path}")
    say(f"Tile {sample.label} is {describe_car(sample.car_info)}; photo: {sample_path}")
    command = command_name()
    say(f"Look up any tile with: {command} mosaic tile {DEMO_NAME} B7")
    say(f"Talk to it as in a chat, no tokens needed: {command} chat")
    say("Click through it in the web gallery: `make gallery` (python -m bot), then open "
        f"http://{ctx.settings.gallery_host}:{ctx.settings.gallery_port}/")
    return DemoResult(mosaic, render_path, preview_path, sample, sample_path, built)


def command_name() -> str:
    """How to run `talkmosaic` from here: its bare name when it is on PATH, else its path
    (e.g. .venv/bin/talkmosaic, where `make setup` puts it)."""
    if shutil.which("talkmosaic"):
        return "talkmosaic"
    script = Path(sys.executable).parent / "talkmosaic"
    if not script.exists():
        return "talkmosaic"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def describe_car(info: dict | None) -> str:
    """One line about a car photo, from what the library knows."""
    if info is None:
        return "a car no longer in the library"
    name = " ".join(str(info[key]) for key in ("year", "make", "model") if info.get(key))
    facts = [f"{info['fuel']}" if info.get("fuel") else "",
             f"{info['co2_g_km']:g} g CO2/km" if info.get("co2_g_km") is not None else "",
             info.get("emission_standard") or ""]
    details = ", ".join(fact for fact in facts if fact)
    return f"{name or info['file_name']}" + (f" ({details})" if details else "")
