"""Follow-up questions: a job that continues an answered one asks about the same photo, its
answer function sees the earlier turns in order, and what cannot be followed up is refused."""

import io

import pytest
from PIL import Image
from sqlalchemy import func, select

from core.errors import ConversationTooLong, QueueFull, UnknownConversation
from core.worker import MAX_CONVERSATION_TURNS, AnswerResult, JobQueue, JobView, Worker
from storage.media import sha256_hex
from storage.models import FollowUp, Job

REPLY_TO = {"channel_id": "c1"}


class Answers:
    """An answer function that keeps every JobView it is given and numbers its answers."""

    def __init__(self):
        self.views: list[JobView] = []

    def __call__(self, job: JobView, progress) -> AnswerResult:
        self.views.append(job)
        return AnswerResult(f"Answer {len(self.views)}.")


@pytest.fixture
def answers() -> Answers:
    return Answers()


async def answered(ctx, answers: Answers, submitted) -> int:
    """Run the worker on the job just submitted; its id once it is done."""
    job = await Worker(ctx, answers).run_once()
    assert (job.id, job.status) == (submitted.job_id, "done")
    return job.id


def jobs_and_links(ctx) -> tuple[int, int]:
    with ctx.db.session() as session:
        return (session.scalar(select(func.count()).select_from(Job)),
                session.scalar(select(func.count()).select_from(FollowUp)))


async def test_a_first_question_is_a_conversation_of_its_own(ctx, queue, photo, answers):
    await answered(ctx, answers, queue.submit("discord", "alice", REPLY_TO, photo, "Which fuel?"))
    [view] = answers.views
    assert view.conversation_id == view.id
    assert view.history == ()


async def test_a_follow_up_without_a_photo_asks_about_the_parents_photo(
    ctx, queue, photo, answers
):
    first = await answered(ctx, answers, queue.submit("discord", "alice", REPLY_TO, photo, "Q1?"))
    follow_up = queue.submit("discord", "alice", REPLY_TO, None, "And its tyres?",
                             follow_up_of=first)
    await answered(ctx, answers, follow_up)
    job = queue.get(follow_up.job_id)
    assert job.image_sha256 == sha256_hex(photo)
    assert job.image_media_key == queue.get(first).image_media_key
    assert answers.views[1].load_image() == photo


async def test_a_follow_up_carries_the_earlier_turns_oldest_first(ctx, queue, photo, answers):
    first = await answered(ctx, answers, queue.submit("slack", "bob", REPLY_TO, photo, "Q1?"))
    second = await answered(ctx, answers, queue.submit("slack", "bob", REPLY_TO, None, "Q2?",
                                                       follow_up_of=first))
    await answered(ctx, answers, queue.submit("slack", "bob", REPLY_TO, None, "Q3?",
                                              follow_up_of=second))
    third = answers.views[2]
    assert third.question == "Q3?"
    assert third.history == (("Q1?", "Answer 1."), ("Q2?", "Answer 2."))
    assert third.conversation_id == first
    assert answers.views[1].conversation_id == first


async def test_two_follow_ups_to_one_answer_each_see_only_their_own_branch(
    ctx, queue, photo, answers
):
    first = await answered(ctx, answers, queue.submit("web", "w", REPLY_TO, photo, "Q1?"))
    await answered(ctx, answers, queue.submit("web", "w", REPLY_TO, None, "Q2a?",
                                              follow_up_of=first))
    await answered(ctx, answers, queue.submit("web", "w", REPLY_TO, None, "Q2b?",
                                              follow_up_of=first))
    assert answers.views[2].history == (("Q1?", "Answer 1."),)


async def test_a_follow_up_with_a_photo_of_its_own_asks_about_that_photo(
    ctx, queue, photo, answers
):
    first = await answered(ctx, answers, queue.submit("discord", "alice", REPLY_TO, photo, "Q1?"))
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (20, 30, 200)).save(out, "PNG")
    other = out.getvalue()
    await answered(ctx, answers, queue.submit("discord", "alice", REPLY_TO, other,
                                              "And this one?", follow_up_of=first))
    assert answers.views[1].load_image() == other
    assert answers.views[1].history == (("Q1?", "Answer 1."),)


