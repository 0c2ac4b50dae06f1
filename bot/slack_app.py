"""The Slack adapter (slack-bolt, async): `/mosaic build|show|list|tile`, thread replies such as
`C7` under a mosaic, photos shared with a question that mentions the app, and follow-up
questions: any reply in a thread where the app answered continues that conversation.

Listeners ack() first (Slack wants it within 3 s), then do the work. A mosaic is posted as a
message with its preview uploaded into that message's thread, where tile replies go.
"""

import ipaddress
import logging
import re
from collections.abc import Iterable

import aiohttp
from slack_bolt.async_app import AsyncApp, AsyncBoltContext
from slack_sdk.web.async_client import AsyncWebClient
from yarl import URL

from bot.commands import (
    NOT_AN_IMAGE,
    SORRY,
    Commands,
    JobUpdates,
    PostedAnswer,
    Reply,
    check_attachment,
    error_reply,
    is_coordinate,
)
from core.errors import BadImage, UserError
from storage.models import Job

log = logging.getLogger(__name__)

PLATFORM = "slack"
USAGE = (
    "Usage: /mosaic build NAME [COLUMNS] (uses the last image you shared here), "
    "/mosaic show NAME, /mosaic list, /mosaic tile NAME C7."
)
MENTION = re.compile(r"<@[A-Z0-9]+>")
# How far back /mosaic build looks for the user's last image.
HISTORY_LIMIT = 50
MAX_REDIRECTS = 3
REDIRECTS = frozenset({301, 302, 303, 307, 308})
CHUNK_BYTES = 256 * 1024


def scope_of(team_id: str | None) -> str:
    return f"slack:{team_id or 'unknown'}"


