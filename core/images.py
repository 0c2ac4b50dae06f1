"""Safe image decoding and colour features: the one place untrusted image bytes are opened.

Also sRGB <-> CIELAB (D65) in numpy and the k x k Lab grid that mosaic matching compares.
"""

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.errors import BadImage

# Cells per side of a photo's colour feature: 4 x 4 Lab means = 48 floats per photo.
LAB_GRID = 4

_WHITE_D65 = np.array([0.95047, 1.0, 1.08883], np.float32)
_RGB_TO_XYZ = np.array(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ],
    np.float32,
)
_XYZ_TO_RGB = np.linalg.inv(_RGB_TO_XYZ.astype(np.float64)).astype(np.float32)
_EPSILON = (6 / 29) ** 3
_ORIENTATION_TAG = 0x0112
# Pillow only warns about a would-be bomb under 2x its own limit; make that an error everywhere
# (set once here because warnings.catch_warnings is not thread-safe and ingest decodes in threads).
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
# EXIF orientations 5-8 turn the picture a quarter, so width and height swap.
_QUARTER_TURNS = {5, 6, 7, 8}


def decode_image(
    data: bytes, max_pixels: int, *, max_bytes: int | None = None, draft_px: int | None = None
) -> Image.Image:
    """Bytes -> RGB image, upright per EXIF. Raises BadImage with one sentence if the bytes are
    too many, not an image, truncated, or claim more than `max_pixels` pixels.

    The pixel count is read from the header before any pixel is decoded, so a decompression bomb
    costs nothing. `draft_px` lets JPEGs decode at 1/2, 1/4 or 1/8 scale when only a small result
    (at least draft_px on each side) is wanted. `image.info["original_size"]` keeps the upright
    size before drafting.
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise BadImage(f"The image is larger than {max_bytes // (1024 * 1024)} MiB.")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise BadImage(
                f"The image claims {width} x {height} pixels, more than the "
                f"{max_pixels:,} allowed."
            )
        orientation = image.getexif().get(_ORIENTATION_TAG, 1)
        if draft_px and image.format == "JPEG":
            image.draft("RGB", (draft_px, draft_px))
        image.load()
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("The image claims too many pixels (a decompression bomb).") from None
    except UnidentifiedImageError:
        raise BadImage("The file is not an image in a format we can read.") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        if "truncated" in str(error).lower() or isinstance(error, EOFError):
            raise BadImage("The image file is truncated.") from None
        raise BadImage("The image file is damaged and cannot be decoded.") from None
    if orientation in _QUARTER_TURNS:
        width, height = height, width
    image = _to_rgb(ImageOps.exif_transpose(image))
    image.info["original_size"] = (width, height)
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode -> RGB; transparent pixels become white, as a photo viewer would show them."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":
        # 16/32-bit greys: scale to 8 bits by their own range instead of clipping at 255.
        grey = np.asarray(image, np.float64)
        span = max(float(grey.max() - grey.min()), 1e-9)
        grey = ((grey - grey.min()) * (255 / span)).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")


def _srgb_to_linear(values: np.ndarray) -> np.ndarray:
    """sRGB 0..255 -> linear light 0..1 (float32); uint8 input goes through a 256-entry table."""
    if values.dtype == np.uint8:
        return _LINEAR_TABLE[values]
    v = np.asarray(values, np.float32) / 255
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4).astype(np.float32)


def _linear_to_srgb(values: np.ndarray) -> np.ndarray:
    v = np.clip(values, 0, 1)
    return np.where(v <= 0.0031308, v * 12.92, 1.055 * v ** (1 / 2.4) - 0.055) * 255


_LINEAR_TABLE = _srgb_to_linear(np.arange(256, dtype=np.float32))


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (..., 3) with values 0..255 (uint8 or float) -> CIELAB D65 (..., 3) float32."""
    xyz = (_srgb_to_linear(np.asarray(rgb)) @ _RGB_TO_XYZ.T) / _WHITE_D65
    f = np.where(xyz > _EPSILON, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = np.empty(f.shape, np.float32)
    lab[..., 0] = 116 * f[..., 1] - 16
    lab[..., 1] = 500 * (f[..., 0] - f[..., 1])
    lab[..., 2] = 200 * (f[..., 1] - f[..., 2])
    return lab


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIELAB D65 (..., 3) -> sRGB (..., 3) float32 in 0..255, out-of-gamut colours clipped."""
    lab = np.asarray(lab, np.float32)
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], axis=-1)
    xyz = np.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * _WHITE_D65
    return _linear_to_srgb(xyz @ _XYZ_TO_RGB.T).astype(np.float32)


def lab_grid(image: Image.Image, k: int = LAB_GRID) -> np.ndarray:
    """(k, k, 3) float32: the mean colour of each of k x k cells, in CIELAB.

    Cells are averaged in sRGB (box filter) and then converted, exactly as mosaic target cells
    are, so library and target features compare like with like.
    """
    small = image.convert("RGB").resize((k, k), Image.Resampling.BOX)
    return rgb_to_lab(np.asarray(small))


def square_crop(image: Image.Image) -> Image.Image:
    """The largest centred square: what a mosaic tile shows of a photo."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def square_thumbnail(image: Image.Image, px: int) -> Image.Image:
    """Centre-cropped square resized to px x px (small photos are enlarged to fit)."""
    square = square_crop(image)
    if square.width == px:
        return square
    # reduce() first: integer box shrinking is cheap, LANCZOS then only works on a small image.
    factor = square.width // (2 * px)
    if factor >= 2:
        square = square.reduce(factor)
    return square.resize((px, px), Image.Resampling.LANCZOS)


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=quality, optimize=False)
    return out.getvalue()


def image_content_type(data: bytes) -> str:
    """The content type of an image we encoded ourselves: PNG or JPEG."""
    return "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"


def sniffed_image_type(head: bytes) -> str | None:
    """The image content type that the first bytes of a file announce (its magic number), or
    None: what a chat attachment really is, whatever content type its upload claimed."""
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:2] == b"BM":
        return "image/bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    return None


# Bytes a file needs before sniffed_image_type can tell (WebP's mark ends at byte 12).
SNIFF_BYTES = 12


def _open_upright(data: bytes) -> Image.Image:
    """A stored image, turned as its EXIF orientation says: re-encoding drops the EXIF, so a
    photo not turned first would show sideways."""
    try:
        image = Image.open(io.BytesIO(data))
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImage("That picture could not be read.") from error


def jpeg_within(data: bytes, max_bytes: int) -> bytes:
    """A stored image re-encoded as an upright JPEG of at most max_bytes (a chat's upload
    limit), halving its size until it fits; a 16 px image is the floor, returned even if still
    too large."""
    image = _open_upright(data).convert("RGB")
    while True:
        encoded = encode_jpeg(image, quality=85)
        if len(encoded) <= max_bytes or min(image.size) <= 16:
            return encoded
        image = image.resize((max(1, image.width // 2), max(1, image.height // 2)))


def jpeg_at_width(data: bytes, width: int) -> bytes:
    """A stored image as an upright JPEG no wider than `width` (aspect kept, never enlarged)."""
    image = _open_upright(data)
    if image.width > width:
        image = image.convert("RGB").resize(
            (width, round(image.height * width / image.width)), Image.Resampling.LANCZOS
        )
    return encode_jpeg(image, quality=88)
