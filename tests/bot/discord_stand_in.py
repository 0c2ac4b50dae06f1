"""A local stand-in for the Discord REST API (aiohttp on 127.0.0.1) that records every call,
plus builders for the raw gateway payloads (INTERACTION_CREATE, MESSAGE_CREATE) fed to a client.
"""

import contextlib
import itertools
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiohttp import web
from discord.utils import time_snowflake

from tests.bot.recording_server import RecordingServer

APP_ID = 900000000000000001
BOT_ID = 900000000000000002
GUILD_ID = 900000000000000003
CHANNEL_ID = 900000000000000004
USER_ID = 900000000000000005
EPHEMERAL = 1 << 6
DEFER_WITH_THINKING = 5

CAR_JPEG = "car.jpg"
_sequence = itertools.count()


def snowflake() -> str:
    """A fresh id from now: discord.py dates an interaction, and its 15-minute token, by its id."""
    return str(time_snowflake(datetime.now(UTC)) + next(_sequence) % 4096)


def user_payload(user_id: int = USER_ID, name: str = "alice", bot: bool = False) -> dict:
    return {"id": str(user_id), "username": name, "discriminator": "0", "global_name": name,
            "avatar": None, "bot": bot}


def attachment_payload(
    base_url: str, name: str, data_size: int, content_type: str | None
) -> dict:
    """An attachment; Discord leaves content_type out when it could not tell (None)."""
    attachment = {"id": snowflake(), "filename": name, "size": data_size,
                  "url": f"{base_url}/cdn/{name}", "proxy_url": f"{base_url}/cdn/{name}",
                  "width": 100, "height": 100}
    if content_type is not None:
        attachment["content_type"] = content_type
    return attachment


def message_payload(
    content: str = "",
    *,
    message_id: str | None = None,
    author: dict | None = None,
    attachments: list[dict] | None = None,
    mentions: list[dict] | None = None,
    reference: str | None = None,
    flags: int = 0,
) -> dict:
    payload = {
        "id": message_id or snowflake(), "channel_id": str(CHANNEL_ID), "guild_id": str(GUILD_ID),
        "author": author or user_payload(), "content": content,
        "timestamp": "2026-11-21T12:00:00.000000+00:00", "edited_timestamp": None, "tts": False,
        "mention_everyone": False, "mentions": mentions or [], "mention_roles": [],
        "attachments": attachments or [], "embeds": [], "pinned": False, "type": 0,
        "flags": flags,
    }
    if reference:
        payload["message_reference"] = {"message_id": reference, "channel_id": str(CHANNEL_ID),
                                         "guild_id": str(GUILD_ID)}
        payload["type"] = 19
    return payload


APPLICATION_COMMAND, MESSAGE_COMPONENT, AUTOCOMPLETE, MODAL_SUBMIT = 2, 3, 4, 5
# Interaction callback types (what the bot answered with).
CHANNEL_MESSAGE, DEFERRED_UPDATE, AUTOCOMPLETE_RESULT, MODAL = 4, 6, 8, 9
BUTTON, TEXT_INPUT, LABEL = 2, 4, 18


def interaction_payload(
    data: dict, *, limit: int = 10 * 1024 * 1024, kind: int = APPLICATION_COMMAND,
    user: dict | None = None, message: dict | None = None,
) -> dict:
    """An INTERACTION_CREATE in a guild text channel: an application command by default; a
    component interaction or a modal submit carries the message it came from."""
    payload = {
        "id": snowflake(), "application_id": str(APP_ID), "type": kind, "data": data,
        "guild_id": str(GUILD_ID), "channel_id": str(CHANNEL_ID),
        "channel": {"id": str(CHANNEL_ID), "type": 0, "guild_id": str(GUILD_ID),
                    "name": "mosaics", "position": 0, "permission_overwrites": [],
                    "nsfw": False, "parent_id": None},
        "member": {"user": user or user_payload(), "roles": [],
                   "joined_at": "2026-01-01T00:00:00+00:00",
                   "deaf": False, "mute": False, "permissions": "2147483647", "flags": 0},
        "token": f"interaction-token-{snowflake()}", "version": 1, "locale": "en-US",
        "guild_locale": "en-US", "app_permissions": "2147483647", "entitlements": [],
        "authorizing_integration_owners": {"0": str(GUILD_ID)}, "context": 0,
        "attachment_size_limit": limit,
    }
    if message is not None:
        payload["message"] = message
    return payload


