"""`talkmosaic chat`: TalkMosaic as a conversation in the terminal, no tokens needed. It goes
through the same commands layer (bot/commands.py) as Discord and Slack, and runs the Q&A
worker in-process: the loop reads lines, the answer runs in the worker's thread.

Images the chat would upload (previews, tile photos) are written to DATA_DIR/chat/ and their
paths printed. A question waits for its answer before the next line is read, so a piped
script of lines reads like a conversation.
"""

import asyncio
import itertools
import shlex
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from bot.commands import (
    SHARED_SCOPE,
    Commands,
    Cooldowns,
    JobUpdates,
    PostedAnswer,
    Reply,
    is_coordinate,
)
from core.context import AppContext
from core.errors import ModelNotInstalled
from core.worker import AnswerFn, JobQueue, JobView, Progress, Worker

PLATFORM = "terminal"
CHANNEL = "terminal"
USER = "you"
HELP = """\
Commands:
  /mosaic build PATH NAME [COLUMNS]  build a mosaic of the image at PATH (quote names with spaces)
  /mosaic show NAME                  show a mosaic: its preview is saved, its tiles become C7...
  /mosaic list                       the mosaics built so far
  /mosaic tile NAME C7               the car behind one tile of a mosaic
  C7                                 the car behind that tile of the last mosaic shown
  /random                            the car behind a random tile of the last mosaic shown
  /ask PATH QUESTION                 ask about the car photo at PATH
  /ask C7 QUESTION                   ask about the car behind that tile of the last mosaic
  any other text                     a follow-up question about the last answer
  /help                              this list
  /quit                              leave (Ctrl-D too)"""
WELCOME = ("TalkMosaic chat. Type /help for the commands, /mosaic list for the mosaics, "
           "/quit to leave.")
NOTHING_SHOWN = "Show or build a mosaic first (/mosaic show NAME), then type a tile such as C7."
USAGE = {
    "build": "Usage: /mosaic build PATH NAME [COLUMNS], e.g. /mosaic build panda.png panda 60.",
    "show": "Usage: /mosaic show NAME.",
    "tile": "Usage: /mosaic tile NAME C7.",
    "ask": 'Usage: /ask PATH QUESTION, e.g. /ask car.jpg "Which parts of this car pollute?"',
    "mosaic": "Usage: /mosaic build PATH NAME [COLUMNS], /mosaic show NAME, /mosaic list, "
              "/mosaic tile NAME C7.",
}


class LazyPipeline:
    """The real answer pipeline, loaded at the first question (mosaic commands never wait for
    the models), before that question is queued: loading is not part of its answer time."""

    def __init__(self, ctx: AppContext):
        self.ctx = ctx
        self._pipeline = None
        self._loading = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._pipeline is not None

    def load(self) -> None:
        """Load the models (seconds); raises ModelNotInstalled naming what to install."""
        with self._loading:
            if self._pipeline is None:
                from core.qa.pipeline import AnswerPipeline

                self._pipeline = AnswerPipeline(self.ctx)

    def __call__(self, job: JobView, progress: Progress):
        self.load()
        return self._pipeline.answer_job(job, progress)


