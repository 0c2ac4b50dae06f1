"""The job queue: what a submission stores, the limits and their sentences, positions, cancel."""

import pytest

from core.errors import BadImage, BadQuestion, QueueFull
from core.worker import JobQueue, Worker
from storage.media import sha256_hex
from tests.worker.fakes import echo_answer

REPLY_TO = {"channel_id": "c1", "message_id": "m1"}


def test_submission_is_persisted_with_its_photo(ctx, queue, photo):
    submitted = queue.submit("discord", "alice", REPLY_TO, photo, "  Which parts pollute?  ")
    job = queue.get(submitted.job_id)
    assert submitted.position == 1
    assert (job.platform, job.user_id, job.reply_to) == ("discord", "alice", REPLY_TO)
    assert job.question == "Which parts pollute?"
    assert job.status == "queued" and job.attempts == 0
    assert job.image_sha256 == sha256_hex(photo)
    assert ctx.media.read(job.image_media_key) == photo


def test_the_queue_survives_reopening_the_database(ctx, settings, queue, photo):
    from core.context import AppContext

    submitted = queue.submit("slack", "bob", REPLY_TO, photo, "What tyre should I buy?")
    ctx.close()
    reopened = AppContext.open(settings)
    try:
        job = JobQueue(reopened).get(submitted.job_id)
        assert (job.status, job.question) == ("queued", "What tyre should I buy?")
    finally:
        reopened.close()


@pytest.mark.parametrize("question", ["", "   \n\t "])
def test_an_empty_question_is_refused(queue, photo, question):
    with pytest.raises(BadQuestion, match="Please ask a question"):
        queue.submit("discord", "alice", REPLY_TO, photo, question)


def test_an_overlong_question_is_refused(queue, photo):
    with pytest.raises(BadQuestion) as refused:
        queue.submit("discord", "alice", REPLY_TO, photo, "why? " * 1000)
    assert str(refused.value) == (
        "Your question is 4,999 characters long; please keep it under 1,000."
    )


def test_an_oversized_photo_is_refused(ctx, queue):
    huge = b"\0" * (ctx.settings.max_upload_bytes + 1)
    with pytest.raises(BadImage, match="upload limit"):
        queue.submit("discord", "alice", REPLY_TO, huge, "What is this?")


def test_a_user_with_two_waiting_questions_must_wait(queue, photo):
    queue.submit("discord", "alice", REPLY_TO, photo, "first?")
    queue.submit("discord", "alice", REPLY_TO, photo, "second?")
    with pytest.raises(QueueFull) as refused:
        queue.submit("discord", "alice", REPLY_TO, photo, "third?")
    assert str(refused.value) == "You already have 2 questions waiting; please wait for an answer."
    assert queue.submit("discord", "bob", REPLY_TO, photo, "mine?").position == 3


def test_a_full_queue_refuses_everyone(ctx, photo):
    queue = JobQueue(ctx, max_pending=3, per_user=2)
    for user in ("a", "b", "c"):
        queue.submit("slack", user, REPLY_TO, photo, "question?")
    with pytest.raises(QueueFull) as refused:
        queue.submit("slack", "d", REPLY_TO, photo, "question?")
    assert str(refused.value) == (
        "The queue is full (3 questions waiting); please try again in a few minutes."
    )


def test_a_refused_submission_leaves_nothing_behind(ctx, queue, photo):
    queue.submit("discord", "alice", REPLY_TO, photo, "first?")
    queue.submit("discord", "alice", REPLY_TO, photo, "second?")
    other_photo = photo + b"trailing bytes"
    with pytest.raises(QueueFull):
        queue.submit("discord", "alice", REPLY_TO, other_photo, "third?")
    assert queue.get(3) is None
    assert not ctx.media.has(sha256_hex(other_photo))


async def test_finished_questions_no_longer_count_against_the_limit(ctx, queue, photo):
    queue.submit("discord", "alice", REPLY_TO, photo, "first?")
    queue.submit("discord", "alice", REPLY_TO, photo, "second?")
    await Worker(ctx, echo_answer).run_once()
    assert queue.submit("discord", "alice", REPLY_TO, photo, "third?").position == 2


def test_cancelling_a_queued_question(queue, photo):
    first = queue.submit("discord", "alice", REPLY_TO, photo, "first?")
    second = queue.submit("discord", "bob", REPLY_TO, photo, "second?")
    assert not queue.cancel(first.job_id, "bob"), "only the asker may cancel"
    assert queue.cancel(first.job_id, "alice")
    assert queue.get(first.job_id).status == "cancelled"
    assert queue.position(first.job_id) is None
    assert queue.position(second.job_id) == 1
    assert not queue.cancel(first.job_id, "alice"), "already over"


async def test_a_cancelled_question_is_never_answered(ctx, queue, photo):
    first = queue.submit("discord", "alice", REPLY_TO, photo, "first?")
    second = queue.submit("discord", "bob", REPLY_TO, photo, "second?")
    queue.cancel(first.job_id, "alice")
    worker = Worker(ctx, echo_answer)
    assert (await worker.run_once()).id == second.job_id
    assert await worker.run_once() is None
    assert queue.get(first.job_id).answer is None


async def test_positions_move_up_as_jobs_complete(ctx, photo):
    queue = JobQueue(ctx, max_pending=10, per_user=10)
    ids = [queue.submit("discord", "alice", REPLY_TO, photo, f"q{n}?").job_id for n in range(4)]
    assert [queue.position(job_id) for job_id in ids] == [1, 2, 3, 4]
    worker = Worker(ctx, echo_answer)
    seen = []
    while await worker.run_once() is not None:
        seen.append([queue.position(job_id) for job_id in ids])
    assert seen == [
        [None, 1, 2, 3],
        [None, None, 1, 2],
        [None, None, None, 1],
        [None, None, None, None],
    ]
