"""Several hosts: a worker in another process (no chat tokens, no link to the gateway's
JobUpdates) finishes a job; the gateway's poll posts that answer to the chat exactly once, and
an answer of the gateway's own worker is still posted exactly once.
"""

import asyncio
import sys
from pathlib import Path

from sqlalchemy import select

from bot.commands import CANCELLED, POST_TRIES, JobUpdates, PostedAnswer
from core.worker import JobQueue, Worker
from storage.messages import job_for_answer_message
from storage.models import Job
from tests.bot.conftest import fake_answer
from tests.bot.discord_stand_in import (
    answer_text,
    dispatch_interaction,
    followups,
    webhook_calls,
)
from tests.bot.test_discord import ask_data

QUESTION = "Which parts of this car pollute?"


class RecordedStatus:
    """A status message: its edits and its one answer, posted as message "m-<job>"."""

    def __init__(self, job_ids: list[int]):
        self.job_ids = job_ids
        self.log: list[tuple[str, str]] = []

    async def update(self, text: str) -> None:
        self.log.append(("update", text))

    async def finish(self, text: str) -> PostedAnswer:
        self.log.append(("finish", text))
        return PostedAnswer("discord", "c1", f"m-{self.job_ids[-1]}")


async def other_host_answers(settings, tmp_path: Path, worker_id: str = "other-host") -> None:
    """A worker in its own process on the same database answers every queued job."""
    marks = tmp_path / "marks"
    marks.mkdir(exist_ok=True)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.worker.worker_process", str(settings.data_dir), str(marks),
        "--worker-id", worker_id, "--until-empty",
    )
    assert await process.wait() == 0


async def asked(commands, updates, photo: bytes) -> tuple[int, RecordedStatus]:
    job_ids: list[int] = []
    status = RecordedStatus(job_ids)

    async def show(text: str) -> RecordedStatus:
        return status

    reply = await updates.follow(commands.ask("discord", "u1", {"channel_id": "c1"}, photo,
                                              QUESTION), show)
    job_ids.append(reply.job_id)
    return reply.job_id, status


def finishes(status: RecordedStatus) -> list[str]:
    return [text for kind, text in status.log if kind == "finish"]


async def test_an_answer_from_a_worker_in_another_process_is_posted_once(
    settings, ctx, commands, updates, vehicle_photos, tmp_path
):
    updates.add_fallback("discord", _refusing_fallback)
    job_id, status = await asked(commands, updates, vehicle_photos[0].read_bytes())
    await other_host_answers(settings, tmp_path)

    assert await updates.post_finished() == 1
    assert finishes(status) == [f"answer {job_id} by other-host"]
    # Later polls, and a late event of any worker, post nothing more.
    assert await updates.post_finished() == 0
    await updates(job_id, "done", f"answer {job_id} by other-host")
    assert finishes(status) == [f"answer {job_id} by other-host"]
    # The posted answer can be followed up, as one from the gateway's own worker.
    with ctx.db.session() as session:
        assert job_for_answer_message(session, "discord", "c1", f"m-{job_id}") == job_id


async def _refusing_fallback(job: Job, text: str) -> None:
    raise AssertionError("a job with a live status must be answered through it")


async def test_a_worker_without_chat_tokens_leaves_the_answer_to_the_gateway(
    ctx, commands, updates, vehicle_photos
):
    updates.add_fallback("discord", _refusing_fallback)
    job_id, status = await asked(commands, updates, vehicle_photos[0].read_bytes())
    # A second Worker with its own JobUpdates and no platform to post to (`--no-gallery`, tokens
    # blank): it hears its own final event, but cannot post, so it must not mark the job.
    elsewhere = Worker(ctx, fake_answer, on_update=JobUpdates(JobQueue(ctx)), poll_s=0.05)
    assert (await elsewhere.run_once()).status == "done"
    assert finishes(status) == []

    assert await updates.post_finished() == 1
    assert finishes(status) == [f"Fake answer to: {QUESTION}"]


