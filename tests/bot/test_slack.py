"""The Slack adapter: signed requests dispatched to the bolt app, whose AsyncWebClient talks to a
local Web API stand-in that records every call (uploads through files_upload_v2 included).
"""

import asyncio
import time

import pytest
from slack_bolt.context.ack.async_ack import AsyncAck
from slack_sdk.web.async_client import AsyncWebClient

from bot.slack_app import SlackFiles, make_slack_app
from core.mosaic import preview_image
from core.worker import Worker
from storage.messages import job_for_answer_message, mosaic_for_message
from storage.models import FollowUp, Job
from tests.bot.conftest import MOSAIC_NAME, car_at, fake_answer, fox_image
from tests.bot.slack_stand_in import (
    BOT_TOKEN,
    BOT_USER,
    CHANNEL,
    SIGNING_SECRET,
    USER,
    SlackStandIn,
    event_callback,
    next_ts,
    slash_command,
)


@pytest.fixture
async def stand_in():
    server = await SlackStandIn().start()
    yield server
    await server.stop()


@pytest.fixture
async def app(stand_in, commands, updates, ctx):
    client = AsyncWebClient(token=BOT_TOKEN, base_url=f"{stand_in.base_url}/api/")
    files = SlackFiles(BOT_TOKEN, ctx.settings.max_upload_bytes, file_hosts=["127.0.0.1"])
    yield make_slack_app(commands, updates, client=client, signing_secret=SIGNING_SECRET,
                         files=files)
    await files.close()


@pytest.fixture(autouse=True)
def ack_times(monkeypatch) -> list[float]:
    """When each listener called ack() (events are acked by bolt itself, before listeners)."""
    times: list[float] = []
    original = AsyncAck.__call__

    async def timed(self, *args, **kwargs):
        times.append(time.perf_counter())
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(AsyncAck, "__call__", timed)
    return times


async def dispatch(app, request) -> float:
    """Dispatch a signed request; returns when it was acknowledged (under 3 s after arrival)."""
    started = time.perf_counter()
    response = await app.async_dispatch(request)
    returned = time.perf_counter()
    assert response.status == 200
    assert returned - started < 3.0
    return returned


def work_after(stand_in: SlackStandIn, ack_times: list[float]) -> None:
    """The listener acked before anything slow (downloads, uploads, messages)."""
    [acked] = ack_times
    early = [c.method for c in stand_in.calls if c.at < acked and c.method != "auth.test"]
    assert early == []


async def test_a_request_with_a_bad_signature_is_refused(app, stand_in):
    request = slash_command("list")
    request.headers["x-slack-signature"] = ["v0=" + "0" * 64]
    response = await app.async_dispatch(request)
    assert response.status == 401
    assert not [c for c in stand_in.calls if c.method != "auth.test"]


async def test_show_posts_the_mosaic_and_uploads_its_preview_in_its_thread(
    app, stand_in, ack_times, ctx, mosaic
):
    await dispatch(app, slash_command(f"show {MOSAIC_NAME}"))
    [(complete, raw)] = await stand_in.wait_for(lambda _: stand_in.uploaded())
    work_after(stand_in, ack_times)
    [posted] = stand_in.api("chat.postMessage")
    assert posted.args["text"].startswith(f"Mosaic {MOSAIC_NAME}: 10x10 tiles")
    thread_ts = posted.response["ts"]
    assert complete.args["thread_ts"] == thread_ts and complete.args["channel_id"] == CHANNEL
    assert raw.body == preview_image(ctx, mosaic, ctx.settings.preview_max_bytes)
    with ctx.db.session() as session:
        shown = mosaic_for_message(session, "slack", CHANNEL, thread_ts)
    assert shown.id == mosaic.id


async def test_build_uses_the_users_last_image_downloaded_with_the_bot_token(
    app, stand_in, ack_times, car_library
):
    target = stand_in.serve_file("owl.png", fox_image(90), "image/png")
    stand_in.history = [
        {"type": "message", "user": "U0BOB", "ts": next_ts(), "files": [
            stand_in.serve_file("other.png", b"not used", "image/png")]},
        {"type": "message", "user": USER, "ts": next_ts(), "files": [target]},
    ]
    await dispatch(app, slash_command("build owl 8"))
    [(_complete, raw)] = await stand_in.wait_for(lambda _: stand_in.uploaded())
    work_after(stand_in, ack_times)
    [download] = [c for c in stand_in.calls if c.method.startswith("GET /files/")]
    assert download.method == "GET /files/owl.png"
    assert download.headers["Authorization"] == f"Bearer {BOT_TOKEN}"
    assert stand_in.api("chat.update")[-1].args["text"].startswith("Built owl: 8x8 tiles")
    assert raw.body[:3] == b"\xff\xd8\xff"


