"""Demo data: procedural car photos with labels, deterministic by seed, and the bundled panda."""

import csv

import numpy as np
from PIL import Image

from core.democars import DEMO_PX, DEMO_TARGET, SHAPES, draw_panda, generate_demo_library
from core.library import LibraryIndex, ingest_paths, library_stats


def test_the_same_seed_draws_the_same_photos(tmp_path):
    first = generate_demo_library(tmp_path / "a", n=6, seed=3)
    again = generate_demo_library(tmp_path / "b", n=6, seed=3)
    other = generate_demo_library(tmp_path / "c", n=6, seed=4)
    assert [p.read_bytes() for p in first.photos] == [p.read_bytes() for p in again.photos]
    assert first.labels_csv.read_text() == again.labels_csv.read_text()
    assert all(
        a.read_bytes() != b.read_bytes() for a, b in zip(first.photos, other.photos, strict=True)
    )


def test_demo_photos_are_square_jpegs_with_a_label_row_each(tmp_path):
    demo = generate_demo_library(tmp_path, n=8, seed=0)
    with open(demo.labels_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["file"] for row in rows] == [p.name for p in demo.photos]
    for path, row in zip(demo.photos, rows, strict=True):
        with Image.open(path) as image:
            assert (image.format, image.size) == ("JPEG", (DEMO_PX, DEMO_PX))
        assert row["make"] == "Demo" and "demo" in row["source"].lower()
        assert any(shape in row["model"] for shape in SHAPES)
        assert float(row["co2_g_km"]) >= 0 and 2006 <= int(row["year"]) <= 2024


def test_demo_library_ingests_with_its_labels(ctx, tmp_path):
    demo = generate_demo_library(tmp_path / "demo", n=24, seed=1)
    report = ingest_paths(ctx, tmp_path / "demo", demo.labels_csv, progress=False)
    assert (report.added, report.failed, report.label_problems) == (24, [], [])
    stats = library_stats(ctx)
    assert stats.by_make == [("Demo", 24)]
    assert sum(n for _, n in stats.by_fuel) == 24 and None not in dict(stats.by_fuel)


def test_demo_photos_cover_many_shapes_and_colours(ctx, tmp_path):
    demo = generate_demo_library(tmp_path / "demo", n=60, seed=0)
    with open(demo.labels_csv, newline="") as handle:
        models = {row["model"].split()[-1] for row in csv.DictReader(handle)}
    assert models == set(SHAPES)
    ingest_paths(ctx, demo.photos, progress=False)
    lab = LibraryIndex.load(ctx).features.reshape(60, -1, 3).mean(axis=1)
    hues = np.degrees(np.arctan2(lab[:, 2], lab[:, 1])) // 45
    assert len(set(hues.tolist())) >= 6  # photo colours spread around the hue circle
    assert lab[:, 0].std() > 5


def test_bundled_panda_is_the_drawing_and_reads_black_white_and_green():
    bundled = np.asarray(Image.open(DEMO_TARGET).convert("RGB"), np.int16)
    drawn = np.asarray(draw_panda(), np.int16)
    assert bundled.shape == (512, 512, 3)
    assert np.abs(bundled - drawn).mean() < 2
    grey = bundled.mean(axis=2)
    assert (grey < 50).mean() > 0.1 and (grey > 230).mean() > 0.1
    green = (bundled[..., 1] > bundled[..., 0] + 30) & (bundled[..., 1] > bundled[..., 2] + 30)
    assert green.mean() > 0.2
