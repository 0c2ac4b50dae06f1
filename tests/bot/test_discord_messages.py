"""Discord attachments and plain messages: downloads capped while they are read and sniffed
whatever their content type claims, error replies to messages as private as a message can be,
the message menu and a mention behaving alike, and the sharded client.
"""

import io

import discord
import pytest
from PIL import Image

from bot.commands import NOT_AN_IMAGE
from bot.discord_bot import (
    DEFAULT_QUESTION,
    NO_PHOTO_HERE,
    ShardedTalkMosaicBot,
    TalkMosaicBot,
    discord_bot,
)
from storage.media import sha256_hex
from storage.models import Job
from tests.bot.discord_stand_in import (
    APP_ID,
    CAR_JPEG,
    CHANNEL_ID,
    EPHEMERAL,
    answer_text,
    attachment_payload,
    callback,
    channel_posts,
    dispatch_interaction,
    followups,
    mentioning_the_bot,
    message_payload,
    slash,
    snowflake,
)

MIB = 1024 * 1024


def big_photo(vehicle_photos, side: int = 2200) -> bytes:
    """A real car photo enlarged to a few MB, as a phone would send it."""
    image = Image.open(vehicle_photos[5]).convert("RGB").resize((side, side))
    grain = Image.effect_noise((side, side), 40).convert("RGB")
    out = io.BytesIO()
    Image.blend(image, grain, 0.25).save(out, "JPEG", quality=97)
    return out.getvalue()


def jobs(ctx) -> list[Job]:
    with ctx.db.session() as session:
        return session.query(Job).all()


def ask(stand_in, data: bytes, announced_type: str | None, *, chunked: bool = False,
        announced_size: int | None = None) -> dict:
    """/ask about an attachment served by the stand-in's CDN."""
    stand_in.serve_file(CAR_JPEG, data, announced_type or "application/octet-stream", chunked)
    attachment = attachment_payload(stand_in.base_url, CAR_JPEG,
                                    announced_size or len(data), announced_type)
    return slash(None, "ask", [
        {"name": "photo", "type": 11, "value": attachment["id"]},
        {"name": "question", "type": 3, "value": "Which fuel?"},
    ], resolved={"attachments": {attachment["id"]: attachment}})


async def only_followup(stand_in, token: str):
    [posted] = await stand_in.wait_for(lambda _: followups(stand_in, token))
    return posted


# Downloads -------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_download_past_the_cap_stops_with_one_sentence_whatever_size_was_announced(
    bot, stand_in, ctx, vehicle_photos, chunked
):
    photo = big_photo(vehicle_photos)
    ctx.settings.max_upload_bytes = 1 * MIB
    assert len(photo) > 2 * MIB
    token, _ = dispatch_interaction(
        bot, ask(stand_in, photo, "image/jpeg", chunked=chunked, announced_size=50_000)
    )
    error = await only_followup(stand_in, token)
    assert error.flags & EPHEMERAL
    assert error.content == "That image is over the 1 MiB upload limit."
    assert jobs(ctx) == []


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_photo_of_several_mb_is_read_whole(bot, stand_in, ctx, vehicle_photos, chunked):
    photo = big_photo(vehicle_photos)
    token, _ = dispatch_interaction(bot, ask(stand_in, photo, "image/jpeg", chunked=chunked))
    status = await stand_in.wait_for(
        lambda _: [c for c in stand_in.calls if token in c.path and c.method == "PATCH"]
    )
    assert "next in line" in status[0].content
    [job] = jobs(ctx)
    assert job.image_sha256 == sha256_hex(photo)


