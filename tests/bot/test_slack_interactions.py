"""Slack's Block Kit side: the buttons under a mosaic and under a tile, the modals they open
(real block_actions and view_submission payloads), `/ask`, the message shortcut, and a build's
progress edited into its message.
"""

import json
import re

from bot.slack_app import ASK_ABOUT_CAR, ASK_ABOUT_PHOTO, OPEN_GALLERY, PICK_TILE, RANDOM_TILE
from core.mosaic import parse_coordinate
from storage.messages import mosaic_for_message
from storage.models import Job
from tests.bot import test_slack
from tests.bot.conftest import MOSAIC_NAME, car_at, fox_image
from tests.bot.slack_stand_in import (
    CHANNEL,
    USER,
    block_action,
    message_shortcut,
    next_ts,
    slash_command,
    view_submission,
)
from tests.bot.test_slack import dispatch, posted_messages, uploads_so_far

# The Slack fixtures of test_slack.py: the stand-in, the app, and when each listener acked.
stand_in, app, ack_times = test_slack.stand_in, test_slack.app, test_slack.ack_times


def blocks_of(call) -> list[dict]:
    blocks = call.args["blocks"]
    return json.loads(blocks) if isinstance(blocks, str) else blocks


def buttons(call) -> dict[str, dict]:
    """The buttons of a posted or updated message, by action id."""
    blocks = blocks_of(call)
    return {element["action_id"]: element
            for block in blocks if block["type"] == "actions" for element in block["elements"]}


def as_stored(call) -> dict:
    """The message Slack stores for a chat.postMessage call (what a click payload carries)."""
    message = {"type": "message", "ts": call.response["ts"], "text": call.args["text"],
               "user": "U0BOT", "bot_id": "B0BOT", "blocks": blocks_of(call)}
    if call.args.get("thread_ts"):
        message["thread_ts"] = call.args["thread_ts"]
    return message


async def shown_mosaic(app, stand_in):
    await dispatch(app, slash_command(f"show {MOSAIC_NAME}"))
    await stand_in.wait_for(lambda _: stand_in.uploaded())
    [posted] = stand_in.api("chat.postMessage")
    return posted


async def submit(app, request) -> dict:
    """Dispatch a view_submission; the ack's body (empty: the modal closes)."""
    response = await app.async_dispatch(request)
    assert response.status == 200
    return json.loads(response.body) if response.body else {}


async def opened_modal(stand_in, count: int = 1) -> dict:
    opened = await stand_in.wait_for(
        lambda _: stand_in.api("views.open") if len(stand_in.api("views.open")) >= count else [])
    return opened[-1].response["view"]


async def test_a_mosaic_comes_with_pick_and_random_buttons(app, stand_in, mosaic):
    posted = await shown_mosaic(app, stand_in)
    found = buttons(posted)
    assert [b["text"]["text"] for b in found.values()] == ["Pick a tile", "Random tile"]
    assert found[PICK_TILE]["value"] == str(mosaic.id)


async def test_open_in_gallery_links_the_mosaics_page_when_the_gallery_is_public(
    app, stand_in, ctx, mosaic
):
    ctx.settings.gallery_public_url = "https://mosaics.example.org/"
    posted = await shown_mosaic(app, stand_in)
    link = buttons(posted)[OPEN_GALLERY]
    assert link["text"]["text"] == "Open in gallery"
    assert link["url"] == f"https://mosaics.example.org/m/{mosaic.id}"
    await dispatch(app, block_action(as_stored(posted), OPEN_GALLERY, url=link["url"]))


async def test_pick_a_tile_opens_a_modal_and_shows_that_car_in_the_mosaics_thread(
    app, stand_in, ctx, mosaic
):
    posted = await shown_mosaic(app, stand_in)
    await dispatch(app, block_action(as_stored(posted), PICK_TILE, str(mosaic.id)))
    modal = await opened_modal(stand_in)
    assert modal["callback_id"] == PICK_TILE and modal["type"] == "modal"
    assert await submit(app, view_submission(modal, {"coordinate": "C7"})) == {}
    uploads = await stand_in.wait_for(lambda _: uploads_so_far(stand_in, 2))
    complete, raw = uploads[1]
    assert raw.body == car_at(ctx, mosaic, row=6, col=2)
    assert complete.args["thread_ts"] == posted.response["ts"]
    assert complete.args["initial_comment"].startswith(f"C7 of {MOSAIC_NAME}:")


