"""Ingest speed on 640x480 JPEGs: the library's thread pool against 2 threads, a 2-process pool
and one thread, each on a fresh SQLite file and media store, best of N rounds.

The JPEGs are the real 100 px car photos upscaled with per-image noise and a gradient, so every
file is distinct. Run: python bench/ingest.py [--photos 600] [--rounds 3]
"""

import argparse
import concurrent.futures as cf
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
from PIL import Image

import core.library as library
from core.context import AppContext
from core.settings import Settings

VEHICLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "vehicles"


class OneThread(cf.Executor):
    def map(self, fn, *iterables, **_):
        return list(map(fn, *iterables))


POOLS = {
    "threads (library default)": library._executor,
    "threads x2": lambda _workers: cf.ThreadPoolExecutor(2),
    "processes x2": lambda _workers: cf.ProcessPoolExecutor(2),
    "one thread": lambda _workers: OneThread(),
}


def make_photos(folder: Path, n: int) -> list[Path]:
    sources = sorted(VEHICLES.glob("*/*.jpg"))
    rng = np.random.default_rng(0)
    ramp = np.linspace(-20, 20, 640, dtype=np.int16)[None, :, None]
    paths = []
    for i in range(n):
        image = Image.open(sources[i % len(sources)]).convert("RGB")
        pixels = np.asarray(image.resize((640, 480), Image.Resampling.BICUBIC)).astype(np.int16)
        pixels += rng.integers(-6, 7, pixels.shape) + ramp * (1 if i % 2 else -1)
        path = folder / f"p{i:05d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=88)
        paths.append(path)
    return paths


def photos_per_second(photos: list[Path], pool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        ctx = AppContext.open(Settings(data_dir=Path(tmp), database_url=None))
        with mock.patch.object(library, "_executor", pool):
            report = library.ingest_paths(ctx, photos, progress=False)
        ctx.close()
    assert report.added == len(photos), report
    return report.photos_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--photos", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        photos = make_photos(Path(tmp), args.photos)
        size_kib = sum(p.stat().st_size for p in photos) / len(photos) / 1024
        best = dict.fromkeys(POOLS, 0.0)
        for _ in range(args.rounds):
            for name, pool in POOLS.items():
                best[name] = max(best[name], photos_per_second(photos, pool))
    print(f"{len(photos)} distinct 640x480 JPEGs, {size_kib:.0f} KiB each, best of {args.rounds}")
    print("| pool                      | photos/s | vs one thread |")
    print("|---------------------------|----------|---------------|")
    for name, rate in best.items():
        print(f"| {name:<25} | {rate:8.0f} | {rate / best['one thread']:12.2f}x |")


if __name__ == "__main__":
    main()
