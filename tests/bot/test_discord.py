"""The Discord adapter, driven as Discord drives it: raw INTERACTION_CREATE and MESSAGE_CREATE
payloads fed to a real discord.py client whose REST calls go to a local stand-in that records
them (interaction callbacks, follow-ups with multipart files, message edits).
"""

import asyncio
from datetime import UTC, datetime, timedelta

from discord.utils import time_snowflake

from bot.discord_bot import DEFAULT_QUESTION, TalkMosaicBot
from core.mosaic import preview_image
from storage.messages import job_for_answer_message, mosaic_for_message
from storage.models import FollowUp, Job
from tests.bot.conftest import MOSAIC_NAME, car_at, fox_image
from tests.bot.discord_stand_in import (
    APP_ID,
    BOT_ID,
    CHANNEL_ID,
    EPHEMERAL,
    USER_ID,
    answer_text,
    assert_acknowledged_first,
    attachment_payload,
    channel_posts,
    dispatch_interaction,
    followups,
    interaction_payload,
    labels,
    mentioning_the_bot,
    message_payload,
    original_with_files,
    served_attachment,
    slash,
    snowflake,
    user_payload,
    webhook_calls,
)


async def show_mosaic(bot, stand_in) -> tuple[str, object]:
    token, dispatched = dispatch_interaction(
        bot, slash("mosaic", "show", [{"name": "name", "type": 3, "value": MOSAIC_NAME}])
    )
    [posted] = await stand_in.wait_for(lambda _: followups(stand_in, token))
    assert_acknowledged_first(stand_in, token, dispatched)
    return token, posted


async def test_login_syncs_the_commands_globally_without_a_guild(bot, stand_in):
    assert stand_in.api("PUT", f"/applications/{APP_ID}/commands")
    names = {command.name for command in bot.tree.get_commands()}
    assert names == {"mosaic", "ask", "help", "Ask TalkMosaic"}


async def test_guild_sync_in_development(stand_in, commands, updates):
    client = TalkMosaicBot(commands, updates, guild_id=1234)
    await client.login("test-token")
    await client.close()
    assert stand_in.api("PUT", f"/applications/{APP_ID}/guilds/1234/commands")


async def test_show_defers_then_attaches_the_mosaic_and_remembers_the_message(
    bot, stand_in, ctx, mosaic
):
    _token, posted = await show_mosaic(bot, stand_in)
    [(name, data)] = posted.files
    assert name == f"{MOSAIC_NAME}.jpg"
    assert data == preview_image(ctx, mosaic, ctx.settings.preview_max_bytes)
    assert "A1 to J10" in posted.content
    await asyncio.sleep(0.2)  # the message is remembered right after the follow-up returns
    with ctx.db.session() as session:
        shown = mosaic_for_message(session, "discord", str(CHANNEL_ID), posted.response["id"])
    assert shown is not None and shown.id == mosaic.id


async def test_preview_fits_the_interaction_filesize_limit(bot, stand_in, mosaic):
    limit = 20_000
    token, _ = dispatch_interaction(
        bot, slash("mosaic", "show", [{"name": "name", "type": 3, "value": MOSAIC_NAME}]),
        limit=limit,
    )
    [posted] = await stand_in.wait_for(lambda _: followups(stand_in, token))
    assert 0 < len(posted.files[0][1]) <= limit


async def test_build_downloads_the_target_after_deferring_and_attaches_the_mosaic(
    bot, stand_in, car_library
):
    target = fox_image(90)
    stand_in.serve_file("owl.png", target, "image/png")
    attachment = attachment_payload(stand_in.base_url, "owl.png", len(target), "image/png")
    data = slash(
        "mosaic", "build",
        [{"name": "target", "type": 11, "value": attachment["id"]},
         {"name": "name", "type": 3, "value": "owl"},
         {"name": "columns", "type": 4, "value": 8}],
        resolved={"attachments": {attachment["id"]: attachment}},
    )
    token, dispatched = dispatch_interaction(bot, data)
    posted = await stand_in.wait_for(lambda _: original_with_files(stand_in, token))
    assert_acknowledged_first(stand_in, token, dispatched)
    assert posted.content.startswith("Built owl: 8x8 tiles")
    assert posted.files and posted.files[0][1][:3] == b"\xff\xd8\xff"
    assert labels(posted.payload) == ["Pick a tile", "Random tile"]


