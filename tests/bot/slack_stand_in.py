"""A local stand-in for the Slack Web API (aiohttp on 127.0.0.1), as bolt-python's own tests use:
it answers the methods the app calls, serves `url_private` files, takes file uploads, and
records every call in arrival order. Plus signed request builders for slash commands and events.
"""

import itertools
import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlencode

from aiohttp import web
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_sdk.signature import SignatureVerifier

from tests.bot.recording_server import RecordingServer

SIGNING_SECRET = "test-signing-secret"
BOT_TOKEN = "xoxb-test-token"
TEAM_ID = "T0TEAM"
CHANNEL = "C0CHANNEL"
USER = "U0ALICE"
BOT_USER = "U0BOT"

_ts = itertools.count(1)


def next_ts() -> str:
    return f"{1_790_000_000 + next(_ts)}.000100"


@dataclass
class Call:
    method: str  # Web API method ("chat.postMessage"), or "GET /files/x", "POST /upload/F1"
    args: dict
    headers: dict
    body: bytes = b""
    at: float = field(default_factory=time.perf_counter)
    response: dict | None = None


class SlackStandIn(RecordingServer):
    def __init__(self):
        super().__init__()
        self.calls: list[Call] = []
        self.files: dict[str, tuple[bytes, str]] = {}
        self.chunked: set[str] = set()
        self.redirects: dict[str, str] = {}
        self.history: list[dict] = []
        # conversations.history answers this error instead (e.g. "not_in_channel").
        self.history_error: str | None = None
        self._uploads = itertools.count(1)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/files/{name}", self._file)
        app.router.add_post("/upload/{file_id}", self._upload)
        app.router.add_route("*", "/api/{method}", self._api)

    def serve_file(self, name: str, data: bytes, content_type: str, mimetype: str = "",
                   chunked: bool = False) -> dict:
        """Serve bytes at a url_private (with a Content-Length, or chunked as a stream in 64 KiB
        writes); returns the Slack file object pointing at it."""
        self.files[name] = (data, content_type)
        if chunked:
            self.chunked.add(name)
        return {"id": f"F{name}", "name": name, "mimetype": mimetype or content_type,
                "size": len(data), "url_private": f"{self.base_url}/files/{name}"}

    def api(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    def uploaded(self) -> list[tuple[Call, Call]]:
        """(completeUploadExternal call, raw upload call) pairs, one per uploaded file."""
        raw = {c.method.split("/")[-1]: c for c in self.calls
               if c.method.startswith("POST /upload/")}
        pairs = []
        for complete in self.api("files.completeUploadExternal"):
            for entry in json.loads(complete.args["files"]):
                pairs.append((complete, raw[entry["id"]]))
        return pairs

    def redirect_file(self, name: str, location: str) -> None:
        """Answer GET /files/NAME with a 302 to `location` (which may be another host)."""
        self.redirects[name] = location

    async def _file(self, request: web.Request) -> web.StreamResponse:
        self._record(Call(f"GET {request.path}", {}, dict(request.headers)))
        name = request.match_info["name"]
        if name in self.redirects:
            raise web.HTTPFound(self.redirects[name])
        data, content_type = self.files[name]
        if request.headers.get("Authorization") != f"Bearer {BOT_TOKEN}":
            return web.Response(text="<html>sign in</html>", content_type="text/html")
        if name not in self.chunked:
            return web.Response(body=data, headers={"Content-Type": content_type})
        response = web.StreamResponse(headers={"Content-Type": content_type})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(data), 64 * 1024):
            await response.write(data[start:start + 64 * 1024])
        await response.write_eof()
        return response

    async def _upload(self, request: web.Request) -> web.Response:
        body = await request.read()
        self._record(Call(f"POST /upload/{request.match_info['file_id']}", {},
                          dict(request.headers), body))
        return web.Response(text=f"OK - {len(body)}")

    async def _api(self, request: web.Request) -> web.Response:
        # The SDK sends some arguments in the query string (params=), others in the body.
        args = dict(request.query)
        if request.content_type == "application/json":
            args.update(await request.json())
        elif request.can_read_body:
            args.update(await request.post())
        method = request.match_info["method"]
        call = Call(method, args, dict(request.headers))
        call.response = {"ok": True, **self._answer(method, args)}
        self._record(call)
        return web.json_response(call.response)

    def _answer(self, method: str, args: dict) -> dict:
        if method == "auth.test":
            return {"url": "https://test.slack.com/", "team": "Test", "user": "talkmosaic",
                    "team_id": TEAM_ID, "user_id": BOT_USER, "bot_id": "B0BOT"}
        if method in ("chat.postMessage", "chat.update"):
            ts = args.get("ts") or next_ts()
            return {"channel": args.get("channel"), "ts": ts,
                    "message": {"text": args.get("text"), "ts": ts}}
        if method == "chat.postEphemeral":
            return {"message_ts": next_ts()}
        if method == "chat.delete":
            return {"channel": args.get("channel"), "ts": args.get("ts")}
        if method == "views.open":
            view = json.loads(args["view"]) if isinstance(args["view"], str) else args["view"]
            return {"view": {**view, "id": f"V{next(self._uploads):04d}", "state": {"values": {}}}}
        if method == "files.getUploadURLExternal":
            file_id = f"F{next(self._uploads):04d}"
            return {"upload_url": f"{self.base_url}/upload/{file_id}", "file_id": file_id}
        if method == "files.completeUploadExternal":
            return {"files": [{"id": f["id"], "title": f.get("title")}
                              for f in json.loads(args["files"])]}
        if method == "conversations.history":
            if self.history_error:
                return {"ok": False, "error": self.history_error}
            return {"messages": self.history, "has_more": False}
        return {}


