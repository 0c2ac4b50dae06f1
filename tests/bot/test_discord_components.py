"""Discord's interactive parts, driven with the payloads Discord sends: autocomplete (type 4),
button clicks (component interactions, type 3) and modal submits (type 5) against the bot's own
posted messages; /help; build progress; answers as embeds; cancelling a waiting question.
"""

import asyncio

from bot.commands import CANCELLED, NOT_YOURS
from bot.discord_ui import answer_embed
from core.mosaic import parse_coordinate
from core.worker import AnswerResult, Worker
from storage.models import Job
from tests.bot.conftest import MOSAIC_NAME, car_at, fox_image
from tests.bot.discord_stand_in import (
    APP_ID,
    AUTOCOMPLETE,
    AUTOCOMPLETE_RESULT,
    CHANNEL_ID,
    CHANNEL_MESSAGE,
    DEFER_WITH_THINKING,
    DEFERRED_UPDATE,
    EPHEMERAL,
    MODAL,
    MODAL_SUBMIT,
    answer_text,
    attachment_payload,
    callback,
    channel_posts,
    click,
    dispatch_interaction,
    followups,
    labels,
    mentioning_the_bot,
    message_payload,
    modal_submit_data,
    original_edits,
    original_with_files,
    served_attachment,
    slash,
    user_payload,
    webhook_calls,
)

GALLERY = "https://mosaics.example.org"
QUESTION = "Which fuel does it use?"


async def shown_mosaic(bot, stand_in) -> dict:
    """/mosaic show fox; returns the posted message as Discord delivers it (with components)."""
    token, _ = dispatch_interaction(
        bot, slash("mosaic", "show", [{"name": "name", "type": 3, "value": MOSAIC_NAME}])
    )
    [posted] = await stand_in.wait_for(lambda _: followups(stand_in, token))
    await asyncio.sleep(0.2)  # the message is remembered right after the follow-up returns
    return posted.response


def answered(stand_in, token: str):
    return stand_in.wait_for(lambda _: callback(stand_in, token), timeout=5)


async def opened_modal(bot, stand_in, token: str) -> dict:
    """The modal the bot opened in answer to an interaction, once the bot listens for its submit
    (discord.py starts listening when Discord has acknowledged the modal, just after the call)."""
    opened = await answered(stand_in, token)
    assert opened.payload["type"] == MODAL
    modal = opened.payload["data"]
    async with asyncio.timeout(5):
        while modal["custom_id"] not in bot._connection._view_store._modals:
            await asyncio.sleep(0.01)
    return modal


def car_from_content(ctx, mosaic, content: str) -> bytes:
    label = content.split(" of ", 1)[0]
    row, col = parse_coordinate(label, mosaic.rows, mosaic.cols)
    return car_at(ctx, mosaic, row, col)


def job_row(ctx) -> Job:
    with ctx.db.session() as session:
        [job] = session.query(Job).all()
        return job


# Autocomplete and /help ----------------------------------------------------------------------


async def test_autocomplete_offers_the_mosaic_names_at_once(bot, stand_in, mosaic):
    data = slash("mosaic", "show", [{"name": "name", "type": 3, "value": "FO", "focused": True}])
    token, _ = dispatch_interaction(bot, data, kind=AUTOCOMPLETE)
    answer = await answered(stand_in, token)
    assert answer.payload["type"] == AUTOCOMPLETE_RESULT
    assert answer.payload["data"]["choices"] == [{"name": MOSAIC_NAME, "value": MOSAIC_NAME}]


async def test_autocomplete_of_the_tile_command_offers_nothing_for_an_unknown_name(
    bot, stand_in, mosaic
):
    data = slash("mosaic", "tile", [{"name": "name", "type": 3, "value": "zebra", "focused": True},
                                    {"name": "coordinate", "type": 3, "value": ""}])
    token, _ = dispatch_interaction(bot, data, kind=AUTOCOMPLETE)
    answer = await answered(stand_in, token)
    assert answer.payload["data"]["choices"] == []


