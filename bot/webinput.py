"""Reading numbers and coordinates out of gallery URLs: ASCII digits in range or one sentence
(400/404), never an OverflowError or a Unicode digit reaching the database; and a last guard
that turns anything unforeseen into a one-sentence 500 instead of aiohttp's default page.
"""

import logging
import re

from aiohttp import web

log = logging.getLogger(__name__)

# Row ids are SQLite/PostgreSQL BIGINTs: anything past 2^63 - 1 cannot name a row.
MAX_ROW_ID = 2**63 - 1
# str.isdigit() and int() accept "²" and "٣"; a URL number is ASCII digits only.
_ASCII_NUMBER = re.compile(r"[0-9]{1,19}")
# The longest real coordinate is a few letters and digits ("ZZ120", "120,120").
MAX_COORDINATE_CHARS = 16
BAD_COORDINATE = (
    "That is not a tile coordinate: write a column letter and a row number such as C7, "
    "or row,column such as 7,3 (the same tile)."
)
FAILED = "Something went wrong in the gallery; please try again."
ROUTER_SENTENCES = {
    404: "There is nothing at this address.",
    405: "This address does not take that kind of request.",
}


def path_id(request: web.Request, name: str, missing: str) -> int:
    """The row id in the path segment `name`; 404 with `missing` unless it can name a row."""
    text = request.match_info[name]
    if not _ASCII_NUMBER.fullmatch(text) or int(text) > MAX_ROW_ID:
        raise web.HTTPNotFound(text=missing)
    return int(text)


def query_number(request: web.Request, name: str, low: int, high: int, sentence: str) -> int | None:
    """The whole number in ?name=, None when absent; 400 with `sentence` unless low..high."""
    text = request.query.get(name)
    if text is None:
        return None
    if not _ASCII_NUMBER.fullmatch(text) or not low <= int(text) <= high:
        raise web.HTTPBadRequest(text=sentence)
    return int(text)


def path_coordinate(request: web.Request) -> str:
    """The {coord} segment, refused early when no coordinate could be that long."""
    text = request.match_info["coord"]
    if len(text) > MAX_COORDINATE_CHARS:
        raise web.HTTPBadRequest(text=BAD_COORDINATE)
    return text


@web.middleware
async def plain_errors(request: web.Request, handler):
    """An unforeseen failure is logged here and the browser gets one sentence."""
    try:
        return await handler(request)
    except web.HTTPException as error:
        # aiohttp's own answers ("404: Not Found" when no route matches) become sentences too.
        if error.text == f"{error.status}: {error.reason}" and error.status in ROUTER_SENTENCES:
            error.text = ROUTER_SENTENCES[error.status]
        raise
    except Exception:
        log.exception("gallery request failed: %s %s", request.method, request.path)
        raise web.HTTPInternalServerError(text=FAILED) from None