async def test_build_without_a_shared_image_says_so_privately(app, stand_in, car_library):
    await dispatch(app, slash_command("build owl"))
    [error] = await stand_in.wait_for(lambda _: stand_in.api("chat.postEphemeral"))
    assert error.args["user"] == USER
    assert error.args["text"].startswith("Share an image in this channel first")


async def test_a_thread_reply_c7_under_a_mosaic_uploads_that_cars_photo(
    app, stand_in, ctx, mosaic
):
    await dispatch(app, slash_command(f"show {MOSAIC_NAME}"))
    await stand_in.wait_for(lambda _: stand_in.uploaded())
    thread_ts = stand_in.api("chat.postMessage")[0].response["ts"]
    await dispatch(app, event_callback({
        "type": "message", "channel": CHANNEL, "user": USER, "text": "C7",
        "ts": next_ts(), "thread_ts": thread_ts,
    }))
    uploads = await stand_in.wait_for(lambda _: uploads_so_far(stand_in, 2))
    complete, raw = uploads[1]
    assert raw.body == car_at(ctx, mosaic, row=6, col=2)
    assert complete.args["thread_ts"] == thread_ts
    assert complete.args["initial_comment"].startswith(f"C7 of {MOSAIC_NAME}:")


async def test_a_coordinate_outside_a_mosaic_thread_is_ignored(app, stand_in, mosaic):
    await dispatch(app, event_callback({
        "type": "message", "channel": CHANNEL, "user": USER, "text": "C7",
        "ts": next_ts(), "thread_ts": next_ts(),
    }))
    await dispatch(app, slash_command("list"))
    await stand_in.wait_for(lambda _: stand_in.api("chat.postMessage"))
    assert not stand_in.api("files.getUploadURLExternal")


async def test_a_bad_coordinate_is_one_ephemeral_sentence(app, stand_in, ack_times, mosaic):
    await dispatch(app, slash_command(f"tile {MOSAIC_NAME} Z99"))
    [error] = await stand_in.wait_for(lambda _: stand_in.api("chat.postEphemeral"))
    work_after(stand_in, ack_times)
    assert error.args["user"] == USER and error.args["channel"] == CHANNEL
    assert error.args["text"].startswith("Z99 is off the grid")
    assert not stand_in.api("files.getUploadURLExternal")


async def test_tile_command_uploads_the_car(app, stand_in, ctx, mosaic):
    await dispatch(app, slash_command(f"tile {MOSAIC_NAME} b3"))
    [(_complete, raw)] = await stand_in.wait_for(lambda _: stand_in.uploaded())
    assert raw.body == car_at(ctx, mosaic, row=2, col=1)


async def test_unknown_subcommand_shows_the_usage_privately(app, stand_in):
    await dispatch(app, slash_command("paint"))
    [usage] = await stand_in.wait_for(lambda _: stand_in.api("chat.postEphemeral"))
    assert usage.args["text"].startswith("Usage: /mosaic build NAME")


def posted_messages(stand_in: SlackStandIn, at_least: int) -> list:
    posts = stand_in.api("chat.postMessage")
    return posts if len(posts) >= at_least else []


def uploads_so_far(stand_in: SlackStandIn, at_least: int) -> list:
    uploads = stand_in.uploaded()
    return uploads if len(uploads) >= at_least else []


def mention(stand_in, text: str, files: list[dict]) -> dict:
    return {"type": "app_mention", "channel": CHANNEL, "user": USER, "text": text,
            "ts": next_ts(), "files": files}


async def test_a_photo_with_a_question_mentioning_the_app_is_answered_in_its_thread(
    app, stand_in, worker, vehicle_photos
):
    photo = stand_in.serve_file("car.jpg", vehicle_photos[0].read_bytes(), "image/jpeg")
    event = mention(stand_in, f"<@{BOT_USER}> which parts of this car pollute?", [photo])
    await dispatch(app, event_callback(event))
    status, answer = await stand_in.wait_for(lambda _: posted_messages(stand_in, at_least=2))
    assert "next in line" in status.args["text"] or "in the queue" in status.args["text"]
    assert status.args["thread_ts"] == event["ts"] == answer.args["thread_ts"]
    assert answer.args["text"] == "Fake answer to: which parts of this car pollute?"
    edits = stand_in.api("chat.update")
    assert edits and all(e.args["ts"] == status.response["ts"] for e in edits)


