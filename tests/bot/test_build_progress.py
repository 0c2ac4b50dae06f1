"""A build's progress as chat sentences: one per stage quarter, in order, the newest kept when
the chat is slower than the build, and a chat that fails to show one does not fail the build."""

import asyncio

from bot.commands import _ProgressRelay
from tests.bot.conftest import fox_image

STAGES = [("matching", done, 8) for done in range(9)] + [("placing", done, 4) for done in range(5)]
EXPECTED = (
    [f"Building owl: matching cells to car photos, {p}%." for p in (0, 25, 50, 75, 100)]
    + [f"Building owl: placing the tiles, {p}%." for p in (0, 25, 50, 75)]
    + ["Building owl: rendering the mosaic."]
)


async def relayed(progress) -> None:
    relay = _ProgressRelay(asyncio.get_running_loop(), "owl", progress)

    def build() -> None:
        for stage in STAGES:
            relay(*stage)

    await asyncio.to_thread(build)
    await relay.close()


async def test_each_stage_quarter_is_one_sentence_in_order():
    heard: list[str] = []

    async def progress(text: str) -> None:
        heard.append(text)

    await relayed(progress)
    assert heard and heard[-1] == EXPECTED[-1]
    positions = [EXPECTED.index(text) for text in heard]
    assert positions == sorted(set(positions))


async def test_a_slow_chat_gets_the_newest_sentence_not_a_backlog():
    heard: list[str] = []
    release = asyncio.Event()

    async def progress(text: str) -> None:
        heard.append(text)
        await release.wait()

    relay = _ProgressRelay(asyncio.get_running_loop(), "owl", progress)
    relay(*STAGES[0])
    while not heard:
        await asyncio.sleep(0)
    await asyncio.to_thread(lambda: [relay(*stage) for stage in STAGES[1:]])
    await asyncio.sleep(0)
    release.set()
    await relay.close()
    assert heard == [EXPECTED[0], EXPECTED[-1]]


async def test_a_progress_line_that_fails_does_not_fail_the_build(commands, car_library):
    async def broken(_text: str) -> None:
        raise RuntimeError("chat.update refused")

    reply = await commands.build("slack:T1", "slack:U1", fox_image(90), "owl", 8, 8 << 20,
                                 progress=broken)
    assert reply.mosaic_id is not None and reply.text.startswith("Built owl: 8x8 tiles")
