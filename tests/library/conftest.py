"""Photos generated in the test: distinct JPEGs of a coloured box on a coloured background."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw


def photo_bytes(seed: int, size: tuple[int, int] = (80, 60)) -> bytes:
    rng = np.random.default_rng(seed)
    background, body = (tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(2))
    image = Image.new("RGB", size, background)
    width, height = size
    ImageDraw.Draw(image).rectangle(
        (width // 8, height // 3, width * 7 // 8, height * 3 // 4), fill=body
    )
    out = io.BytesIO()
    image.save(out, "JPEG", quality=92)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no pixel data behind it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def photo_dir(tmp_path):
    """A folder of 10 distinct photos, car00.jpg .. car09.jpg."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(10):
        (folder / f"car{i:02d}.jpg").write_bytes(photo_bytes(i))
    return folder
