"""`python -m bot`: every chat adapter whose tokens are set, the Q&A worker and the web gallery,
in one event loop, until Ctrl-C or SIGTERM. Tokens are never logged.

What the operator must fix (a bad setting, a port in use, a token a platform refuses) is one
sentence on stderr and exit status 1, before anything half-starts; an adapter that dies later
stops the whole process the same way. SIGTERM/SIGINT: no new job is claimed, the job under way
gets SHUTDOWN_GRACE_S to finish (else it goes back to the queue), the adapters close, exit 0.
"""

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from bot.commands import Commands, JobUpdates
from bot.web import start_gallery
from core.context import AppContext
from core.errors import ModelNotInstalled
from core.settings import BadSettings, Settings, load_settings
from core.worker import AnswerFn, JobQueue, Worker, exit_if_answers_running

log = logging.getLogger("bot")

Cleanup = Callable[[], Awaitable[None]]


class StartupFailed(Exception):
    """What the operator must fix before the bot can run; `str()` is one sentence."""


class Failures:
    """Adapters that stopped on their own: the first one's sentence, and the stop it triggers."""

    def __init__(self, stop: asyncio.Event):
        self.stop = stop
        self.first: str | None = None

    def watch(self, task: asyncio.Task, describe: Callable[[BaseException], str]) -> None:
        def ended(done: asyncio.Task) -> None:
            if done.cancelled() or self.stop.is_set():
                return
            error = done.exception()
            sentence = describe(error) if error else f"{done.get_name()} stopped unexpectedly."
            log.error("%s", sentence)
            self.first = self.first or sentence
            self.stop.set()

        task.add_done_callback(ended)


def _refuse_with(error: ModelNotInstalled) -> AnswerFn:
    def refuse(_job, _progress):
        raise error

    return refuse


async def start_worker(
    ctx: AppContext, updates: JobUpdates, answer_fn: AnswerFn | None = None,
    failures: Failures | None = None,
) -> Cleanup:
    """The answering worker. Without an installed model it still runs, so every asker hears
    the one sentence naming what to install instead of waiting forever."""
    if answer_fn is None:
        from core.qa.pipeline import AnswerPipeline

        try:
            answer_fn = (await asyncio.to_thread(AnswerPipeline, ctx)).answer_job
        except ModelNotInstalled as error:
            log.error("questions cannot be answered: %s", error)
            answer_fn = _refuse_with(error)
    worker = Worker(ctx, answer_fn, on_update=updates)
    task = asyncio.create_task(worker.run_forever(), name="worker")
    if failures is not None:
        failures.watch(task, lambda error: f"The answering worker stopped: {error}")
    grace_s = ctx.settings.shutdown_grace_s

    async def stop() -> None:
        worker.stop_taking_jobs()
        done, _ = await asyncio.wait({task}, timeout=grace_s)
        if not done:
            log.info("the answer under way took over %g s; handing it back to the queue", grace_s)
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    return stop


def start_answer_poll(updates: JobUpdates, poll_s: float) -> Cleanup:
    """Post the answers that workers of other processes (other hosts) finished: this process
    holds the chat tokens, they do not."""
    task = asyncio.create_task(updates.poll_forever(poll_s), name="answer-poll")

    async def stop() -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    return stop


def _discord_failure(error: BaseException) -> str:
    import discord

    if isinstance(error, discord.PrivilegedIntentsRequired):
        return ("Discord refused the Message Content intent: enable it for the bot in the "
                "Developer Portal, or set DISCORD_MESSAGE_CONTENT=false.")
    if isinstance(error, discord.LoginFailure):
        return ("Discord refused DISCORD_TOKEN: copy the bot's token again from the "
                "Developer Portal.")
    if isinstance(error, discord.HTTPException):
        return f"Discord refused the bot's start ({error.status}: {error.text or error})."
    if isinstance(error, aiohttp.ClientError | OSError | TimeoutError):
        return f"Discord could not be reached ({type(error).__name__}); check the network."
    return f"The Discord connection stopped: {error}"


async def start_discord(settings: Settings, commands: Commands, updates: JobUpdates,
                        failures: Failures) -> Cleanup:
    from bot.discord_bot import discord_bot

    bot = discord_bot(settings, commands, updates)  # sharded when DISCORD_SHARDED/_SHARD_COUNT
    try:
        # login() proves the token (and syncs the commands) before anything else starts.
        await bot.login(settings.discord_token.get_secret_value())
    except Exception as error:
        await bot.close()
        raise StartupFailed(_discord_failure(error)) from None
    task = asyncio.create_task(bot.connect(), name="discord")
    failures.watch(task, _discord_failure)
    log.info("Discord: connecting (%s command sync)",
             "guild" if settings.discord_guild_id else "global")

    async def stop() -> None:
        await bot.close()
        await asyncio.gather(task, return_exceptions=True)

    return stop


def _slack_failure(error: BaseException, token_name: str) -> str:
    from slack_sdk.errors import SlackApiError

    if isinstance(error, SlackApiError):
        return f"Slack refused {token_name} ({error.response.get('error', 'error')})."
    if isinstance(error, aiohttp.ClientError | OSError | TimeoutError):
        return f"Slack could not be reached ({type(error).__name__}); check the network."
    return f"Slack could not start: {error}"