async def test_help_is_an_ephemeral_embed_answered_at_once(bot, stand_in, ctx):
    ctx.settings.gallery_public_url = GALLERY
    token, _ = dispatch_interaction(bot, slash(None, "help", []))
    answer = await answered(stand_in, token)
    assert answer.payload["type"] == CHANNEL_MESSAGE
    assert answer.payload["data"]["flags"] & EPHEMERAL
    [embed] = answer.payload["data"]["embeds"]
    assert embed["title"] == "TalkMosaic"
    fields = {field["name"]: field["value"] for field in embed["fields"]}
    assert any(name.startswith("/mosaic build") for name in fields)
    asking = "/ask photo question · mention me with a photo · Apps > Ask TalkMosaic"
    assert "Cancel" in fields[asking]
    assert fields["Gallery"] == GALLERY
    assert len(webhook_calls(stand_in, token)) == 1


# Buttons under a mosaic ----------------------------------------------------------------------


async def test_a_mosaic_has_tile_buttons_and_a_gallery_link_when_the_gallery_is_public(
    bot, stand_in, ctx, mosaic
):
    assert labels(await shown_mosaic(bot, stand_in)) == ["Pick a tile", "Random tile"]
    ctx.settings.gallery_public_url = GALLERY + "/"
    message = await shown_mosaic(bot, stand_in)
    assert labels(message) == ["Pick a tile", "Random tile", "Open in gallery"]
    link = message["components"][0]["components"][2]
    assert link["url"] == f"{GALLERY}/m/{mosaic.id}" and "custom_id" not in link


async def test_pick_a_tile_opens_a_modal_whose_coordinate_brings_the_car(
    bot, stand_in, ctx, mosaic
):
    message = await shown_mosaic(bot, stand_in)
    token, _ = click(bot, message, "Pick a tile")
    modal = await opened_modal(bot, stand_in, token)
    assert modal["title"] == "Pick a tile"

    submit, _ = dispatch_interaction(bot, modal_submit_data(modal, "c7"), kind=MODAL_SUBMIT,
                                     message=message)
    [posted] = await stand_in.wait_for(lambda _: followups(stand_in, submit))
    assert callback(stand_in, submit).payload["type"] == DEFER_WITH_THINKING
    assert posted.content.startswith(f"C7 of {MOSAIC_NAME}:")
    assert posted.files[0][1] == car_at(ctx, mosaic, row=6, col=2)
    assert labels(posted.payload) == ["Ask about this car"]


async def test_a_coordinate_off_the_grid_in_the_modal_is_an_ephemeral_sentence(
    bot, stand_in, mosaic
):
    message = await shown_mosaic(bot, stand_in)
    token, _ = click(bot, message, "Pick a tile")
    modal = await opened_modal(bot, stand_in, token)
    submit, _ = dispatch_interaction(bot, modal_submit_data(modal, "Z99"), kind=MODAL_SUBMIT,
                                     message=message)
    [error] = await stand_in.wait_for(lambda _: followups(stand_in, submit))
    assert error.flags & EPHEMERAL
    assert error.content.startswith("Z99 is off the grid")


async def test_a_tile_links_the_gallery_opened_on_it_when_the_gallery_is_public(
    bot, stand_in, ctx, mosaic
):
    ctx.settings.gallery_public_url = GALLERY
    token, _ = dispatch_interaction(bot, slash("mosaic", "tile", [
        {"name": "name", "type": 3, "value": MOSAIC_NAME},
        {"name": "coordinate", "type": 3, "value": "C7"},
    ]))
    [posted] = await stand_in.wait_for(lambda _: followups(stand_in, token))
    assert labels(posted.payload) == ["Ask about this car", "Open in gallery"]
    link = posted.payload["components"][0]["components"][1]
    assert link["url"] == f"{GALLERY}/m/{mosaic.id}/C7"


async def test_random_tile_defers_then_posts_a_car_of_the_mosaic(bot, stand_in, ctx, mosaic):
    message = await shown_mosaic(bot, stand_in)
    token, _ = click(bot, message, "Random tile")
    [posted] = await stand_in.wait_for(lambda _: followups(stand_in, token))
    assert callback(stand_in, token).payload["type"] == DEFER_WITH_THINKING
    assert posted.files[0][1] == car_from_content(ctx, mosaic, posted.content)
    assert labels(posted.payload) == ["Ask about this car"]