async def test_a_bad_coordinate_in_the_modal_is_one_sentence_under_its_field(
    app, stand_in, mosaic
):
    posted = await shown_mosaic(app, stand_in)
    await dispatch(app, block_action(as_stored(posted), PICK_TILE, str(mosaic.id)))
    modal = await opened_modal(stand_in)
    answer = await submit(app, view_submission(modal, {"coordinate": "Z99"}))
    assert answer["response_action"] == "errors"
    assert answer["errors"]["coordinate"].startswith("Z99 is off the grid")
    answer = await submit(app, view_submission(modal, {"coordinate": "the fox's eye"}))
    assert answer["errors"]["coordinate"] == (
        "the fox's eye is not a tile: write column letters and a row number, e.g. C7.")
    assert len(stand_in.uploaded()) == 1  # only the mosaic's preview


async def test_random_tile_shows_some_tiles_car_in_the_mosaics_thread(app, stand_in, ctx, mosaic):
    posted = await shown_mosaic(app, stand_in)
    await dispatch(app, block_action(as_stored(posted), RANDOM_TILE, str(mosaic.id)))
    uploads = await stand_in.wait_for(lambda _: uploads_so_far(stand_in, 2))
    complete, raw = uploads[1]
    assert complete.args["thread_ts"] == posted.response["ts"]
    label = re.match(rf"([A-Z]+\d+) of {MOSAIC_NAME}:", complete.args["initial_comment"])[1]
    row, col = parse_coordinate(label, mosaic.rows, mosaic.cols)
    assert raw.body == car_at(ctx, mosaic, row, col)


async def test_a_tiles_photo_comes_with_ask_about_this_car(app, stand_in, mosaic):
    await dispatch(app, slash_command(f"tile {MOSAIC_NAME} b3"))
    [ask] = await stand_in.wait_for(lambda _: stand_in.api("chat.postMessage"))
    assert buttons(ask)[ASK_ABOUT_CAR]["text"]["text"] == "Ask about this car"
    assert buttons(ask)[ASK_ABOUT_CAR]["value"] == f"{mosaic.id}:B3"


async def test_ask_about_this_car_asks_about_that_tiles_photo_in_its_thread(
    app, stand_in, ctx, worker, mosaic
):
    posted = await shown_mosaic(app, stand_in)
    thread_ts = posted.response["ts"]
    await dispatch(app, block_action(as_stored(posted), RANDOM_TILE, str(mosaic.id)))
    ask = (await stand_in.wait_for(lambda _: posted_messages(stand_in, at_least=2)))[1]
    assert ask.args["thread_ts"] == thread_ts
    await dispatch(app, block_action(as_stored(ask), ASK_ABOUT_CAR,
                                     buttons(ask)[ASK_ABOUT_CAR]["value"]))
    modal = await opened_modal(stand_in)
    assert modal["callback_id"] == ASK_ABOUT_CAR
    assert await submit(app, view_submission(modal, {"question": ""})) == {
        "response_action": "errors",
        "errors": {"question": 'Please write a question, e.g. "Which parts of this car pollute?"'},
    }
    assert await submit(app, view_submission(modal, {"question": "is it a diesel?"})) == {}
    status, answer = (await stand_in.wait_for(lambda _: posted_messages(stand_in, 4)))[2:4]
    assert status.args["thread_ts"] == answer.args["thread_ts"] == thread_ts
    assert answer.args["text"] == "Fake answer to: is it a diesel?"
    label = buttons(ask)[ASK_ABOUT_CAR]["value"].split(":")[1]
    row, col = parse_coordinate(label, mosaic.rows, mosaic.cols)
    with ctx.db.session() as session:
        [job] = session.query(Job).all()
        assert ctx.media.read(job.image_media_key) == car_at(ctx, mosaic, row, col)


async def test_ask_asks_about_the_last_photo_shared_and_opens_a_thread(
    app, stand_in, worker, vehicle_photos
):
    photo = stand_in.serve_file("car.jpg", vehicle_photos[0].read_bytes(), "image/jpeg")
    stand_in.history = [{"type": "message", "user": USER, "ts": next_ts(), "files": [photo]}]
    await dispatch(app, slash_command("which fuel does it use?", command="/ask"))
    opening, answer = await stand_in.wait_for(lambda _: posted_messages(stand_in, at_least=2))
    assert opening.args["text"].startswith(f"<@{USER}> asked: which fuel does it use?")
    assert "thread_ts" not in opening.args
    assert answer.args["thread_ts"] == opening.response["ts"]
    assert answer.args["text"] == "Fake answer to: which fuel does it use?"


