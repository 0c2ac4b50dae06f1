"""The gallery's deep zoom: each mosaic's DZI descriptor and tiles, as OpenSeadragon asks for them
(the pyramid is built on first view, one build at a time, off the event loop), and the mosaic
page's own script, styles and vendored OpenSeadragon, all served from the gallery's origin.
"""

import asyncio
import hashlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache, partial
from importlib.resources import files

from aiohttp import web

from core.context import AppContext
from core.errors import BadCoordinate
from core.mosaic import parse_coordinate
from core.pyramid import Pyramid, pyramid_for, stored_pyramid
from storage.models import Mosaic

log = logging.getLogger(__name__)

NO_TILE = "There is no such tile in this mosaic's deep zoom."
NOT_BUILT = "The deep zoom of this mosaic could not be built; please try again later."
# Tiles change only when the pyramid's layout version does; the ETag settles any doubt.
TILE_CACHING = "public, max-age=86400"
HOT_TILE_BYTES = 64 * 1024 * 1024
# A ready pyramid is trusted this long before its mosaic is looked up again (deleted mosaics).
READY_TTL_S = 300.0
CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}
# What /static/ serves: these files of bot/static and nothing else.
STATIC_FILES = {
    "mosaic.js": "text/javascript",
    "mosaic.css": "text/css",
    "openseadragon.min.js": "text/javascript",
}
# A real coordinate is a few letters and digits ("ZZ120", "120,120").
MAX_COORDINATE_CHARS = 16
NOT_A_COORDINATE = (
    "That is not a tile coordinate: write a column letter and a row number such as C7, "
    "or row,column such as 7,3 (the same tile)."
)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_ID = re.compile(r"[0-9]{1,18}")
_NUMBER = re.compile(r"[0-9]{1,6}")


class DeepZoom:
    """Pyramids of the mosaics being viewed: builds shared by every request that waits on them,
    ready pyramids by mosaic id, and the most requested tiles' bytes (top levels, hot spots)."""

    def __init__(self, ctx: AppContext, mosaic_from: Callable[[web.Request], Mosaic]):
        self.ctx = ctx
        self.mosaic_from = mosaic_from
        # One build at a time: a build keeps both cores busy; more would only slow each other.
        self.builder = ThreadPoolExecutor(1, thread_name_prefix="pyramid")
        self.builds: dict[int, asyncio.Future[Pyramid]] = {}
        self.ready: dict[int, tuple[Pyramid, float]] = {}
        self.hot: OrderedDict[str, bytes] = OrderedDict()
        self.hot_bytes = 0

    async def pyramid(self, request: web.Request) -> Pyramid:
        """The pyramid of the mosaic in the path; a hit touches neither the database nor a
        thread. 404 for an unknown mosaic, 503 if its pyramid cannot be built."""
        if (pyramid := self._ready(request.match_info["mosaic_id"])) is not None:
            return pyramid
        mosaic = await asyncio.to_thread(self.mosaic_from, request)
        pyramid = await asyncio.to_thread(stored_pyramid, self.ctx, mosaic)
        if pyramid is None:
            pyramid = self._ready(str(mosaic.id)) or await self._build(mosaic)
        self.ready[mosaic.id] = (pyramid, time.monotonic())
        return pyramid

    def _ready(self, mosaic_id: str) -> Pyramid | None:
        found = self.ready.get(int(mosaic_id)) if _ID.fullmatch(mosaic_id) else None
        if found is None or time.monotonic() - found[1] > READY_TTL_S:
            return None
        return found[0]

    async def _build(self, mosaic: Mosaic) -> Pyramid:
        """Every request for a mosaic being built waits on the same build."""
        building = self.builds.get(mosaic.id)
        if building is None:
            loop = asyncio.get_running_loop()
            building = loop.run_in_executor(self.builder, pyramid_for, self.ctx, mosaic)
            self.builds[mosaic.id] = building
            building.add_done_callback(lambda _: self.builds.pop(mosaic.id, None))
        try:
            return await asyncio.shield(building)
        except Exception:
            log.exception("building the pyramid of mosaic %s failed", mosaic.id)
            raise web.HTTPServiceUnavailable(text=NOT_BUILT) from None

    async def tile(self, key: str) -> bytes:
        if (data := self.hot.get(key)) is not None:
            self.hot.move_to_end(key)
            return data
        data = await asyncio.to_thread(self.ctx.media.read, key)
        self.hot[key] = data
        self.hot_bytes += len(data)
        while self.hot_bytes > HOT_TILE_BYTES:
            self.hot_bytes -= len(self.hot.popitem(last=False)[1])
        return data

    async def close(self, _app: web.Application) -> None:
        self.builder.shutdown(wait=False, cancel_futures=True)


