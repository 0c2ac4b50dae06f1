"""The gallery's deep zoom, as people use it: the DZI served the way viewers expect, and in
headless Chromium the wheel zooms under the cursor, a click or a tap shows the tile's car, a
typed coordinate flies there, /m/<id>/C7 opens on C7, and a phone gets the whole width."""

import asyncio
import io
import xml.etree.ElementTree as ET

import aiohttp
import numpy as np
import pytest
from PIL import Image

from bot.web import bound_port, start_gallery
from core.library import add_car_photo
from core.mosaic import MosaicOptions, build_mosaic, column_index
from tests.bot.conftest import car_at
from tests.web.test_gallery import ARTIFACTS, CHROMIUM, launch_chromium

DZI = "{http://schemas.microsoft.com/deepzoom/2008}"
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed")


def _jpeg(rgb: tuple[int, int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(rgb) + rng.integers(-20, 20, (60, 80, 3)), 0, 255).astype(np.uint8)
    pixels[25:35] //= 2  # a dark band, so a tile is not one flat colour
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=92)
    return out.getvalue()


@pytest.fixture
def mosaic(ctx):
    rng = np.random.default_rng(7)
    for i in range(60):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        add_car_photo(ctx, _jpeg(colour, i), f"car{i}.jpg", {"make": "Demo", "model": f"M{i}"})
    target = Image.new("RGB", (100, 140), (30, 90, 40))
    target.paste((220, 200, 40), (25, 40, 75, 110))
    out = io.BytesIO()
    target.save(out, "PNG")
    # 10 columns x 14 rows: C7 and B12 exist.
    return build_mosaic(ctx, out.getvalue(), "meadow", options=MosaicOptions(cols=10, tile_px=16))