async def test_ask_without_a_question_or_a_photo_is_one_private_sentence(app, stand_in):
    await dispatch(app, slash_command("", command="/ask"))
    await dispatch(app, slash_command("what car is it?", command="/ask"))
    usage, no_photo = await stand_in.wait_for(
        lambda _: stand_in.api("chat.postEphemeral")[:2]
        if len(stand_in.api("chat.postEphemeral")) >= 2 else [])
    assert usage.args["text"].startswith("Usage: /ask QUESTION")
    assert no_photo.args["text"].startswith("Share a photo of a car in this channel first")
    assert not stand_in.api("chat.postMessage")


async def test_the_message_shortcut_asks_about_that_messages_photo(
    app, stand_in, worker, vehicle_photos
):
    photo = stand_in.serve_file("car.jpg", vehicle_photos[3].read_bytes(), "image/jpeg")
    message = {"type": "message", "user": "U0BOB", "ts": next_ts(), "text": "my car",
               "files": [photo]}
    await dispatch(app, message_shortcut(ASK_ABOUT_PHOTO, message))
    modal = await opened_modal(stand_in)
    assert await submit(app, view_submission(modal, {"question": "what tyres?"})) == {}
    status, answer = await stand_in.wait_for(lambda _: posted_messages(stand_in, at_least=2))
    assert status.args["thread_ts"] == answer.args["thread_ts"] == message["ts"]
    assert answer.args["text"] == "Fake answer to: what tyres?"


async def test_the_message_shortcut_on_a_message_without_a_photo_says_so(app, stand_in):
    message = {"type": "message", "user": "U0BOB", "ts": next_ts(), "text": "hello"}
    await dispatch(app, message_shortcut(ASK_ABOUT_PHOTO, message))
    [error] = await stand_in.wait_for(lambda _: stand_in.api("chat.postEphemeral"))
    assert error.args["text"] == "That message has no photo to ask about."
    assert not stand_in.api("views.open")


async def test_a_builds_progress_is_edited_into_the_message_that_becomes_the_mosaic(
    app, stand_in, ctx, car_library
):
    target = stand_in.serve_file("owl.png", fox_image(90), "image/png")
    stand_in.history = [{"type": "message", "user": USER, "ts": next_ts(), "files": [target]}]
    await dispatch(app, slash_command("build owl 8"))
    [(complete, _raw)] = await stand_in.wait_for(lambda _: stand_in.uploaded())
    [status] = stand_in.api("chat.postMessage")
    edits = [c for c in stand_in.api("chat.update") if c.args["ts"] == status.response["ts"]]
    texts = [status.args["text"]] + [e.args["text"] for e in edits]
    # Lines the chat was too slow for are skipped; the last stage always shows.
    assert all(text.startswith("Building owl: ") for text in texts[:-1])
    assert texts[-2] == "Building owl: rendering the mosaic."
    assert texts[-1].startswith("Built owl: 8x8 tiles")
    assert set(buttons(edits[-1])) == {PICK_TILE, RANDOM_TILE}
    assert complete.args["thread_ts"] == status.response["ts"]
    with ctx.db.session() as session:
        assert mosaic_for_message(session, "slack", CHANNEL, status.response["ts"]).name == "owl"


async def test_a_build_that_fails_leaves_no_public_message(app, stand_in, car_library):
    target = stand_in.serve_file("fox.png", fox_image(90), "image/png")
    stand_in.history = [{"type": "message", "user": USER, "ts": next_ts(), "files": [target]}]
    await dispatch(app, slash_command("build " + "x" * 81))
    [error] = await stand_in.wait_for(lambda _: stand_in.api("chat.postEphemeral"))
    assert error.args["text"] == "A mosaic name needs 1 to 80 characters."
    assert not stand_in.api("chat.postMessage") and not stand_in.api("chat.update")


async def test_a_channel_the_app_is_not_in_gets_an_invite_hint(app, stand_in):
    stand_in.history_error = "not_in_channel"
    await dispatch(app, slash_command("build owl"))
    await dispatch(app, slash_command("what car?", command="/ask"))
    errors = await stand_in.wait_for(
        lambda _: stand_in.api("chat.postEphemeral")
        if len(stand_in.api("chat.postEphemeral")) >= 2 else [])
    hint = "I cannot read this channel: invite me first (/invite @TalkMosaic), then try again."
    assert [e.args["text"] for e in errors] == [hint, hint]
