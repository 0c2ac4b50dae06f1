"""Slack, several hosts: an answer that a worker in another process finished reaches the thread
that asked, once, through the gateway's poll (the Discord case is in
test_answers_from_other_workers.py)."""

from tests.bot.slack_stand_in import BOT_USER, event_callback
from tests.bot.test_answers_from_other_workers import other_host_answers
from tests.bot.test_slack import (  # noqa: F401 - fixtures
    ack_times,
    app,
    dispatch,
    mention,
    posted_messages,
    stand_in,
)


async def test_slack_gets_another_hosts_answer_once_in_its_thread(
    settings, app, stand_in, updates, vehicle_photos, tmp_path  # noqa: F811
):
    photo = stand_in.serve_file("car.jpg", vehicle_photos[0].read_bytes(), "image/jpeg")
    event = mention(stand_in, f"<@{BOT_USER}> which parts of this car pollute?", [photo])
    await dispatch(app, event_callback(event))
    [status] = await stand_in.wait_for(lambda _: posted_messages(stand_in, at_least=1))
    await other_host_answers(settings, tmp_path)

    assert await updates.post_finished() == 1
    _, answer = await stand_in.wait_for(lambda _: posted_messages(stand_in, at_least=2))
    assert answer.args["thread_ts"] == event["ts"]
    assert answer.args["text"].startswith("answer ") and answer.args["text"].endswith(
        " by other-host")
    assert await updates.post_finished() == 0
    assert len(stand_in.api("chat.postMessage")) == 2