@pytest.fixture
async def gallery(ctx, mosaic):
    runner = await start_gallery(ctx, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{bound_port(runner)}"
    await runner.cleanup()


async def test_dzi_descriptor_and_tiles_are_served_with_caching_headers(gallery, mosaic):
    base = f"{gallery}/api/mosaics/{mosaic.id}"
    async with aiohttp.ClientSession() as http:
        async with http.get(base + ".dzi") as response:
            assert response.status == 200
            assert response.content_type == "application/xml"
            root = ET.fromstring(await response.text())
        deepest = int(np.ceil(np.log2(int(root.find(f"{DZI}Size").get("Height")))))
        tile = f"{base}_files/{deepest}/2_6.{root.get('Format')}"
        async with http.get(tile) as response:
            assert response.status == 200 and response.content_type == "image/jpeg"
            assert "max-age" in response.headers["Cache-Control"]
            etag = response.headers["ETag"]
            size = Image.open(io.BytesIO(await response.read())).size
        async with http.get(tile, headers={"If-None-Match": etag}) as response:
            assert response.status == 304
        for missing in (f"{base}_files/{deepest}/10_0.jpeg", f"{base}_files/{deepest + 1}/0_0.jpeg",
                        f"{base}_files/{deepest}/0_0.png", f"{gallery}/api/mosaics/999.dzi"):
            async with http.get(missing) as response:
                assert response.status == 404, missing
                assert (await response.text()).endswith(".")
    assert size == (256 + 2, 256 + 2)  # one car, one pixel of overlap on each side


async def test_page_scripts_come_from_the_gallery_itself(gallery):
    async with aiohttp.ClientSession() as http:
        for name in ("openseadragon.min.js", "mosaic.js", "mosaic.css"):
            async with http.get(f"{gallery}/static/{name}") as response:
                assert response.status == 200, name
        async with http.get(f"{gallery}/static/web.py") as response:
            assert response.status == 404


# In the browser ----------------------------------------------------------------------------


async def _page(browser, url: str, **context):
    """A page of the gallery, with every CSP violation or script error it reports kept."""
    page = await (await browser.new_context(**context)).new_page()
    page.problems = []
    page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
    page.on("response", lambda r: r.status >= 400 and page.problems.append(f"{r.status} {r.url}"))
    page.on("pageerror", lambda e: page.problems.append(str(e)))
    await page.goto(url)
    await page.locator("#stage[data-view]").wait_for(state="attached")
    return page


async def _still(page) -> tuple[float, float, float, float]:
    """The shown part of the mosaic in image pixels (x, y, width, height), once it stops moving.
    Polled through the DOM: an evaluated predicate is eval, which the page's CSP bars."""
    last = None
    for _ in range(100):
        stage = page.locator("#stage")
        view = await stage.get_attribute("data-view")
        if view == last and await stage.get_attribute("data-moving") == "0":
            return tuple(float(v) for v in view.split(","))
        last = view
        await asyncio.sleep(0.1)
    raise AssertionError("the view never settled")


async def _screen_point(page, x: float, y: float) -> tuple[float, float]:
    """Where image pixel (x, y) is on the page."""
    vx, vy, vw, vh = await _still(page)
    box = await page.locator("#view").bounding_box()
    return box["x"] + (x - vx) / vw * box["width"], box["y"] + (y - vy) / vh * box["height"]


async def _cell_px(page) -> float:
    return float(await page.locator("#stage").get_attribute("data-cell-px"))


def _centre(label: str, cell: float) -> tuple[float, float]:
    col, row = column_index(label.rstrip("0123456789")), int(label.lstrip("ABCDEFGHIJ")) - 1
    return (col + 0.5) * cell, (row + 0.5) * cell


async def _shown_photo(page, gallery: str) -> bytes:
    photo = page.locator("#car-photo")
    await photo.wait_for(state="visible")
    return await (await page.request.get(gallery + await photo.get_attribute("src"))).body()


async def _centred_on(page, label: str) -> bool:
    vx, vy, vw, vh = await _still(page)
    cell = await _cell_px(page)
    x, y = _centre(label, cell)
    cx, cy = vx + vw / 2, vy + vh / 2
    return abs(cx - x) < cell / 2 and abs(cy - y) < cell / 2


@needs_chromium
async def test_wheel_zoom_keeps_the_point_under_the_cursor(gallery, mosaic):
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await launch_chromium(pw)
        page = await _page(browser, f"{gallery}/m/{mosaic.id}",
                           viewport={"width": 1200, "height": 800})
        box = await page.locator("#view").bounding_box()
        x, y = box["x"] + box["width"] * 0.62, box["y"] + box["height"] * 0.37
        await page.mouse.move(x, y)
        before = await _still(page)
        for _ in range(3):
            await page.mouse.wheel(0, -120)
            await asyncio.sleep(0.05)
        after = await _still(page)
        hover = await page.locator("#hover-coord").text_content()
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "zoom-wheel.png"))
        problems = page.problems
        await browser.close()

    def under_cursor(view):
        vx, vy, vw, vh = view
        return (vx + (x - box["x"]) / box["width"] * vw, vy + (y - box["y"]) / box["height"] * vh)

    assert after[2] < before[2] / 2  # zoomed in more than twice
    (bx, by), (ax, ay) = under_cursor(before), under_cursor(after)
    assert abs(ax - bx) < 2 and abs(ay - by) < 2, (under_cursor(before), under_cursor(after))
    cell = 256
    assert hover == f"{'ABCDEFGHIJ'[int(bx // cell)]}{int(by // cell) + 1}"
    assert problems == []


@needs_chromium
async def test_a_click_on_c7_shows_c7s_car(ctx, gallery, mosaic):
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await launch_chromium(pw)
        page = await _page(browser, f"{gallery}/m/{mosaic.id}",
                           viewport={"width": 1200, "height": 800})
        await page.mouse.click(*await _screen_point(page, *_centre("C7", await _cell_px(page))))
        await page.locator("#tile-title", has_text="Tile C7").wait_for()
        shown = await _shown_photo(page, gallery)
        await page.wait_for_timeout(300)  # the outline is drawn with the next frame
        await page.screenshot(path=str(ARTIFACTS / "zoom-click-c7.png"))
        url = page.url
        problems = page.problems
        await browser.close()
    assert shown == car_at(ctx, mosaic, 6, 2)
    assert url.endswith(f"/m/{mosaic.id}/C7")
    assert problems == []