class SlackFiles:
    """Downloads `url_private` files with the bot token, and only if Slack says it is an image.

    The token goes only to Slack's file hosts (`file_hosts`, over HTTPS; plain HTTP only on
    this machine, for stand-ins). Redirects are followed by hand: each hop's host is checked
    again, and a hop to any other host (a pre-signed link) goes without the token. The body is
    read to its end in chunks and refused once it passes `max_bytes`.

    Slack answers a request it cannot authorise with its HTML sign-in page and status 200, so
    the content type is what tells a photo from a page."""

    def __init__(self, bot_token: str, max_bytes: int,
                 file_hosts: Iterable[str] = ("files.slack.com",)):
        self._headers = {"Authorization": f"Bearer {bot_token}"}
        self.max_bytes = max_bytes
        self.file_hosts = frozenset(host.lower() for host in file_hosts)
        self._session: aiohttp.ClientSession | None = None

    async def download(self, file: dict) -> bytes:
        check_attachment(file.get("mimetype"), file.get("size"), self.max_bytes)
        url = file.get("url_private_download") or file.get("url_private")
        if not url:
            raise BadImage("That file has no download link; please share it again.")
        if not self._may_send_token(URL(url)):
            raise BadImage("That file is not stored by Slack, so it was not downloaded.")
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        try:
            data, content_type = await self._get(URL(url))
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            raise BadImage("That file could not be downloaded; please share it again.") from error
        check_attachment(content_type, len(data), self.max_bytes)
        return data

    def _may_send_token(self, url: URL) -> bool:
        host = (url.host or "").lower()
        if host not in self.file_hosts:
            return False
        return url.scheme == "https" or (url.scheme == "http" and _is_loopback(host))

    async def _get(self, url: URL) -> tuple[bytes, str]:
        for _hop in range(MAX_REDIRECTS + 1):
            headers = self._headers if self._may_send_token(url) else {}
            async with self._session.get(url, headers=headers, allow_redirects=False) as response:
                if response.status in REDIRECTS and "Location" in response.headers:
                    url = url.join(URL(response.headers["Location"]))
                    continue
                content_type = response.headers.get("Content-Type", "")
                if response.status != 200 or not content_type.lower().startswith("image/"):
                    raise BadImage("That file could not be downloaded as an image; "
                                   "please share a JPEG, PNG or WebP photo.")
                if (response.content_length or 0) > self.max_bytes:
                    raise BadImage(_too_large(self.max_bytes))
                return await self._read_capped(response), content_type
        raise BadImage("That file could not be downloaded (too many redirects); "
                       "please share it again.")

    async def _read_capped(self, response: aiohttp.ClientResponse) -> bytes:
        body = bytearray()
        async for chunk in response.content.iter_chunked(CHUNK_BYTES):
            body += chunk
            if len(body) > self.max_bytes:
                raise BadImage(_too_large(self.max_bytes))
        return bytes(body)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _too_large(max_bytes: int) -> str:
    return f"That image is over the {max_bytes // (1024 * 1024)} MiB upload limit."


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def make_slack_app(
    commands: Commands,
    updates: JobUpdates,
    *,
    client: AsyncWebClient,
    signing_secret: str | None = None,
    files: SlackFiles | None = None,
) -> AsyncApp:
    """The bolt app. HTTP mode verifies requests with `signing_secret`; Socket Mode needs none."""
    settings = commands.ctx.settings
    app = AsyncApp(
        client=client,
        signing_secret=signing_secret or "",
        request_verification_enabled=bool(signing_secret),
    )
    files = files or SlackFiles(client.token, settings.max_upload_bytes,
                                settings.slack_file_hosts)
    max_bytes = settings.preview_max_bytes

    async def post(channel: str, user: str, reply: Reply, thread_ts: str | None = None) -> None:
        if reply.ephemeral:
            await client.chat_postEphemeral(channel=channel, user=user, text=reply.text,
                                            thread_ts=thread_ts)
            return
        if reply.mosaic_id is not None:
            posted = await client.chat_postMessage(channel=channel, text=reply.text)
            thread_ts = posted["ts"]
            await commands.remember(PLATFORM, channel, thread_ts, reply.mosaic_id)
            await upload(channel, thread_ts, reply, comment=None)
            return
        if reply.files:
            await upload(channel, thread_ts, reply, comment=reply.text)
        else:
            await client.chat_postMessage(channel=channel, text=reply.text, thread_ts=thread_ts)

    async def upload(channel: str, thread_ts: str | None, reply: Reply,
                     comment: str | None) -> None:
        uploads = [{"file": data, "filename": name, "title": name} for name, data in reply.files]
        await client.files_upload_v2(file_uploads=uploads, channel=channel, thread_ts=thread_ts,
                                     initial_comment=comment)

    async def latest_image(channel: str, user: str) -> dict:
        history = await client.conversations_history(channel=channel, limit=HISTORY_LIMIT)
        for message in history.get("messages", []):
            if message.get("user") != user:
                continue
            for file in message.get("files", []):
                if (file.get("mimetype") or "").startswith("image/"):
                    return file
        raise BadImage("Share an image in this channel first, then run /mosaic build NAME.")

    @app.command("/mosaic")
    async def mosaic_command(ack, command: dict) -> None:
        await ack()
        channel, user = command["channel_id"], command["user_id"]
        scope = scope_of(command.get("team_id"))
        words = (command.get("text") or "").split()
        verb, args = (words[0].lower(), words[1:]) if words else ("", [])
        try:
            if verb == "build" and args:
                columns = None
                if len(args) > 1 and args[-1].isdigit():
                    columns, args = int(args[-1]), args[:-1]
                target = await files.download(await latest_image(channel, user))
                reply = await commands.build(scope, f"{PLATFORM}:{user}", target, " ".join(args),
                                             columns, max_bytes)
            elif verb == "show" and args:
                reply = await commands.show(scope, f"{PLATFORM}:{user}", " ".join(args), max_bytes)
            elif verb == "list":
                reply = await commands.mosaics(scope)
            elif verb == "tile" and len(args) >= 2:
                reply = await commands.tile(scope, " ".join(args[:-1]), args[-1], max_bytes)
            else:
                reply = Reply(USAGE, ephemeral=True)
        except UserError as error:
            reply = error_reply(error)
        except Exception:
            # Caught here, not in unexpected_failure: bolt's error path after an ack() clears
            # the command's HTTP response, and Slack would then see the command time out.
            log.exception("/mosaic %s failed", verb)
            reply = Reply(SORRY, ephemeral=True)
        await post(channel, user, reply)

    async def ask_in_thread(event: dict, thread_ts: str, follow_up_of: int | None = None) -> None:
        """Queue the event's question about its photo and answer it in the thread. A follow-up
        may come without a photo: it asks about its conversation's photo."""
        channel, user = event["channel"], event["user"]
        question = " ".join(MENTION.sub(" ", event.get("text") or "").split())
        photos = [f for f in event.get("files", [])
                  if (f.get("mimetype") or "").startswith("image/")]
        if not photos and (event.get("files") or follow_up_of is None):
            if event.get("files"):
                await post(channel, user, error_reply(BadImage(NOT_AN_IMAGE)), thread_ts)
            return
        image = None
        if photos:
            try:
                image = await files.download(photos[0])
            except UserError as error:
                await post(channel, user, error_reply(error), thread_ts)
                return
        reply_to = {"channel": channel, "thread_ts": thread_ts, "user": user}

        async def show(text: str) -> SlackStatus:
            posted = await client.chat_postMessage(channel=channel, thread_ts=thread_ts, text=text)
            return SlackStatus(client, channel, thread_ts, posted["ts"])

        asked = commands.ask(PLATFORM, user, reply_to, image, question, follow_up_of=follow_up_of)
        reply = await updates.follow(asked, show)
        if reply.job_id is None:
            await post(channel, user, reply, thread_ts)

    @app.event("message")
    async def thread_reply(event: dict, context: AsyncBoltContext) -> None:
        """A reply in a thread: C7 under a mosaic, or a follow-up question under an answer."""
        thread_ts, text = event.get("thread_ts"), event.get("text") or ""
        if event.get("bot_id") or event.get("subtype") not in (None, "file_share"):
            return
        if not thread_ts or thread_ts == event.get("ts"):
            return
        channel = event["channel"]
        if is_coordinate(text):
            reply = await commands.tile_for_message(PLATFORM, channel, thread_ts, text, max_bytes)
            if reply is not None:
                await post(channel, event["user"], reply, thread_ts=thread_ts)
            return
        if f"<@{context.bot_user_id}>" in text:
            return  # Slack sends it as an app_mention too; that listener takes it.
        parent = await commands.follow_up_for_message(PLATFORM, channel, thread_ts)
        if parent is not None:
            await ask_in_thread(event, thread_ts, follow_up_of=parent)

    @app.event("app_mention")
    async def question_about_photo(event: dict) -> None:
        """A photo shared with a question that mentions the app: queued, answered in thread.
        In a thread where the app answered, it is a follow-up (its photo is optional)."""
        thread_ts = event.get("thread_ts") or event["ts"]
        parent = None
        if event.get("thread_ts"):
            parent = await commands.follow_up_for_message(PLATFORM, event["channel"], thread_ts)
        await ask_in_thread(event, thread_ts, follow_up_of=parent)

    async def answer_without_status(job: Job, text: str) -> PostedAnswer | None:
        where = job.reply_to or {}
        if not where.get("channel"):
            return None
        await client.chat_postMessage(channel=where["channel"], text=text,
                                      thread_ts=where.get("thread_ts"))
        if not where.get("thread_ts"):
            return None
        return PostedAnswer(PLATFORM, where["channel"], where["thread_ts"])

    @app.error
    async def unexpected_failure(error: Exception, body: dict) -> None:
        """An event listener's unexpected failure: logged, and one private sentence to the user."""
        log.error("Slack listener failed", exc_info=error)
        event = body.get("event") or {}
        channel = event.get("channel") or body.get("channel_id")
        user = event.get("user") or body.get("user_id")
        if channel and user:
            await client.chat_postEphemeral(channel=channel, user=user, text=SORRY,
                                            thread_ts=event.get("thread_ts") or event.get("ts"))

    updates.add_fallback(PLATFORM, answer_without_status)
    return app


class SlackStatus:
    """A job's status as a message in the asker's thread (edited), then the answer below it."""

    def __init__(self, client: AsyncWebClient, channel: str, thread_ts: str, status_ts: str):
        self.client = client
        self.channel = channel
        self.thread_ts = thread_ts
        self.status_ts = status_ts

    async def update(self, text: str) -> None:
        await self.client.chat_update(channel=self.channel, ts=self.status_ts, text=text)

    async def finish(self, text: str) -> PostedAnswer:
        """Post the answer in the thread; the thread (its ts) is what a follow-up replies in."""
        await self.client.chat_postMessage(channel=self.channel, thread_ts=self.thread_ts,
                                           text=text)
        return PostedAnswer(PLATFORM, self.channel, self.thread_ts)
