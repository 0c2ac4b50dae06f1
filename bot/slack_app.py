"""The Slack adapter (slack-bolt, async): `/mosaic build|show|list|tile`, `/ask`, thread replies
such as `C7` under a mosaic, photos shared with a question that mentions the app, follow-up
questions (any reply in a thread where the app answered), and Block Kit buttons and modals:
"Pick a tile", "Random tile", "Open in gallery" under a mosaic, "Ask about this car" under a
tile, and the message shortcut "Ask about this photo". The app's manifest: bot/slack-manifest.yml.

Listeners ack() first (Slack wants it within 3 s), then do the work; a modal's bad input is
answered in the ack itself, as an error under its field. A mosaic is posted as a message with
its preview uploaded into that message's thread, where tile replies go.
"""

import ipaddress
import json
import logging
import re
from collections.abc import Iterable

import aiohttp
from slack_bolt.async_app import AsyncApp, AsyncBoltContext
from slack_sdk.errors import SlackApiError
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

    async def post(channel: str, user: str, reply: Reply, thread_ts: str | None = None,
                   mosaic_ts: str | None = None) -> None:
        """Send a reply. A mosaic goes in a new message (or `mosaic_ts`, its status message,
        edited) with its buttons, its preview in that message's thread."""
        if reply.ephemeral:
            await client.chat_postEphemeral(channel=channel, user=user, text=reply.text,
                                            thread_ts=thread_ts)
            return
        if reply.mosaic_id is not None:
            blocks = mosaic_blocks(reply.text, reply.mosaic_id,
                                   commands.gallery_url(reply.mosaic_id))
            if mosaic_ts is None:
                posted = await client.chat_postMessage(channel=channel, text=reply.text,
                                                       blocks=blocks)
                mosaic_ts = posted["ts"]
            else:
                await client.chat_update(channel=channel, ts=mosaic_ts, text=reply.text,
                                         blocks=blocks)
            await commands.remember(PLATFORM, channel, mosaic_ts, reply.mosaic_id)
            await upload(channel, mosaic_ts, reply, comment=None)
            return
        if reply.files:
            await upload(channel, thread_ts, reply, comment=reply.text)
        else:
            await client.chat_postMessage(channel=channel, text=reply.text, thread_ts=thread_ts)
        if reply.tile is not None:
            mosaic_id, label = reply.tile
            await client.chat_postMessage(channel=channel, thread_ts=thread_ts,
                                          text=f"Ask about the car behind {label}",
                                          blocks=tile_blocks(mosaic_id, label))

    async def upload(channel: str, thread_ts: str | None, reply: Reply,
                     comment: str | None) -> None:
        uploads = [{"file": data, "filename": name, "title": name} for name, data in reply.files]
        await client.files_upload_v2(file_uploads=uploads, channel=channel, thread_ts=thread_ts,
                                     initial_comment=comment)

    async def latest_image(channel: str, user: str, hint: str) -> dict:
        try:
            history = await client.conversations_history(channel=channel, limit=HISTORY_LIMIT)
        except SlackApiError as error:
            if error.response.get("error") in ("not_in_channel", "channel_not_found"):
                raise UserError(NOT_INVITED) from None
            raise
        for message in history.get("messages", []):
            if message.get("user") != user:
                continue
            for file in message.get("files", []):
                if (file.get("mimetype") or "").startswith("image/"):
                    return file
        raise BadImage(hint)

    async def build(channel: str, user: str, scope: str, args: list[str]) -> None:
        """/mosaic build: the status message appears with the first progress line, is edited
        as the build goes, and becomes the mosaic's message (or goes, if the build fails)."""
        columns = None
        if len(args) > 1 and args[-1].isdigit():
            columns, args = int(args[-1]), args[:-1]
        target = await files.download(await latest_image(
            channel, user, "Share an image in this channel first, then run /mosaic build NAME."))
        status_ts: str | None = None

        async def progress(text: str) -> None:
            nonlocal status_ts
            if status_ts is None:
                status_ts = (await client.chat_postMessage(channel=channel, text=text))["ts"]
            else:
                await client.chat_update(channel=channel, ts=status_ts, text=text)

        reply = await commands.build(scope, f"{PLATFORM}:{user}", target, " ".join(args),
                                     columns, max_bytes, progress=progress)
        if reply.mosaic_id is None and status_ts is not None:
            await client.chat_delete(channel=channel, ts=status_ts)
        await post(channel, user, reply, mosaic_ts=status_ts)

    @app.command("/mosaic")
    async def mosaic_command(ack, command: dict) -> None:
        await ack()
        channel, user = command["channel_id"], command["user_id"]
        scope = scope_of(command.get("team_id"))
        words = (command.get("text") or "").split()
        verb, args = (words[0].lower(), words[1:]) if words else ("", [])
        try:
            if verb == "build" and args:
                await build(channel, user, scope, args)
                return
            if verb == "show" and args:
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

    @app.command("/ask")
    async def ask_command(ack, command: dict) -> None:
        """/ask QUESTION: about the last photo the user shared in the channel; the question and
        its status open a thread, where the answer and follow-ups go."""
        await ack()
        channel, user = command["channel_id"], command["user_id"]
        question = (command.get("text") or "").strip()
        if not question:
            await post(channel, user, Reply(ASK_USAGE, ephemeral=True))
            return
        try:
            image = await files.download(await latest_image(
                channel, user, "Share a photo of a car in this channel first, then run "
                               "/ask QUESTION."))
        except UserError as error:
            await post(channel, user, error_reply(error))
            return
        except Exception:
            log.exception("/ask failed")
            await post(channel, user, Reply(SORRY, ephemeral=True))
            return
        await queue_question(channel, user, None, image, question, asked_by=user)

    async def queue_question(channel: str, user: str, thread_ts: str | None,
                             image: bytes | None, question: str,
                             follow_up_of: int | None = None, asked_by: str | None = None,
                             tile: tuple[int, str] | None = None) -> None:
        """Queue a question and show its status in `thread_ts` (or, without one, in a new
        message that starts the question's thread); the answer follows in that thread."""
        reply_to = {"channel": channel, "thread_ts": thread_ts, "user": user}

        async def show(text: str) -> SlackStatus:
            if thread_ts is None:
                # Nobody sees a slash command: the thread opens with who asked what.
                opening = f"<@{asked_by}> asked: {question}\n{text}"
                posted = await client.chat_postMessage(channel=channel, text=opening)
                return SlackStatus(client, channel, posted["ts"], posted["ts"])
            posted = await client.chat_postMessage(channel=channel, thread_ts=thread_ts, text=text)
            return SlackStatus(client, channel, thread_ts, posted["ts"])

        if tile is not None:
            asked = commands.ask_about_tile(PLATFORM, user, reply_to, *tile, question)
        else:
            asked = commands.ask(PLATFORM, user, reply_to, image, question,
                                 follow_up_of=follow_up_of)
        reply = await updates.follow(asked, show)
        if reply.job_id is None:
            await post(channel, user, reply, thread_ts)

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
        await queue_question(channel, user, thread_ts, image, question, follow_up_of)

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

    # Buttons and modals ------------------------------------------------------------------

    @app.action(PICK_TILE)
    async def pick_tile(ack, body: dict) -> None:
        """"Pick a tile" under a mosaic: a modal asks for the coordinate."""
        await ack()
        metadata = {"channel": body["channel"]["id"], "message_ts": _message_ts(body)}
        await client.views_open(trigger_id=body["trigger_id"], view=coordinate_modal(metadata))

    @app.view(PICK_TILE)
    async def tile_picked(ack, body: dict, view: dict) -> None:
        """The coordinate modal sent: a bad coordinate is one sentence in the modal itself;
        a good one closes it and the car's photo goes in the mosaic's thread."""
        where = json.loads(view["private_metadata"])
        coordinate = _input_value(view, COORDINATE_BLOCK)
        reply = None
        if is_coordinate(coordinate):
            reply = await commands.tile_for_message(PLATFORM, where["channel"],
                                                    where["message_ts"], coordinate, max_bytes)
            if reply is None:
                reply = error_reply(UserError(GONE))
        else:
            reply = Reply(f"{coordinate or 'That'} is not a tile: write column letters and a "
                          "row number, e.g. C7.", ephemeral=True)
        if reply.ephemeral:
            await ack(response_action="errors", errors={COORDINATE_BLOCK: reply.text})
            return
        await ack()
        await post(where["channel"], body["user"]["id"], reply, thread_ts=where["message_ts"])

    @app.action(RANDOM_TILE)
    async def random_tile(ack, body: dict) -> None:
        """"Random tile" under a mosaic: any tile's car, in the mosaic's thread."""
        await ack()
        channel, message_ts = body["channel"]["id"], _message_ts(body)
        reply = await commands.random_tile_for_message(PLATFORM, channel, message_ts, max_bytes)
        await post(channel, body["user"]["id"], reply or error_reply(UserError(GONE)),
                   thread_ts=message_ts)

    @app.action(OPEN_GALLERY)
    async def open_gallery(ack) -> None:
        """A link button: Slack opens the page, and still tells the app it was clicked."""
        await ack()

    @app.action(ASK_ABOUT_CAR)
    async def ask_about_car(ack, body: dict, action: dict) -> None:
        """"Ask about this car" under a tile's photo: a modal asks for the question."""
        await ack()
        mosaic_id, label = action["value"].split(":", 1)
        message = body.get("message") or {}
        metadata = {"channel": body["channel"]["id"], "mosaic_id": int(mosaic_id),
                    "coordinate": label,
                    "thread_ts": message.get("thread_ts") or _message_ts(body)}
        await client.views_open(trigger_id=body["trigger_id"], view=question_modal(
            ASK_ABOUT_CAR, f"Ask about {label}", metadata))

    @app.view(ASK_ABOUT_CAR)
    async def car_question_sent(ack, body: dict, view: dict) -> None:
        where, question = await _accept_question(ack, view)
        if not question:
            return
        await queue_question(where["channel"], body["user"]["id"], where["thread_ts"], None,
                             question, tile=(where["mosaic_id"], where["coordinate"]))

    @app.shortcut(ASK_ABOUT_PHOTO)
    async def ask_about_photo(ack, shortcut: dict) -> None:
        """The message menu's "Ask about this photo": a modal asks for the question."""
        await ack()
        channel, user = shortcut["channel"]["id"], shortcut["user"]["id"]
        message = shortcut.get("message") or {}
        photo = next((f for f in message.get("files", [])
                      if (f.get("mimetype") or "").startswith("image/")), None)
        if photo is None:
            await post(channel, user, error_reply(BadImage(NO_PHOTO_IN_MESSAGE)),
                       thread_ts=message.get("thread_ts"))
            return
        metadata = {"channel": channel, "thread_ts": message.get("thread_ts") or message["ts"],
                    "file": {k: photo.get(k) for k in FILE_FIELDS}}
        await client.views_open(trigger_id=shortcut["trigger_id"], view=question_modal(
            ASK_ABOUT_PHOTO, "Ask about this photo", metadata))

    @app.view(ASK_ABOUT_PHOTO)
    async def photo_question_sent(ack, body: dict, view: dict) -> None:
        where, question = await _accept_question(ack, view)
        if not question:
            return
        channel, user = where["channel"], body["user"]["id"]
        try:
            image = await files.download(where["file"])
        except UserError as error:
            await post(channel, user, error_reply(error), where["thread_ts"])
            return
        await queue_question(channel, user, where["thread_ts"], image, question)

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
        channel = (event.get("channel") or body.get("channel_id")
                   or (body.get("channel") or {}).get("id"))
        user = event.get("user") or body.get("user_id") or (body.get("user") or {}).get("id")
        if channel and user:
            await client.chat_postEphemeral(channel=channel, user=user, text=SORRY,
                                            thread_ts=event.get("thread_ts") or event.get("ts"))

    updates.add_fallback(PLATFORM, answer_without_status)
    return app


