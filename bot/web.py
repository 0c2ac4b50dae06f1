"""The web gallery (aiohttp): list of mosaics, a zoomable mosaic page, click a tile to see its car,
ask about it, and ask follow-ups about the answer.

Everything served comes from the database and the media store by id or key; no path is ever
taken from the request. Bound to 127.0.0.1 unless the settings say otherwise.
"""

import asyncio
import html
from functools import cache, lru_cache, partial
from importlib.resources import files

from aiohttp import web

from bot.deepzoom import add_deep_zoom
from bot.loopshare import freeze_startup_objects, loop_share_middleware
from bot.tilecache import CachedTile, TileCache
from bot.webinput import path_coordinate, path_id, plain_errors, query_number
from bot.websession import asker_id, session_middlewares, viewer_id
from core.context import AppContext
from core.errors import UnknownMosaic, UserError
from core.gallery import list_mosaics, mosaic_by_id, render_bytes, tile_lookup
from core.images import image_content_type, jpeg_at_width
from core.mosaic import format_coordinate, parse_coordinate
from core.worker import JobQueue
from storage.models import Job, Mosaic

CTX = web.AppKey("ctx", AppContext)
QUEUE = web.AppKey("queue", JobQueue)
TILES = web.AppKey("tiles", TileCache)
MAX_VIEW_WIDTH = 4096
# 500 browsers opening a mosaic at once must not find the accept queue full (SYNs dropped and
# retried a second later); the kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 1024
NO_MOSAIC = "There is no such mosaic."
NO_QUESTION = "There is no such question."
# A tile's photo URL always shows the same photo; its JSON may change if the car is relabelled.
PHOTO_CACHING = "public, max-age=31536000, immutable"


@cache
def _page(name: str) -> str:
    # Read once: the pages ship with the package, and the event loop should not wait on disk.
    return files("bot.static").joinpath(name).read_text(encoding="utf-8")


def _mosaic_json(mosaic: Mosaic) -> dict:
    return {
        "id": mosaic.id,
        "name": mosaic.name,
        "scope": mosaic.owner_scope,
        "rows": mosaic.rows,
        "cols": mosaic.cols,
        "tile_px": mosaic.tile_px,
        "width": mosaic.cols * mosaic.tile_px,
        "height": mosaic.rows * mosaic.tile_px,
        "created_at": mosaic.created_at.isoformat() if mosaic.created_at else None,
        "last_tile": format_coordinate(mosaic.rows - 1, mosaic.cols - 1),
    }


def _mosaic_from(request: web.Request) -> Mosaic:
    mosaic_id = path_id(request, "mosaic_id", NO_MOSAIC)
    try:
        return mosaic_by_id(request.app[CTX], mosaic_id)
    except UnknownMosaic as error:
        raise web.HTTPNotFound(text=str(error)) from None


# The "light deep zoom": a screen-sized copy first, the full render only when zoomed in.
_scaled = lru_cache(maxsize=32)(jpeg_at_width)


async def index(request: web.Request) -> web.Response:
    mosaics = await asyncio.to_thread(list_mosaics, request.app[CTX], None)
    items = "\n".join(
        f'<li><a href="/m/{m.id}"><img src="/media/mosaics/{m.id}/render?w=320" alt="" '
        f'loading="lazy"><span>{html.escape(m.name)}</span></a>'
        f"<small>{m.cols}×{m.rows} tiles · {html.escape(m.owner_scope)}</small></li>"
        for m in mosaics
    )
    empty = "<li class=empty>No mosaics yet: run <code>talkmosaic demo</code>.</li>"
    body = _page("index.html").replace("{{items}}", items or empty)
    return web.Response(text=body, content_type="text/html")


async def mosaic_page(request: web.Request) -> web.Response:
    mosaic = await asyncio.to_thread(_mosaic_from, request)
    body = _page("mosaic.html").replace("{{name}}", html.escape(mosaic.name)).replace(
        "{{id}}", str(mosaic.id)
    )
    return web.Response(text=body, content_type="text/html")


async def api_mosaics(request: web.Request) -> web.Response:
    mosaics = await asyncio.to_thread(list_mosaics, request.app[CTX], None)
    return web.json_response([_mosaic_json(m) for m in mosaics])


async def api_mosaic(request: web.Request) -> web.Response:
    mosaic = await asyncio.to_thread(_mosaic_from, request)
    return web.json_response(_mosaic_json(mosaic))


async def render(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    mosaic = await asyncio.to_thread(_mosaic_from, request)
    data = await asyncio.to_thread(render_bytes, ctx, mosaic)
    width = query_number(
        request, "w", 16, MAX_VIEW_WIDTH, f"w must be a width between 16 and {MAX_VIEW_WIDTH}."
    )
    if width is None:
        return web.Response(body=data, content_type=image_content_type(data))
    scaled = await asyncio.to_thread(_scaled, data, width)
    return web.Response(body=scaled, content_type="image/jpeg")


async def _tile(request: web.Request) -> CachedTile:
    """The tile named in the path, from memory when it was looked up before: a hit touches
    neither the database nor a thread."""
    ctx, tiles = request.app[CTX], request.app[TILES]
    coordinate = path_coordinate(request)
    mosaic = tiles.mosaic(path_id(request, "mosaic_id", NO_MOSAIC))
    if mosaic is None:
        mosaic = await asyncio.to_thread(_mosaic_from, request)
        tiles.keep_mosaic(mosaic)
    try:
        key = (mosaic.id, *parse_coordinate(coordinate, mosaic.rows, mosaic.cols))
        if (tile := tiles.tile(key)) is not None:
            return tile
        found = await asyncio.to_thread(tile_lookup, ctx, mosaic, coordinate)
    except UserError as error:
        raise web.HTTPBadRequest(text=str(error)) from None
    tile = CachedTile.of(found, mosaic.id)
    tiles.keep_tile(key, tile)
    return tile


def _cacheable(
    request: web.Request, body: bytes, content_type: str, etag: str, caching: str
) -> web.Response:
    """The body with its ETag, or 304 Not Modified when the browser already holds it."""
    headers = {"ETag": etag, "Cache-Control": caching}
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, content_type=content_type, headers=headers)


