"""Looking mosaics up: by name in a scope, and a tile coordinate to the original car photo
behind it (or, if that file is gone, the tile cropped from the stored render).
"""

import io
from dataclasses import dataclass

from PIL import Image

from core.context import AppContext
from core.errors import UnknownMosaic
from core.library import METADATA_FIELDS
from core.mosaic import format_coordinate, parse_coordinate
from core.settings import Settings
from storage import mosaics as mosaic_rows
from storage.media import MediaMissing
from storage.models import Mosaic

# car_info()'s keys, read straight from the look-up row.
CAR_INFO_FIELDS = ("file_name", *METADATA_FIELDS)


@dataclass
class TileLookup:
    row: int  # 0-based
    col: int  # 0-based
    label: str  # "C7"
    car_info: dict | None  # None if the car was removed from the library
    image_bytes: bytes
    content_type: str
    is_original: bool  # False: the tile cropped from the render
    note: str | None  # why the original is not shown, in one sentence
    score: float


def find_mosaic(ctx: AppContext, name: str, scope: str = "local") -> Mosaic:
    with ctx.db.session() as session:
        mosaic = mosaic_rows.mosaic_by_name(session, scope, " ".join(name.split()))
    if mosaic is None:
        raise UnknownMosaic(f'There is no mosaic named "{name.strip()[:80]}" here.')
    return mosaic


def list_mosaics(ctx: AppContext, scope: str | None = "local") -> list[Mosaic]:
    """Newest first; scope None lists every scope (the web gallery shows them all)."""
    with ctx.db.session() as session:
        return mosaic_rows.mosaics_in_scope(session, scope)


def mosaic_by_id(ctx: AppContext, mosaic_id: int) -> Mosaic:
    with ctx.db.session() as session:
        mosaic = mosaic_rows.mosaic_by_id(session, mosaic_id)
    if mosaic is None:
        raise UnknownMosaic("There is no such mosaic.")
    return mosaic


def mosaic_url(settings: Settings, mosaic_id: int) -> str | None:
    """The mosaic's page in the web gallery, when GALLERY_PUBLIC_URL says where it is."""
    base = settings.gallery_public_url
    return f"{base.rstrip('/')}/m/{mosaic_id}" if base else None


def tile_url(settings: Settings, mosaic_id: int, coordinate: str) -> str | None:
    """The gallery page that opens zoomed on one tile ("C7") with its car shown, or None."""
    page = mosaic_url(settings, mosaic_id)
    return f"{page}/{coordinate}" if page else None


def render_bytes(ctx: AppContext, mosaic: Mosaic) -> bytes:
    return ctx.media.read(mosaic.render_media_key)


def tile_lookup(ctx: AppContext, mosaic: Mosaic, coordinate: str) -> TileLookup:
    """Coordinate ("C7", "c7", "3,7") -> the car photo behind that tile. Raises BadCoordinate."""
    row, col = parse_coordinate(coordinate, mosaic.rows, mosaic.cols)
    # A plain connection: this read runs on every chat reply, the session adds nothing to it.
    with ctx.db.engine.connect() as connection:
        tile = mosaic_rows.tile_at(connection, mosaic.id, row, col)
    known = tile["car_id"] is not None
    found = TileLookup(
        row=row,
        col=col,
        label=format_coordinate(row, col),
        car_info={"id": tile["car_id"], **{f: tile[f] for f in CAR_INFO_FIELDS}} if known else None,
        image_bytes=b"",
        content_type="image/jpeg",
        is_original=True,
        note=None,
        score=tile["score"],
    )
    if known:
        try:
            found.image_bytes = ctx.media.read(tile["media_key"])
            found.content_type = _content_type(found.image_bytes)
            return found
        except MediaMissing:
            found.note = "The original photo is no longer stored, so this is the tile as it "
            found.note += "appears in the mosaic."
    else:
        found.note = "This car was removed from the library, so this is the tile as it appears "
        found.note += "in the mosaic."
    render = Image.open(io.BytesIO(render_bytes(ctx, mosaic)))
    crop = render.crop((tile["x0"], tile["y0"], tile["x1"], tile["y1"])).convert("RGB")
    out = io.BytesIO()
    crop.save(out, "PNG")
    found.image_bytes, found.content_type, found.is_original = out.getvalue(), "image/png", False
    return found


def _content_type(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return "image/jpeg"