# Block Kit ---------------------------------------------------------------------------------

PICK_TILE = "pick_tile"
RANDOM_TILE = "random_tile"
OPEN_GALLERY = "open_gallery"
ASK_ABOUT_CAR = "ask_about_car"
ASK_ABOUT_PHOTO = "ask_about_photo"
COORDINATE_BLOCK = "coordinate"
QUESTION_BLOCK = "question"
ASK_USAGE = "Usage: /ask QUESTION (about the last photo of a car you shared in this channel)."
EMPTY_QUESTION = 'Please write a question, e.g. "Which parts of this car pollute?"'
NO_PHOTO_IN_MESSAGE = "That message has no photo to ask about."
GONE = "That mosaic is no longer here."
NOT_INVITED = ("I cannot read this channel: invite me first (/invite @TalkMosaic), "
               "then try again.")
# What a question modal carries of the photo's Slack file (private_metadata, 3,000 chars).
FILE_FIELDS = ("id", "name", "mimetype", "size", "url_private", "url_private_download")


def _plain(text: str) -> dict:
    # plain_text, not mrkdwn: a mosaic's name or a question is shown as typed, never as markup.
    return {"type": "plain_text", "text": text[:3000]}


def _button(action_id: str, text: str, value: str | None = None, url: str | None = None) -> dict:
    button = {"type": "button", "action_id": action_id, "text": _plain(text)}
    if value is not None:
        button["value"] = value
    if url is not None:
        button["url"] = url
    return button