def _signed(body: str, content_type: str) -> AsyncBoltRequest:
    timestamp = str(int(time.time()))
    signature = SignatureVerifier(SIGNING_SECRET).generate_signature(
        timestamp=timestamp, body=body
    )
    return AsyncBoltRequest(body=body, headers={
        "content-type": [content_type],
        "x-slack-signature": [signature],
        "x-slack-request-timestamp": [timestamp],
    })


def slash_command(text: str, command: str = "/mosaic") -> AsyncBoltRequest:
    body = urlencode({
        "token": "legacy", "team_id": TEAM_ID, "team_domain": "test", "channel_id": CHANNEL,
        "channel_name": "mosaics", "user_id": USER, "user_name": "alice", "command": command,
        "text": text, "api_app_id": "A0APP", "response_url": "http://127.0.0.1:9/unused",
        "trigger_id": "1.2.3",
    })
    return _signed(body, "application/x-www-form-urlencoded")


def event_callback(event: dict) -> AsyncBoltRequest:
    body = json.dumps({
        "token": "legacy", "team_id": TEAM_ID, "api_app_id": "A0APP", "event": event,
        "type": "event_callback", "event_id": f"Ev{next_ts()}", "event_time": int(time.time()),
        "authorizations": [{"team_id": TEAM_ID, "user_id": BOT_USER, "is_bot": True}],
    })
    return _signed(body, "application/json")


def _interaction(payload: dict) -> AsyncBoltRequest:
    """Buttons, modals and shortcuts arrive form-encoded, the JSON in a `payload` field."""
    base = {"token": "legacy", "api_app_id": "A0APP", "trigger_id": f"{next_ts()}.trigger",
            "team": {"id": TEAM_ID, "domain": "test"},
            "user": {"id": USER, "username": "alice", "team_id": TEAM_ID}}
    return _signed(urlencode({"payload": json.dumps({**base, **payload})}),
                   "application/x-www-form-urlencoded")


def block_action(message: dict, action_id: str, value: str | None = None,
                 url: str | None = None) -> AsyncBoltRequest:
    """A click on a button of `message` (a chat.postMessage's args and response, as Slack
    stores it: its ts, its thread_ts, its blocks)."""
    action = {"type": "button", "action_id": action_id, "block_id": "b",
              "text": {"type": "plain_text", "text": action_id}, "action_ts": next_ts()}
    if value is not None:
        action["value"] = value
    if url is not None:
        action["url"] = url
    return _interaction({
        "type": "block_actions",
        "container": {"type": "message", "message_ts": message["ts"], "channel_id": CHANNEL,
                      "is_ephemeral": False},
        "channel": {"id": CHANNEL, "name": "mosaics"},
        "message": message,
        "response_url": "http://127.0.0.1:9/unused",
        "actions": [action],
    })


def view_submission(view: dict, values: dict[str, str]) -> AsyncBoltRequest:
    """The modal `view` (as views.open returned it) sent with these plain_text_input values,
    keyed by block id (each input's action id is its block id here)."""
    state = {block: {block: {"type": "plain_text_input", "value": value}}
             for block, value in values.items()}
    return _interaction({
        "type": "view_submission",
        "view": {**view, "state": {"values": state}, "hash": "1.abc", "team_id": TEAM_ID,
                 "app_id": "A0APP", "bot_id": "B0BOT"},
        "response_urls": [],
    })


def message_shortcut(callback_id: str, message: dict) -> AsyncBoltRequest:
    return _interaction({
        "type": "message_action", "callback_id": callback_id, "message_ts": message["ts"],
        "channel": {"id": CHANNEL, "name": "mosaics"}, "message": message,
        "response_url": "http://127.0.0.1:9/unused",
    })