def test_a_follow_up_to_an_unknown_question_is_one_sentence(ctx, queue):
    with pytest.raises(UnknownConversation) as refused:
        queue.submit("discord", "alice", REPLY_TO, None, "And its tyres?", follow_up_of=404)
    assert str(refused.value) == (
        "That answer is no longer available to follow up on; please ask again with a photo."
    )
    assert jobs_and_links(ctx) == (0, 0)


async def test_a_follow_up_from_another_platform_is_refused(ctx, queue, photo, answers):
    first = await answered(ctx, answers, queue.submit("discord", "alice", REPLY_TO, photo, "Q?"))
    with pytest.raises(UnknownConversation, match="no longer available"):
        queue.submit("slack", "alice", REPLY_TO, None, "And its tyres?", follow_up_of=first)
    assert jobs_and_links(ctx) == (1, 0)


def test_a_follow_up_to_a_question_still_waiting_is_refused(ctx, queue, photo):
    waiting = queue.submit("discord", "alice", REPLY_TO, photo, "Q?").job_id
    with pytest.raises(UnknownConversation) as refused:
        queue.submit("discord", "alice", REPLY_TO, None, "And?", follow_up_of=waiting)
    assert str(refused.value) == (
        "That question has not been answered yet; please wait for its answer, then follow up."
    )
    assert jobs_and_links(ctx) == (1, 0)


def test_a_follow_up_to_a_cancelled_question_is_refused(queue, photo):
    cancelled = queue.submit("discord", "alice", REPLY_TO, photo, "Q?").job_id
    queue.cancel(cancelled, "alice")
    with pytest.raises(UnknownConversation) as refused:
        queue.submit("discord", "alice", REPLY_TO, None, "And?", follow_up_of=cancelled)
    assert str(refused.value) == (
        "That question was not answered, so there is nothing to follow up on; "
        "please ask it again."
    )


async def test_a_conversation_stops_at_its_turn_limit(ctx, queue, photo, answers):
    last = await answered(ctx, answers, queue.submit("discord", "alice", REPLY_TO, photo, "Q1?"))
    for turn in range(2, MAX_CONVERSATION_TURNS + 1):
        last = await answered(ctx, answers, queue.submit(
            "discord", "alice", REPLY_TO, None, f"Q{turn}?", follow_up_of=last))
    assert len(answers.views[-1].history) == MAX_CONVERSATION_TURNS - 1
    with pytest.raises(ConversationTooLong) as refused:
        queue.submit("discord", "alice", REPLY_TO, None, "One more?", follow_up_of=last)
    assert str(refused.value) == (
        f"This conversation already has {MAX_CONVERSATION_TURNS} questions; "
        "please start a new one by asking again with a photo."
    )
    assert jobs_and_links(ctx) == (MAX_CONVERSATION_TURNS, MAX_CONVERSATION_TURNS - 1)


async def test_follow_ups_count_against_the_askers_limit(ctx, photo, answers):
    queue = JobQueue(ctx, max_pending=50, per_user=1)
    first = await answered(ctx, answers, queue.submit("discord", "alice", REPLY_TO, photo, "Q1?"))
    queue.submit("discord", "alice", REPLY_TO, None, "Q2?", follow_up_of=first)
    with pytest.raises(QueueFull, match="already have 1 question waiting"):
        queue.submit("discord", "alice", REPLY_TO, None, "Q2 again?", follow_up_of=first)
    assert jobs_and_links(ctx) == (2, 1)


def test_a_job_view_built_without_a_conversation_is_its_own():
    view = JobView(id=7, user_id="u", platform="cli", question="Q?", reply_to={},
                   image_sha256=None, attempt=1, load_image=lambda: None)
    assert (view.conversation_id, view.history) == (7, ())