@needs_chromium
async def test_a_tile_url_opens_zoomed_on_that_tile_with_its_car(ctx, gallery, mosaic):
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await launch_chromium(pw)
        page = await _page(browser, f"{gallery}/m/{mosaic.id}/C7",
                           viewport={"width": 1200, "height": 800})
        await page.locator("#tile-title", has_text="Tile C7").wait_for()
        shown = await _shown_photo(page, gallery)
        centred = await _centred_on(page, "C7")
        view = await _still(page)
        await page.screenshot(path=str(ARTIFACTS / "zoom-url-c7.png"))
        await browser.close()
    assert shown == car_at(ctx, mosaic, 6, 2)
    assert centred
    assert view[2] <= 4 * 256  # zoomed in: a few tiles across, not the whole mosaic


@needs_chromium
async def test_typing_b12_flies_there(ctx, gallery, mosaic):
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await launch_chromium(pw)
        page = await _page(browser, f"{gallery}/m/{mosaic.id}",
                           viewport={"width": 1200, "height": 800})
        await page.fill("#goto", "b12")
        await page.press("#goto", "Enter")
        await page.locator("#tile-title", has_text="Tile B12").wait_for()
        shown = await _shown_photo(page, gallery)
        centred = await _centred_on(page, "B12")
        await page.screenshot(path=str(ARTIFACTS / "zoom-typed-b12.png"))
        url = page.url
        await page.fill("#goto", "Z99")
        await page.press("#goto", "Enter")
        error = page.locator("#tile-error")
        await error.wait_for(state="visible")
        sentence = await error.text_content()
        await browser.close()
    assert shown == car_at(ctx, mosaic, 11, 1)
    assert centred
    assert url.endswith(f"/m/{mosaic.id}/B12")
    assert sentence.startswith("Z99 is off the grid") and sentence.endswith(".")


@needs_chromium
async def test_on_a_phone_the_mosaic_takes_the_width_and_a_tap_opens_the_panel(
    ctx, gallery, mosaic
):
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await launch_chromium(pw)
        page = await _page(browser, f"{gallery}/m/{mosaic.id}",
                           viewport={"width": 390, "height": 844}, has_touch=True,
                           is_mobile=True)
        view = await page.locator("#view").bounding_box()
        closed = await page.locator("#panel").bounding_box()
        await page.touchscreen.tap(*await _screen_point(page, *_centre("D5", await _cell_px(page))))
        await page.locator("#tile-title", has_text="Tile D5").wait_for()
        shown = await _shown_photo(page, gallery)
        await page.wait_for_timeout(400)  # the panel's slide
        opened = await page.locator("#panel").bounding_box()
        await page.screenshot(path=str(ARTIFACTS / "zoom-phone-tap.png"))
        problems = page.problems
        await browser.close()
    assert view["width"] >= 350
    assert closed["y"] >= 844  # below the screen until a tile is tapped
    assert opened["y"] < 844 and opened["y"] + opened["height"] <= 845
    assert shown == car_at(ctx, mosaic, 4, 3)
    assert problems == []


async def test_viewers_opening_a_new_mosaic_at_once_share_one_build(
    gallery, mosaic, monkeypatch
):
    import core.pyramid

    builds = []
    real = core.pyramid.build_pyramid

    def counted(ctx, built_mosaic, *args):
        builds.append(built_mosaic.id)
        return real(ctx, built_mosaic, *args)

    monkeypatch.setattr(core.pyramid, "build_pyramid", counted)
    async with aiohttp.ClientSession() as http:

        async def descriptor() -> int:
            async with http.get(f"{gallery}/api/mosaics/{mosaic.id}.dzi") as response:
                return response.status

        statuses = await asyncio.gather(*(descriptor() for _ in range(5)))
    assert statuses == [200] * 5
    assert builds == [mosaic.id]


async def test_a_pyramid_that_cannot_be_built_is_one_sentence(gallery, mosaic, monkeypatch):
    import core.pyramid

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(core.pyramid, "build_pyramid", broken)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gallery}/api/mosaics/{mosaic.id}.dzi") as response:
            status, text = response.status, await response.text()
    assert status == 503
    assert text == "The deep zoom of this mosaic could not be built; please try again later."


async def test_an_off_grid_tile_page_is_not_found_with_one_sentence(gallery, mosaic):
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gallery}/m/{mosaic.id}/K1") as response:
            status, text = response.status, await response.text()
    assert status == 404
    assert text.startswith("K1 is off the grid") and text.endswith(".")


