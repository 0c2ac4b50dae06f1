"""Tile look-ups are served from memory: the JSON and photo of a tile seen before come without a
database read, browsers revalidate with ETags, and the cache stays within its byte bound."""

import io

import aiohttp
import numpy as np
import pytest
from PIL import Image

import bot.web
from bot.tilecache import CachedTile, TileCache
from bot.web import bound_port, start_gallery
from core.gallery import TileLookup
from core.library import add_car_photo
from core.mosaic import MosaicOptions, build_mosaic
from tests.bot.conftest import car_at


@pytest.fixture
def mosaic(ctx):
    rng = np.random.default_rng(3)
    for i in range(12):
        pixels = np.full((32, 32, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "JPEG")
        add_car_photo(ctx, out.getvalue(), f"car{i}.jpg", {"make": "Demo", "model": f"M{i}"})
    target = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 60, 30)).save(target, "PNG")
    return build_mosaic(ctx, target.getvalue(), "rust", options=MosaicOptions(cols=4, tile_px=16))


@pytest.fixture
def lookups(monkeypatch) -> list[str]:
    """The coordinates that reached the database (core.gallery.tile_lookup)."""
    seen = []
    real = bot.web.tile_lookup

    def counted(ctx, mosaic, coordinate):
        seen.append(coordinate)
        return real(ctx, mosaic, coordinate)

    monkeypatch.setattr(bot.web, "tile_lookup", counted)
    return seen


async def _gallery(ctx, cache_mb: float):
    ctx.settings = ctx.settings.model_copy(update={"gallery_tile_cache_mb": cache_mb})
    runner = await start_gallery(ctx, "127.0.0.1", 0)
    return runner, f"http://127.0.0.1:{bound_port(runner)}/api/mosaics"


async def test_a_tile_seen_before_is_served_without_reading_the_database(ctx, mosaic, lookups):
    runner, base = await _gallery(ctx, 16)
    try:
        async with aiohttp.ClientSession() as http:
            bodies = []
            for coordinate in ("B3", "b3", "3,2", "B3"):
                async with http.get(f"{base}/{mosaic.id}/tiles/{coordinate}") as response:
                    bodies.append(await response.json())
                async with http.get(f"{base}/{mosaic.id}/tiles/{coordinate}/photo") as response:
                    photo = await response.read()
    finally:
        await runner.cleanup()
    assert lookups == ["B3"]
    assert all(body == bodies[0] for body in bodies)
    assert (bodies[0]["label"], bodies[0]["car"]["make"]) == ("B3", "Demo")
    assert photo == car_at(ctx, mosaic, 2, 1)


async def test_with_the_cache_off_every_look_up_reads_the_database(ctx, mosaic, lookups):
    runner, base = await _gallery(ctx, 0)
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(2):
                async with http.get(f"{base}/{mosaic.id}/tiles/A1/photo") as response:
                    assert await response.read() == car_at(ctx, mosaic, 0, 0)
    finally:
        await runner.cleanup()
    assert lookups == ["A1", "A1"]


async def test_a_tile_photo_is_immutable_and_its_etag_answers_not_modified(ctx, mosaic):
    runner, base = await _gallery(ctx, 16)
    try:
        async with aiohttp.ClientSession() as http:
            url = f"{base}/{mosaic.id}/tiles/C4/photo"
            async with http.get(url) as response:
                caching, etag = response.headers["Cache-Control"], response.headers["ETag"]
            async with http.get(url, headers={"If-None-Match": etag}) as response:
                again = (response.status, await response.read(), response.headers["ETag"])
    finally:
        await runner.cleanup()
    assert "immutable" in caching and "max-age=31536000" in caching
    assert again == (304, b"", etag)


async def test_tile_json_is_revalidated_since_a_car_can_be_relabelled(ctx, mosaic):
    runner, base = await _gallery(ctx, 16)
    try:
        async with aiohttp.ClientSession() as http:
            url = f"{base}/{mosaic.id}/tiles/C4"
            async with http.get(url) as response:
                caching, etag = response.headers["Cache-Control"], response.headers["ETag"]
            async with http.get(url, headers={"If-None-Match": etag}) as response:
                status = response.status
            async with http.get(url, headers={"If-None-Match": '"other"'}) as response:
                changed = (response.status, (await response.json())["label"])
    finally:
        await runner.cleanup()
    assert caching == "no-cache"
    assert status == 304
    assert changed == (200, "C4")


def _tile(label: str, photo_bytes: int) -> CachedTile:
    found = TileLookup(0, 0, label, None, b"x" * photo_bytes, "image/jpeg", True, None, 1.0)
    return CachedTile.of(found, 1)


def test_the_cache_drops_the_least_recently_used_tile_past_its_byte_bound():
    one = _tile("A1", 10_000)
    cache = TileCache(max_bytes=3 * one.size, ttl_s=60)
    for col, label in enumerate(("A1", "B1", "C1")):
        cache.keep_tile((1, 0, col), _tile(label, 10_000))
    assert cache.tile((1, 0, 0)) is not None  # A1 is now the most recently used
    cache.keep_tile((1, 0, 3), _tile("D1", 10_000))
    assert cache.tile((1, 0, 1)) is None  # B1 went first
    assert [cache.tile((1, 0, c)) is not None for c in (0, 2, 3)] == [True, True, True]
    assert cache.bytes <= cache.max_bytes and len(cache) == 3


def test_a_tile_larger_than_the_whole_cache_is_not_kept():
    cache = TileCache(max_bytes=1000, ttl_s=60)
    cache.keep_tile((1, 0, 0), _tile("A1", 5000))
    assert (len(cache), cache.bytes) == (0, 0)


def test_a_cached_tile_expires_after_its_time_to_live():
    now = [100.0]
    cache = TileCache(max_bytes=1 << 20, ttl_s=60, clock=lambda: now[0])
    cache.keep_tile((1, 0, 0), _tile("A1", 100))
    now[0] += 59
    assert cache.tile((1, 0, 0)) is not None
    now[0] += 2
    assert cache.tile((1, 0, 0)) is None
    assert (len(cache), cache.bytes) == (0, 0)
