"""`python -m bot`: every chat adapter whose tokens are set, the Q&A worker and the web gallery,
in one event loop, until Ctrl-C or SIGTERM. Tokens are never logged.
"""

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

from aiohttp import web

from bot.commands import Commands, JobUpdates
from bot.web import start_gallery
from core.context import AppContext
from core.errors import ModelNotInstalled
from core.settings import Settings
from core.worker import AnswerFn, JobQueue, Worker

log = logging.getLogger("bot")

Cleanup = Callable[[], Awaitable[None]]


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s stopped: %s", task.get_name(), task.exception())


def _refuse_with(error: ModelNotInstalled) -> AnswerFn:
    def refuse(_job, _progress):
        raise error

    return refuse


async def start_worker(
    ctx: AppContext, updates: JobUpdates, answer_fn: AnswerFn | None = None
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
    task.add_done_callback(_log_failure)

    async def stop() -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    return stop


async def start_discord(settings: Settings, commands: Commands, updates: JobUpdates) -> Cleanup:
    from bot.discord_bot import TalkMosaicBot

    bot = TalkMosaicBot(
        commands, updates, guild_id=settings.discord_guild_id,
        message_content=settings.discord_message_content,
    )
    task = asyncio.create_task(bot.start(settings.discord_token.get_secret_value()),
                               name="discord")
    task.add_done_callback(_log_failure)
    log.info("Discord: connecting (%s command sync)",
             "guild" if settings.discord_guild_id else "global")

    async def stop() -> None:
        await bot.close()
        await asyncio.gather(task, return_exceptions=True)

    return stop


async def start_slack(settings: Settings, commands: Commands, updates: JobUpdates) -> Cleanup:
    from slack_sdk.web.async_client import AsyncWebClient

    from bot.slack_app import SlackFiles, make_slack_app

    if not settings.slack_app_token and not settings.slack_signing_secret:
        raise SystemExit("Slack HTTP mode needs SLACK_SIGNING_SECRET (or set SLACK_APP_TOKEN "
                         "for Socket Mode).")
    token = settings.slack_bot_token.get_secret_value()
    client = AsyncWebClient(token=token)
    files = SlackFiles(token, settings.max_upload_bytes)
    if settings.slack_app_token:
        from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

        app = make_slack_app(commands, updates, client=client, files=files)
        handler = AsyncSocketModeHandler(app, settings.slack_app_token.get_secret_value())
        await handler.connect_async()
        log.info("Slack: connected in Socket Mode")
        stop_serving = handler.close_async
    else:
        app = make_slack_app(commands, updates, client=client, files=files,
                             signing_secret=settings.slack_signing_secret.get_secret_value())
        host = settings.slack_host
        runner = web.AppRunner(app.web_app(path="/slack/events", port=settings.slack_port),
                               access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, settings.slack_port).start()
        log.info("Slack: HTTP mode on http://%s:%s/slack/events", host, settings.slack_port)
        stop_serving = runner.cleanup

    async def stop() -> None:
        await stop_serving()
        await files.close()

    return stop


async def start_web_gallery(ctx: AppContext, queue: JobQueue) -> Cleanup:
    runner = await start_gallery(ctx, ctx.settings.gallery_host, ctx.settings.gallery_port,
                                 queue=queue)
    log.info("Gallery: http://%s:%s/", ctx.settings.gallery_host, ctx.settings.gallery_port)
    return runner.cleanup


async def serve(
    settings: Settings, stop: asyncio.Event, gallery: bool = True,
    answer_fn: AnswerFn | None = None,
) -> None:
    """Start what is configured, wait for `stop`, then shut everything down in reverse order.
    answer_fn replaces the answering pipeline (tests, load checks)."""
    ctx = AppContext.open(settings)
    queue = JobQueue(ctx)
    updates = JobUpdates(queue)
    commands = Commands(ctx, queue)
    cleanups: list[Cleanup] = []
    try:
        if settings.discord_token:
            cleanups.append(await start_discord(settings, commands, updates))
        if settings.slack_bot_token:
            cleanups.append(await start_slack(settings, commands, updates))
        if not cleanups:
            log.warning("no DISCORD_TOKEN or SLACK_BOT_TOKEN set: no chat adapter started")
        if gallery:
            cleanups.append(await start_web_gallery(ctx, queue))
        cleanups.append(await start_worker(ctx, updates, answer_fn))
        await stop.wait()
    finally:
        for cleanup in reversed(cleanups):
            try:
                await cleanup()
            except Exception:
                log.exception("error while shutting down")
        ctx.close()


async def _main(gallery: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    await serve(Settings(), stop, gallery=gallery)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bot", description=__doc__)
    parser.add_argument("--no-gallery", action="store_true", help="do not serve the web gallery")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(_main(gallery=not args.no_gallery))


if __name__ == "__main__":
    main()
