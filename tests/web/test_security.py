"""The gallery's questions belong to browser sessions: a POST needs the gallery's own Origin and
a session cookie the gallery set, limits count per session, and an answer is shown only to the
session that asked. Odd ids, widths and coordinates get one sentence, never a 500."""

import io
import os
import stat
import string

import aiohttp
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select
from yarl import URL

from bot.web import bound_port, make_gallery_app, start_gallery
from bot.websession import COOKIE_NAME, CROSS_SITE, NO_SESSION, session_key
from core.library import add_car_photo
from core.mosaic import MosaicOptions, build_mosaic
from core.settings import Settings
from core.worker import AnswerResult, JobQueue, Worker
from storage.models import Job
from tests.web.browsing import gallery_browser


def _jpeg(rgb: tuple[int, int, int], seed: int) -> bytes:
    noise = np.random.default_rng(seed).integers(-12, 12, (40, 40, 3))
    pixels = np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


@pytest.fixture
def mosaic(ctx):
    rng = np.random.default_rng(7)
    for i in range(16):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        add_car_photo(ctx, _jpeg(colour, i), f"car{i}.jpg", {"make": "Demo", "model": f"M{i}"})
    target = Image.new("RGB", (96, 96), (30, 90, 40))
    target.paste((220, 200, 40), (24, 24, 72, 72))
    out = io.BytesIO()
    target.save(out, "PNG")
    return build_mosaic(ctx, out.getvalue(), "pond", options=MosaicOptions(cols=4, tile_px=16))


@pytest.fixture
def queue(ctx):
    return JobQueue(ctx)


@pytest.fixture
async def gallery(ctx, mosaic, queue):
    runner = await start_gallery(ctx, "127.0.0.1", 0, queue=queue)
    yield f"http://127.0.0.1:{bound_port(runner)}"
    await runner.cleanup()


def answered(job, progress) -> AnswerResult:
    return AnswerResult(f"Answer to {job.question}", [], {})


def ask_url(base: str, mosaic) -> str:
    return f"{base}/api/mosaics/{mosaic.id}/tiles/B2/ask"


def pending(queue: JobQueue) -> int:
    with queue.ctx.db.session() as session:
        return session.scalar(select(func.count()).select_from(Job))


# Origin and session ------------------------------------------------------------------------


async def test_a_page_sets_an_http_only_same_site_session_cookie(gallery, mosaic):
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gallery}/m/{mosaic.id}") as response:
            cookie = response.cookies[COOKIE_NAME]
        async with http.get(f"{gallery}/api/mosaics/{mosaic.id}/tiles/B2") as response:
            tile_cookies = response.headers.getall("Set-Cookie", [])
    assert cookie["httponly"] is True
    assert cookie["samesite"] == "Lax"
    assert cookie["path"] == "/"
    assert tile_cookies == []


async def test_a_cross_site_ask_is_refused_and_queues_nothing(gallery, mosaic, queue):
    async with gallery_browser(gallery, f"/m/{mosaic.id}", origin="http://evil.example") as http:
        async with http.post(ask_url(gallery, mosaic), data={"question": "Fuel?"}) as response:
            refused = (response.status, await response.text())
    assert refused == (403, CROSS_SITE)
    assert pending(queue) == 0


async def test_an_ask_with_neither_origin_nor_referer_is_refused(gallery, mosaic, queue):
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        async with http.get(f"{gallery}/m/{mosaic.id}") as response:
            assert response.status == 200
        async with http.post(ask_url(gallery, mosaic), data={"question": "Fuel?"}) as response:
            refused = (response.status, await response.text())
    assert refused == (403, CROSS_SITE)
    assert pending(queue) == 0


async def test_a_same_origin_referer_stands_in_for_a_missing_origin(gallery, mosaic, queue):
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        async with http.get(f"{gallery}/m/{mosaic.id}") as response:
            assert response.status == 200
        headers = {"Referer": f"{gallery}/m/{mosaic.id}"}
        async with http.post(ask_url(gallery, mosaic), data={"question": "Fuel?"},
                             headers=headers) as response:
            assert response.status == 200, await response.text()
    assert pending(queue) == 1


async def test_an_ask_without_the_session_cookie_is_refused(gallery, mosaic, queue):
    async with aiohttp.ClientSession(headers={"Origin": gallery}) as http:
        async with http.post(ask_url(gallery, mosaic), data={"question": "Fuel?"}) as response:
            refused = (response.status, await response.text())
    assert refused == (403, NO_SESSION)
    assert pending(queue) == 0


async def test_a_forged_session_cookie_is_refused(gallery, mosaic, queue):
    jar = aiohttp.CookieJar(unsafe=True)
    jar.update_cookies({COOKIE_NAME: "gAAAAABforged"}, URL(gallery))
    async with aiohttp.ClientSession(cookie_jar=jar, headers={"Origin": gallery}) as http:
        async with http.post(ask_url(gallery, mosaic), data={"question": "Fuel?"}) as response:
            assert (response.status, await response.text()) == (403, NO_SESSION)
    assert pending(queue) == 0