async def test_answers_finished_while_no_gateway_ran_are_posted_once_on_start(
    settings, ctx, queue, vehicle_photos, tmp_path
):
    photo = vehicle_photos[0].read_bytes()
    first = queue.submit("discord", "u1", {"channel_id": "c1"}, photo, QUESTION)
    second = queue.submit("slack", "U2", {"channel": "C2"}, photo, QUESTION)
    await other_host_answers(settings, tmp_path)
    posted: list[tuple[int, str]] = []

    async def fallback(job: Job, text: str) -> None:
        posted.append((job.id, text))

    restarted = JobUpdates(queue)  # a gateway started after the answers; Discord only
    restarted.add_fallback("discord", fallback)
    assert await restarted.post_finished() == 1
    assert posted == [(first.job_id, f"answer {first.job_id} by other-host")]
    # A second gateway process (or the next restart) finds nothing left to post.
    again = JobUpdates(queue)
    again.add_fallback("discord", fallback)
    assert await again.post_finished() == 0
    # The Slack answer waits for a process that can post to Slack.
    slack = JobUpdates(queue)
    slack.add_fallback("slack", fallback)
    assert await slack.post_finished() == 1
    assert posted[-1] == (second.job_id, f"answer {second.job_id} by other-host")


async def test_an_answer_the_chat_refused_is_tried_again_by_the_next_poll(
    settings, ctx, queue, vehicle_photos, tmp_path
):
    job = queue.submit("discord", "u1", {"channel_id": "c1"}, vehicle_photos[0].read_bytes(),
                       QUESTION)
    await other_host_answers(settings, tmp_path)
    tries: list[str] = []

    async def down_once(job: Job, text: str) -> None:
        tries.append(text)
        if len(tries) == 1:
            raise ConnectionError("Discord is unreachable")

    updates = JobUpdates(queue)
    updates.add_fallback("discord", down_once)
    assert await updates.post_finished() == 0
    assert await updates.post_finished() == 1
    assert await updates.post_finished() == 0
    assert tries == [f"answer {job.job_id} by other-host"] * 2


async def test_an_answer_the_chat_always_refuses_is_given_up_after_a_few_tries(
    settings, ctx, queue, vehicle_photos, tmp_path
):
    queue.submit("discord", "u1", {"channel_id": "c1"}, vehicle_photos[0].read_bytes(), QUESTION)
    await other_host_answers(settings, tmp_path)
    tries: list[str] = []

    async def gone(job: Job, text: str) -> None:
        tries.append(text)
        raise ConnectionError("Unknown Channel")

    updates = JobUpdates(queue)
    updates.add_fallback("discord", gone)
    for _ in range(POST_TRIES + 2):
        assert await updates.post_finished() == 0
    assert len(tries) == POST_TRIES


async def test_the_own_workers_answer_is_still_posted_once(
    commands, updates, worker, vehicle_photos
):
    updates.add_fallback("discord", _refusing_fallback)
    job_id, status = await asked(commands, updates, vehicle_photos[0].read_bytes())
    while not finishes(status):
        await asyncio.sleep(0.01)
    assert await updates.post_finished() == 0
    assert finishes(status) == [f"Fake answer to: {QUESTION}"]
    assert ("update", "Looking at your photo.") in status.log


async def test_the_poll_and_the_local_event_racing_post_once(
    ctx, commands, updates, vehicle_photos
):
    updates.add_fallback("discord", _refusing_fallback)
    job_id, status = await asked(commands, updates, vehicle_photos[0].read_bytes())
    worker = Worker(ctx, fake_answer, poll_s=0.05)  # records the answer, tells nobody
    await worker.run_once()
    text = f"Fake answer to: {QUESTION}"
    await asyncio.gather(updates(job_id, "done", text), updates.post_finished(),
                         updates(job_id, "done", text), updates.post_finished())
    assert finishes(status) == [text]


async def test_a_question_cancelled_before_it_started_is_not_posted_again(
    commands, updates, vehicle_photos
):
    updates.add_fallback("discord", _refusing_fallback)
    job_id, status = await asked(commands, updates, vehicle_photos[0].read_bytes())
    assert (await commands.cancel_question("discord", "u1", job_id)).text == CANCELLED
    updates.forget(job_id)
    assert await updates.post_finished() == 0
    assert finishes(status) == []


async def test_discord_gets_another_hosts_answer_once(
    settings, ctx, bot, stand_in, updates, vehicle_photos, tmp_path
):
    photo = vehicle_photos[0].read_bytes()
    token, _ = dispatch_interaction(bot, ask_data(stand_in, photo, "image/jpeg", QUESTION))
    # The status edit comes once the job is queued (this process runs no worker).
    await stand_in.wait_for(lambda _: [c for c in webhook_calls(stand_in, token)
                                       if c.method == "PATCH"])
    await other_host_answers(settings, tmp_path)
    with ctx.db.session() as session:
        job = session.scalars(select(Job)).one()

    assert await updates.post_finished() == 1
    [answer] = await stand_in.wait_for(lambda _: followups(stand_in, token))
    assert answer_text(answer) == f"answer {job.id} by other-host"
    assert await updates.post_finished() == 0
    assert len(followups(stand_in, token)) == 1
