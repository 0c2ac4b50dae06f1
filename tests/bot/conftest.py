"""A real car library (the shared vehicle photos), a built mosaic, the command layer, a job
queue whose worker answers with a fast fake function (the real pipeline is tested elsewhere),
and a Discord bot logged in against the local Discord stand-in.
"""

import asyncio
import io

import discord
import pytest
from PIL import Image, ImageDraw
from sqlalchemy import select

from bot.commands import Commands, Cooldowns, JobUpdates
from bot.discord_bot import TalkMosaicBot
from core.library import add_car_photo
from core.mosaic import MosaicOptions, build_mosaic
from core.worker import AnswerResult, JobQueue, JobView, Worker
from storage.models import Car, Mosaic, Tile
from tests.bot.discord_stand_in import DiscordStandIn

MOSAIC_NAME = "fox"


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def fox_image(size: int = 120) -> bytes:
    """An orange 'fox' head on green: enough shape for a 10 x 10 grid."""
    image = Image.new("RGB", (size, size), (40, 110, 60))
    draw = ImageDraw.Draw(image)
    draw.polygon([(20, 30), (60, 100), (100, 30), (60, 50)], fill=(220, 120, 30))
    draw.ellipse((50, 70, 70, 90), fill=(30, 30, 30))
    return png(image)


def car_at(ctx, mosaic: Mosaic, row: int, col: int) -> bytes:
    """The original photo bytes of the car behind (row, col)."""
    with ctx.db.session() as session:
        key = session.scalar(
            select(Car.media_key)
            .join(Tile, Tile.car_id == Car.id)
            .where(Tile.mosaic_id == mosaic.id, Tile.row == row, Tile.col == col)
        )
    return ctx.media.read(key)


@pytest.fixture
def car_library(ctx, vehicle_photos) -> int:
    chosen = vehicle_photos[::25]
    for path in chosen:
        add_car_photo(ctx, path.read_bytes(), path.name, {"source": "Zenodo 6634554"})
    return len(chosen)


@pytest.fixture
def mosaic(ctx, car_library) -> Mosaic:
    # Built from the CLI scope, so every chat sees it.
    return build_mosaic(ctx, fox_image(), MOSAIC_NAME, options=MosaicOptions(cols=10, tile_px=16))


def fake_answer(job: JobView, progress) -> AnswerResult:
    progress("Looking at your photo.")
    return AnswerResult(f"Fake answer to: {job.question}")


@pytest.fixture
def queue(ctx) -> JobQueue:
    return JobQueue(ctx, max_pending=100, per_user=50)


@pytest.fixture
def updates(queue) -> JobUpdates:
    return JobUpdates(queue)


@pytest.fixture
def commands(ctx, queue) -> Commands:
    return Commands(ctx, queue, Cooldowns(0))


@pytest.fixture
async def worker(ctx, updates):
    worker = Worker(ctx, fake_answer, on_update=updates, poll_s=0.05)
    task = asyncio.create_task(worker.run_forever())
    yield worker
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
async def stand_in(monkeypatch):
    """The Discord stand-in, with discord.py's REST calls pointed at it (the Slack tests define
    their own `stand_in`)."""
    server = await DiscordStandIn().start()
    monkeypatch.setattr(discord.http.Route, "BASE", f"{server.base_url}/api/v10")
    yield server
    await server.stop()


@pytest.fixture
async def bot(stand_in, commands, updates):
    """A logged-in Discord bot; tests feed it gateway payloads through `bot._connection`."""
    client = TalkMosaicBot(commands, updates, guild_id=None)
    await client.login("test-token")
    yield client
    await client.close()
