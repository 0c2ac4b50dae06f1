"""Slack `url_private` downloads: whole multi-megabyte photos over chunked and Content-Length
responses, a byte cap on the body itself, and the bot token sent only to Slack's file hosts.
"""

import functools
import io

import pytest
from PIL import Image

from bot.slack_app import SlackFiles
from core.errors import BadImage
from core.images import decode_image
from tests.bot.slack_stand_in import BOT_TOKEN, SlackStandIn
from tests.conftest import VEHICLES

MIB = 1024 * 1024


@functools.cache
def big_photo(megabytes: float) -> bytes:
    """A camera-sized JPEG of at least `megabytes` MiB made of real car photos side by side
    (real detail: an upscaled single photo compresses too well to reach a real photo's size)."""
    paths = sorted(VEHICLES.glob("*/*.jpg"))
    if not paths:
        pytest.skip("../shared/data/vehicles is not beside the project")
    across = 16
    while True:
        down = across * 3 // 4
        sheet = Image.new("RGB", (across * 100, down * 100))
        for n in range(across * down):
            car = Image.open(paths[n % len(paths)]).convert("RGB").resize((100, 100))
            sheet.paste(car, (n % across * 100, n // across * 100))
        out = io.BytesIO()
        sheet.save(out, "JPEG", quality=98, subsampling=0)
        if out.tell() >= megabytes * MIB:
            return out.getvalue()
        across += 2


@pytest.fixture
async def stand_in():
    server = await SlackStandIn().start()
    yield server
    await server.stop()


@pytest.fixture
async def other_host():
    """A server on another loopback address: "another host" than the Slack file host."""
    server = await SlackStandIn().start(host="127.0.0.2")
    yield server
    await server.stop()


@pytest.fixture
async def files():
    downloader = SlackFiles(BOT_TOKEN, 20 * MIB, file_hosts=["127.0.0.1"])
    yield downloader
    await downloader.close()


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
@pytest.mark.parametrize("megabytes", [2.2, 5.0, 8.0])
async def test_a_camera_sized_photo_downloads_whole(stand_in, files, vehicle_photos, chunked,
                                                    megabytes):
    photo = big_photo(megabytes)
    assert megabytes * MIB <= len(photo) <= 10 * MIB
    file = stand_in.serve_file("car.jpg", photo, "image/jpeg", chunked=chunked)
    data = await files.download(file)
    assert data == photo
    assert decode_image(data, 40_000_000).size == Image.open(io.BytesIO(photo)).size


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
async def test_a_body_past_the_cap_is_one_sentence(stand_in, vehicle_photos, chunked):
    photo = big_photo(3.0)
    downloader = SlackFiles(BOT_TOKEN, 2 * MIB, file_hosts=["127.0.0.1"])
    # Slack's announced size can be wrong (or missing): the body itself is what is capped.
    file = {**stand_in.serve_file("car.jpg", photo, "image/jpeg", chunked=chunked), "size": None}
    try:
        with pytest.raises(BadImage) as refused:
            await downloader.download(file)
    finally:
        await downloader.close()
    assert str(refused.value) == "That image is over the 2 MiB upload limit."


async def test_the_token_is_not_sent_to_a_host_that_is_not_slacks(stand_in, other_host, files):
    file = other_host.serve_file("car.jpg", b"\xff\xd8\xff", "image/jpeg")
    with pytest.raises(BadImage) as refused:
        await files.download(file)
    assert str(refused.value) == "That file is not stored by Slack, so it was not downloaded."
    assert other_host.calls == []


async def test_a_redirect_to_another_host_goes_without_the_token(
    stand_in, other_host, files, vehicle_photos
):
    elsewhere = other_host.serve_file("car.jpg", vehicle_photos[0].read_bytes(), "image/jpeg")
    stand_in.redirect_file("car.jpg", elsewhere["url_private"])
    file = {**elsewhere, "url_private": f"{stand_in.base_url}/files/car.jpg"}
    with pytest.raises(BadImage) as refused:
        await files.download(file)
    # The other host wanted the token (it answers its sign-in page), and never saw it.
    assert "could not be downloaded as an image" in str(refused.value)
    [first] = stand_in.calls
    assert first.headers["Authorization"] == f"Bearer {BOT_TOKEN}"
    [followed] = other_host.calls
    assert "Authorization" not in followed.headers


async def test_a_redirect_within_slacks_file_hosts_keeps_the_token(stand_in, files,
                                                                   vehicle_photos):
    photo = vehicle_photos[0].read_bytes()
    stand_in.serve_file("origin.jpg", photo, "image/jpeg")
    stand_in.redirect_file("car.jpg", "/files/origin.jpg")
    file = {"id": "F1", "mimetype": "image/jpeg", "size": len(photo),
            "url_private": f"{stand_in.base_url}/files/car.jpg"}
    assert await files.download(file) == photo
    assert [c.headers["Authorization"] for c in stand_in.calls] == [f"Bearer {BOT_TOKEN}"] * 2


async def test_plain_http_to_a_listed_host_that_is_not_loopback_is_refused(stand_in):
    downloader = SlackFiles(BOT_TOKEN, MIB, file_hosts=["files.slack.com"])
    file = {"id": "F1", "mimetype": "image/jpeg", "size": 10,
            "url_private": "http://files.slack.com/files-pri/T1-F1/car.jpg"}
    with pytest.raises(BadImage, match="not stored by Slack"):
        await downloader.download(file)
    await downloader.close()