DEEP_ZOOM = web.AppKey("deep_zoom", DeepZoom)


def _cached(request: web.Request, body: bytes, content_type: str, etag: str,
            caching: str) -> web.Response:
    headers = {"ETag": etag, "Cache-Control": caching}
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, content_type=content_type, headers=headers)


async def descriptor(request: web.Request) -> web.Response:
    """/api/mosaics/<id>.dzi: the Deep Zoom descriptor (size, tile size, overlap, format)."""
    pyramid = await request.app[DEEP_ZOOM].pyramid(request)
    etag = f'"{pyramid.manifest_key[:32]}"'
    return _cached(request, pyramid.descriptor.encode(), "application/xml", etag, "no-cache")


async def dzi_tile(request: web.Request) -> web.Response:
    """/api/mosaics/<id>_files/<level>/<col>_<row>.<ext>: one tile of the pyramid."""
    deep_zoom = request.app[DEEP_ZOOM]
    pyramid = await deep_zoom.pyramid(request)
    info = request.match_info
    numbers = [info[name] for name in ("level", "col", "row")]
    if info["ext"] != pyramid.tile_format or not all(_NUMBER.fullmatch(n) for n in numbers):
        raise web.HTTPNotFound(text=NO_TILE)
    key = pyramid.tile_key(*(int(n) for n in numbers))
    if key is None:
        raise web.HTTPNotFound(text=NO_TILE)
    etag = f'"{key[:32]}"'
    headers = {"ETag": etag, "Cache-Control": TILE_CACHING}
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers=headers)
    data = await deep_zoom.tile(key)
    return web.Response(body=data, content_type=CONTENT_TYPES[pyramid.tile_format],
                        headers=headers)


@cache
def _static(name: str) -> tuple[bytes, str]:
    data = files("bot.static").joinpath(name).read_bytes()
    return data, f'"{hashlib.sha256(data).hexdigest()[:32]}"'


async def static_file(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC_FILES:
        raise web.HTTPNotFound(text="There is no such file.")
    data, etag = _static(name)
    return _cached(request, data, STATIC_FILES[name], etag, "no-cache")


async def tile_page(page: Handler, request: web.Request) -> web.StreamResponse:
    """/m/<id>/C7: the mosaic page (which then opens on that tile); 404 with the coordinate's
    sentence if the mosaic has no such tile."""
    mosaic = await asyncio.to_thread(request.app[DEEP_ZOOM].mosaic_from, request)
    coordinate = request.match_info["coord"]
    try:
        if len(coordinate) > MAX_COORDINATE_CHARS:
            raise BadCoordinate(NOT_A_COORDINATE)
        parse_coordinate(coordinate, mosaic.rows, mosaic.cols)
    except BadCoordinate as error:
        raise web.HTTPNotFound(text=str(error)) from None
    return await page(request)


def add_deep_zoom(app: web.Application, ctx: AppContext,
                  mosaic_from: Callable[[web.Request], Mosaic], page: Handler) -> None:
    """Register the deep-zoom routes and /m/<id>/<tile> (served by `page`, the mosaic page);
    call before `/api/mosaics/{mosaic_id}` is routed, which would take `<id>.dzi` for an id."""
    app[DEEP_ZOOM] = DeepZoom(ctx, mosaic_from)
    app.on_cleanup.append(app[DEEP_ZOOM].close)
    app.add_routes([
        web.get("/api/mosaics/{mosaic_id}.dzi", descriptor),
        web.get("/api/mosaics/{mosaic_id}_files/{level}/{col}_{row}.{ext}", dzi_tile),
        web.get("/m/{mosaic_id}/{coord}", partial(tile_page, page)),
        web.get("/static/{name}", static_file),
    ])
