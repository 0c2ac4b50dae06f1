"""Safe decoding of untrusted bytes, CIELAB conversion and the Lab-grid feature."""

import io

import numpy as np
import pytest
from PIL import Image

from core.errors import BadImage
from core.images import (
    SNIFF_BYTES,
    decode_image,
    jpeg_at_width,
    jpeg_within,
    lab_grid,
    lab_to_rgb,
    rgb_to_lab,
    sniffed_image_type,
    square_thumbnail,
)
from tests.library.conftest import png_header_only

LIMIT = 40_000_000


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


@pytest.mark.parametrize(
    ("rgb", "lab"),
    [
        ((255, 255, 255), (100, 0, 0)),
        ((0, 0, 0), (0, 0, 0)),
        ((255, 0, 0), (53.24, 80.09, 67.20)),
        ((0, 0, 255), (32.30, 79.19, -107.86)),
        ((128, 128, 128), (53.59, 0, 0)),
    ],
)
def test_rgb_to_lab_matches_reference_values(rgb, lab):
    assert rgb_to_lab(np.array(rgb, np.uint8)) == pytest.approx(lab, abs=0.02)


def test_float_and_uint8_input_give_the_same_lab():
    colours = np.random.default_rng(0).integers(0, 256, (50, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        rgb_to_lab(colours), rgb_to_lab(colours.astype(np.float64)), atol=1e-3
    )


def test_lab_to_rgb_inverts_rgb_to_lab():
    colours = np.random.default_rng(1).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    np.testing.assert_allclose(lab_to_rgb(rgb_to_lab(colours)), colours, atol=0.01)


def test_lab_grid_holds_each_cells_colour():
    image = Image.new("RGB", (64, 64), (255, 0, 0))
    image.paste((0, 0, 255), (32, 0, 64, 32))
    grid = lab_grid(image, 2)
    assert grid.shape == (2, 2, 3) and grid.dtype == np.float32
    assert grid[0, 1] == pytest.approx(rgb_to_lab(np.array([0, 0, 255], np.uint8)), abs=0.01)
    assert grid[1, 0] == pytest.approx((53.24, 80.09, 67.20), abs=0.02)


def test_decoded_image_is_rgb_and_upright_per_exif():
    # Stored left red / right blue; orientation 6 means "turn 90 degrees clockwise to view".
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode_image(encode(image, "JPEG", exif=exif, quality=95), LIMIT)
    assert decoded.mode == "RGB" and decoded.size == (20, 40)
    assert decoded.info["original_size"] == (20, 40)
    top, bottom = decoded.getpixel((10, 5)), decoded.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert decode_image(encode(image), LIMIT).getpixel((3, 3)) == (255, 255, 255)
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([10, 200, 30] * 256)
    assert decode_image(encode(palette, transparency=0), LIMIT).getpixel((0, 0)) == (255, 255, 255)


def test_jpeg_draft_decodes_small_but_remembers_the_full_size():
    big = Image.fromarray(np.random.default_rng(2).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    decoded = decode_image(encode(big, "JPEG"), LIMIT, draft_px=96)
    assert decoded.size == (160, 120)
    assert decoded.info["original_size"] == (640, 480)


def test_non_image_bytes_are_rejected():
    with pytest.raises(BadImage, match="not an image"):
        decode_image(b"just some text, not a picture", LIMIT)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image_is_rejected(fmt):
    noisy = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = encode(noisy, fmt)
    with pytest.raises(BadImage, match="truncated"):
        decode_image(data[: len(data) // 2], LIMIT)


def test_decompression_bomb_is_rejected_before_decoding():
    with pytest.raises(BadImage, match="too many pixels"):
        decode_image(png_header_only(50_000, 50_000), LIMIT)


def test_pixel_limit_is_checked_from_the_header():
    with pytest.raises(BadImage, match="8000 x 8000"):
        decode_image(png_header_only(8000, 8000), LIMIT)


def test_too_many_bytes_are_rejected():
    with pytest.raises(BadImage, match="larger than 1 MiB"):
        decode_image(b"\0" * (2 << 20), LIMIT, max_bytes=1 << 20)


def test_square_thumbnail_crops_the_centre():
    image = Image.new("RGB", (300, 100), (0, 0, 0))
    image.paste((255, 255, 255), (100, 0, 200, 100))
    thumbnail = square_thumbnail(image, 32)
    assert thumbnail.size == (32, 32)
    assert np.asarray(thumbnail).min() > 240


def test_jpeg_within_halves_until_it_fits():
    noise = Image.effect_noise((512, 512), 80).convert("RGB")
    assert len(jpeg_within(encode(noise), 20_000)) <= 20_000


def test_jpeg_at_width_scales_down_and_keeps_the_aspect():
    scaled = Image.open(io.BytesIO(jpeg_at_width(encode(Image.new("RGB", (400, 200))), 100)))
    assert (scaled.format, scaled.size) == ("JPEG", (100, 50))


def sideways_jpeg(photo: bytes) -> tuple[bytes, Image.Image]:
    """A real photo stored turned a quarter, with EXIF orientation 6 saying so (as phones do);
    returns the bytes and the picture as it should be seen."""
    upright = Image.open(io.BytesIO(photo)).convert("RGB")
    upright.paste((255, 0, 0), (0, 0, 12, 12))  # a mark in the top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to view"
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    return encode(stored, "JPEG", quality=95, exif=exif), upright


def top_left_is_red(image: Image.Image) -> bool:
    red, green, blue = image.convert("RGB").resize((image.width // 4, image.height // 4)).getpixel(
        (0, 0)
    )
    return red > 180 and green < 90 and blue < 90


def test_jpeg_within_keeps_a_photo_upright_per_its_exif_orientation(vehicle_photos):
    data, upright = sideways_jpeg(vehicle_photos[0].read_bytes())
    shrunk = Image.open(io.BytesIO(jpeg_within(data, len(data) // 3)))
    assert shrunk.width / shrunk.height == pytest.approx(upright.width / upright.height, 0.05)
    assert top_left_is_red(shrunk)
    assert shrunk.getexif().get(0x0112) in (None, 1)  # nothing left to turn it again


def test_jpeg_at_width_keeps_a_photo_upright_per_its_exif_orientation(vehicle_photos):
    data, upright = sideways_jpeg(vehicle_photos[0].read_bytes())
    scaled = Image.open(io.BytesIO(jpeg_at_width(data, upright.width // 2)))
    assert scaled.width == upright.width // 2
    assert top_left_is_red(scaled)


def test_jpeg_within_refuses_bytes_that_are_not_a_picture_in_one_sentence():
    with pytest.raises(BadImage, match=r"^That picture could not be read\.$"):
        jpeg_within(b"<svg xmlns='http://www.w3.org/2000/svg'/>", 1000)


@pytest.mark.parametrize(
    ("fmt", "kind"),
    [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("GIF", "image/gif"), ("WEBP", "image/webp"),
     ("BMP", "image/bmp"), ("TIFF", "image/tiff")],
)
def test_sniffed_image_type_reads_the_magic_number(fmt, kind):
    assert sniffed_image_type(encode(Image.new("RGB", (8, 8)), fmt)[:SNIFF_BYTES]) == kind


@pytest.mark.parametrize(
    "head", [b"%PDF-1.7 ", b"<svg xmlns=", b"PK\x03\x04zip", b"", b"RIFFxxxxWAVE"]
)
def test_sniffed_image_type_refuses_what_is_not_an_image(head):
    assert sniffed_image_type(head) is None
