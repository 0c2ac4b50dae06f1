"""Building a mosaic: grid, limits, determinism, storage, preview."""

import io
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from core.errors import (
    BadMosaicName,
    BadMosaicOptions,
    EmptyLibrary,
    LibraryTooSmall,
    MosaicExists,
)
from core.gallery import find_mosaic, list_mosaics, render_bytes
from core.library import add_car_photo
from core.mosaic import MosaicOptions, build_mosaic, preview_image
from storage.models import Mosaic, Tile
from tests.mosaic.conftest import car_photo, png


def tiles_of(ctx, mosaic) -> list[tuple[int, int, int]]:
    with ctx.db.session() as session:
        rows = session.query(Tile).filter_by(mosaic_id=mosaic.id).order_by(Tile.row, Tile.col)
        return [(t.row, t.col, t.car_id) for t in rows]


def test_grid_follows_the_target_aspect_and_render_is_tiles_wide(ctx, library, target):
    mosaic = build_mosaic(ctx, target, "field", options=MosaicOptions(cols=8, tile_px=24))
    render = Image.open(io.BytesIO(render_bytes(ctx, mosaic)))
    assert (mosaic.rows, mosaic.cols) == (6, 8)
    assert render.size == (8 * 24, 6 * 24)


def test_one_tile_row_per_cell_with_its_pixel_box(ctx, library, target):
    mosaic = build_mosaic(ctx, target, "field", options=MosaicOptions(cols=8, tile_px=24))
    with ctx.db.session() as session:
        tiles = session.query(Tile).filter_by(mosaic_id=mosaic.id).all()
    assert len(tiles) == 48
    assert {(t.row, t.col) for t in tiles} == {(r, c) for r in range(6) for c in range(8)}
    corner = next(t for t in tiles if (t.row, t.col) == (5, 7))
    assert (corner.x0, corner.y0, corner.x1, corner.y1) == (168, 120, 192, 144)
    assert all(0.0 <= t.score <= 1.0 for t in tiles)


def test_no_photo_is_used_more_than_max_uses(ctx, library, target):
    options = MosaicOptions(cols=12, tile_px=8, max_uses=2, spacing=0)
    mosaic = build_mosaic(ctx, target, "limited", options=options)
    uses = np.bincount([car for _, _, car in tiles_of(ctx, mosaic)])
    assert mosaic.rows * mosaic.cols == 108 and uses.max() <= 2


def test_copies_of_a_photo_keep_their_distance(ctx, library, target):
    options = MosaicOptions(cols=16, tile_px=8, spacing=2)
    mosaic = build_mosaic(ctx, target, "spaced", options=options)
    where = defaultdict(list)
    for row, col, car in tiles_of(ctx, mosaic):
        where[car].append((row, col))
    assert any(len(cells) > 1 for cells in where.values())
    for cells in where.values():
        for i, (r1, c1) in enumerate(cells):
            for r2, c2 in cells[i + 1 :]:
                assert max(abs(r1 - r2), abs(c1 - c2)) > 2


def test_same_seed_builds_the_same_mosaic(ctx, library, target):
    options = MosaicOptions(cols=10, tile_px=16, seed=7)
    first = build_mosaic(ctx, target, "one", options=options)
    second = build_mosaic(ctx, target, "two", options=options)
    assert tiles_of(ctx, first) == tiles_of(ctx, second)
    assert render_bytes(ctx, first) == render_bytes(ctx, second)


def test_another_seed_breaks_near_ties_differently(ctx, library):
    # A flat grey target: many photos tie, so the seed decides among them.
    flat = png(Image.new("RGB", (100, 100), (128, 128, 128)))
    options = MosaicOptions(cols=10, tile_px=8, temperature=20.0)
    first = build_mosaic(ctx, flat, "a", options=options)
    second = build_mosaic(ctx, flat, "b", options=MosaicOptions(**{**vars(options), "seed": 1}))
    assert tiles_of(ctx, first) != tiles_of(ctx, second)


