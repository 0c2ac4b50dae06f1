"""bot/slack-manifest.yml matches the app: every command, shortcut and event it declares is one
the app answers, and its scopes cover what the app calls, private channels included."""

from pathlib import Path

import pytest
import yaml

from tests.bot import test_slack
from tests.bot.slack_stand_in import (
    CHANNEL,
    USER,
    event_callback,
    message_shortcut,
    next_ts,
    slash_command,
)

MANIFEST = Path(__file__).resolve().parents[2] / "bot" / "slack-manifest.yml"
# The Web API methods and downloads the app uses, and the bot scope each needs.
NEEDED_SCOPES = {
    "app_mention events": "app_mentions:read",
    "conversations.history and message events, public channels": "channels:history",
    "conversations.history and message events, private channels": "groups:history",
    "chat.postMessage, chat.update, chat.delete, chat.postEphemeral": "chat:write",
    "slash commands and shortcuts": "commands",
    "url_private downloads": "files:read",
    "files.getUploadURLExternal, files.completeUploadExternal": "files:write",
}

stand_in, app, ack_times = test_slack.stand_in, test_slack.app, test_slack.ack_times


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def test_the_scopes_are_exactly_what_the_app_uses(manifest):
    assert sorted(manifest["oauth_config"]["scopes"]["bot"]) == sorted(NEEDED_SCOPES.values())


def test_socket_mode_and_interactivity_are_on(manifest):
    assert manifest["settings"]["socket_mode_enabled"] is True
    assert manifest["settings"]["interactivity"]["is_enabled"] is True


def test_private_channels_get_their_message_events(manifest):
    events = manifest["settings"]["event_subscriptions"]["bot_events"]
    assert {"app_mention", "message.channels", "message.groups"} == set(events)


async def test_every_declared_command_is_answered(manifest, app):
    commands = [c["command"] for c in manifest["features"]["slash_commands"]]
    assert commands == ["/mosaic", "/ask"]
    for command in commands:
        response = await app.async_dispatch(slash_command("", command=command))
        assert response.status == 200, command


async def test_every_declared_shortcut_is_answered(manifest, app):
    for shortcut in manifest["features"]["shortcuts"]:
        message = {"type": "message", "user": USER, "ts": next_ts(), "text": "hello"}
        response = await app.async_dispatch(message_shortcut(shortcut["callback_id"], message))
        assert response.status == 200, shortcut["callback_id"]


async def test_an_undeclared_command_is_not_answered(app):
    response = await app.async_dispatch(slash_command("", command="/paint"))
    assert response.status == 404


async def test_every_declared_event_is_answered(manifest, app):
    kinds = {"app_mention": "app_mention", "message.channels": "message",
             "message.groups": "message"}
    for declared in manifest["settings"]["event_subscriptions"]["bot_events"]:
        event = {"type": kinds[declared], "channel": CHANNEL, "user": USER, "text": "hi",
                 "ts": next_ts()}
        if declared.startswith("message."):
            event["channel_type"] = declared.removeprefix("message.").removesuffix("s")
        response = await app.async_dispatch(event_callback(event))
        assert response.status == 200, declared