@needs_chromium
async def test_on_a_phone_a_pinch_zooms_in(gallery, mosaic):
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await launch_chromium(pw)
        page = await _page(browser, f"{gallery}/m/{mosaic.id}",
                           viewport={"width": 390, "height": 844}, has_touch=True,
                           is_mobile=True)
        before = await _still(page)
        box = await page.locator("#view").bounding_box()
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        touch = await page.context.new_cdp_session(page)

        def fingers(spread: float) -> list[dict]:
            return [{"x": cx - spread, "y": cy, "id": 0}, {"x": cx + spread, "y": cy, "id": 1}]

        await touch.send("Input.dispatchTouchEvent", {"type": "touchStart",
                                                      "touchPoints": fingers(20)})
        for spread in range(30, 161, 10):
            await touch.send("Input.dispatchTouchEvent", {"type": "touchMove",
                                                          "touchPoints": fingers(spread)})
            await asyncio.sleep(0.02)
        await touch.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
        after = await _still(page)
        await page.screenshot(path=str(ARTIFACTS / "zoom-phone-pinch.png"))
        await browser.close()
    assert after[2] < before[2] / 3  # the fingers moved 8x apart: well over 3x closer


@needs_chromium
async def test_a_tile_link_shows_its_car_and_the_flat_render_before_the_pyramid_is_ready(
    ctx, gallery, mosaic, monkeypatch
):
    import threading

    from playwright.async_api import async_playwright

    import core.pyramid

    release = threading.Event()
    real = core.pyramid.build_pyramid

    def slow(*args):
        release.wait(30)
        return real(*args)

    monkeypatch.setattr(core.pyramid, "build_pyramid", slow)
    try:
        async with async_playwright() as pw:
            browser = await launch_chromium(pw)
            page = await browser.new_page(viewport={"width": 1200, "height": 800})
            await page.goto(f"{gallery}/m/{mosaic.id}/C7")
            await page.locator("#tile-title", has_text="Tile C7").wait_for()
            shown = await _shown_photo(page, gallery)
            flat = page.locator("#placeholder")
            await flat.wait_for(state="visible")
            flat_ok = await page.evaluate("document.getElementById('placeholder').naturalWidth")
            building = await page.locator("#stage").get_attribute("data-view")
            await page.screenshot(path=str(ARTIFACTS / "zoom-url-before-pyramid.png"))
            release.set()
            await page.locator("#stage[data-view]").wait_for(state="attached")
            await flat.wait_for(state="detached")
            centred = await _centred_on(page, "C7")
            await browser.close()
    finally:
        release.set()
    assert shown == car_at(ctx, mosaic, 6, 2)
    assert building is None  # the car was shown while the pyramid was still being built
    assert flat_ok > 0
    assert centred


@needs_chromium
async def test_the_toolbar_names_the_typed_tile_after_a_hover(gallery, mosaic):
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await launch_chromium(pw)
        page = await _page(browser, f"{gallery}/m/{mosaic.id}",
                           viewport={"width": 1200, "height": 800})
        await page.mouse.move(*await _screen_point(page, *_centre("H12", await _cell_px(page))))
        hovered = await page.locator("#hover-coord").text_content()
        await page.fill("#goto", "C7")
        await page.press("#goto", "Enter")
        await page.locator("#tile-title", has_text="Tile C7").wait_for()
        await _still(page)
        named = await page.locator("#hover-coord").text_content()
        await browser.close()
    assert hovered == "H12"
    assert named == "C7"


@needs_chromium
async def test_the_gallery_pages_report_no_errors(gallery, mosaic):
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await launch_chromium(pw)
        problems = []
        for url in (f"{gallery}/", f"{gallery}/m/{mosaic.id}/C7"):
            page = await (await browser.new_context()).new_page()
            page.on("console", lambda m: m.type == "error" and problems.append(m.text))
            page.on("response", lambda r: r.status >= 400 and problems.append(r.url))
            page.on("pageerror", lambda e: problems.append(str(e)))
            await page.goto(url)
            await page.wait_for_load_state("networkidle")
        await browser.close()
    assert problems == []


def test_pyvips_logs_warnings_only():
    import logging

    import core.pyramid  # noqa: F401

    assert logging.getLogger("pyvips").getEffectiveLevel() == logging.WARNING
