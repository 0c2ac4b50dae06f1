"""The web gallery: served on loopback, clicking a tile shows the car photo behind it, and a
question about it gets an answer that follow-up questions continue."""

import asyncio
import io
import shutil
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from PIL import Image

from bot.web import bound_port, start_gallery
from core.library import add_car_photo
from core.mosaic import MosaicOptions, build_mosaic
from core.worker import AnswerResult, JobQueue, Worker
from tests.bot.conftest import car_at
from tests.web.browsing import gallery_browser

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Without the background-networking flags Chromium keeps dialling out on a closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


async def launch_chromium(pw):
    """Debian's headless Chromium, as every browser test here starts it."""
    return await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def _jpeg(rgb: tuple[int, int, int], seed: int) -> bytes:
    noise = np.random.default_rng(seed).integers(-12, 12, (48, 48, 3))
    pixels = np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=92)
    return out.getvalue()


@pytest.fixture
def mosaic(ctx):
    rng = np.random.default_rng(1)
    for i in range(40):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        add_car_photo(ctx, _jpeg(colour, i), f"car{i}.jpg", {"make": "Demo", "model": f"M{i}"})
    target = Image.new("RGB", (160, 120), (30, 90, 40))
    target.paste((220, 200, 40), (40, 30, 120, 90))
    out = io.BytesIO()
    target.save(out, "PNG")
    options = MosaicOptions(cols=8, tile_px=32, seed=3)
    return build_mosaic(ctx, out.getvalue(), "meadow", options=options)


@pytest.fixture
async def gallery(ctx, mosaic):
    runner = await start_gallery(ctx, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{bound_port(runner)}"
    await runner.cleanup()


async def test_gallery_lists_mosaics(gallery, mosaic):
    async with aiohttp.ClientSession() as http, http.get(gallery + "/") as response:
        body = await response.text()
    assert response.status == 200
    assert "meadow" in body
    assert f'href="/m/{mosaic.id}"' in body


async def test_tile_api_returns_the_original_car(ctx, gallery, mosaic):
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gallery}/api/mosaics/{mosaic.id}/tiles/c2") as response:
            tile = await response.json()
        async with http.get(gallery + tile["photo"]) as response:
            photo = await response.read()
    assert (tile["label"], tile["row"], tile["col"]) == ("C2", 1, 2)
    assert tile["is_original"] is True
    assert tile["car"]["make"] == "Demo"
    assert photo == car_at(ctx, mosaic, 1, 2)


async def test_off_grid_tile_is_one_clear_sentence(gallery, mosaic):
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gallery}/api/mosaics/{mosaic.id}/tiles/Z99") as response:
            text = await response.text()
    assert response.status == 400
    assert text.endswith(".") and "\n" not in text.strip()


async def test_unknown_mosaic_is_not_found(gallery):
    async with aiohttp.ClientSession() as http:
        for path in ("/m/999", "/m/abc", "/api/mosaics/999", "/media/mosaics/999/render"):
            async with http.get(gallery + path) as response:
                assert response.status == 404, path


async def test_nothing_outside_the_media_store_is_served(gallery, mosaic):
    async with aiohttp.ClientSession() as http:
        for path in (
            "/media/..%2F..%2Fetc%2Fpasswd",
            "/media/mosaics/1/../../talkmosaic.db",
            "/static/../talkmosaic.db",
        ):
            async with http.get(gallery + path) as response:
                assert response.status == 404, path


async def test_render_is_scaled_for_the_screen(gallery, mosaic):
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gallery}/media/mosaics/{mosaic.id}/render?w=100") as response:
            small = Image.open(io.BytesIO(await response.read()))
        async with http.get(f"{gallery}/media/mosaics/{mosaic.id}/render?w=x") as response:
            assert response.status == 400
    assert small.width == 100


async def test_gallery_is_bound_to_loopback_by_default(ctx):
    assert ctx.settings.gallery_host == "127.0.0.1"


