"""The persisted Q&A job queue and the worker that answers its jobs without blocking the loop.

`JobQueue` is synchronous (adapters call it through `asyncio.to_thread`); `Worker` is async.
Any number of workers, in one process or many, may share one database (SQLite or PostgreSQL).
A follow-up question is a job of its own that continues an answered one: it asks about the same
photo unless it brings a new one, and its answer function sees the earlier turns.

How a job is run, and why:
- A worker claims the oldest queued job with one conditional UPDATE (storage/jobs.py) and holds
  it under a lease (`lease_s`) that it renews every third of the lease while the answer runs. A
  job whose lease expires (its worker was killed or stalled) goes back to the queue, up to
  `max_attempts` starts; a restarted worker with the same `worker_id` takes its own interrupted
  job back at once instead of waiting for the lease.
- The answer function runs in a daemon thread, never on the event loop, one at a time per
  worker. A thread (not a process) because the model is loaded once and shared; the price is
  that a thread cannot be killed. So a job past `job_timeout_s` is marked timed_out at once (the
  asker hears at the deadline), `progress()` raises `JobAbandoned` so a cooperative answer
  function stops at its next step, and the worker claims nothing until that thread has
  returned: a stuck answer costs one worker, never a growing pile of threads, and other workers
  keep taking jobs. A daemon thread cannot hold the process open at exit.
- Cancelling a running job works the same way: the worker notices at its next lease renewal,
  tells the asker, and drops whatever the answer function returns.
- Leases compare the clocks of the hosts sharing a database: keep them in sync (NTP).
"""

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial

from sqlalchemy.orm import Session

from core.context import AppContext
from core.errors import (
    BadImage,
    BadQuestion,
    ConversationTooLong,
    ModelNotInstalled,
    QueueFull,
    UnknownConversation,
    UserError,
)
from storage import jobs as job_rows
from storage.conversations import earlier_turns, link_follow_up
from storage.media import MediaMissing, MediaStore, sha256_hex
from storage.models import Job, utcnow

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
# on_update(job_id, event, text); events: position, started, progress, done, failed,
# timed_out, cancelled. `text` is a sentence for the asker (for done: the answer).
OnUpdate = Callable[[int, str, str], Awaitable[None]]
FINAL_EVENTS = frozenset({"done", "failed", "timed_out", "cancelled"})
UNEXPECTED_FAILURE = "Sorry, something went wrong while answering; please try again later."
# Questions in one conversation, the first included: each turn makes the prompt longer.
MAX_CONVERSATION_TURNS = 8
ANSWER_THREAD = "answer-"

_worker_numbers = itertools.count()


@dataclass(frozen=True)
class SubmittedJob:
    job_id: int
    position: int  # 1 = next in line


@dataclass(frozen=True)
class JobView:
    """What an answer function knows about its job, so it never touches the ORM."""

    id: int
    user_id: str
    platform: str
    question: str
    reply_to: dict
    image_sha256: str | None
    attempt: int  # 1 on the first start, 2 after one interruption, ...
    load_image: Callable[[], bytes | None] = field(repr=False, compare=False)
    # The id of the conversation's first job; left out (None), it is this job's own id.
    conversation_id: int | None = None
    # The earlier turns as (question, answer) pairs, oldest first; empty for a first question.
    history: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.conversation_id is None:
            object.__setattr__(self, "conversation_id", self.id)


@dataclass
class AnswerResult:
    """What an answer function returns (any object with these three attributes will do)."""

    text: str
    sources: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)


AnswerFn = Callable[[JobView, Progress], AnswerResult]


class JobAbandoned(Exception):
    """Raised by `progress()` once the worker gave up on the job (timed out or cancelled).

    An answer function should let it propagate: it ends the abandoned work at its next step."""


def check_question(question: str, max_chars: int) -> str:
    """The question without surrounding blanks; BadQuestion if it is empty or too long."""
    question = (question or "").strip()
    if not question:
        raise BadQuestion(
            'Please ask a question about the photo, e.g. "Which parts of this car pollute?"'
        )
    if len(question) > max_chars:
        raise BadQuestion(
            f"Your question is {len(question):,} characters long; "
            f"please keep it under {max_chars:,}."
        )
    return question