async def test_replying_c7_to_a_mosaic_returns_that_cars_photo(bot, stand_in, ctx, mosaic):
    _token, posted = await show_mosaic(bot, stand_in)
    await asyncio.sleep(0.2)
    reply = message_payload("C7", reference=posted.response["id"])
    bot._connection.parse_message_create(reply)
    [answer] = await stand_in.wait_for(lambda _: channel_posts(stand_in))
    assert answer.path.endswith("/messages")
    [(name, data)] = answer.files
    assert data == car_at(ctx, mosaic, row=6, col=2)
    assert name == f"{MOSAIC_NAME}-C7.jpg"
    assert answer.content.startswith(f"C7 of {MOSAIC_NAME}:")
    assert str(answer.payload["message_reference"]["message_id"]) == reply["id"]


async def test_a_coordinate_reply_to_another_message_is_ignored(bot, stand_in, mosaic):
    bot._connection.parse_message_create(message_payload("C7", reference=snowflake()))
    bot._connection.parse_message_create(message_payload("ping"))
    await show_mosaic(bot, stand_in)  # something to wait for
    assert not stand_in.api("POST", "/channels/")


async def test_tile_command_with_a_bad_coordinate_is_one_ephemeral_sentence(
    bot, stand_in, mosaic
):
    token, dispatched = dispatch_interaction(bot, slash("mosaic", "tile", [
        {"name": "name", "type": 3, "value": MOSAIC_NAME},
        {"name": "coordinate", "type": 3, "value": "Z99"},
    ]))
    [error] = await stand_in.wait_for(lambda _: followups(stand_in, token))
    assert_acknowledged_first(stand_in, token, dispatched)
    # The public "thinking" message goes, so the error can be private.
    assert any(c.method == "DELETE" and c.path.endswith("/messages/@original")
               for c in webhook_calls(stand_in, token))
    assert error.flags & EPHEMERAL
    assert error.files == []
    assert error.content.startswith("Z99 is off the grid")
    assert error.content.count(".") == 1 and "Traceback" not in error.content


async def test_tile_command_returns_the_car(bot, stand_in, ctx, mosaic):
    token, _ = dispatch_interaction(bot, slash("mosaic", "tile", [
        {"name": "name", "type": 3, "value": MOSAIC_NAME},
        {"name": "coordinate", "type": 3, "value": "b3"},
    ]))
    [posted] = await stand_in.wait_for(lambda _: followups(stand_in, token))
    assert posted.files[0][1] == car_at(ctx, mosaic, row=2, col=1)
    assert not posted.flags & EPHEMERAL


async def test_unknown_mosaic_is_an_ephemeral_error(bot, stand_in, mosaic):
    token, _ = dispatch_interaction(
        bot, slash("mosaic", "show", [{"name": "name", "type": 3, "value": "unicorn"}])
    )
    [error] = await stand_in.wait_for(lambda _: followups(stand_in, token))
    assert error.flags & EPHEMERAL
    assert error.content == 'There is no mosaic named "unicorn" here.'


async def test_list_names_the_mosaics(bot, stand_in, mosaic):
    token, _ = dispatch_interaction(bot, slash("mosaic", "list", []))
    [posted] = await stand_in.wait_for(lambda _: followups(stand_in, token))
    assert f"{MOSAIC_NAME} (10x10 tiles)" in posted.content


def ask_data(stand_in, photo: bytes, content_type: str, question: str) -> dict:
    attachment = served_attachment(stand_in, photo, content_type)
    return slash(None, "ask", [
        {"name": "photo", "type": 11, "value": attachment["id"]},
        {"name": "question", "type": 3, "value": question},
    ], resolved={"attachments": {attachment["id"]: attachment}})


async def test_ask_posts_the_queue_position_then_the_answer(
    bot, stand_in, worker, vehicle_photos
):
    photo = vehicle_photos[0].read_bytes()
    token, dispatched = dispatch_interaction(
        bot, ask_data(stand_in, photo, "image/jpeg", "Which parts of this car pollute?")
    )
    [answer] = await stand_in.wait_for(lambda _: followups(stand_in, token))
    assert_acknowledged_first(stand_in, token, dispatched)
    edits = [c for c in webhook_calls(stand_in, token)
             if c.method == "PATCH" and c.path.endswith("/messages/@original")]
    assert "next in line" in edits[0].content or "in the queue" in edits[0].content
    assert edits[0].at < answer.at
    assert answer_text(answer) == "Fake answer to: Which parts of this car pollute?"


async def test_ask_refuses_a_file_that_is_not_an_image(bot, stand_in, worker):
    token, _ = dispatch_interaction(
        bot, ask_data(stand_in, b"%PDF-1.7 not a photo", "application/pdf", "What is it?")
    )
    [error] = await stand_in.wait_for(lambda _: followups(stand_in, token))
    assert error.flags & EPHEMERAL
    assert "not an image" in error.content
    assert not [c for c in stand_in.calls if c.path.startswith("/cdn/")]