async def test_asking_about_a_tile_queues_a_job_and_shows_the_answer(ctx, mosaic):
    seen = []

    def answer(job, progress):
        seen.append(job.load_image())
        return AnswerResult("A catalytic converter [1].", [{"title": "Cat", "source": "EEA"}], {})

    queue = JobQueue(ctx)
    runner = await start_gallery(ctx, "127.0.0.1", 0, queue=queue)
    base = f"http://127.0.0.1:{bound_port(runner)}/api"
    try:
        async with gallery_browser(base.removesuffix("/api")) as http:
            ask = f"{base}/mosaics/{mosaic.id}/tiles/C2/ask"
            async with http.post(ask, data={"question": "What pollutes?"}) as response:
                job = await response.json()
            async with http.post(ask, data={"question": "   "}) as response:
                empty_status = response.status
            await Worker(ctx, answer, poll_s=0.01).run_once()
            async with http.get(f"{base}/jobs/{job['job']}") as response:
                status = await response.json()
    finally:
        await runner.cleanup()
    assert job["position"] == 1
    assert empty_status == 400
    assert status["status"] == "done"
    assert status["answer"] == "A catalytic converter [1]."
    assert seen == [car_at(ctx, mosaic, 1, 2)]


class NumberedAnswers:
    """An answer function that keeps what each job saw: its earlier turns and its photo."""

    def __init__(self):
        self.seen: list[tuple[tuple, bytes | None]] = []

    def __call__(self, job, progress) -> AnswerResult:
        self.seen.append((job.history, job.load_image()))
        return AnswerResult(f"Answer {len(self.seen)}.", [], {})


@pytest.fixture
async def asking_gallery(ctx, mosaic):
    """A gallery that takes questions: its API's base URL."""
    runner = await start_gallery(ctx, "127.0.0.1", 0, queue=JobQueue(ctx))
    yield f"http://127.0.0.1:{bound_port(runner)}"
    await runner.cleanup()


async def test_a_follow_up_asks_about_the_same_car_with_the_earlier_turns(
    ctx, mosaic, asking_gallery
):
    answers = NumberedAnswers()
    worker = Worker(ctx, answers, poll_s=0.01)
    base = f"{asking_gallery}/api"
    async with gallery_browser(asking_gallery) as http:
        ask = f"{base}/mosaics/{mosaic.id}/tiles/C2/ask"
        async with http.post(ask, data={"question": "What pollutes?"}) as response:
            first = (await response.json())["job"]
        await worker.run_once()
        follow_up = f"{base}/jobs/{first}/follow-up"
        async with http.post(follow_up, data={"question": "And its tyres?"}) as response:
            queued = await response.json()
        await worker.run_once()
        async with http.get(f"{base}/jobs/{queued['job']}") as response:
            status = await response.json()
    assert queued["position"] == 1
    assert (status["status"], status["answer"]) == ("done", "Answer 2.")
    assert answers.seen[1] == ((("What pollutes?", "Answer 1."),), car_at(ctx, mosaic, 1, 2))


async def test_a_follow_up_to_an_unanswered_question_is_one_sentence(
    ctx, mosaic, asking_gallery
):
    base = f"{asking_gallery}/api"
    async with gallery_browser(asking_gallery) as http:
        ask = f"{base}/mosaics/{mosaic.id}/tiles/C2/ask"
        async with http.post(ask, data={"question": "What pollutes?"}) as response:
            waiting = (await response.json())["job"]
        follow_up = f"{base}/jobs/{waiting}/follow-up"
        async with http.post(follow_up, data={"question": "And?"}) as response:
            refused = (response.status, await response.text())
        async with http.post(f"{base}/jobs/999/follow-up", data={"question": "And?"}) as response:
            unknown = response.status
    assert refused == (
        400, "That question has not been answered yet; please wait for its answer, then follow up."
    )
    assert unknown == 404