async def test_a_dns_rebinding_page_whose_host_and_origin_agree_is_refused(gallery, mosaic, queue):
    # evil.example resolved to 127.0.0.1: the browser sends Host and Origin both naming it.
    rebound = f"http://evil.example:{URL(gallery).port}"
    async with gallery_browser(gallery, f"/m/{mosaic.id}", origin=rebound) as http:
        headers = {"Host": URL(rebound).raw_authority}
        async with http.get(f"{gallery}/m/{mosaic.id}", headers=headers) as response:
            assert response.status == 200
        async with http.post(ask_url(gallery, mosaic), data={"question": "Fuel?"},
                             headers=headers) as response:
            assert (response.status, await response.text()) == (403, CROSS_SITE)
    assert pending(queue) == 0


async def test_the_public_url_is_an_accepted_origin(mosaic, ctx):
    # Behind a proxy the Host header may be the proxy's upstream name, so the origin people use
    # is the one GALLERY_PUBLIC_URL names.
    ctx.settings = ctx.settings.model_copy(
        update={"gallery_public_url": "http://mosaics.example.org"}
    )
    runner = await start_gallery(ctx, "127.0.0.1", 0, queue=JobQueue(ctx))
    base = f"http://127.0.0.1:{bound_port(runner)}"
    try:
        async with gallery_browser(base, origin="http://mosaics.example.org") as http:
            async with http.post(ask_url(base, mosaic), data={"question": "Fuel?"}) as response:
                status = response.status
    finally:
        await runner.cleanup()
    assert status == 200


async def test_an_https_public_url_makes_the_cookie_secure(mosaic, ctx):
    ctx.settings = ctx.settings.model_copy(
        update={"gallery_public_url": "https://mosaics.example.org"}
    )
    runner = await start_gallery(ctx, "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{bound_port(runner)}/"
        ) as response:
            cookie = response.cookies[COOKIE_NAME]
    finally:
        await runner.cleanup()
    assert cookie["secure"] is True


# Limits and answers per session --------------------------------------------------------------


async def test_the_per_user_limit_counts_per_session_not_per_address(gallery, mosaic, queue):
    assert queue.per_user == 2
    async with gallery_browser(gallery) as alice, gallery_browser(gallery) as bob:
        statuses = []
        for http in (alice, alice, alice, bob):
            async with http.post(ask_url(gallery, mosaic), data={"question": "Fuel?"}) as response:
                statuses.append(response.status)
    # Both from 127.0.0.1: Alice's third waits for an answer, Bob's first is taken.
    assert statuses == [200, 200, 400, 200]


async def test_an_answer_is_shown_only_to_the_session_that_asked(ctx, gallery, mosaic):
    async with gallery_browser(gallery) as alice, gallery_browser(gallery) as bob:
        async with alice.post(ask_url(gallery, mosaic), data={"question": "Fuel?"}) as response:
            job = (await response.json())["job"]
        await Worker(ctx, answered, poll_s=0.01).run_once()
        async with alice.get(f"{gallery}/api/jobs/{job}") as response:
            mine = await response.json()
        async with bob.get(f"{gallery}/api/jobs/{job}") as response:
            theirs = (response.status, await response.text())
        async with aiohttp.ClientSession() as nobody, nobody.get(
            f"{gallery}/api/jobs/{job}"
        ) as response:
            anonymous = response.status
    assert mine["answer"] == "Answer to Fuel?"
    assert theirs == (404, "There is no such question.")
    assert anonymous == 404


async def test_a_follow_up_is_taken_only_from_the_session_that_asked(ctx, gallery, mosaic, queue):
    async with gallery_browser(gallery) as alice, gallery_browser(gallery) as bob:
        async with alice.post(ask_url(gallery, mosaic), data={"question": "Fuel?"}) as response:
            job = (await response.json())["job"]
        await Worker(ctx, answered, poll_s=0.01).run_once()
        follow_up = f"{gallery}/api/jobs/{job}/follow-up"
        async with bob.post(follow_up, data={"question": "And tyres?"}) as response:
            theirs = response.status
        async with alice.post(follow_up, data={"question": "And tyres?"}) as response:
            mine = response.status
    assert (theirs, mine) == (404, 200)
    assert pending(queue) == 2


async def test_a_cross_site_follow_up_is_refused(ctx, gallery, mosaic, queue):
    async with gallery_browser(gallery) as alice:
        async with alice.post(ask_url(gallery, mosaic), data={"question": "Fuel?"}) as response:
            job = (await response.json())["job"]
        await Worker(ctx, answered, poll_s=0.01).run_once()
        async with alice.post(f"{gallery}/api/jobs/{job}/follow-up", data={"question": "And?"},
                              headers={"Origin": "http://evil.example"}) as response:
            assert (response.status, await response.text()) == (403, CROSS_SITE)
    assert pending(queue) == 1


