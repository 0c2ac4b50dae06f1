"""Deep-zoom pyramids: the DZI descriptor describes the tiles that are stored, and the deepest
level shows each car's own photo at 256 px."""

import io
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from core.library import add_car_photo
from core.mosaic import MosaicOptions, build_mosaic
from core.pyramid import CELL_PX, build_pyramid, level_count, pyramid_for
from storage.models import Mosaic
from tests.bot.conftest import car_at

DZI = "{http://schemas.microsoft.com/deepzoom/2008}"


def _photo(rgb: tuple[int, int, int], seed: int, size=(300, 200)) -> bytes:
    """A car-photo stand-in with structure (a gradient, a dark band, grain), wider than tall."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(-40, 40, size[0])[None, :, None]
    grain = rng.integers(-6, 6, (size[1], size[0], 3))
    pixels = np.clip(np.array(rgb) + ramp + grain, 0, 255)
    pixels[size[1] // 2 : size[1] // 2 + 20] //= 3
    pixels = pixels.astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=92)
    return out.getvalue()


@pytest.fixture
def mosaic(ctx) -> Mosaic:
    rng = np.random.default_rng(4)
    for i in range(30):
        colour = tuple(int(c) for c in rng.integers(30, 226, 3))
        add_car_photo(ctx, _photo(colour, i), f"car{i}.jpg", {"make": "Demo", "model": f"M{i}"})
    target = Image.new("RGB", (140, 100), (40, 120, 60))
    target.paste((230, 210, 60), (40, 30, 100, 80))
    out = io.BytesIO()
    target.save(out, "PNG")
    # No colour treatment: the deepest level is then the photos themselves.
    options = MosaicOptions(cols=7, tile_px=16, seed=2, blend=0, shift=0)
    return build_mosaic(ctx, out.getvalue(), "plain", options=options)


def _descriptor(xml: str) -> dict:
    root = ET.fromstring(xml)
    size = root.find(f"{DZI}Size")
    return {
        "format": root.get("Format"),
        "overlap": int(root.get("Overlap")),
        "tile": int(root.get("TileSize")),
        "width": int(size.get("Width")),
        "height": int(size.get("Height")),
    }


def _tile(ctx, pyramid, level: int, col: int, row: int) -> Image.Image:
    return Image.open(io.BytesIO(ctx.media.read(pyramid.tile_key(level, col, row))))


def test_level_count_and_tile_sizes_match_the_descriptor(ctx, mosaic):
    pyramid = build_pyramid(ctx, mosaic)
    dzi = _descriptor(pyramid.descriptor)
    assert (dzi["width"], dzi["height"]) == (mosaic.cols * CELL_PX, mosaic.rows * CELL_PX)
    assert dzi["format"] == "jpeg" and dzi["tile"] >= 256
    levels = math.ceil(math.log2(max(dzi["width"], dzi["height"]))) + 1
    assert len(pyramid.levels) == levels == level_count(dzi["width"], dzi["height"])
    for level, grid in enumerate(pyramid.levels):
        scale = 2 ** (levels - 1 - level)
        width, height = math.ceil(dzi["width"] / scale), math.ceil(dzi["height"] / scale)
        assert (grid.cols, grid.rows) == (math.ceil(width / dzi["tile"]),
                                          math.ceil(height / dzi["tile"]))
        for col, row in {(0, 0), (grid.cols - 1, grid.rows - 1), (grid.cols // 2, 0)}:
            x0, y0 = col * dzi["tile"], row * dzi["tile"]
            left, top = min(x0, dzi["overlap"]), min(y0, dzi["overlap"])
            right = min(dzi["tile"] + dzi["overlap"], width - x0)
            bottom = min(dzi["tile"] + dzi["overlap"], height - y0)
            assert _tile(ctx, pyramid, level, col, row).size == (left + right, top + bottom)
    assert pyramid.tile_key(levels, 0, 0) is None
    assert pyramid.tile_key(levels - 1, mosaic.cols, 0) is None


def _resized_photo(data: bytes) -> np.ndarray:
    """The photo as a tile shows it: its centred square, resized to 256 px."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return np.asarray(square.resize((CELL_PX, CELL_PX), Image.Resampling.LANCZOS)).astype(int)


