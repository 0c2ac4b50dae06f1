"""Chat replies link into the gallery when GALLERY_PUBLIC_URL says where it is: the mosaic
message to the mosaic's page, a tile reply to the page opened on that tile."""

from bot.commands import Commands, Cooldowns
from core.gallery import tile_url
from core.worker import JobQueue
from tests.web.test_gallery_zoom import mosaic  # noqa: F401 - the fixture


def _commands(ctx, public_url: str | None) -> Commands:
    ctx.settings.gallery_public_url = public_url
    return Commands(ctx, JobQueue(ctx), Cooldowns(0))


async def test_a_tile_reply_links_the_tile_in_the_gallery(ctx, mosaic):  # noqa: F811
    reply = await _commands(ctx, "https://mosaics.example.org/").tile(
        "local", "meadow", "c7", 8 * 1024 * 1024
    )
    assert reply.text.endswith(f"https://mosaics.example.org/m/{mosaic.id}/C7")


async def test_the_mosaic_message_links_its_gallery_page(ctx, mosaic):  # noqa: F811
    reply = await _commands(ctx, "https://mosaics.example.org").show(
        "local", "alice", "meadow", 8 * 1024 * 1024
    )
    assert reply.text.endswith(f"https://mosaics.example.org/m/{mosaic.id}")
    assert reply.mosaic_id == mosaic.id


async def test_without_a_public_url_replies_carry_no_link(ctx, mosaic):  # noqa: F811
    reply = await _commands(ctx, None).tile("local", "meadow", "C7", 8 * 1024 * 1024)
    assert "http" not in reply.text
    assert tile_url(ctx.settings, mosaic.id, "C7") is None