async def start_slack(settings: Settings, commands: Commands, updates: JobUpdates) -> Cleanup:
    from slack_sdk.web.async_client import AsyncWebClient

    from bot.slack_app import SlackFiles, make_slack_app

    if not settings.slack_app_token and not settings.slack_signing_secret:
        raise StartupFailed("Slack HTTP mode needs SLACK_SIGNING_SECRET (or set SLACK_APP_TOKEN "
                            "for Socket Mode).")
    token = settings.slack_bot_token.get_secret_value()
    client = AsyncWebClient(token=token, base_url=settings.slack_api_url)
    try:
        await client.auth_test()
    except Exception as error:
        raise StartupFailed(_slack_failure(error, "SLACK_BOT_TOKEN")) from None
    files = SlackFiles(token, settings.max_upload_bytes, settings.slack_file_hosts)
    if settings.slack_app_token:
        from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

        app_token = settings.slack_app_token.get_secret_value()
        try:
            # The SDK retries a refused app token forever; asking for the first WebSocket URL
            # here turns a wrong token into one sentence.
            opened = await client.apps_connections_open(app_token=app_token)
        except Exception as error:
            await files.close()
            raise StartupFailed(_slack_failure(error, "SLACK_APP_TOKEN")) from None
        app = make_slack_app(commands, updates, client=client, files=files)
        handler = AsyncSocketModeHandler(app, app_token)
        handler.client.wss_uri = opened["url"]
        # In a task: the SDK retries a WebSocket that will not open until it does, and a stop
        # signal must still be heard meanwhile.
        connecting = asyncio.create_task(handler.connect_async(), name="slack")
        log.info("Slack: connecting in Socket Mode")

        async def stop_serving() -> None:
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
            await handler.close_async()
    else:
        app = make_slack_app(commands, updates, client=client, files=files,
                             signing_secret=settings.slack_signing_secret.get_secret_value())
        host = settings.slack_host
        runner = web.AppRunner(app.web_app(path="/slack/events", port=settings.slack_port),
                               access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, settings.slack_port).start()
        except OSError as error:
            await runner.cleanup()
            await files.close()
            raise StartupFailed(_cannot_listen("Slack's HTTP endpoint", host, settings.slack_port,
                                               error, "SLACK_HOST/SLACK_PORT")) from None
        log.info("Slack: HTTP mode on http://%s:%s/slack/events", host, settings.slack_port)
        stop_serving = runner.cleanup

    async def stop() -> None:
        await stop_serving()
        await files.close()

    return stop


def _cannot_listen(what: str, host: str, port: int, error: OSError, settings: str) -> str:
    if isinstance(error, socket.gaierror):
        host_setting = settings.split("/")[0]
        return (f"{what} cannot listen on {host}:{port}: no address of this machine has the "
                f"name {host}; set {host_setting} to an address such as 127.0.0.1 or 0.0.0.0.")
    reason = (os.strerror(error.errno) if error.errno else str(error)).rstrip(".").lower()
    return f"{what} cannot listen on {host}:{port} ({reason}); set {settings} to a free address."


async def start_web_gallery(ctx: AppContext, queue: JobQueue) -> Cleanup:
    host, port = ctx.settings.gallery_host, ctx.settings.gallery_port
    try:
        runner = await start_gallery(ctx, host, port, queue=queue)
    except OSError as error:
        raise StartupFailed(_cannot_listen("The gallery", host, port, error,
                                           "GALLERY_HOST/GALLERY_PORT")) from None
    bound = runner.addresses[0][1] if runner.addresses else port
    log.info("Gallery: http://%s:%s/", host, bound)
    return runner.cleanup


async def serve(
    settings: Settings, stop: asyncio.Event, gallery: bool = True,
    answer_fn: AnswerFn | None = None,
) -> None:
    """Start what is configured, wait for `stop`, then shut everything down in reverse order
    (the worker first, so the job under way can still post its answer). Raises StartupFailed
    when something cannot start, or when an adapter stopped on its own.
    answer_fn replaces the answering pipeline (tests, load checks)."""
    ctx = AppContext.open(settings)
    queue = JobQueue(ctx)
    updates = JobUpdates(queue)
    commands = Commands(ctx, queue)
    failures = Failures(stop)
    cleanups: list[Cleanup] = []
    try:
        if settings.discord_token:
            cleanups.append(await start_discord(settings, commands, updates, failures))
        if settings.slack_bot_token:
            cleanups.append(await start_slack(settings, commands, updates))
        if cleanups:
            cleanups.append(start_answer_poll(updates, settings.job_poll_s))
        else:
            log.warning("no DISCORD_TOKEN or SLACK_BOT_TOKEN set: no chat adapter started")
        if gallery:
            cleanups.append(await start_web_gallery(ctx, queue))
        cleanups.append(await start_worker(ctx, updates, answer_fn, failures))
        log.info("ready")
        await stop.wait()
        log.info("stopping")
    finally:
        for cleanup in reversed(cleanups):
            try:
                await cleanup()
            except Exception:
                log.exception("error while shutting down")
        ctx.close()
    if failures.first:
        raise StartupFailed(failures.first)


async def _main(settings: Settings, gallery: bool, answer_fn: AnswerFn | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    await serve(settings, stop, gallery=gallery, answer_fn=answer_fn)


def run(settings: Settings, gallery: bool = True, answer_fn: AnswerFn | None = None) -> int:
    """Serve until SIGTERM/SIGINT: 0 after a clean stop; 1, with one sentence on stderr, when
    something could not start or an adapter stopped on its own. With an answer handed back
    but its thread still inside the model, the process ends here with that status."""
    code = 0
    try:
        asyncio.run(_main(settings, gallery, answer_fn))
    except StartupFailed as error:
        print(f"error: {error}", file=sys.stderr)
        code = 1
    exit_if_answers_running(code)
    return code


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bot", description=__doc__)
    parser.add_argument("--no-gallery", action="store_true", help="do not serve the web gallery")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        settings = load_settings()
    except BadSettings as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    sys.exit(run(settings, gallery=not args.no_gallery))


if __name__ == "__main__":
    main()
