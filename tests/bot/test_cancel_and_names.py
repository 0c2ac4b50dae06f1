"""Two command-layer services the chat buttons and autocomplete stand on: cancelling a question
that is still waiting, and the mosaic names offered while a user types."""

from core.mosaic import MosaicOptions, build_mosaic
from storage.models import Job
from tests.bot.conftest import MOSAIC_NAME, fox_image

QUESTION = "Which parts of this car pollute?"


def status_of(ctx, job_id: int) -> str:
    with ctx.db.session() as session:
        return session.get(Job, job_id).status


async def queued(commands, vehicle_photos, user: str = "42") -> int:
    reply = await commands.ask("discord", user, {"channel_id": "1"},
                               vehicle_photos[0].read_bytes(), QUESTION)
    assert reply.job_id is not None
    return reply.job_id


async def test_the_asker_cancels_a_question_no_worker_has_started(ctx, commands, vehicle_photos):
    job_id = await queued(commands, vehicle_photos)
    reply = await commands.cancel_question("discord", "42", job_id)
    assert (reply.text, reply.ephemeral) == ("Your question was cancelled.", False)
    assert status_of(ctx, job_id) == "cancelled"


async def test_someone_else_cannot_cancel_a_question(ctx, commands, vehicle_photos):
    job_id = await queued(commands, vehicle_photos)
    reply = await commands.cancel_question("discord", "43", job_id)
    assert reply.ephemeral
    assert reply.text == "Only the person who asked this question can cancel it."
    assert status_of(ctx, job_id) == "queued"


async def test_a_question_being_answered_is_not_cancelled(ctx, commands, queue, vehicle_photos):
    job_id = await queued(commands, vehicle_photos)
    with ctx.db.session() as session:
        session.get(Job, job_id).status = "running"
    reply = await commands.cancel_question("discord", "42", job_id)
    assert reply.ephemeral and "already being answered" in reply.text
    assert status_of(ctx, job_id) == "running"


async def test_a_question_of_another_platform_or_unknown_is_no_longer_waiting(
    commands, vehicle_photos
):
    job_id = await queued(commands, vehicle_photos)
    for platform, job in (("slack", job_id), ("discord", job_id + 100)):
        reply = await commands.cancel_question(platform, "42", job)
        assert reply.ephemeral and reply.text == "That question is no longer waiting."


async def test_autocomplete_offers_names_that_start_with_what_was_typed_first(
    ctx, commands, car_library
):
    options = MosaicOptions(cols=4, tile_px=8)
    for name in ("red fox", "fox cub", "arctic fox", "owl"):
        build_mosaic(ctx, fox_image(40), name, options=options)
    build_mosaic(ctx, fox_image(40), "fox of the server", scope="discord:1", options=options)
    assert await commands.mosaic_names("discord:1", "FOX") == [
        "fox of the server", "fox cub", "arctic fox", "red fox",
    ]
    assert await commands.mosaic_names("discord:2", "") == [
        "owl", "arctic fox", "fox cub", "red fox",
    ]
    assert await commands.mosaic_names("discord:2", "o", limit=2) == ["owl", "arctic fox"]
    assert MOSAIC_NAME not in await commands.mosaic_names("discord:2", "zebra")
