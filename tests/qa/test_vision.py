"""The photo classifier's car gate and the library match that brings a car's metadata."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import core
from core.images import decode_image, encode_jpeg
from core.library import add_car_photo
from core.qa.vision import VisionTagger, not_a_car_reply

METADATA = {
    "make": "Renault",
    "model": "Zoe",
    "year": "2021",
    "fuel": "electric",
    "co2_g_km": "0",
    "emission_standard": "Euro 6d",
}


def drawn_tree() -> Image.Image:
    image = Image.new("RGB", (224, 224), (135, 200, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 170, 224, 224], fill=(60, 140, 50))
    draw.rectangle([100, 110, 124, 175], fill=(100, 60, 20))
    rng = np.random.default_rng(0)
    for _ in range(30):
        x, y = rng.integers(50, 170), rng.integers(30, 130)
        draw.ellipse([x - 20, y - 20, x + 20, y + 20], fill=(20, int(rng.integers(100, 160)), 30))
    return image


def noise() -> Image.Image:
    pixels = np.random.default_rng(1).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def stripes() -> Image.Image:
    image = Image.new("RGB", (224, 224), "white")
    draw = ImageDraw.Draw(image)
    for x in range(0, 224, 16):
        draw.line([x, 0, x, 224], fill="black", width=3)
    return image


@pytest.fixture(scope="module")
def tagger() -> VisionTagger:
    return VisionTagger()


@pytest.mark.parametrize(
    "make_image", [drawn_tree, noise, stripes, lambda: Image.new("RGB", (64, 64), "red")]
)
def test_a_picture_without_a_car_is_refused_politely(tagger, make_image):
    evidence = tagger.describe(make_image())
    assert not evidence.is_car
    reply = not_a_car_reply(evidence)
    assert "does not look like a car" in reply
    assert "please send a photo of a car" in reply


def test_the_bundled_animal_picture_is_not_a_car(tagger):
    panda = Path(core.__file__).parent / "assets" / "panda.png"
    assert not tagger.describe(Image.open(panda)).is_car


def test_real_car_photos_pass_the_gate(tagger, vehicle_photos):
    sample = vehicle_photos[::160]  # ten photos, cars and pickups
    passed = [tagger.describe(Image.open(path)).is_car for path in sample]
    assert sum(passed) >= 8


def test_labels_come_with_probabilities_and_car_labels_are_vehicles(tagger, vehicle_photos):
    evidence = tagger.describe(Image.open(vehicle_photos[0]))
    probabilities = [p for _, p in evidence.labels]
    assert len(evidence.labels) == 5 and probabilities == sorted(probabilities, reverse=True)
    assert 0 < sum(probabilities) <= 1.0001
    assert evidence.car_labels and evidence.car_labels[0][1] >= 0.03


@pytest.fixture
def library_car(ctx, vehicle_photos):
    data = vehicle_photos[3].read_bytes()
    add_car_photo(ctx, data, vehicle_photos[3].name, METADATA)
    add_car_photo(ctx, vehicle_photos[900].read_bytes(), vehicle_photos[900].name)
    return data


def test_the_same_file_brings_the_cars_metadata(ctx, library_car):
    evidence = VisionTagger(ctx).describe(decode_image(library_car, 10**7), library_car)
    assert evidence.match == "same file"
    assert evidence.library_car["make"] == "Renault" and evidence.library_car["co2_g_km"] == 0
    assert "Renault Zoe" in evidence.summary() and "Euro 6d" in evidence.summary()


@pytest.mark.parametrize("scale, quality", [(3, 75), (0.5, 90), (1, 60)])
def test_a_resized_or_recompressed_copy_is_a_near_duplicate(ctx, library_car, scale, quality):
    image = decode_image(library_car, 10**7)
    size = (round(image.width * scale), round(image.height * scale))
    copy = encode_jpeg(image.resize(size, Image.Resampling.BICUBIC), quality)
    evidence = VisionTagger(ctx).describe(decode_image(copy, 10**7), copy)
    assert evidence.match == "near duplicate"
    assert evidence.library_car["model"] == "Zoe"
    assert evidence.is_car


def test_a_different_car_matches_nothing(ctx, library_car, vehicle_photos):
    for path in vehicle_photos[4:40:4]:
        data = path.read_bytes()
        evidence = VisionTagger(ctx).describe(decode_image(data, 10**7), data)
        assert evidence.library_car is None, path.name


def test_a_cropped_copy_is_not_taken_for_the_car(ctx, library_car):
    image = decode_image(library_car, 10**7)
    out = io.BytesIO()
    image.crop((0, 0, image.width, image.height * 2 // 3)).save(out, "PNG")
    evidence = VisionTagger(ctx).describe(Image.open(io.BytesIO(out.getvalue())), out.getvalue())
    assert evidence.library_car is None