async def test_the_buttons_work_on_a_mosaic_posted_before_a_restart(
    stand_in, commands, updates, ctx, mosaic, bot
):
    from bot.discord_bot import TalkMosaicBot

    message = await shown_mosaic(bot, stand_in)
    restarted = TalkMosaicBot(commands, updates)
    await restarted.login("test-token")
    try:
        token, _ = click(restarted, message, "Random tile")
        [posted] = await stand_in.wait_for(lambda _: followups(stand_in, token))
        assert posted.files[0][1] == car_from_content(ctx, mosaic, posted.content)
    finally:
        await restarted.close()


# Ask about this car, answers as embeds ---------------------------------------------------------


async def tile_reply(bot, stand_in, mosaic_message: dict) -> dict:
    bot._connection.parse_message_create(message_payload("C7", reference=mosaic_message["id"]))
    [posted] = await stand_in.wait_for(lambda _: channel_posts(stand_in))
    return posted.response


async def test_ask_about_this_car_queues_a_question_about_the_tiles_photo(
    bot, stand_in, ctx, mosaic, worker
):
    tile_message = await tile_reply(bot, stand_in, await shown_mosaic(bot, stand_in))
    assert labels(tile_message) == ["Ask about this car"]
    token, _ = click(bot, tile_message, "Ask about this car")
    modal = await opened_modal(bot, stand_in, token)
    assert modal["title"] == "Ask about this car"

    submit, _ = dispatch_interaction(bot, modal_submit_data(modal, QUESTION), kind=MODAL_SUBMIT,
                                     message=tile_message)
    [answer] = await stand_in.wait_for(lambda _: followups(stand_in, submit))
    assert callback(stand_in, submit).payload["type"] == DEFER_WITH_THINKING
    status = original_edits(stand_in, submit)[0]
    assert "next in line" in status.content and labels(status.payload) == ["Cancel"]
    assert answer_text(answer) == f"Fake answer to: {QUESTION}"
    job = job_row(ctx)
    assert ctx.media.read(job.image_media_key) == car_at(ctx, mosaic, row=6, col=2)


async def test_an_answer_is_an_embed_with_its_sources(ctx, bot, stand_in, updates, vehicle_photos):
    def sourced(job, progress) -> AnswerResult:
        return AnswerResult(
            "A three-way catalyst cleans CO, HC and NOx [1].\n\n"
            "Sources: [1] Three-way catalytic converter (US EPA)",
            sources=[{"n": 1, "title": "Three-way catalytic converter", "source": "US EPA"}],
        )

    worker = Worker(ctx, sourced, on_update=updates, poll_s=0.05)
    task = asyncio.create_task(worker.run_forever())
    try:
        photo = served_attachment(stand_in, vehicle_photos[0].read_bytes())
        bot._connection.parse_message_create(mentioning_the_bot("which parts pollute?", [photo]))
        _status, answer = await stand_in.wait_for(lambda _: channel_posts(stand_in, at_least=2))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    [embed] = answer.payload["embeds"]
    assert embed["title"] == "which parts pollute?"
    assert embed["description"] == "A three-way catalyst cleans CO, HC and NOx [1]."
    assert embed["fields"] == [{"name": "Sources", "value":
                                "[1] Three-way catalytic converter — US EPA", "inline": False}]
    assert embed["footer"]["text"].startswith("Reply to this message")


def test_an_answer_embed_stays_within_discords_limits():
    sources = [{"n": n, "title": "A very long source title " * 4, "source": "An origin " * 5}
               for n in range(1, 41)]
    text = "An answer sentence. " * 700 + "\n\nSources: " + "; ".join(["[1] x (y)"] * 40)
    embed = answer_embed("Why? " * 100, text, sources)
    assert len(embed) <= 6000
    assert len(embed.title) <= 256 and len(embed.description) <= 4096
    assert all(len(field.value) <= 1024 for field in embed.fields)
    assert "Sources:" not in embed.description and embed.description.endswith("…")


# Cancelling a waiting question -----------------------------------------------------------------


async def waiting_status(bot, stand_in, vehicle_photos) -> dict:
    """A photo question asked by mentioning the bot, no worker running: its status message."""
    photo = served_attachment(stand_in, vehicle_photos[0].read_bytes())
    bot._connection.parse_message_create(mentioning_the_bot("what tyre should I buy?", [photo]))
    [status] = await stand_in.wait_for(lambda _: channel_posts(stand_in))
    assert labels(status.payload) == ["Cancel"]
    return status.response