class TerminalStatus:
    """A question's status lines, then its answer, printed; `done` is set once it is in."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self.done = asyncio.Event()

    async def update(self, text: str) -> None:
        self.say(f"  ... {text}")

    async def finish(self, text: str) -> PostedAnswer | None:
        self.say(text)
        self.done.set()
        return None


class TerminalChat:
    """One person's conversation: what the last mosaic shown and the last answer were."""

    def __init__(self, commands: Commands, updates: JobUpdates, out: TextIO, files_dir: Path,
                 pipeline: LazyPipeline | None = None):
        self.commands = commands
        self.pipeline = pipeline
        self.updates = updates
        self.queue = commands.queue
        self.out = out
        self.files_dir = files_dir
        self.max_bytes = commands.ctx.settings.preview_max_bytes
        self.last_mosaic: str | None = None  # the "message" showing it, as the chats remember
        self.last_answer: int | None = None  # the job whose answer a follow-up continues
        self._messages = itertools.count(1)

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    async def handle(self, line: str) -> bool:
        """Answer one line; False when the chat should end."""
        line = line.strip()
        if not line:
            return True
        if line.startswith("/"):
            try:
                words = shlex.split(line)
            except ValueError:
                self.say("That line has an unclosed quote; close it and try again.")
                return True
            command, args = words[0].lower(), words[1:]
            if command in ("/quit", "/exit"):
                return False
            if command == "/help":
                self.say(HELP)
            elif command == "/mosaic":
                await self._mosaic(args)
            elif command == "/random":
                await self._random()
            elif command == "/ask":
                await self._ask(args)
            else:
                self.say(f"There is no command {command}; type /help for the list.")
            return True
        if is_coordinate(line):
            await self._tile_of_last(line)
        elif self.last_answer is not None:
            await self._question(None, line, follow_up_of=self.last_answer)
        else:
            self.say("Type /help for the commands; ask about a car photo with /ask PATH QUESTION.")
        return True

    async def _mosaic(self, args: list[str]) -> None:
        verb, rest = (args[0].lower(), args[1:]) if args else ("", [])
        if verb == "list" and not rest:
            await self._show(await self.commands.mosaics(SHARED_SCOPE))
        elif verb == "show" and rest:
            await self._show(await self.commands.show(SHARED_SCOPE, USER, " ".join(rest),
                                                      self.max_bytes))
        elif verb == "tile" and len(rest) >= 2:
            await self._show(await self.commands.tile(SHARED_SCOPE, " ".join(rest[:-1]), rest[-1],
                                                      self.max_bytes))
        elif verb == "build" and len(rest) >= 2:
            await self._build(rest)
        else:
            self.say(USAGE.get(verb, USAGE["mosaic"]))

    async def _build(self, args: list[str]) -> None:
        path, rest = Path(args[0]).expanduser(), args[1:]
        columns = None
        if len(rest) > 1 and rest[-1].isdigit():
            columns, rest = int(rest[-1]), rest[:-1]
        target = self._read(path)
        if target is None:
            return

        async def progress(text: str) -> None:
            self.say(f"  ... {text}")

        reply = await self.commands.build(SHARED_SCOPE, USER, target, " ".join(rest), columns,
                                          self.max_bytes, progress=progress)
        await self._show(reply)

    async def _tile_of_last(self, coordinate: str) -> None:
        if self.last_mosaic is None:
            self.say(NOTHING_SHOWN)
            return
        await self._show(await self.commands.tile_for_message(
            PLATFORM, CHANNEL, self.last_mosaic, coordinate, self.max_bytes))

    async def _random(self) -> None:
        if self.last_mosaic is None:
            self.say(NOTHING_SHOWN)
            return
        await self._show(await self.commands.random_tile_for_message(
            PLATFORM, CHANNEL, self.last_mosaic, self.max_bytes))

    async def _ask(self, args: list[str]) -> None:
        if len(args) < 2:
            self.say(USAGE["ask"])
            return
        what, question = args[0], " ".join(args[1:])
        if is_coordinate(what) and not Path(what).exists():
            if self.last_mosaic is None:
                self.say(NOTHING_SHOWN)
                return
            mosaic = await self.commands.mosaic_shown(PLATFORM, CHANNEL, self.last_mosaic)
            if mosaic is None:
                self.say("That mosaic is no longer here.")
                return
            await self._question(None, question, tile=(mosaic.id, what))
            return
        photo = self._read(Path(what).expanduser())
        if photo is not None:
            await self._question(photo, question)

    async def _question(self, photo: bytes | None, question: str,
                        follow_up_of: int | None = None,
                        tile: tuple[int, str] | None = None) -> None:
        """Queue it, print its status as it moves, and wait for its answer."""
        if self.pipeline is not None and not self.pipeline.loaded:
            self.say("  ... Loading the answering models (once per chat).")
            try:
                await asyncio.to_thread(self.pipeline.load)
            except ModelNotInstalled as error:
                self.say(str(error))
                return
        status = TerminalStatus(self.say)

        async def show(text: str) -> TerminalStatus:
            self.say(f"  ... {text}")
            return status

        reply_to = {"channel": CHANNEL}
        if tile is not None:
            asked = self.commands.ask_about_tile(PLATFORM, USER, reply_to, *tile, question)
        else:
            asked = self.commands.ask(PLATFORM, USER, reply_to, photo, question,
                                      follow_up_of=follow_up_of)
        reply = await self.updates.follow(asked, show)
        if reply.job_id is None:
            self.say(reply.text)
            return
        await status.done.wait()
        job = await asyncio.to_thread(self.queue.get, reply.job_id)
        if job is not None and job.status == "done":
            self.last_answer = job.id

    async def _show(self, reply: Reply | None) -> None:
        if reply is None:
            self.say("That mosaic is no longer here.")
            return
        self.say(reply.text.replace("Reply to this message with a tile",
                                    "Type a tile (or /random), any tile"))
        for name, data in reply.files:
            path = self.files_dir / name
            await asyncio.to_thread(self._write, path, data)
            self.say(f"  image: {path}")
        if reply.mosaic_id is not None:
            self.last_mosaic = f"m{next(self._messages)}"
            await self.commands.remember(PLATFORM, CHANNEL, self.last_mosaic, reply.mosaic_id)

    def _read(self, path: Path) -> bytes | None:
        if not path.is_file():
            self.say(f"There is no file at {path}.")
            return None
        try:
            return path.read_bytes()
        except OSError as error:
            self.say(f"{path} could not be read ({error.strerror or error}).")
            return None

    def _write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


async def chat(ctx: AppContext, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout,
               answer_fn: AnswerFn | None = None) -> int:
    """Read lines until /quit or the end of input; returns the exit status (0)."""
    queue = JobQueue(ctx)
    updates = JobUpdates(queue)
    commands = Commands(ctx, queue, Cooldowns(0))
    pipeline = LazyPipeline(ctx) if answer_fn is None else None
    worker = Worker(ctx, answer_fn or pipeline, on_update=updates,
                    platforms=frozenset({PLATFORM}), poll_s=0.1)
    working = asyncio.create_task(worker.run_forever(), name="worker")
    session = TerminalChat(commands, updates, out, ctx.settings.data_dir / "chat", pipeline)
    interactive = stdin.isatty()
    session.say(WELCOME)
    try:
        while True:
            if interactive:
                print("> ", end="", file=out, flush=True)
            line = await asyncio.to_thread(stdin.readline)
            if not line or not await session.handle(line):
                break
    finally:
        worker.stop_taking_jobs()
        working.cancel()
        await asyncio.gather(working, return_exceptions=True)
    return 0
