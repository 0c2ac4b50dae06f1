"""Tile look-up: a coordinate to the original car photo, or the tile cropped from the render."""

import io

import numpy as np
import pytest
from PIL import Image

from core.errors import BadCoordinate, UnknownMosaic
from core.gallery import find_mosaic, render_bytes, tile_lookup
from core.mosaic import MosaicOptions, build_mosaic
from storage.models import Car, Tile


@pytest.fixture
def mosaic(ctx, library, target):
    return build_mosaic(ctx, target, "field", options=MosaicOptions(cols=8, tile_px=24, seed=3))


def car_at(ctx, mosaic, row, col) -> Car:
    with ctx.db.session() as session:
        tile = session.query(Tile).filter_by(mosaic_id=mosaic.id, row=row, col=col).one()
        return session.get(Car, tile.car_id)


def test_coordinate_gives_the_original_photo_and_what_is_known(ctx, mosaic):
    found = tile_lookup(ctx, mosaic, "c2")
    car = car_at(ctx, mosaic, 1, 2)
    assert (found.label, found.row, found.col) == ("C2", 1, 2)
    assert found.is_original and found.note is None
    assert found.image_bytes == ctx.media.read(car.media_key)
    assert found.content_type == "image/jpeg"
    assert found.car_info["make"] == "Demo" and found.car_info["model"] == car.model


def test_row_comma_column_finds_the_same_tile(ctx, mosaic):
    assert tile_lookup(ctx, mosaic, "2,3").image_bytes == tile_lookup(ctx, mosaic, "C2").image_bytes


def test_off_grid_coordinate_is_refused(ctx, mosaic):
    with pytest.raises(BadCoordinate, match="off the grid"):
        tile_lookup(ctx, mosaic, "I1")


def test_missing_original_falls_back_to_the_rendered_tile(ctx, mosaic):
    car = car_at(ctx, mosaic, 5, 7)
    ctx.media.delete(car.media_key)
    found = tile_lookup(ctx, mosaic, "H6")
    assert not found.is_original and "no longer stored" in found.note
    assert found.car_info["file_name"] == car.file_name
    crop = Image.open(io.BytesIO(found.image_bytes))
    render = Image.open(io.BytesIO(render_bytes(ctx, mosaic))).convert("RGB")
    assert crop.size == (24, 24)
    expected = np.asarray(render.crop((7 * 24, 5 * 24, 8 * 24, 6 * 24)))
    assert np.array_equal(np.asarray(crop), expected)


def test_unknown_mosaic_name_is_one_clear_sentence(ctx, mosaic):
    with pytest.raises(UnknownMosaic) as error:
        find_mosaic(ctx, "nope")
    assert str(error.value) == 'There is no mosaic named "nope" here.'


def test_a_mosaic_is_only_found_in_its_own_scope(ctx, mosaic):
    assert find_mosaic(ctx, "field").id == mosaic.id
    with pytest.raises(UnknownMosaic):
        find_mosaic(ctx, "field", scope="guild:42")


def test_a_car_removed_from_the_library_still_shows_its_tile(ctx, mosaic):
    car = car_at(ctx, mosaic, 0, 0)
    with ctx.db.session() as session:
        session.delete(session.get(Car, car.id))
    found = tile_lookup(ctx, mosaic, "A1")
    assert found.car_info is None and not found.is_original
    assert "removed from the library" in found.note
    assert Image.open(io.BytesIO(found.image_bytes)).size == (24, 24)