# The key that seals the cookies ---------------------------------------------------------------


async def test_a_session_outlives_a_restart(ctx, mosaic):
    first = await start_gallery(ctx, "127.0.0.1", 0, queue=JobQueue(ctx))
    async with gallery_browser(f"http://127.0.0.1:{bound_port(first)}") as alice:
        await first.cleanup()
        second = await start_gallery(ctx, "127.0.0.1", 0, queue=JobQueue(ctx))
        base = f"http://127.0.0.1:{bound_port(second)}"
        try:
            async with alice.post(ask_url(base, mosaic), data={"question": "Fuel?"},
                                  headers={"Origin": base}) as response:
                status = response.status
        finally:
            await second.cleanup()
    assert status == 200


def test_the_stored_key_is_private_to_its_owner_and_stable(settings):
    key = session_key(settings)
    stored = settings.data_dir / "gallery-secret"
    assert stat.S_IMODE(os.stat(stored).st_mode) == 0o600
    assert session_key(settings) == key and len(key) == 32


def test_gallery_secret_from_the_environment_replaces_the_stored_key(tmp_path, monkeypatch):
    monkeypatch.setenv("GALLERY_SECRET", "correct horse battery staple")
    from_env = Settings(data_dir=tmp_path / "a", database_url=None)
    other_host = Settings(data_dir=tmp_path / "b", database_url=None)
    assert session_key(from_env) == session_key(other_host)
    assert not (tmp_path / "a" / "gallery-secret").exists()
    assert "correct horse" not in repr(from_env)


# Odd input on every route ----------------------------------------------------------------------

# Path-ready (percent-encoded) values that must be a 400 or a 404 sentence wherever they land.
BAD_SEGMENTS = {
    "2^63": str(2**63),
    "2^64": str(2**64),
    "30 digits": "9" * 30,
    "negative": "-1",
    "superscript two": "%C2%B2",
    "arabic-indic three": "%D9%A3",
    "fullwidth one": "%EF%BC%91",
    "underscored": "1_0",
    "spaced": "%201",
    "hex": "0x1f",
    "float": "1.5",
    "word": "abc",
    "nul": "%00",
    "5000-digit row": "C" + "9" * 5000,
    "long": "x" * 300,
}
BAD_WIDTHS = ["%C2%B2", "%D9%A3", "-5", "0", "4097", "99999999999999999999", "abc", "1e3", ""]


def _routes(app):
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        if route.method in ("GET", "POST") and "formatter" in info:
            yield route.method, info["formatter"]


def _one_sentence(text: str) -> bool:
    return text.endswith(".") and "\n" not in text.strip() and len(text) < 300


@pytest.mark.parametrize("bad", list(BAD_SEGMENTS.values()), ids=list(BAD_SEGMENTS))
async def test_every_route_answers_odd_path_values_with_one_sentence(
    ctx, mosaic, queue, gallery, bad
):
    job = queue.submit("web", "someone", {}, None, "Fuel?").job_id
    good = {"mosaic_id": str(mosaic.id), "coord": "B2", "job_id": str(job)}
    routes = list(_routes(make_gallery_app(ctx, queue)))
    assert len(routes) >= 8
    failures = []
    async with gallery_browser(gallery) as http:
        for method, template in routes:
            for name in _names(template):
                values = {n: good.get(n, "1") for n in _names(template)}
                values[name] = bad
                url = URL(gallery + template.format(**values), encoded=True)
                async with http.request(method, url, data={"question": "Fuel?"}) as response:
                    text = await response.text()
                # A page whose path names a coordinate is served; its script says what is wrong.
                page = method == "GET" and template.startswith("/m/") and name == "coord"
                if page and response.status == 200 and response.content_type == "text/html":
                    continue
                if response.status not in (400, 404) or not _one_sentence(text):
                    failures.append((method, template, name, response.status, text[:120]))
    assert failures == [], "\n".join(map(str, failures))


@pytest.mark.parametrize("width", BAD_WIDTHS)
async def test_an_odd_render_width_is_one_sentence(gallery, mosaic, width):
    url = URL(f"{gallery}/media/mosaics/{mosaic.id}/render?w={width}", encoded=True)
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        text = await response.text()
    assert response.status == 400
    assert text == "w must be a width between 16 and 4096."


def _names(template: str) -> list[str]:
    return [field for _, field, _, _ in string.Formatter().parse(template) if field]



async def test_an_address_with_no_route_is_one_sentence(gallery):
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gallery}/no/such/page") as response:
            missing = (response.status, await response.text())
        async with http.options(f"{gallery}/api/mosaics") as response:
            wrong_method = (response.status, await response.text())
    assert missing == (404, "There is nothing at this address.")
    assert wrong_method == (405, "This address does not take that kind of request.")