async def api_tile(request: web.Request) -> web.Response:
    tile = await _tile(request)
    return _cacheable(request, tile.json_body, "application/json", tile.json_etag, "no-cache")


async def tile_photo(request: web.Request) -> web.Response:
    tile = await _tile(request)
    return _cacheable(request, tile.photo, tile.photo_type, tile.photo_etag, PHOTO_CACHING)


async def ask_about_tile(request: web.Request) -> web.Response:
    queue = request.app.get(QUEUE)
    if queue is None:
        raise web.HTTPServiceUnavailable(text="Questions are not taken on this gallery right now.")
    tile = await _tile(request)
    form = await request.post()
    question = str(form.get("question", ""))
    user = await asker_id(request)
    try:
        job = await asyncio.to_thread(
            queue.submit, "web", user, {"tile": tile.label}, tile.photo, question
        )
    except UserError as error:
        raise web.HTTPBadRequest(text=str(error)) from None
    return web.json_response({"job": job.job_id, "position": job.position})


async def _web_job(request: web.Request) -> tuple[JobQueue, Job]:
    """The queue and the job named in the path if this browser session asked it; 404 for any
    other, so counting through ids shows nobody else's questions."""
    queue = request.app.get(QUEUE)
    job_id = path_id(request, "job_id", NO_QUESTION)
    viewer = await viewer_id(request)
    if queue is None or viewer is None:
        raise web.HTTPNotFound(text=NO_QUESTION)
    job = await asyncio.to_thread(queue.get, job_id)
    if job is None or job.platform != "web" or job.user_id != viewer:
        raise web.HTTPNotFound(text=NO_QUESTION)
    return queue, job


async def ask_follow_up(request: web.Request) -> web.Response:
    """A follow-up question about an answered job: same car photo, the earlier turns kept."""
    queue, parent = await _web_job(request)
    form = await request.post()
    question = str(form.get("question", ""))
    user = await asker_id(request)
    try:
        job = await asyncio.to_thread(partial(
            queue.submit, "web", user, dict(parent.reply_to or {}), None, question,
            follow_up_of=parent.id,
        ))
    except UserError as error:
        raise web.HTTPBadRequest(text=str(error)) from None
    return web.json_response({"job": job.job_id, "position": job.position})


async def api_job(request: web.Request) -> web.Response:
    queue, job = await _web_job(request)
    position = await asyncio.to_thread(queue.position, job.id)
    return web.json_response(
        {
            "status": job.status,
            "position": position,
            "answer": job.answer,
            "sources": job.sources or [],
            "error": job.error,
        }
    )


@web.middleware
async def security_headers(request: web.Request, handler):
    response = await handler(request)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault(
        "Content-Security-Policy", "default-src 'self'; img-src 'self' data:; style-src 'self' "
        "'unsafe-inline'; script-src 'self' 'unsafe-inline'"
    )
    return response


def make_gallery_app(ctx: AppContext, queue: JobQueue | None = None) -> web.Application:
    app = web.Application(
        middlewares=[
            loop_share_middleware(), security_headers, plain_errors,
            *session_middlewares(ctx.settings),
        ],
        client_max_size=64 * 1024,
    )
    app[CTX] = ctx
    app[TILES] = TileCache(
        int(ctx.settings.gallery_tile_cache_mb * 1024 * 1024), ctx.settings.gallery_tile_cache_ttl_s
    )
    if queue is not None:
        app[QUEUE] = queue
    # Before /api/mosaics/{mosaic_id}, which would take "<id>.dzi" for an id.
    add_deep_zoom(app, ctx, _mosaic_from, mosaic_page)
    app.add_routes(
        [
            web.get("/", index),
            web.get("/m/{mosaic_id}", mosaic_page),
            web.get("/api/mosaics", api_mosaics),
            web.get("/api/mosaics/{mosaic_id}", api_mosaic),
            web.get("/api/mosaics/{mosaic_id}/tiles/{coord}", api_tile),
            web.get("/api/mosaics/{mosaic_id}/tiles/{coord}/photo", tile_photo),
            web.post("/api/mosaics/{mosaic_id}/tiles/{coord}/ask", ask_about_tile),
            web.get("/api/jobs/{job_id}", api_job),
            web.post("/api/jobs/{job_id}/follow-up", ask_follow_up),
            web.get("/media/mosaics/{mosaic_id}/render", render),
        ]
    )
    return app


async def start_gallery(
    ctx: AppContext,
    host: str | None = None,
    port: int | None = None,
    queue: JobQueue | None = None,
) -> web.AppRunner:
    """Serve the gallery in the running event loop; returns the runner (call `cleanup()`)."""
    runner = web.AppRunner(make_gallery_app(ctx, queue), access_log=None)
    await runner.setup()
    port = ctx.settings.gallery_port if port is None else port
    site = web.TCPSite(runner, host or ctx.settings.gallery_host, port, backlog=LISTEN_BACKLOG)
    await site.start()
    freeze_startup_objects()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port a runner listens on (useful with port 0)."""
    return runner.addresses[0][1]
