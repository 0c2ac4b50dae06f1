"""The chat commands, platform-agnostic: parse a request, call core off the event loop, and return
a Reply (text + files) that the Discord and Slack adapters only have to send.

A UserError becomes one ephemeral sentence; nothing else the user did shows a traceback.
"""

import asyncio
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol, TypeVar

from core.context import AppContext
from core.errors import BadImage, UnknownMosaic, UserError
from core.gallery import (
    TileLookup,
    find_mosaic,
    list_mosaics,
    mosaic_by_id,
    mosaic_url,
    tile_lookup,
    tile_url,
)
from core.images import decode_image, image_content_type, jpeg_within
from core.mosaic import MosaicOptions, build_mosaic, format_coordinate, preview_image
from core.settings import Settings
from core.worker import FINAL_EVENTS, UNEXPECTED_FAILURE, JobQueue
from storage import jobs as job_rows
from storage.messages import (
    job_for_answer_message,
    mosaic_for_message,
    remember_answer,
    remember_message,
)
from storage.models import Job, Mosaic

# Mosaics built from the CLI or `talkmosaic demo` live here and are visible from every chat.
SHARED_SCOPE = "local"
OFF_LOOP_THREADS = 2
# Tries to post one outcome (a chat API that refused it: down, rate-limited) before giving up.
POST_TRIES = 3
# Commands that cost real work; look-ups and lists stay free so "C7" then "C8" just works.
COOLED_COMMANDS = frozenset({"build", "show", "ask"})
# A message that is nothing but a tile coordinate, e.g. "C7", "aa12" or "3,7".
COORDINATE_MESSAGE = re.compile(r"^\s*(?:[A-Za-z]{1,3}\s*\d{1,6}|\d{1,6}\s*[,;]\s*\d{1,6})\s*$")
# What a user sees when something failed on our side (the log has the details).
SORRY = "Something went wrong on our side; please try again later."
NOT_AN_IMAGE = "That file is not an image: send a JPEG, PNG or WebP photo."
NO_PHOTO = "Please send a photo of a car with your question."
EXTENSIONS = {"image/png": "png", "image/webp": "webp", "image/gif": "gif"}
CANCELLED = "Your question was cancelled."
NOT_YOURS = "Only the person who asked this question can cancel it."
ALREADY_STARTED = "Your question is already being answered, so it can no longer be cancelled."
NOT_WAITING = "That question is no longer waiting."
T = TypeVar("T")
log = logging.getLogger(__name__)


class CoolingDown(UserError):
    """The same user ran the same costly command again too soon."""


@dataclass
class Reply:
    """What a command answers: the adapter posts text and files, privately when ephemeral.

    mosaic_id is set when the reply shows a mosaic (the adapter remembers the message it posts);
    job_id when a question was queued (the adapter follows the job's status); tile, as
    (mosaic id, "C7"), when it shows the car behind a tile (the adapter offers to ask about it)."""

    text: str
    files: list[tuple[str, bytes]] = field(default_factory=list)
    ephemeral: bool = False
    mosaic_id: int | None = None
    job_id: int | None = None
    tile: tuple[int, str] | None = None


# A build's progress as one sentence, e.g. "Building owl: matching cells to car photos, 50%."
BuildProgress = Callable[[str], Awaitable[None]]
BUILD_STAGES = {"matching": "matching cells to car photos", "placing": "placing the tiles"}


def error_reply(error: UserError) -> Reply:
    return Reply(str(error), ephemeral=True)