def answers_still_running() -> list[threading.Thread]:
    """Answer threads still alive (abandoned after a timeout, a cancel or a shutdown). An entry
    point that exits while one is inside torch must leave with os._exit: interpreter shutdown
    under a running torch thread aborts the process (C++ terminate)."""
    return [t for t in threading.enumerate() if t.name.startswith(ANSWER_THREAD) and t.is_alive()]


def exit_if_answers_running(code: int) -> None:
    """Leave the process now with `code` (streams flushed) if an answer thread is still alive;
    return otherwise. Call it last, once everything else is closed."""
    if not answers_still_running():
        return
    log.info("an abandoned answer is still running: exiting without waiting for it")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def default_worker_id() -> str:
    """host:pid:n. A restarted container gets the same id (same host name, same pid, first
    worker), so it reclaims its interrupted job at once. Give workers explicit ids if two live
    processes could share a host name and a pid (separate PID namespaces, one host name)."""
    return f"{socket.gethostname()}:{os.getpid()}:{next(_worker_numbers)}"


class JobQueue:
    """Submit, look up, number and cancel jobs. Limits default to the settings."""

    def __init__(
        self,
        ctx: AppContext,
        max_pending: int | None = None,
        per_user: int | None = None,
        max_question_chars: int | None = None,
    ):
        settings = ctx.settings
        self.ctx = ctx
        self.max_pending = settings.queue_max_pending if max_pending is None else max_pending
        self.per_user = settings.queue_per_user if per_user is None else per_user
        self.max_question_chars = max_question_chars or settings.max_question_chars

    def submit(
        self,
        platform: str,
        user_id: str,
        reply_to: dict,
        image: bytes | None,
        question: str,
        follow_up_of: int | None = None,
    ) -> SubmittedJob:
        """Queue a question; raises BadQuestion, BadImage (too many bytes) or QueueFull.

        `follow_up_of` makes it a follow-up to that answered job of the same platform (raises
        UnknownConversation otherwise, or ConversationTooLong); without an image of its own it
        asks about that job's photo."""
        question = check_question(question, self.max_question_chars)
        if image is not None and len(image) > self.ctx.settings.max_upload_bytes:
            limit_mib = self.ctx.settings.max_upload_bytes // (1024 * 1024)
            raise BadImage(f"That image is over the {limit_mib} MiB upload limit.")
        with self.ctx.db.session() as session:
            job_rows.lock_for_submit(session)
            parent = None
            if follow_up_of is not None:
                parent = _answered_parent(session, platform, follow_up_of)
            # Insert first, then count: on SQLite the INSERT takes the write lock, so the counts
            # below see every other submission and the limits hold exactly.
            job = Job(
                platform=platform,
                user_id=user_id,
                reply_to=reply_to,
                image_sha256=sha256_hex(image) if image is not None else None,
                question=question,
            )
            if image is None and parent is not None:
                # The same photo: the media store is content-addressed, so sharing its key is safe.
                job.image_sha256 = parent.image_sha256
                job.image_media_key = parent.image_media_key
            session.add(job)
            session.flush()
            mine, everyone = job_rows.pending_counts(session, user_id)
            if mine - 1 >= self.per_user:
                raise QueueFull(
                    f"You already have {_questions(mine - 1)} waiting; please wait for an answer."
                )
            if everyone - 1 >= self.max_pending:
                raise QueueFull(
                    f"The queue is full ({_questions(everyone - 1)} waiting); "
                    "please try again in a few minutes."
                )
            if parent is not None:
                link_follow_up(session, job.id, parent.id)
            if image is not None:
                job.image_media_key = self.ctx.media.put(image)
            position = job_rows.queue_position(session, job.id, utcnow())
        return SubmittedJob(job.id, position)

    def get(self, job_id: int) -> Job | None:
        """The job row as it is now (detached: read its attributes, do not modify it)."""
        with self.ctx.db.session() as session:
            return job_rows.job_by_id(session, job_id)

    def position(self, job_id: int) -> int | None:
        """Place in line, 1 = next (queued jobs ahead plus jobs running now); None unless the
        job is queued."""
        with self.ctx.db.session() as session:
            return job_rows.queue_position(session, job_id, utcnow())

    def cancel(self, job_id: int, user_id: str) -> bool:
        """Cancel the asker's own queued or running job. False if the job is someone else's,
        unknown, or already over. A running job's worker drops its answer (see module doc)."""
        with self.ctx.db.session() as session:
            return job_rows.cancel_job(session, job_id, user_id)