def button_data(message: dict, label: str) -> dict:
    """The data of a click on the button labelled `label` of a message the bot posted."""
    buttons = [c for row in message.get("components", []) for c in row["components"]
               if c["type"] == BUTTON]
    [button] = [b for b in buttons if b.get("label") == label]
    return {"custom_id": button["custom_id"], "component_type": BUTTON}


def labels(message: dict) -> list[str]:
    return [c.get("label") for row in message.get("components", []) for c in row["components"]]


def modal_submit_data(modal: dict, *values: str) -> dict:
    """The data of a modal submit: each text input of the modal the bot opened, filled in."""
    inputs = [row["component"] for row in modal["components"] if row["type"] == LABEL]
    return {"custom_id": modal["custom_id"], "components": [
        {"type": LABEL, "id": index + 1, "component": {
            "type": TEXT_INPUT, "id": index + 10, "custom_id": text_input["custom_id"],
            "value": value}}
        for index, (text_input, value) in enumerate(zip(inputs, values, strict=True))
    ]}


def slash(group: str | None, name: str, options: list[dict], resolved: dict | None = None) -> dict:
    if group:
        options = [{"name": name, "type": 1, "options": options}]
        name = group
    data = {"id": snowflake(), "name": name, "type": 1, "options": options,
            "guild_id": str(GUILD_ID)}
    if resolved:
        data["resolved"] = resolved
    return data


@dataclass
class Call:
    method: str
    path: str
    query: dict
    payload: dict | None
    files: list[tuple[str, bytes]]
    at: float = field(default_factory=time.perf_counter)
    response: dict | None = None  # the message the stand-in answered with, if any

    @property
    def flags(self) -> int:
        return int((self.payload or {}).get("flags") or 0)

    @property
    def content(self) -> str:
        return (self.payload or {}).get("content") or ""


class DiscordStandIn(RecordingServer):
    """Answers what discord.py calls and keeps the calls in `calls`, in arrival order."""

    def __init__(self):
        super().__init__()
        self.calls: list[Call] = []
        self.cdn: dict[str, tuple[bytes, str, bool]] = {}
        # One id per interaction's original response and per posted message, as Discord keeps.
        self.originals: dict[str, str] = {}

    def add_routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/cdn/{name}", self._cdn)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._api)

    def serve_file(self, name: str, data: bytes, content_type: str, chunked: bool = False) -> None:
        """Serve bytes on the CDN, with a Content-Length or chunked (no length announced)."""
        self.cdn[name] = (data, content_type, chunked)

    def api(self, method: str, fragment: str = "") -> list[Call]:
        return [c for c in self.calls if c.method == method and fragment in c.path]

    async def _cdn(self, request: web.Request) -> web.Response:
        self._record(Call("GET", request.path, dict(request.query), None, []))
        data, content_type, chunked = self.cdn[request.match_info["name"]]
        if not chunked:
            return web.Response(body=data, content_type=content_type)
        response = web.StreamResponse(headers={"Content-Type": content_type})
        response.enable_chunked_encoding()
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            for start in range(0, len(data), 16 * 1024):
                await response.write(data[start : start + 16 * 1024])
            await response.write_eof()
        return response

    async def _api(self, request: web.Request) -> web.Response:
        payload, files = None, []
        if request.content_type == "multipart/form-data":
            reader = await request.multipart()
            async for part in reader:
                if part.name == "payload_json":
                    payload = json.loads(await part.text())
                else:
                    files.append((part.filename, bytes(await part.read())))
        elif request.can_read_body:
            payload = await request.json()
        path = "/" + request.match_info["tail"]
        call = Call(request.method, path, dict(request.query), payload, files)
        response = self._answer(request.method, path, payload or {}, files)
        if isinstance(response, dict):
            call.response = response
        self._record(call)
        if isinstance(response, web.Response):
            return response
        # discord.py parses JSON only when the content type is exactly application/json.
        return web.Response(body=json.dumps(response).encode(),
                            headers={"Content-Type": "application/json"})

    def _answer(self, method: str, path: str, payload: dict, files: list):
        if path == "/users/@me":
            return user_payload(BOT_ID, "talkmosaic", bot=True)
        if path == "/oauth2/applications/@me":
            return {
                "id": str(APP_ID), "name": "TalkMosaic", "description": "", "icon": None,
                "bot_public": True, "bot_require_code_grant": False, "verify_key": "00",
                "owner": user_payload(), "flags": 0,
            }
        if path.endswith("/commands"):
            return []
        if path.endswith("/callback"):
            return {"interaction": {"id": path.split("/")[2], "type": 2}}
        if method == "DELETE":
            return web.Response(status=204)
        attachments = [
            {"id": snowflake(), "filename": name, "size": len(data), "url": f"{self.base_url}/x",
             "proxy_url": f"{self.base_url}/x"} for name, data in files
        ]
        message = message_payload(
            payload.get("content") or "", author=user_payload(BOT_ID, "talkmosaic", bot=True),
            attachments=attachments, flags=int(payload.get("flags") or 0),
        )
        message["webhook_id"] = str(APP_ID) if path.startswith("/webhooks") else None
        message["components"] = payload.get("components") or []
        if payload.get("embeds"):
            message["embeds"] = payload["embeds"]
        if path.endswith("/messages/@original"):
            message["id"] = self.originals.setdefault(path, message["id"])
        elif method == "PATCH":
            message["id"] = path.rsplit("/", 1)[1]
        return message