class Cooldowns:
    """Per-user, per-command waiting time between two costly commands."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds = seconds
        self.clock = clock
        self._last: dict[tuple[str, str], float] = {}

    def check(self, user: str, command: str) -> None:
        """Raise CoolingDown if this user ran this command less than `seconds` ago."""
        if self.seconds <= 0 or command not in COOLED_COMMANDS:
            return
        now = self.clock()
        last = self._last.get((user, command))
        if last is not None and now - last < self.seconds:
            wait = max(1, round(self.seconds - (now - last)))
            raise CoolingDown(f"Please wait {wait} s before using {command} again.")
        self._last[(user, command)] = now


def check_attachment(content_type: str | None, size: int | None, max_bytes: int) -> None:
    """Refuse a chat attachment before downloading it: not an image, or too large."""
    if content_type is not None and not content_type.lower().startswith("image/"):
        raise BadImage(NOT_AN_IMAGE)
    if size is not None and size > max_bytes:
        raise BadImage(f"That image is over the {max_bytes // (1024 * 1024)} MiB upload limit.")


class Commands:
    """One instance per process, shared by every adapter."""

    def __init__(self, ctx: AppContext, queue: JobQueue, cooldowns: Cooldowns | None = None):
        self.ctx = ctx
        self.queue = queue
        self.cooldowns = cooldowns or Cooldowns(ctx.settings.cooldown_s)
        # One build at a time keeps look-ups and the worker responsive on a small machine.
        self._builds = asyncio.Semaphore(1)
        # Core calls hold the GIL for most of their time: a crowd of them in threads starves
        # the event loop of it (200 concurrent look-ups blocked the loop for 150 ms).
        self._threads = asyncio.Semaphore(OFF_LOOP_THREADS)

    async def _off_loop(self, function: Callable[..., T], *args) -> T:
        async with self._threads:
            return await asyncio.to_thread(function, *args)

    async def build(
        self, scope: str, user: str, target: bytes, name: str, columns: int | None, max_bytes: int,
        progress: BuildProgress | None = None,
    ) -> Reply:
        """Build a mosaic; `progress(sentence)` hears each stage as it goes (a quarter at a time,
        since chat edits are rate-limited), from the loop, in order, before this returns."""
        try:
            self.cooldowns.check(user, "build")
            options = MosaicOptions(cols=columns) if columns else MosaicOptions()
            relay = _ProgressRelay(asyncio.get_running_loop(), " ".join(name.split()), progress)
            # Not _off_loop: a build would hold one of the look-ups' thread slots for seconds.
            try:
                async with self._builds:
                    mosaic = await asyncio.to_thread(
                        build_mosaic, self.ctx, target, name, scope=scope, created_by=user,
                        options=options, progress=relay if progress else None,
                    )
            finally:
                await relay.close()
            return await self._showing(mosaic, max_bytes, built=True)
        except UserError as error:
            return error_reply(error)

    async def show(self, scope: str, user: str, name: str, max_bytes: int) -> Reply:
        try:
            self.cooldowns.check(user, "show")
            mosaic = await self._off_loop(self._find, scope, name)
            return await self._showing(mosaic, max_bytes, built=False)
        except UserError as error:
            return error_reply(error)

    async def mosaics(self, scope: str) -> Reply:
        mosaics = await self._off_loop(self._visible, scope)
        if not mosaics:
            return Reply("No mosaics yet: build one with /mosaic build.", ephemeral=True)
        lines = [f"{m.name} ({m.cols}x{m.rows} tiles)" for m in mosaics[:50]]
        return Reply("Mosaics:\n" + "\n".join(lines))

    async def tile(self, scope: str, name: str, coordinate: str, max_bytes: int) -> Reply:
        try:
            mosaic, found = await self._off_loop(self._lookup, scope, name, coordinate)
            return await _tile_reply(mosaic, found, max_bytes, self.ctx.settings)
        except UserError as error:
            return error_reply(error)

    async def tile_for_message(
        self, platform: str, channel_id: str, message_id: str, coordinate: str, max_bytes: int
    ) -> Reply | None:
        """A reply such as "C7" to a message: None when that message shows no mosaic."""
        try:
            shown = await self._off_loop(
                self._lookup_for_message, platform, channel_id, message_id, coordinate
            )
        except UserError as error:
            return error_reply(error)
        return None if shown is None else await _tile_reply(*shown, max_bytes, self.ctx.settings)

    async def mosaic_shown(self, platform: str, channel_id: str, message_id: str
                           ) -> Mosaic | None:
        """The mosaic that message shows, or None."""
        return await self._off_loop(self._mosaic_shown, platform, channel_id, message_id)

    async def random_tile_for_message(
        self, platform: str, channel_id: str, message_id: str, max_bytes: int,
        rng: random.Random | None = None,
    ) -> Reply | None:
        """A tile chosen at random from the mosaic that message shows (None if it shows none)."""
        shown = await self.mosaic_shown(platform, channel_id, message_id)
        if shown is None:
            return None
        rng = rng or random.Random()
        label = format_coordinate(rng.randrange(shown.rows), rng.randrange(shown.cols))
        return await self.tile_for_message(platform, channel_id, message_id, label, max_bytes)

    async def ask_about_tile(
        self, platform: str, user: str, reply_to: dict, mosaic_id: int, coordinate: str,
        question: str,
    ) -> Reply:
        """Queue a question about the car photo behind a tile ("Ask about this car")."""
        try:
            found = await self._off_loop(self._lookup_by_id, mosaic_id, coordinate)
        except UserError as error:
            return error_reply(error)
        return await self.ask(platform, user, reply_to, found.image_bytes, question)

    async def mosaic_names(self, scope: str, typed: str, limit: int = 25) -> list[str]:
        """What autocomplete offers: names of the mosaics visible here that contain what was
        typed (case-insensitive), those starting with it first, newest first within each."""
        mosaics = await self._off_loop(self._visible, scope)
        typed = " ".join(typed.split()).lower()
        names = [m.name for m in mosaics if typed in m.name.lower()]
        return sorted(names, key=lambda name: not name.lower().startswith(typed))[:limit]

    async def cancel_question(self, platform: str, user: str, job_id: int) -> Reply:
        """Cancel a question no worker has started yet, for the person who asked it. The reply
        says what happened; it is ephemeral when nothing was cancelled."""
        outcome = await self._off_loop(self._cancel_queued, platform, user, job_id)
        return Reply(outcome, ephemeral=outcome != CANCELLED)

    def gallery_url(self, mosaic_id: int) -> str | None:
        """The mosaic's page in the web gallery, when GALLERY_PUBLIC_URL says where it is."""
        return mosaic_url(self.ctx.settings, mosaic_id)

    async def ask(
        self,
        platform: str,
        user: str,
        reply_to: dict,
        image: bytes | None,
        question: str,
        follow_up_of: int | None = None,
    ) -> Reply:
        """Queue a question about a photo; the reply carries the job id and queue position.

        A follow-up (`follow_up_of`, the job whose answer it continues) may come without a
        photo: it then asks about the photo of that conversation."""
        try:
            if image is None and follow_up_of is None:
                raise BadImage(NO_PHOTO)
            self.cooldowns.check(f"{platform}:{user}", "ask")
            if image is not None:
                # Decoding proves it is a whole, sane image before anything is stored or queued.
                await self._off_loop(partial(
                    decode_image, image, self.ctx.settings.max_image_pixels,
                    max_bytes=self.ctx.settings.max_upload_bytes,
                ))
            job = await self._off_loop(partial(
                self.queue.submit, platform, user, reply_to, image, question,
                follow_up_of=follow_up_of,
            ))
        except UserError as error:
            return error_reply(error)
        return Reply(queued_text(job.position), job_id=job.job_id)

    async def follow_up_for_message(
        self, platform: str, channel_id: str, message_id: str
    ) -> int | None:
        """The job whose answer this message shows (a reply to it is a follow-up), or None."""
        return await self._off_loop(self._answer_shown, platform, channel_id, message_id)

    async def remember(self, platform: str, channel_id: str, message_id: str,
                       mosaic_id: int) -> None:
        await self._off_loop(self._remember, platform, channel_id, message_id, mosaic_id)

    async def _showing(self, mosaic: Mosaic, max_bytes: int, built: bool) -> Reply:
        preview = await self._off_loop(preview_image, self.ctx, mosaic, max_bytes)
        last = format_coordinate(mosaic.rows - 1, mosaic.cols - 1)
        verb = "Built" if built else "Mosaic"
        text = (
            f"{verb} {mosaic.name}: {mosaic.cols}x{mosaic.rows} tiles of car photos. "
            f"Reply to this message with a tile from A1 to {last} to see the car behind it."
        )
        if page := mosaic_url(self.ctx.settings, mosaic.id):
            text += f" Explore it in the gallery: {page}"
        kind = EXTENSIONS.get(image_content_type(preview), "jpg")
        return Reply(text, files=[(f"{_file_stem(mosaic.name)}.{kind}", preview)],
                     mosaic_id=mosaic.id)

    def _find(self, scope: str, name: str) -> Mosaic:
        try:
            return find_mosaic(self.ctx, name, scope)
        except UnknownMosaic:
            if scope == SHARED_SCOPE:
                raise
            return find_mosaic(self.ctx, name, SHARED_SCOPE)

    def _visible(self, scope: str) -> list[Mosaic]:
        own = list_mosaics(self.ctx, scope)
        shared = list_mosaics(self.ctx, SHARED_SCOPE) if scope != SHARED_SCOPE else []
        names = {m.name for m in own}
        return own + [m for m in shared if m.name not in names]

    def _lookup(self, scope: str, name: str, coordinate: str) -> tuple[Mosaic, TileLookup]:
        mosaic = self._find(scope, name)
        return mosaic, tile_lookup(self.ctx, mosaic, coordinate)

    def _lookup_for_message(
        self, platform: str, channel_id: str, message_id: str, coordinate: str
    ) -> tuple[Mosaic, TileLookup] | None:
        with self.ctx.db.session() as session:
            mosaic = mosaic_for_message(session, platform, channel_id, message_id)
        return None if mosaic is None else (mosaic, tile_lookup(self.ctx, mosaic, coordinate))

    def _mosaic_shown(self, platform: str, channel_id: str, message_id: str) -> Mosaic | None:
        with self.ctx.db.session() as session:
            return mosaic_for_message(session, platform, channel_id, message_id)

    def _lookup_by_id(self, mosaic_id: int, coordinate: str) -> TileLookup:
        return tile_lookup(self.ctx, mosaic_by_id(self.ctx, mosaic_id), coordinate)

    def _remember(self, platform: str, channel_id: str, message_id: str, mosaic_id: int) -> None:
        with self.ctx.db.session() as session:
            remember_message(session, platform, channel_id, message_id, mosaic_id)

    def _cancel_queued(self, platform: str, user: str, job_id: int) -> str:
        with self.ctx.db.session() as session:
            job = job_rows.job_by_id(session, job_id)
            if job is None or job.platform != platform:
                return NOT_WAITING
            if job.user_id != user:
                return NOT_YOURS
            if job_rows.cancel_queued_job(session, job_id, user):
                return CANCELLED
            session.refresh(job)
            return ALREADY_STARTED if job.status == "running" else NOT_WAITING

    def _answer_shown(self, platform: str, channel_id: str, message_id: str) -> int | None:
        with self.ctx.db.session() as session:
            return job_for_answer_message(session, platform, channel_id, message_id)