def _questions(count: int) -> str:
    return f"{count} question{'s' if count != 1 else ''}"


def _answered_parent(session: Session, platform: str, job_id: int) -> Job:
    """The job a follow-up continues: it must exist on this platform, be answered, and leave
    room in its conversation."""
    parent = job_rows.job_by_id(session, job_id)
    if parent is None or parent.platform != platform:
        raise UnknownConversation(
            "That answer is no longer available to follow up on; please ask again with a photo."
        )
    if parent.status in job_rows.PENDING:
        raise UnknownConversation(
            "That question has not been answered yet; please wait for its answer, then follow up."
        )
    if parent.status != "done":
        raise UnknownConversation(
            "That question was not answered, so there is nothing to follow up on; "
            "please ask it again."
        )
    if len(earlier_turns(session, parent.id)) + 1 >= MAX_CONVERSATION_TURNS:
        raise ConversationTooLong(
            f"This conversation already has {MAX_CONVERSATION_TURNS} questions; "
            "please start a new one by asking again with a photo."
        )
    return parent


def _read_image(media: MediaStore, key: str | None) -> bytes | None:
    if key is None:
        return None
    try:
        return media.read(key)
    except MediaMissing:
        raise BadImage(
            "The photo for this question is no longer stored; please send it again."
        ) from None


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _position_text(position: int) -> str:
    if position <= 1:
        return "Your question is next in line."
    return f"Your question is #{position} in the queue."