# Driving a bot against the stand-in ------------------------------------------------------


def dispatch_interaction(bot, data: dict, **kwargs) -> tuple[str, float]:
    """Feed an INTERACTION_CREATE to the bot; returns its token and when it was dispatched."""
    payload = interaction_payload(data, **kwargs)
    dispatched = time.perf_counter()
    bot._connection.parse_interaction_create(payload)
    return payload["token"], dispatched


def webhook_calls(stand_in: DiscordStandIn, token: str) -> list:
    return [c for c in stand_in.calls if token in c.path]


def followups(stand_in: DiscordStandIn, token: str) -> list:
    return [c for c in webhook_calls(stand_in, token)
            if c.method == "POST" and c.path == f"/webhooks/{APP_ID}/{token}"]


def channel_posts(stand_in: DiscordStandIn, at_least: int = 1) -> list:
    posts = stand_in.api("POST", f"/channels/{CHANNEL_ID}/messages")
    return posts if len(posts) >= at_least else []


def original_with_files(stand_in: DiscordStandIn, token: str):
    """The edit that turned an interaction's deferred response into a message with files."""
    edits = [c for c in webhook_calls(stand_in, token)
             if c.method == "PATCH" and c.path.endswith("/messages/@original") and c.files]
    return edits[-1] if edits else None


def answer_text(call) -> str:
    """An answer's text: the description of the embed the bot posted."""
    [embed] = call.payload["embeds"]
    return embed["description"]


def assert_acknowledged_first(stand_in: DiscordStandIn, token: str, dispatched: float) -> None:
    """The interaction's first call is the deferral, within 3 s, before any download."""
    calls = webhook_calls(stand_in, token)
    callback = calls[0]
    assert callback.path.endswith("/callback")
    assert callback.payload["type"] == DEFER_WITH_THINKING
    assert callback.at - dispatched < 3.0
    downloads = [c for c in stand_in.calls if c.path.startswith("/cdn/")]
    assert all(callback.at <= d.at for d in downloads)


def served_attachment(stand_in, data: bytes, content_type: str = "image/jpeg") -> dict:
    """Serve the bytes on the stand-in's CDN; returns the attachment payload pointing there."""
    stand_in.serve_file(CAR_JPEG, data, content_type)
    return attachment_payload(stand_in.base_url, CAR_JPEG, len(data), content_type)


def mentioning_the_bot(text: str, attachments: list[dict]) -> dict:
    """A MESSAGE_CREATE that mentions the bot, e.g. a photo posted with a question."""
    return message_payload(f"<@{BOT_ID}> {text}".rstrip(), attachments=attachments,
                           mentions=[user_payload(BOT_ID, "talkmosaic", bot=True)])


def click(bot, message: dict, label: str, user: dict | None = None) -> tuple[str, float]:
    """A user clicks a button of a message the bot posted (a component interaction)."""
    return dispatch_interaction(bot, button_data(message, label), kind=MESSAGE_COMPONENT,
                                message=message, user=user)


def callback(stand_in: DiscordStandIn, token: str):
    """How the bot answered an interaction (the first call it made with its token)."""
    calls = webhook_calls(stand_in, token)
    return calls[0] if calls and calls[0].path.endswith("/callback") else None


def original_edits(stand_in: DiscordStandIn, token: str) -> list:
    return [c for c in webhook_calls(stand_in, token)
            if c.method == "PATCH" and c.path.endswith("/messages/@original")]