def mosaic_blocks(text: str, mosaic_id: int, gallery_url: str | None) -> list[dict]:
    """A mosaic's message: its text, then "Pick a tile", "Random tile" and, when the gallery
    has a public address, "Open in gallery"."""
    buttons = [_button(PICK_TILE, "Pick a tile", str(mosaic_id)),
               _button(RANDOM_TILE, "Random tile", str(mosaic_id))]
    if gallery_url:
        buttons.append(_button(OPEN_GALLERY, "Open in gallery", url=gallery_url))
    return [{"type": "section", "text": _plain(text)},
            {"type": "actions", "block_id": "mosaic", "elements": buttons}]


def tile_blocks(mosaic_id: int, label: str) -> list[dict]:
    return [{"type": "actions", "block_id": "tile", "elements": [
        _button(ASK_ABOUT_CAR, "Ask about this car", f"{mosaic_id}:{label}")]}]


def coordinate_modal(metadata: dict) -> dict:
    return {
        "type": "modal", "callback_id": PICK_TILE, "title": _plain("Pick a tile"),
        "submit": _plain("Show the car"), "close": _plain("Cancel"),
        "private_metadata": json.dumps(metadata),
        "blocks": [{
            "type": "input", "block_id": COORDINATE_BLOCK, "label": _plain("Tile"),
            "hint": _plain("Column letters and row number, as on the preview, e.g. C7."),
            "element": {"type": "plain_text_input", "action_id": COORDINATE_BLOCK,
                        "placeholder": _plain("C7"), "max_length": 12},
        }],
    }