def outcome_text(job: Job) -> str:
    """What the asker is told of a finished job: its answer, or why there is none."""
    if job.status == "done":
        return job.answer or ""
    if job.status == "cancelled":
        return CANCELLED
    return job.error or UNEXPECTED_FAILURE


def queued_text(position: int | None) -> str:
    if not position or position <= 1:
        return "Your question is next in line; the answer will follow here."
    return f"Your question is #{position} in the queue; the answer will follow here."


def is_coordinate(text: str) -> bool:
    return bool(COORDINATE_MESSAGE.match(text or ""))


def describe_car(info: dict | None) -> str:
    if info is None:
        return "a car no longer in the library"
    name = " ".join(str(info[k]) for k in ("year", "make", "model") if info.get(k))
    details = [name or info.get("file_name") or "a car photo"]
    if info.get("fuel"):
        details.append(str(info["fuel"]))
    if info.get("co2_g_km") is not None:
        details.append(f"{info['co2_g_km']:g} g CO2/km")
    if info.get("emission_standard"):
        details.append(str(info["emission_standard"]))
    if info.get("source"):
        details.append(f"source: {info['source']}")
    return ", ".join(details)


async def _tile_reply(
    mosaic: Mosaic, found: TileLookup, max_bytes: int, settings: Settings
) -> Reply:
    image = found.image_bytes
    content_type = found.content_type
    if len(image) > max_bytes:
        image = await asyncio.to_thread(jpeg_within, image, max_bytes)
        content_type = "image/jpeg"
    text = f"{found.label} of {mosaic.name}: {describe_car(found.car_info)}."
    if found.note:
        text += " " + found.note
    if page := tile_url(settings, mosaic.id, found.label):
        text += f" See it in the mosaic: {page}"
    name = f"{_file_stem(mosaic.name)}-{found.label}.{EXTENSIONS.get(content_type, 'jpg')}"
    return Reply(text, files=[(name, image)], tile=(mosaic.id, found.label))


