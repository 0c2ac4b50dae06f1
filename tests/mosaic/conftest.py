"""A small car library and a target image, generated here, on the real SQLite of `ctx`."""

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from core.library import add_car_photo


def car_photo(seed: int, size: int = 48) -> bytes:
    """A box-shaped 'car' of a random colour on a random background: distinct, cheap, real JPEG."""
    rng = np.random.default_rng(seed)
    background, body = (tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(2))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    draw.rectangle((size // 8, size // 3, size * 7 // 8, size * 3 // 4), fill=body)
    pixels = np.asarray(image).astype(np.int16) + rng.integers(-8, 8, (size, size, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=92)
    return out.getvalue()


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@pytest.fixture
def library(ctx) -> list[int]:
    cars = [add_car_photo(ctx, car_photo(i), f"car{i}.jpg", {"make": "Demo", "model": f"M{i}"})
            for i in range(60)]
    return [car.id for car in cars]


@pytest.fixture
def target() -> bytes:
    """160 x 120: green field, yellow sun, dark band; 8 columns make a 6-row grid."""
    image = Image.new("RGB", (160, 120), (40, 120, 60))
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 10, 70, 60), fill=(240, 210, 40))
    draw.rectangle((0, 90, 160, 120), fill=(30, 30, 40))
    return png(image)