def _deepest_cell(ctx, pyramid, row: int, col: int) -> np.ndarray:
    tile = np.asarray(_tile(ctx, pyramid, len(pyramid.levels) - 1, col, row).convert("RGB"))
    left, top = (1 if col else 0), (1 if row else 0)  # the overlap with the neighbours
    return tile[top : top + CELL_PX, left : left + CELL_PX].astype(int)


def test_deepest_level_is_each_cars_photo_resized(ctx, mosaic):
    pyramid = build_pyramid(ctx, mosaic, tile_format="png")
    for row, col in [(0, 0), (2, 3), (mosaic.rows - 1, mosaic.cols - 1)]:
        assert np.array_equal(_deepest_cell(ctx, pyramid, row, col),
                              _resized_photo(car_at(ctx, mosaic, row, col)))


def test_gallery_tiles_are_jpeg_close_to_the_photo(ctx, mosaic):
    pyramid = build_pyramid(ctx, mosaic)
    cell = _deepest_cell(ctx, pyramid, 2, 3)
    assert np.abs(cell - _resized_photo(car_at(ctx, mosaic, 2, 3))).mean() < 2


def test_deep_zoom_looks_like_the_flat_render(ctx, mosaic, tmp_path):
    """With the default colour treatment, each deep cell shrunk to the render's tile size is
    that tile of the render."""
    target = ctx.media.read(mosaic.target_media_key)
    treated = build_mosaic(ctx, target, "treated", options=MosaicOptions(cols=7, tile_px=16))
    pyramid = build_pyramid(ctx, treated)
    render = np.asarray(Image.open(io.BytesIO(ctx.media.read(treated.render_media_key))))
    px = treated.tile_px
    for row, col in [(0, 0), (3, 4)]:
        deep = _deepest_cell(ctx, pyramid, row, col).astype(np.uint8)
        small = np.asarray(Image.fromarray(deep).resize((px, px), Image.Resampling.BOX))
        flat = render[row * px : (row + 1) * px, col * px : (col + 1) * px]
        mean_gap = np.abs(small.reshape(-1, 3).mean(0) - flat.reshape(-1, 3).mean(0))
        assert mean_gap.max() < 6, (row, col, mean_gap)


def test_pyramid_is_built_once_and_found_again(ctx, mosaic):
    first = pyramid_for(ctx, mosaic)
    with ctx.db.session() as session:
        stored = session.get(Mosaic, mosaic.id)
    again = pyramid_for(ctx, stored)
    assert stored.settings["pyramid"]["manifest"] == first.manifest_key
    assert again.manifest_key == first.manifest_key
    assert "options" in stored.settings


def test_a_car_removed_from_the_library_shows_its_render_tile(ctx, mosaic):
    from storage.models import Car, Tile

    with ctx.db.session() as session:
        car_id = session.query(Tile.car_id).filter_by(mosaic_id=mosaic.id, row=1, col=1).scalar()
        session.delete(session.get(Car, car_id))
    pyramid = build_pyramid(ctx, mosaic, tile_format="png")
    render = Image.open(io.BytesIO(ctx.media.read(mosaic.render_media_key))).convert("RGB")
    px = mosaic.tile_px
    crop = render.crop((px, px, 2 * px, 2 * px)).resize((CELL_PX, CELL_PX),
                                                        Image.Resampling.LANCZOS)
    assert np.array_equal(_deepest_cell(ctx, pyramid, 1, 1), np.asarray(crop).astype(int))


def test_a_lost_original_shows_the_library_thumbnail_enlarged(ctx, mosaic):
    from core.images import square_thumbnail
    from storage.models import Car, Tile

    with ctx.db.session() as session:
        car = session.get(Car, session.query(Tile.car_id).filter_by(
            mosaic_id=mosaic.id, row=0, col=1).scalar())
        media_key, thumbnail = car.media_key, car.thumbnail
    ctx.media.delete(media_key)
    pyramid = build_pyramid(ctx, mosaic, tile_format="png")
    enlarged = square_thumbnail(Image.open(io.BytesIO(thumbnail)).convert("RGB"), CELL_PX)
    assert np.array_equal(_deepest_cell(ctx, pyramid, 0, 1), np.asarray(enlarged).astype(int))