async def test_a_url_private_that_is_not_an_image_is_refused(app, stand_in, worker, ctx):
    # Slack's sign-in page, or any non-image, served where a photo was announced.
    page = stand_in.serve_file("car.jpg", b"<html>sign in</html>", "text/html",
                               mimetype="image/jpeg")
    await dispatch(app, event_callback(mention(stand_in, f"<@{BOT_USER}> what car?", [page])))
    [error] = await stand_in.wait_for(lambda _: stand_in.api("chat.postEphemeral"))
    assert "could not be downloaded as an image" in error.args["text"]
    with ctx.db.session() as session:
        assert session.query(Job).count() == 0


async def test_a_download_that_fails_is_one_ephemeral_sentence(app, stand_in, worker, ctx):
    photo = stand_in.serve_file("car.jpg", b"", "image/jpeg")
    photo["url_private"] = "http://127.0.0.1:9/files/car.jpg"  # nothing listens there
    await dispatch(app, event_callback(mention(stand_in, f"<@{BOT_USER}> what car?", [photo])))
    [error] = await stand_in.wait_for(lambda _: stand_in.api("chat.postEphemeral"))
    assert error.args["text"] == "That file could not be downloaded; please share it again."
    with ctx.db.session() as session:
        assert session.query(Job).count() == 0


async def test_a_file_announced_as_not_an_image_is_not_downloaded(app, stand_in, worker):
    pdf = stand_in.serve_file("doc.pdf", b"%PDF-1.7", "application/pdf")
    await dispatch(app, event_callback(mention(stand_in, f"<@{BOT_USER}> what car?", [pdf])))
    [error] = await stand_in.wait_for(lambda _: stand_in.api("chat.postEphemeral"))
    assert "not an image" in error.args["text"]
    assert not [c for c in stand_in.calls if c.method.startswith("GET /files/")]


async def test_the_status_message_is_edited_as_the_queue_moves(
    app, stand_in, ctx, updates, vehicle_photos
):
    photo = stand_in.serve_file("car.jpg", vehicle_photos[0].read_bytes(), "image/jpeg")
    for user in ("U0ONE", "U0TWO", "U0THREE"):
        event = {**mention(stand_in, f"<@{BOT_USER}> which fuel?", [photo]), "user": user}
        await dispatch(app, event_callback(event))
    statuses = await stand_in.wait_for(lambda _: posted_messages(stand_in, at_least=3))
    assert "#3 in the queue" in statuses[2].args["text"]

    worker = Worker(ctx, fake_answer, on_update=updates, poll_s=0.05)
    running = asyncio.create_task(worker.run_forever())
    await stand_in.wait_for(lambda _: posted_messages(stand_in, at_least=6))
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    edits = [c.args["text"] for c in stand_in.api("chat.update")
             if c.args["ts"] == statuses[2].response["ts"]]
    assert "Your question is #2 in the queue." in edits
    assert edits.index("Your question is #2 in the queue.") < edits.index(
        "Working on your question.")


async def test_an_unexpected_failure_is_one_ephemeral_sentence(app, stand_in, commands,
                                                               monkeypatch):
    async def broken(*_args):
        raise RuntimeError("database on fire")

    monkeypatch.setattr(commands, "mosaics", broken)
    await dispatch(app, slash_command("list"))
    [error] = await stand_in.wait_for(lambda _: stand_in.api("chat.postEphemeral"))
    assert error.args["text"] == "Something went wrong on our side; please try again later."


async def test_an_unexpected_failure_under_a_mosaic_thread_is_one_ephemeral_sentence(
    app, stand_in, commands, monkeypatch
):
    async def broken(*_args):
        raise RuntimeError("database on fire")

    monkeypatch.setattr(commands, "tile_for_message", broken)
    event = {"type": "message", "channel": CHANNEL, "user": USER, "text": "C7",
             "ts": next_ts(), "thread_ts": "1790000000.000100"}
    await dispatch(app, event_callback(event))
    [error] = await stand_in.wait_for(lambda _: stand_in.api("chat.postEphemeral"))
    assert error.args["text"] == "Something went wrong on our side; please try again later."
    assert error.args["thread_ts"] == "1790000000.000100"


async def answered_in_a_thread(app, stand_in, ctx, photo_bytes: bytes) -> tuple[dict, int]:
    """Ask a question with a photo; (the question's event, its job) once the answer is in."""
    photo = stand_in.serve_file("car.jpg", photo_bytes, "image/jpeg")
    event = mention(stand_in, f"<@{BOT_USER}> which parts of this car pollute?", [photo])
    await dispatch(app, event_callback(event))
    await stand_in.wait_for(lambda _: posted_messages(stand_in, at_least=2))
    async with asyncio.timeout(10):
        while (job_id := remembered(ctx, event["ts"])) is None:
            await asyncio.sleep(0.02)
    return event, job_id