async def test_ask_refuses_a_photo_over_the_upload_limit_without_downloading_it(
    bot, stand_in, ctx, worker, vehicle_photos
):
    data = ask_data(stand_in, vehicle_photos[0].read_bytes(), "image/jpeg", "What is it?")
    [attachment] = data["resolved"]["attachments"].values()
    attachment["size"] = ctx.settings.max_upload_bytes + 1  # as Discord announces it
    token, _ = dispatch_interaction(bot, data)
    [error] = await stand_in.wait_for(lambda _: followups(stand_in, token))
    assert error.flags & EPHEMERAL
    assert error.content == "That image is over the 20 MiB upload limit."
    assert not [c for c in stand_in.calls if c.path.startswith("/cdn/")]


async def test_context_menu_asks_about_the_photo_in_a_message(
    bot, stand_in, worker, vehicle_photos
):
    target = message_payload(
        "what emission standard does it meet?",
        attachments=[served_attachment(stand_in, vehicle_photos[1].read_bytes())],
    )
    data = {"id": snowflake(), "name": "Ask TalkMosaic", "type": 3, "target_id": target["id"],
            "resolved": {"messages": {target["id"]: target}}}
    token, dispatched = dispatch_interaction(bot, data)
    [answer] = await stand_in.wait_for(lambda _: followups(stand_in, token))
    assert_acknowledged_first(stand_in, token, dispatched)
    assert answer_text(answer) == "Fake answer to: what emission standard does it meet?"


async def test_a_photo_with_a_question_mentioning_the_bot_is_queued_and_answered(
    bot, stand_in, worker, vehicle_photos
):
    photo = served_attachment(stand_in, vehicle_photos[2].read_bytes())
    asked = mentioning_the_bot("what tyre should I buy?", [photo])
    bot._connection.parse_message_create(asked)
    status, answer = await stand_in.wait_for(lambda _: channel_posts(stand_in, at_least=2))
    assert "next in line" in status.content or "in the queue" in status.content
    assert answer_text(answer) == "Fake answer to: what tyre should I buy?"
    assert str(answer.payload["message_reference"]["message_id"]) == asked["id"]


async def test_a_file_that_is_not_an_image_mentioning_the_bot_is_one_sentence(bot, stand_in):
    pdf = attachment_payload(stand_in.base_url, "doc.pdf", 8, "application/pdf")
    bot._connection.parse_message_create(mentioning_the_bot("what car is this?", [pdf]))
    [reply] = await stand_in.wait_for(lambda _: channel_posts(stand_in))
    assert reply.content == "That file is not an image: send a JPEG, PNG or WebP photo."
    assert not [c for c in stand_in.calls if c.path.startswith("/cdn/")]


async def test_a_photo_mentioning_the_bot_without_a_question_asks_the_default_one(
    bot, stand_in, worker, vehicle_photos
):
    photo = served_attachment(stand_in, vehicle_photos[2].read_bytes())
    bot._connection.parse_message_create(mentioning_the_bot("", [photo]))
    _status, answer = await stand_in.wait_for(lambda _: channel_posts(stand_in, at_least=2))
    assert answer_text(answer) == f"Fake answer to: {DEFAULT_QUESTION}"


async def test_messages_from_bots_are_ignored(bot, stand_in, mosaic):
    bot._connection.parse_message_create(
        message_payload("C7", author=user_payload(BOT_ID, "talkmosaic", bot=True),
                        reference=snowflake())
    )
    await show_mosaic(bot, stand_in)
    assert not stand_in.api("POST", "/channels/")


async def test_an_answer_after_the_interaction_token_expired_goes_to_the_channel(
    bot, stand_in, worker, vehicle_photos
):
    data = ask_data(stand_in, vehicle_photos[3].read_bytes(), "image/jpeg", "Which fuel?")
    payload = interaction_payload(data)
    payload["id"] = str(time_snowflake(datetime.now(UTC) - timedelta(minutes=16)))
    bot._connection.parse_interaction_create(payload)
    [answer] = await stand_in.wait_for(lambda _: channel_posts(stand_in))
    assert answer.content == f"<@{USER_ID}>"
    assert answer_text(answer) == "Fake answer to: Which fuel?"
    assert not followups(stand_in, payload["token"])


async def test_an_unexpected_failure_is_one_ephemeral_sentence(bot, stand_in, monkeypatch):
    async def broken(*_args):
        raise RuntimeError("database on fire")

    monkeypatch.setattr(bot.commands, "tile", broken)
    token, _ = dispatch_interaction(bot, slash("mosaic", "tile", [
        {"name": "name", "type": 3, "value": MOSAIC_NAME},
        {"name": "coordinate", "type": 3, "value": "C7"},
    ]))
    [error] = await stand_in.wait_for(lambda _: followups(stand_in, token))
    assert error.flags & EPHEMERAL
    assert error.content == "Something went wrong on our side; please try again later."