def test_colour_adaptation_brings_a_grey_library_closer_to_the_target(ctx, target):
    for i in range(40):  # grey-ish cars only, like the real photos
        grey = np.asarray(Image.open(io.BytesIO(car_photo(i))).convert("L").convert("RGB"))
        add_car_photo(ctx, png(Image.fromarray(grey)), f"grey{i}.png")
    plain = MosaicOptions(cols=8, tile_px=16, adapt=0.0, shift=0.0, blend=0.0)
    plain_error = _grid_error(ctx, build_mosaic(ctx, target, "plain", options=plain), target)
    adapted_error = _grid_error(ctx, build_mosaic(ctx, target, "adapted",
                                                  options=MosaicOptions(cols=8, tile_px=16)),
                                target)
    assert adapted_error < 0.7 * plain_error


def _grid_error(ctx, mosaic: Mosaic, target: bytes) -> float:
    size = (mosaic.cols, mosaic.rows)
    render = Image.open(io.BytesIO(render_bytes(ctx, mosaic))).convert("RGB").resize(size, 4)
    wanted = Image.open(io.BytesIO(target)).convert("RGB").resize(size, 4)
    return float(np.abs(np.asarray(render, float) - np.asarray(wanted, float)).mean())


def test_a_taken_name_is_refused_and_nothing_is_stored(ctx, library, target):
    build_mosaic(ctx, target, "field", options=MosaicOptions(cols=8))
    with pytest.raises(MosaicExists, match='"field"'):
        build_mosaic(ctx, target, "field", options=MosaicOptions(cols=8))
    assert [m.name for m in list_mosaics(ctx)] == ["field"]


def test_the_same_name_may_live_in_another_scope(ctx, library, target):
    build_mosaic(ctx, target, "field", options=MosaicOptions(cols=8))
    build_mosaic(ctx, target, "field", scope="guild:1", options=MosaicOptions(cols=8))
    assert find_mosaic(ctx, "field", "guild:1").owner_scope == "guild:1"


def test_empty_or_overlong_names_are_refused(ctx, library, target):
    for name in ("", "   ", "x" * 81):
        with pytest.raises(BadMosaicName):
            build_mosaic(ctx, target, name)


def test_an_empty_library_is_a_clear_error(ctx, target):
    with pytest.raises(EmptyLibrary):
        build_mosaic(ctx, target, "nothing")


def test_a_use_limit_the_library_cannot_meet_is_refused(ctx, library, target):
    with pytest.raises(LibraryTooSmall, match="60 photos"):
        build_mosaic(ctx, target, "tight", options=MosaicOptions(cols=20, max_uses=1))
    assert list_mosaics(ctx) == []


def test_preview_fits_its_size_limit(ctx, library, target):
    mosaic = build_mosaic(ctx, target, "field", options=MosaicOptions(cols=30, tile_px=32))
    limit = 40_000
    preview = preview_image(ctx, mosaic, max_bytes=limit)
    image = Image.open(io.BytesIO(preview))
    assert len(preview) <= limit
    assert image.format == "JPEG" and image.width > mosaic.cols


def test_preview_has_room_for_labels_beside_the_grid(ctx, library, target):
    mosaic = build_mosaic(ctx, target, "field", options=MosaicOptions(cols=8, tile_px=32))
    preview = Image.open(io.BytesIO(preview_image(ctx, mosaic)))
    assert preview.width > 8 * 32 and preview.height > mosaic.rows * 32
    assert len(preview_image(ctx, mosaic)) <= ctx.settings.preview_max_bytes


@pytest.mark.parametrize(
    "options", [MosaicOptions(cols=0), MosaicOptions(tile_px=1000), MosaicOptions(blend=1.5),
                MosaicOptions(max_uses=0), MosaicOptions(temperature=0)]
)
def test_options_out_of_range_are_one_clear_sentence(ctx, library, target, options):
    with pytest.raises(BadMosaicOptions) as error:
        build_mosaic(ctx, target, "bad", options=options)
    assert str(error.value).endswith(".") and "\n" not in str(error.value)


def test_a_grid_too_large_to_render_is_refused_before_any_work(ctx, library):
    sliver = png(Image.new("RGB", (10, 2000), (90, 90, 90)))
    with pytest.raises(BadMosaicOptions, match="use fewer columns"):
        build_mosaic(ctx, sliver, "sliver", options=MosaicOptions(cols=300))