async def test_a_follow_up_to_a_chat_question_is_not_found(ctx, mosaic, asking_gallery):
    chat = JobQueue(ctx).submit("discord", "alice", {}, None, "Which fuel?")
    await Worker(ctx, NumberedAnswers()).run_once()
    async with gallery_browser(asking_gallery) as http:
        url = f"{asking_gallery}/api/jobs/{chat.job_id}/follow-up"
        async with http.post(url, data={"question": "And?"}) as response:
            assert response.status == 404


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed")
async def test_a_follow_up_answer_shows_below_the_first_in_the_browser(
    ctx, mosaic, asking_gallery
):
    from playwright.async_api import async_playwright

    answers = NumberedAnswers()
    working = asyncio.create_task(Worker(ctx, answers, poll_s=0.05).run_forever())
    try:
        async with async_playwright() as pw:
            browser = await launch_chromium(pw)
            page = await browser.new_page(viewport={"width": 1200, "height": 800})
            await page.goto(f"{asking_gallery}/m/{mosaic.id}")
            await page.locator("#stage[data-view]").wait_for(state="attached")
            await page.fill("#goto", "C2")
            await page.press("#goto", "Enter")
            await page.locator("#tile-title", has_text="Tile C2").wait_for()
            await page.fill("#question", "What pollutes?")
            await page.click("#ask-form button")
            await page.locator("#follow-up-form").wait_for(state="visible")
            await page.fill("#follow-up", "And its tyres?")
            await page.click("#follow-up-form button")
            await page.locator(".turn:nth-child(2) .answer", has_text="Answer 2.").wait_for()
            questions = await page.locator(".turn .question").all_inner_texts()
            shown = await page.locator(".turn .answer").all_inner_texts()
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "gallery-follow-up.png"))
            await browser.close()
    finally:
        working.cancel()
        await asyncio.gather(working, return_exceptions=True)
    assert questions == ["What pollutes?", "And its tyres?"]
    assert [text.strip() for text in shown] == ["Answer 1.", "Answer 2."]
    assert answers.seen[1][0] == (("What pollutes?", "Answer 1."),)


def _answer_with_sources(job, progress) -> AnswerResult:
    text = "A catalytic converter cleans the exhaust [1].\n\nSources: [1] Cat (EEA)"
    return AnswerResult(text, [{"title": "Cat", "source": "EEA"}], {})


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed")
async def test_an_answer_shows_each_source_once_in_view_and_empties_the_box(
    ctx, mosaic, asking_gallery
):
    from playwright.async_api import async_playwright

    working = asyncio.create_task(Worker(ctx, _answer_with_sources, poll_s=0.05).run_forever())
    try:
        async with async_playwright() as pw:
            browser = await launch_chromium(pw)
            page = await browser.new_page(viewport={"width": 1280, "height": 800})
            await page.goto(f"{asking_gallery}/m/{mosaic.id}/C2")
            await page.locator("#tile-title", has_text="Tile C2").wait_for()
            await page.locator("#car-photo").wait_for(state="visible")
            await page.fill("#question", "What pollutes?")
            await page.click("#ask-form button")
            answer = page.locator(".turn .answer", has_text="catalytic")
            await answer.wait_for()
            await page.locator("#follow-up-form").wait_for(state="visible")
            text = await answer.inner_text()
            box = await answer.bounding_box()
            left = await page.input_value("#question")
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "gallery-answer.png"))
            await page.fill("#follow-up", "And its tyres?")
            await page.click("#follow-up-form button")
            await page.locator(".turn:nth-child(2) .answer", has_text="catalytic").wait_for()
            second = await page.locator(".turn:nth-child(2) .answer").inner_text()
            left_follow_up = await page.input_value("#follow-up")
            await browser.close()
    finally:
        working.cancel()
        await asyncio.gather(working, return_exceptions=True)
    assert text.count("Cat") == 1 and text.count("[1] ") == 1, text
    assert second.count("Cat") == 1, second
    assert box["y"] >= 0 and box["y"] + box["height"] <= 800  # scrolled into view
    assert left == "" and left_follow_up == ""