class _ProgressRelay:
    """build_mosaic's progress(stage, done, total), called in the build's thread, relayed to
    an async `progress(sentence)` on the loop: one sentence per stage quarter, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str,
                 progress: BuildProgress | None):
        self.loop = loop
        self.name = name
        self.progress = progress
        self._last: tuple[str, int] | None = None
        self._sentences: asyncio.Queue[str | None] = asyncio.Queue()
        self._delivery = loop.create_task(self._deliver()) if progress else None

    def __call__(self, stage: str, done: int, total: int) -> None:
        quarter = min(4, 4 * done // max(total, 1))
        if (stage, quarter) == self._last:
            return
        self._last = (stage, quarter)
        text = f"Building {self.name}: {BUILD_STAGES.get(stage, stage)}, {25 * quarter}%."
        if stage == "placing" and quarter == 4:
            text = f"Building {self.name}: rendering the mosaic."
        self.loop.call_soon_threadsafe(self._sentences.put_nowait, text)

    async def _deliver(self) -> None:
        while (text := await self._sentences.get()) is not None:
            # Only the newest sentence matters when the chat is slower than the build.
            while not self._sentences.empty():
                newer = self._sentences.get_nowait()
                if newer is None:
                    self._sentences.put_nowait(None)
                    break
                text = newer
            try:
                await self.progress(text)
            except Exception:
                # A progress line that cannot be shown must not fail the build it reports on.
                log.exception("build progress not shown")

    async def close(self) -> None:
        if self._delivery is None:
            return
        self._sentences.put_nowait(None)
        await self._delivery


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:60] or "mosaic"


@dataclass(frozen=True)
class PostedAnswer:
    """Where a platform posted an answer: a reply to that message asks a follow-up question."""

    platform: str
    channel_id: str
    message_id: str


class JobStatus(Protocol):
    """Where one job's status shows on a platform: a message to edit, then the answer to post
    (`finish` says where it posted it, or None when replies to it cannot be followed)."""

    async def update(self, text: str) -> None: ...

    async def finish(self, text: str) -> PostedAnswer | None: ...


# A platform's way to answer a job it has no live status for (e.g. after a restart).
Fallback = Callable[[Job, str], Awaitable[PostedAnswer | None]]


class _Followed:
    """A live status and the lock that keeps its edits in order: nothing edits it once the
    outcome is posted, even a progress edit that was still on its way."""

    def __init__(self, status: JobStatus):
        self.status = status
        self.lock = asyncio.Lock()
        self.finished = False

    async def update(self, text: str) -> None:
        async with self.lock:
            if not self.finished:
                await self.status.update(text)

    async def finish(self, text: str) -> PostedAnswer | None:
        async with self.lock:
            self.finished = True
            return await self.status.finish(text)


class JobUpdates:
    """The worker's on_update(job_id, event, text), routed to the status message of that job:
    position and progress events edit it, a final event posts the answer (or why there is none).
    The message showing an answer is remembered, so a reply to it becomes a follow-up.

    A worker in another process (another host) finishes jobs too: `poll_forever` looks for
    finished jobs of this process's platforms whose outcome is not posted yet and posts them.
    Each outcome is posted once, by whichever path marks the job's row first (`posted_at`), so
    the local worker's event and the poll never both post, nor do two processes; a process that
    cannot post a job (a worker with no chat tokens) leaves it to the one that can.
    """

    def __init__(self, queue: JobQueue):
        self.queue = queue
        self._live: dict[int, _Followed] = {}
        self._fallbacks: dict[str, Fallback] = {}
        self._attaching = asyncio.Lock()
        self._failed_posts: dict[int, int] = {}

    def add_fallback(self, platform: str, fallback: Fallback) -> None:
        self._fallbacks[platform] = fallback

    def forget(self, job_id: int) -> None:
        """Stop following a job that will send no more updates (cancelled before it started)."""
        self._live.pop(job_id, None)

    async def follow(
        self, ask: Awaitable[Reply], show: Callable[[str], Awaitable[JobStatus]]
    ) -> Reply:
        """Queue a question (`ask` is Commands.ask(...)) and show its status with `show(text)`.

        Both happen under one lock, so the worker's first update for the job waits until the
        status message exists, however fast the answer comes."""
        async with self._attaching:
            reply = await ask
            if reply.job_id is not None:
                self._live[reply.job_id] = _Followed(await show(reply.text))
        return reply

    async def __call__(self, job_id: int, event: str, text: str) -> None:
        if event in FINAL_EVENTS:
            await self._post_outcome(job_id, event, text)
            return
        async with self._attaching:
            followed = self._live.get(job_id)
        if followed is not None:
            await followed.update(text)

    async def post_finished(self) -> int:
        """Post the outcome of every finished job of this process's platforms that nobody has
        posted yet, whichever worker finished it; returns how many this call posted. One
        indexed query, off the event loop. A post that fails is logged and tried again by the
        next polls, POST_TRIES times in all."""
        if not self._fallbacks:
            return 0
        jobs = await asyncio.to_thread(self._unposted, sorted(self._fallbacks))
        posted = 0
        for job in jobs:
            try:
                posted += await self._post_outcome(job.id, job.status, outcome_text(job), job)
            except Exception:
                log.exception("could not post the outcome of job %s", job.id)
        return posted

    async def poll_forever(self, poll_s: float) -> None:
        """`post_finished` every `poll_s` seconds until cancelled."""
        while True:
            try:
                await self.post_finished()
            except Exception:
                # An unreachable database must not end the poll; look again next time.
                log.exception("could not look for answers to post")
            await asyncio.sleep(poll_s)

    async def _post_outcome(self, job_id: int, event: str, text: str,
                            job: Job | None = None) -> bool:
        """Post one job's outcome if this process can and nobody posted it; True if it did."""
        async with self._attaching:
            live = job_id in self._live
        fallback = None
        if not live:
            job = job or await asyncio.to_thread(self.queue.get, job_id)
            fallback = self._fallbacks.get(job.platform) if job is not None else None
            if fallback is None:
                return False  # no way to post it from here: the gateway's poll will
        if not await asyncio.to_thread(self._claim_posting, job_id):
            return False  # posted already, by the other path or another process
        async with self._attaching:
            followed = self._live.pop(job_id, None)
        try:
            if followed is not None:
                posted = await followed.finish(text)
            else:
                job = job or await asyncio.to_thread(self.queue.get, job_id)
                fallback = fallback or self._fallbacks.get(job.platform)
                posted = await fallback(job, text) if fallback is not None else None
        except Exception:
            tries = self._failed_posts[job_id] = self._failed_posts.get(job_id, 0) + 1
            if tries < POST_TRIES:
                # Unmarked, the next poll (here or in another gateway) tries it again.
                await asyncio.to_thread(self._release_posting, job_id)
            else:
                del self._failed_posts[job_id]
            raise
        self._failed_posts.pop(job_id, None)
        # Only an answer can be followed up; a reply to a failure is an ordinary message.
        if event == "done" and posted is not None:
            await asyncio.to_thread(self._remember_answer, posted, job_id)
        return True

    def _unposted(self, platforms: list[str]) -> list[Job]:
        with self.queue.ctx.db.session() as session:
            return job_rows.unposted_outcomes(session, platforms)

    def _claim_posting(self, job_id: int) -> bool:
        with self.queue.ctx.db.session() as session:
            return job_rows.claim_posting(session, job_id)

    def _release_posting(self, job_id: int) -> None:
        with self.queue.ctx.db.session() as session:
            job_rows.release_posting(session, job_id)

    def _remember_answer(self, posted: PostedAnswer, job_id: int) -> None:
        with self.queue.ctx.db.session() as session:
            remember_answer(session, posted.platform, posted.channel_id, posted.message_id,
                            job_id)