async def test_the_asker_cancels_a_waiting_question_with_its_button(
    bot, stand_in, ctx, updates, vehicle_photos
):
    status = await waiting_status(bot, stand_in, vehicle_photos)
    token, _ = click(bot, status, "Cancel")
    [edit] = await stand_in.wait_for(lambda _: original_edits(stand_in, token))
    assert callback(stand_in, token).payload["type"] == DEFERRED_UPDATE
    assert edit.content == CANCELLED
    assert edit.payload["components"] == []
    job = job_row(ctx)
    assert job.status == "cancelled"
    assert job.id not in updates._live  # nothing more will be posted for it


async def test_someone_else_cannot_cancel_the_question(bot, stand_in, ctx, vehicle_photos):
    status = await waiting_status(bot, stand_in, vehicle_photos)
    token, _ = click(bot, status, "Cancel", user=user_payload(1234, "mallory"))
    [refusal] = await stand_in.wait_for(lambda _: followups(stand_in, token))
    assert refusal.flags & EPHEMERAL and refusal.content == NOT_YOURS
    assert not original_edits(stand_in, token)
    assert job_row(ctx).status == "queued"


async def test_the_cancel_button_goes_once_a_worker_starts_the_question(
    bot, stand_in, vehicle_photos, worker
):
    photo = served_attachment(stand_in, vehicle_photos[0].read_bytes())
    bot._connection.parse_message_create(mentioning_the_bot("what tyre should I buy?", [photo]))
    status, answer = await stand_in.wait_for(lambda _: channel_posts(stand_in, at_least=2))
    assert labels(status.payload) == ["Cancel"]
    edits = stand_in.api("PATCH", f"/channels/{CHANNEL_ID}/messages/{status.response['id']}")
    assert edits[0].content == "Working on your question."
    assert edits[0].payload["components"] == []
    assert all("components" not in edit.payload for edit in edits[1:])
    assert answer_text(answer) == "Fake answer to: what tyre should I buy?"


async def test_the_slash_ask_status_offers_cancel_too(bot, stand_in, ctx, vehicle_photos):
    attachment = served_attachment(stand_in, vehicle_photos[0].read_bytes())
    token, _ = dispatch_interaction(bot, slash(None, "ask", [
        {"name": "photo", "type": 11, "value": attachment["id"]},
        {"name": "question", "type": 3, "value": QUESTION},
    ], resolved={"attachments": {attachment["id"]: attachment}}))
    [status] = await stand_in.wait_for(lambda _: original_edits(stand_in, token))
    assert labels(status.payload) == ["Cancel"]
    cancel, _ = click(bot, status.response, "Cancel")
    [edit] = await stand_in.wait_for(lambda _: original_edits(stand_in, cancel))
    assert edit.content == CANCELLED
    assert job_row(ctx).status == "cancelled"


# Build progress --------------------------------------------------------------------------------


async def test_a_build_shows_its_progress_in_the_message_that_becomes_the_mosaic(
    bot, stand_in, car_library
):
    target = fox_image(90)
    stand_in.serve_file("owl.png", target, "image/png")
    attachment = attachment_payload(stand_in.base_url, "owl.png", len(target), "image/png")
    token, _ = dispatch_interaction(bot, slash(
        "mosaic", "build",
        [{"name": "target", "type": 11, "value": attachment["id"]},
         {"name": "name", "type": 3, "value": "owl"},
         {"name": "columns", "type": 4, "value": 8}],
        resolved={"attachments": {attachment["id"]: attachment}},
    ))
    final = await stand_in.wait_for(lambda _: original_with_files(stand_in, token))
    edits = original_edits(stand_in, token)
    progress = [edit.content for edit in edits if edit is not final]
    assert progress and all(text.startswith("Building owl: ") for text in progress)
    stages = ["matching" in text and 0 or "placing" in text and 1 or 2 for text in progress]
    assert stages == sorted(stages)  # matching, then placing, then rendering
    assert progress[-1] == "Building owl: rendering the mosaic."
    assert edits[-1] is final and final.content.startswith("Built owl: 8x8 tiles")
    assert not followups(stand_in, token)
    assert f"/webhooks/{APP_ID}/{token}/messages/@original" == final.path