class Worker:
    """Claims jobs one at a time and answers them with `answer_fn(job_view, progress)`."""

    def __init__(
        self,
        ctx: AppContext,
        answer_fn: AnswerFn,
        *,
        worker_id: str | None = None,
        on_update: OnUpdate | None = None,
        job_timeout_s: float | None = None,
        lease_s: float = 30.0,
        max_attempts: int = 3,
        poll_s: float = 0.5,
        platforms: frozenset[str] | None = None,
    ):
        self.ctx = ctx
        # Only these platforms' jobs (None: all): `talkmosaic chat` must not take a Slack job
        # whose answer it could not post.
        self.platforms = platforms
        self.answer_fn = answer_fn
        self.worker_id = worker_id or default_worker_id()
        self.on_update = on_update
        self.job_timeout_s = job_timeout_s or ctx.settings.job_timeout_s
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.poll_s = poll_s
        # The answer thread of the last job; nothing new starts until it has returned.
        self._answering: asyncio.Future | None = None
        self._announced: dict[int, int] = {}
        self._stopping = asyncio.Event()

    async def run_forever(self) -> None:
        """Take back this worker id's interrupted jobs, then answer jobs until cancelled, or
        until `stop_taking_jobs()` (then it returns once the job under way has its outcome)."""
        await self._with_events(self._recover_own)
        while not self._stopping.is_set():
            try:
                job = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A locked or unreachable database must not end the worker; try again shortly.
                log.exception("worker %s: could not run a job", self.worker_id)
                job = None
            if job is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.poll_s)

    def stop_taking_jobs(self) -> None:
        """Claim no new job (shutting down). Cancelling run_forever afterwards, while a job is
        still under way, hands that job back to the queue."""
        self._stopping.set()

    async def run_once(self) -> Job | None:
        """Claim one job and run it to an outcome; None if nothing was queued. Returns the job
        row once its outcome is recorded (a timed-out answer may still be running then)."""
        if self._answering is not None and not self._answering.done():
            log.warning("worker %s: waiting for an abandoned answer to return", self.worker_id)
            await asyncio.wait({self._answering})
        return await self._with_events(self._run_one)

    async def _with_events(self, work: Callable[[asyncio.Queue], Awaitable]):
        """Run `work(events)` while one task delivers its updates in order; returns once the
        last update has been delivered."""
        events: asyncio.Queue = asyncio.Queue()
        delivery = asyncio.create_task(self._deliver(events))
        try:
            return await work(events)
        finally:
            events.put_nowait(None)
            try:
                await delivery
            except asyncio.CancelledError:
                delivery.cancel()
                raise

    async def _deliver(self, events: asyncio.Queue) -> None:
        while (update := await events.get()) is not None:
            if self.on_update is None:
                continue
            try:
                await self.on_update(*update)
            except Exception:
                log.exception("on_update failed for job %s (%s)", update[0], update[1])

    async def _recover_own(self, events: asyncio.Queue) -> None:
        given_up = await asyncio.to_thread(self._recover, self.worker_id)
        for job in given_up:
            events.put_nowait((job.id, "failed", job.error))

    async def _run_one(self, events: asyncio.Queue) -> Job | None:
        job, given_up = await asyncio.to_thread(self._claim)
        for lost in given_up:
            events.put_nowait((lost.id, "failed", lost.error))
        if job is None:
            return None
        try:
            return await self._answer(job, events)
        except asyncio.CancelledError:
            # Shutting down: hand the job back so another worker starts it at once (a blocking
            # call, but a short one, and the loop is stopping anyway).
            with self.ctx.db.session() as session:
                job_rows.release_job(session, job.id, self.worker_id)
            raise

    async def _answer(self, job: Job, events: asyncio.Queue) -> Job | None:
        """Start the answer thread for a claimed job and see it to an outcome."""
        await self._announce_positions(events)
        again = " again after an interruption" if job.attempts > 1 else ""
        events.put_nowait((job.id, "started", f"Working on your question{again}."))
        loop = asyncio.get_running_loop()
        abandon = threading.Event()
        turns = await asyncio.to_thread(self._earlier_turns, job.id)
        view = JobView(
            id=job.id,
            user_id=job.user_id,
            platform=job.platform,
            question=job.question,
            reply_to=dict(job.reply_to or {}),
            image_sha256=job.image_sha256,
            attempt=job.attempts,
            load_image=partial(_read_image, self.ctx.media, job.image_media_key),
            conversation_id=turns[0].id if turns else job.id,
            history=tuple((turn.question, turn.answer or "") for turn in turns),
        )
        progress = partial(self._progress, loop, events, job.id, abandon)
        started = time.monotonic()
        self._answering = self._start_answer(loop, view, progress)
        try:
            in_time = await self._supervise(job, self._answering, abandon, started, events)
        except asyncio.CancelledError:
            abandon.set()
            raise
        if not in_time:
            return await asyncio.to_thread(self._get, job.id)
        return await self._record(job, self._answering, started, events)

    def _start_answer(
        self, loop: asyncio.AbstractEventLoop, view: JobView, progress: Progress
    ) -> asyncio.Future:
        future = loop.create_future()
        # Retrieve the outcome even when nobody awaits it any more (an abandoned answer).
        future.add_done_callback(lambda done: done.cancelled() or done.exception())

        def answer() -> None:
            outcome, error = None, None
            try:
                outcome = self.answer_fn(view, progress)
            except Exception as raised:
                error = raised
            except BaseException as raised:
                # SystemExit and friends must still settle the future, or the worker waits forever.
                error = RuntimeError(f"the answer function ended with {raised!r}")
            try:
                loop.call_soon_threadsafe(_settle, future, outcome, error)
            except RuntimeError:
                pass  # The event loop is gone: nobody is waiting for this answer.

        name = f"{ANSWER_THREAD}{self.worker_id}-job{view.id}"
        threading.Thread(target=answer, name=name, daemon=True).start()
        return future

    def _progress(
        self,
        loop: asyncio.AbstractEventLoop,
        events: asyncio.Queue,
        job_id: int,
        abandon: threading.Event,
        text: str,
    ) -> None:
        """Called by the answer function, in its thread, at each step."""
        if abandon.is_set():
            raise JobAbandoned(job_id)
        loop.call_soon_threadsafe(events.put_nowait, (job_id, "progress", text))

    async def _supervise(
        self,
        job: Job,
        answering: asyncio.Future,
        abandon: threading.Event,
        started: float,
        events: asyncio.Queue,
    ) -> bool:
        """Wait for the answer while renewing the lease. True when the answer came back in
        time and the job is still ours; False when the job was given up (timed out,
        cancelled or taken back), in which case the asker has been told."""
        deadline = started + self.job_timeout_s
        renew_every = self.lease_s / 3
        while True:
            wait = max(0.0, min(renew_every, deadline - time.monotonic()))
            done, _ = await asyncio.wait({answering}, timeout=wait)
            if done:
                return True
            if time.monotonic() >= deadline:
                abandon.set()
                error = (
                    f"Sorry, answering took longer than {self.job_timeout_s:g} s, so I stopped; "
                    "please try again later."
                )
                if await asyncio.to_thread(self._finish, job.id, "timed_out", error=error):
                    events.put_nowait((job.id, "timed_out", error))
                return False
            if not await asyncio.to_thread(self._renew, job.id):
                abandon.set()
                now = await asyncio.to_thread(self._get, job.id)
                if now is not None and now.status == "cancelled":
                    events.put_nowait((job.id, "cancelled", "Your question was cancelled."))
                return False

    async def _record(
        self, job: Job, answering: asyncio.Future, started: float, events: asyncio.Queue
    ) -> Job | None:
        try:
            result = answering.result()
        except UserError as error:
            status, values, update = "failed", {"error": str(error)}, str(error)
        except ModelNotInstalled as error:
            # Not the asker's fault, but its sentence says what is missing; the operator needs
            # the log line, the asker an answer better than "something went wrong".
            log.error("job %s: %s", job.id, error)
            status, values, update = "failed", {"error": str(error)}, str(error)
        except Exception:
            log.exception("job %s failed in worker %s", job.id, self.worker_id)
            status, values, update = "failed", {"error": UNEXPECTED_FAILURE}, UNEXPECTED_FAILURE
        else:
            timings = {
                **dict(result.timings or {}),
                "queue_wait_s": round((job.started_at - job.created_at).total_seconds(), 3),
                "run_s": round(time.monotonic() - started, 3),
            }
            status, update = "done", result.text
            values = {"answer": result.text, "sources": list(result.sources or []),
                      "timings": timings}
        if await asyncio.to_thread(self._finish, job.id, status, **values):
            events.put_nowait((job.id, status, update))
        return await asyncio.to_thread(self._get, job.id)

    async def _announce_positions(self, events: asyncio.Queue) -> None:
        """Tell each waiting asker their new place in line, when it changed."""
        positions = await asyncio.to_thread(self._positions)
        for job_id, position in positions.items():
            if self._announced.get(job_id) != position:
                events.put_nowait((job_id, "position", _position_text(position)))
        self._announced = positions

    # Database steps, each one transaction, run through asyncio.to_thread.

    def _claim(self) -> tuple[Job | None, list[Job]]:
        now = utcnow()
        with self.ctx.db.session() as session:
            given_up = job_rows.recover_interrupted(session, now, self.max_attempts)
            job = job_rows.claim_next(
                session, self.worker_id, now + timedelta(seconds=self.lease_s), self.platforms
            )
            return job, [session.get(Job, job_id) for job_id in given_up]

    def _recover(self, dead_worker: str) -> list[Job]:
        with self.ctx.db.session() as session:
            given_up = job_rows.recover_interrupted(
                session, utcnow(), self.max_attempts, dead_worker=dead_worker
            )
            return [session.get(Job, job_id) for job_id in given_up]

    def _renew(self, job_id: int) -> bool:
        lease_until = utcnow() + timedelta(seconds=self.lease_s)
        with self.ctx.db.session() as session:
            return job_rows.renew_lease(session, job_id, self.worker_id, lease_until)

    def _finish(self, job_id: int, status: str, **values) -> bool:
        with self.ctx.db.session() as session:
            return job_rows.finish_job(session, job_id, self.worker_id, status, **values)

    def _get(self, job_id: int) -> Job | None:
        with self.ctx.db.session() as session:
            return job_rows.job_by_id(session, job_id)

    def _earlier_turns(self, job_id: int) -> list[Job]:
        with self.ctx.db.session() as session:
            return earlier_turns(session, job_id)

    def _positions(self) -> dict[int, int]:
        with self.ctx.db.session() as session:
            return job_rows.queue_positions(session, utcnow())