async def test_an_unexpected_failure_on_a_coordinate_reply_is_one_sentence(
    bot, stand_in, monkeypatch
):
    async def broken(*_args):
        raise RuntimeError("database on fire")

    monkeypatch.setattr(bot.commands, "tile_for_message", broken)
    bot._connection.parse_message_create(message_payload("C7", reference=snowflake()))
    [reply] = await stand_in.wait_for(lambda _: channel_posts(stand_in))
    assert reply.content == "Something went wrong on our side; please try again later."


async def remembered_answer(ctx, message_id: str) -> int:
    """The job whose answer a posted message shows, once the bot has remembered it."""
    async with asyncio.timeout(10):
        while True:
            with ctx.db.session() as session:
                job_id = job_for_answer_message(session, "discord", str(CHANNEL_ID), message_id)
            if job_id is not None:
                return job_id
            await asyncio.sleep(0.02)


def follow_up_of(ctx, job_id: int) -> int | None:
    with ctx.db.session() as session:
        link = session.get(FollowUp, job_id)
        return None if link is None else link.parent_job_id


async def test_a_reply_to_the_bots_answer_is_a_follow_up_about_the_same_photo(
    bot, stand_in, ctx, worker, vehicle_photos
):
    photo = served_attachment(stand_in, vehicle_photos[2].read_bytes())
    bot._connection.parse_message_create(mentioning_the_bot("what tyre should I buy?", [photo]))
    _status, answer = await stand_in.wait_for(lambda _: channel_posts(stand_in, at_least=2))
    first = await remembered_answer(ctx, answer.response["id"])
    downloads = len([c for c in stand_in.calls if c.path.startswith("/cdn/")])

    follow_up = message_payload("and how long do they last?", reference=answer.response["id"])
    bot._connection.parse_message_create(follow_up)
    posts = await stand_in.wait_for(lambda _: channel_posts(stand_in, at_least=4))
    status, second_answer = posts[2], posts[3]
    assert "next in line" in status.content or "in the queue" in status.content
    assert answer_text(second_answer) == "Fake answer to: and how long do they last?"
    assert str(second_answer.payload["message_reference"]["message_id"]) == follow_up["id"]
    second = await remembered_answer(ctx, second_answer.response["id"])
    assert follow_up_of(ctx, second) == first
    with ctx.db.session() as session:
        assert session.get(Job, second).image_sha256 == session.get(Job, first).image_sha256
    assert len([c for c in stand_in.calls if c.path.startswith("/cdn/")]) == downloads


async def test_the_answer_to_a_slash_command_can_be_followed_up(
    bot, stand_in, ctx, worker, vehicle_photos
):
    token, _ = dispatch_interaction(
        bot, ask_data(stand_in, vehicle_photos[0].read_bytes(), "image/jpeg", "Which fuel?")
    )
    [answer] = await stand_in.wait_for(lambda _: followups(stand_in, token))
    first = await remembered_answer(ctx, answer.response["id"])
    bot._connection.parse_message_create(
        message_payload("is it a hybrid?", reference=answer.response["id"])
    )
    _status, second_answer = await stand_in.wait_for(lambda _: channel_posts(stand_in, 2))
    assert answer_text(second_answer) == "Fake answer to: is it a hybrid?"
    assert follow_up_of(ctx, await remembered_answer(ctx, second_answer.response["id"])) == first


async def test_a_follow_up_with_a_file_that_is_not_an_image_is_one_sentence(
    bot, stand_in, ctx, worker, vehicle_photos
):
    photo = served_attachment(stand_in, vehicle_photos[2].read_bytes())
    bot._connection.parse_message_create(mentioning_the_bot("what tyre?", [photo]))
    _status, answer = await stand_in.wait_for(lambda _: channel_posts(stand_in, at_least=2))
    await remembered_answer(ctx, answer.response["id"])
    pdf = attachment_payload(stand_in.base_url, "doc.pdf", 8, "application/pdf")
    bot._connection.parse_message_create(
        message_payload("and this?", reference=answer.response["id"], attachments=[pdf])
    )
    posts = await stand_in.wait_for(lambda _: channel_posts(stand_in, at_least=3))
    assert posts[2].content == "That file is not an image: send a JPEG, PNG or WebP photo."
    with ctx.db.session() as session:
        assert session.query(Job).count() == 1