@pytest.mark.parametrize(
    ("announced", "data"),
    [(None, b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj"),
     ("image/png", b"<!DOCTYPE html><html><body>Sign in</body></html>"),
     ("image/jpeg", b"PK\x03\x04 a zip archive, not a photo")],
    ids=["no-content-type", "html-said-png", "zip-said-jpeg"],
)
async def test_bytes_that_are_not_an_image_are_refused_whatever_the_content_type(
    bot, stand_in, ctx, announced, data
):
    token, _ = dispatch_interaction(bot, ask(stand_in, data, announced))
    error = await only_followup(stand_in, token)
    assert error.flags & EPHEMERAL and error.content == NOT_AN_IMAGE
    assert jobs(ctx) == []


async def test_a_real_photo_without_a_content_type_is_answered(
    bot, stand_in, ctx, worker, vehicle_photos
):
    photo = vehicle_photos[7].read_bytes()
    stand_in.serve_file(CAR_JPEG, photo, "application/octet-stream")
    attachment = attachment_payload(stand_in.base_url, CAR_JPEG, len(photo), None)
    bot._connection.parse_message_create(mentioning_the_bot("which fuel?", [attachment]))
    _status, answer = await stand_in.wait_for(lambda _: channel_posts(stand_in, at_least=2))
    assert answer_text(answer) == "Fake answer to: which fuel?"
    assert jobs(ctx)[0].image_sha256 == sha256_hex(photo)


async def test_a_build_target_that_is_not_an_image_is_refused_before_building(
    bot, stand_in, ctx, car_library
):
    html = b"<html>not an owl</html>"
    stand_in.serve_file("owl.png", html, "text/html")
    attachment = attachment_payload(stand_in.base_url, "owl.png", len(html), None)
    token, _ = dispatch_interaction(bot, slash(
        "mosaic", "build", [{"name": "target", "type": 11, "value": attachment["id"]},
                            {"name": "name", "type": 3, "value": "owl"}],
        resolved={"attachments": {attachment["id"]: attachment}},
    ))
    error = await only_followup(stand_in, token)
    assert error.flags & EPHEMERAL and error.content == NOT_AN_IMAGE


# Errors on plain messages ----------------------------------------------------------------------


def deletions(stand_in, message_id: str) -> list:
    return stand_in.api("DELETE", f"/channels/{CHANNEL_ID}/messages/{message_id}")


async def test_an_error_reply_to_a_message_deletes_itself(bot, stand_in, ctx, mosaic):
    ctx.settings.discord_error_delete_after_s = 0.05
    shown = message_payload("", message_id=snowflake())
    await bot.commands.remember("discord", str(CHANNEL_ID), shown["id"], mosaic.id)
    bot._connection.parse_message_create(message_payload("Z99", reference=shown["id"]))
    [reply] = await stand_in.wait_for(lambda _: channel_posts(stand_in))
    assert reply.content.startswith("Z99 is off the grid")
    await stand_in.wait_for(lambda _: deletions(stand_in, reply.response["id"]))


async def test_a_tile_reply_to_a_message_stays(bot, stand_in, ctx, mosaic):
    ctx.settings.discord_error_delete_after_s = 0.05
    shown = message_payload("", message_id=snowflake())
    await bot.commands.remember("discord", str(CHANNEL_ID), shown["id"], mosaic.id)
    bot._connection.parse_message_create(message_payload("C7", reference=shown["id"]))
    bot._connection.parse_message_create(message_payload("Z99", reference=shown["id"]))
    posts = await stand_in.wait_for(lambda _: channel_posts(stand_in, at_least=2))
    [tile] = [post for post in posts if post.files]
    [error] = [post for post in posts if not post.files]
    await stand_in.wait_for(lambda _: deletions(stand_in, error.response["id"]))
    assert tile.content.startswith("C7 of") and not deletions(stand_in, tile.response["id"])


# The message menu and a mention behave alike -------------------------------------------------


def context_menu(target: dict) -> dict:
    return {"id": snowflake(), "name": "Ask TalkMosaic", "type": 3, "target_id": target["id"],
            "resolved": {"messages": {target["id"]: target}}}


async def both_ways(bot, stand_in, text: str, attachments: list[dict]) -> tuple:
    """The same message asked about through the message menu and by mentioning the bot: the
    bot's final word each way (the follow-up, and the second channel post or the only one)."""
    token, _ = dispatch_interaction(bot, context_menu(message_payload(text,
                                                                       attachments=attachments)))
    menu = (await stand_in.wait_for(lambda _: followups(stand_in, token)))[-1]
    bot._connection.parse_message_create(mentioning_the_bot(text, attachments))
    posts = await stand_in.wait_for(lambda _: channel_posts(stand_in))
    return menu, posts


async def test_a_photo_without_text_gets_the_default_question_either_way(
    bot, stand_in, worker, vehicle_photos
):
    photo = vehicle_photos[4].read_bytes()
    stand_in.serve_file(CAR_JPEG, photo, "image/jpeg")
    attachments = [attachment_payload(stand_in.base_url, CAR_JPEG, len(photo), "image/jpeg")]
    menu, _ = await both_ways(bot, stand_in, "", attachments)
    mention = (await stand_in.wait_for(lambda _: channel_posts(stand_in, at_least=2)))[1]
    assert answer_text(menu) == answer_text(mention) == f"Fake answer to: {DEFAULT_QUESTION}"


@pytest.mark.parametrize(
    ("attachments", "sentence"),
    [([], NO_PHOTO_HERE),
     ([{"id": "1", "filename": "doc.pdf", "size": 8, "url": "http://127.0.0.1:9/cdn/doc.pdf",
        "proxy_url": "http://127.0.0.1:9/cdn/doc.pdf", "content_type": "application/pdf"}],
      NOT_AN_IMAGE)],
    ids=["no-photo", "not-a-photo"],
)
async def test_a_message_without_a_photo_gets_the_same_private_sentence_either_way(
    bot, stand_in, ctx, attachments, sentence
):
    ctx.settings.discord_error_delete_after_s = 0.05
    menu, [mention] = await both_ways(bot, stand_in, "", attachments)
    assert menu.content == mention.content == sentence
    assert menu.flags & EPHEMERAL
    await stand_in.wait_for(lambda _: deletions(stand_in, mention.response["id"]))
    assert jobs(ctx) == []
    assert not [c for c in stand_in.calls if c.path.startswith("/cdn/")]


# Sharding --------------------------------------------------------------------------------------


def test_the_bot_is_one_connection_unless_sharding_is_asked_for(settings, commands, updates):
    assert type(discord_bot(settings, commands, updates)) is TalkMosaicBot
    sharded = discord_bot(settings.model_copy(update={"discord_sharded": True}), commands,
                          updates)
    assert isinstance(sharded, discord.AutoShardedClient) and sharded.shard_count is None


async def test_a_sharded_bot_logs_in_and_answers_interactions(
    stand_in, settings, commands, updates
):
    client = discord_bot(settings.model_copy(update={"discord_shard_count": 3}), commands,
                         updates)
    assert isinstance(client, ShardedTalkMosaicBot) and client.shard_count == 3
    await client.login("test-token")
    try:
        assert stand_in.api("PUT", f"/applications/{APP_ID}/commands")
        token, _ = dispatch_interaction(client, slash(None, "help", []))
        answer = await stand_in.wait_for(lambda _: callback(stand_in, token))
        assert answer.payload["data"]["flags"] & EPHEMERAL
    finally:
        await client.close()