def question_modal(callback_id: str, title: str, metadata: dict) -> dict:
    return {
        "type": "modal", "callback_id": callback_id, "title": _plain(title[:24]),
        "submit": _plain("Ask"), "close": _plain("Cancel"),
        "private_metadata": json.dumps(metadata),
        "blocks": [{
            "type": "input", "block_id": QUESTION_BLOCK, "label": _plain("Your question"),
            "element": {"type": "plain_text_input", "action_id": QUESTION_BLOCK,
                        "multiline": True, "max_length": 1000,
                        "placeholder": _plain("Which parts of this car pollute?")},
        }],
    }


async def _accept_question(ack, view: dict) -> tuple[dict, str]:
    """A question modal's submission: (its private metadata, the question), acknowledged; an
    empty question is sent back as the error under its box and comes back as ""."""
    question = _input_value(view, QUESTION_BLOCK).strip()
    if not question:
        await ack(response_action="errors", errors={QUESTION_BLOCK: EMPTY_QUESTION})
    else:
        await ack()
    return json.loads(view["private_metadata"]), question


def _input_value(view: dict, block_id: str) -> str:
    values = view.get("state", {}).get("values", {})
    return (values.get(block_id, {}).get(block_id, {}).get("value") or "").strip()


def _message_ts(body: dict) -> str:
    return (body.get("container") or {}).get("message_ts") or body["message"]["ts"]


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