def remembered(ctx, thread_ts: str) -> int | None:
    with ctx.db.session() as session:
        return job_for_answer_message(session, "slack", CHANNEL, thread_ts)


def thread_message(thread_ts: str, text: str, **fields) -> dict:
    return {"type": "message", "channel": CHANNEL, "user": USER, "text": text, "ts": next_ts(),
            "thread_ts": thread_ts, **fields}


def jobs(ctx) -> list[Job]:
    with ctx.db.session() as session:
        return list(session.query(Job).order_by(Job.id))


async def test_a_thread_reply_under_an_answer_is_a_follow_up_about_the_same_photo(
    app, stand_in, ctx, worker, vehicle_photos
):
    asked, first = await answered_in_a_thread(app, stand_in, ctx, vehicle_photos[0].read_bytes())
    await dispatch(app, event_callback(thread_message(asked["ts"], "and what about its tyres?")))
    posts = await stand_in.wait_for(lambda _: posted_messages(stand_in, at_least=4))
    status, answer = posts[2], posts[3]
    assert "next in line" in status.args["text"] or "in the queue" in status.args["text"]
    assert answer.args["text"] == "Fake answer to: and what about its tyres?"
    assert status.args["thread_ts"] == answer.args["thread_ts"] == asked["ts"]
    first_job, second_job = jobs(ctx)
    with ctx.db.session() as session:
        assert session.get(FollowUp, second_job.id).parent_job_id == first
    assert second_job.image_media_key == first_job.image_media_key
    assert len([c for c in stand_in.calls if c.method.startswith("GET /files/")]) == 1


async def test_the_thread_points_at_its_latest_answer(app, stand_in, ctx, worker, vehicle_photos):
    asked, first = await answered_in_a_thread(app, stand_in, ctx, vehicle_photos[0].read_bytes())
    await dispatch(app, event_callback(thread_message(asked["ts"], "and its tyres?")))
    await stand_in.wait_for(lambda _: posted_messages(stand_in, at_least=4))
    async with asyncio.timeout(10):
        while remembered(ctx, asked["ts"]) == first:
            await asyncio.sleep(0.02)
    assert remembered(ctx, asked["ts"]) == jobs(ctx)[1].id


async def test_a_mention_in_an_answers_thread_is_one_follow_up(
    app, stand_in, ctx, worker, vehicle_photos
):
    asked, first = await answered_in_a_thread(app, stand_in, ctx, vehicle_photos[0].read_bytes())
    # Slack sends a mention in a thread twice: as a message and as an app_mention.
    reply = thread_message(asked["ts"], f"<@{BOT_USER}> is it a diesel?")
    await dispatch(app, event_callback(reply))
    await dispatch(app, event_callback({**reply, "type": "app_mention"}))
    posts = await stand_in.wait_for(lambda _: posted_messages(stand_in, at_least=4))
    assert posts[3].args["text"] == "Fake answer to: is it a diesel?"
    await asyncio.sleep(0.3)
    assert len(jobs(ctx)) == 2
    with ctx.db.session() as session:
        assert session.get(FollowUp, jobs(ctx)[1].id).parent_job_id == first


async def test_the_apps_own_messages_in_an_answers_thread_are_ignored(
    app, stand_in, ctx, worker, vehicle_photos
):
    asked, _first = await answered_in_a_thread(app, stand_in, ctx, vehicle_photos[0].read_bytes())
    await dispatch(app, event_callback(thread_message(asked["ts"], "Your question is next.",
                                                      bot_id="B0BOT", user=BOT_USER)))
    await dispatch(app, slash_command("list"))  # something to wait for
    await stand_in.wait_for(lambda _: stand_in.api("chat.postEphemeral"))
    assert len(jobs(ctx)) == 1
    assert len(posted_messages(stand_in, at_least=2)) == 2


async def test_a_reply_in_a_thread_without_an_answer_is_ignored(app, stand_in, ctx, worker):
    await dispatch(app, event_callback(thread_message(next_ts(), "and its tyres?")))
    await dispatch(app, slash_command("list"))  # something to wait for
    await stand_in.wait_for(lambda _: stand_in.api("chat.postEphemeral"))
    assert jobs(ctx) == []
    assert not stand_in.api("chat.postMessage")
