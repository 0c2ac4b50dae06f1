"""`python -m bot` as a real process: what the operator must fix is one sentence and exit 1
(no traceback, nothing left running); SIGTERM or SIGINT stops it cleanly with exit 0, the job
under way finished, or handed back to the queue when it outlasts SHUTDOWN_GRACE_S.
"""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web

from core.context import AppContext
from core.settings import Settings
from core.worker import JobQueue
from tests.bot.recording_server import RecordingServer
from tests.bot.slack_stand_in import SlackStandIn

ROOT = Path(__file__).resolve().parents[2]
HELPER = ROOT / "tests" / "bot" / "bot_process.py"
# Well within a container stop's 30 s (the bound on every wait here, not a measured time).
STOP_WITHIN_S = 30


def bot_env(tmp_path: Path, **values: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DISCORD_", "SLACK_", "GALLERY_", "TALKMOSAIC_", "SHUTDOWN_"))}
    env.update({"TALKMOSAIC_DATA_DIR": str(tmp_path / "data"), "GALLERY_PORT": "0",
                "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}, **values)
    return env


def run_bot(tmp_path: Path, *args: str, **values: str) -> subprocess.CompletedProcess:
    """`python -m bot` (or the test helper) to its end; cwd has no .env."""
    command = [sys.executable, *(args or ("-m", "bot"))]
    return subprocess.run(command, cwd=tmp_path, env=bot_env(tmp_path, **values),
                          capture_output=True, text=True, timeout=120)


def assert_one_sentence(finished, sentence_start: str) -> None:
    assert finished.returncode == 1
    assert "Traceback" not in finished.stderr
    last = finished.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {sentence_start}"), finished.stderr
    assert last.endswith(".")


def test_a_setting_that_does_not_parse_is_one_sentence(tmp_path):
    finished = run_bot(tmp_path, GALLERY_PORT="abc")
    assert_one_sentence(finished, "GALLERY_PORT='abc' is not valid (input should be a valid "
                                  "integer")


def test_a_port_off_the_range_is_one_sentence(tmp_path):
    finished = run_bot(tmp_path, GALLERY_PORT="99999")
    assert_one_sentence(finished, "GALLERY_PORT='99999' is not valid (input should be less "
                                  "than or equal to 65535")


def test_a_gallery_host_that_does_not_resolve_is_one_sentence(tmp_path):
    finished = run_bot(tmp_path, GALLERY_HOST="no.such.host.invalid")
    assert_one_sentence(finished, "The gallery cannot listen on no.such.host.invalid:0: no "
                                  "address of this machine has the name no.such.host.invalid")


def test_a_gallery_port_in_use_is_one_sentence(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        finished = run_bot(tmp_path, GALLERY_PORT=str(port))
    assert_one_sentence(
        finished, f"The gallery cannot listen on 127.0.0.1:{port} (address already in use); "
                  "set GALLERY_HOST/GALLERY_PORT")


class RefusingSlack(SlackStandIn):
    """Slack's Web API refusing one method's token, as it does for a revoked or wrong one."""

    def __init__(self, refused_method: str):
        super().__init__()
        self.refused_method = refused_method

    def _answer(self, method: str, args: dict) -> dict:
        if method == self.refused_method:
            return {"ok": False, "error": "invalid_auth"}
        if method == "apps.connections.open":
            return {"url": "ws://127.0.0.1:9/unused"}
        return super()._answer(method, args)


@pytest.mark.parametrize(("refused", "token"), [("auth.test", "SLACK_BOT_TOKEN"),
                                                ("apps.connections.open", "SLACK_APP_TOKEN")])
async def test_a_slack_token_that_is_refused_is_one_sentence(tmp_path, refused, token):
    slack = await RefusingSlack(refused).start()
    try:
        finished = await asyncio.to_thread(
            run_bot, tmp_path, SLACK_BOT_TOKEN="xoxb-wrong", SLACK_APP_TOKEN="xapp-wrong",
            SLACK_API_URL=f"{slack.base_url}/api/")
    finally:
        await slack.stop()
    assert_one_sentence(finished, f"Slack refused {token} (invalid_auth).")
    assert "xoxb-wrong" not in finished.stderr and "xapp-wrong" not in finished.stderr


class RefusingDiscord(RecordingServer):
    """Discord's REST API answering 401 to the token check, as it does for a wrong token."""

    def add_routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/api/v10/{path:.*}", self._unauthorized)

    async def _unauthorized(self, request: web.Request) -> web.Response:
        self._record(request.path)
        return web.json_response({"message": "401: Unauthorized", "code": 0}, status=401)


async def test_a_discord_token_that_is_refused_is_one_sentence(tmp_path):
    discord_api = await RefusingDiscord().start()
    try:
        finished = await asyncio.to_thread(
            run_bot, tmp_path, str(HELPER), DISCORD_TOKEN="wrong.discord.token",
            TEST_DISCORD_API=f"{discord_api.base_url}/api/v10")
    finally:
        await discord_api.stop()
    assert discord_api.calls == ["/api/v10/users/@me"]
    assert_one_sentence(finished, "Discord refused DISCORD_TOKEN")
    assert "wrong.discord.token" not in finished.stderr


def queued_questions(tmp_path: Path, count: int, vehicle_photos) -> tuple[AppContext, list[int]]:
    ctx = AppContext.open(Settings(data_dir=tmp_path / "data", database_url=None))
    queue = JobQueue(ctx)
    photo = vehicle_photos[0].read_bytes()
    ids = [queue.submit("web", f"web:asker{n}", {}, photo, f"question {n}?").job_id
           for n in range(count)]
    return ctx, ids


def start_bot(tmp_path: Path, **values: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HELPER)], cwd=tmp_path,
                            env=bot_env(tmp_path, **values), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_until_running(ctx: AppContext, job_id: int, bot: subprocess.Popen) -> None:
    queue = JobQueue(ctx)
    deadline = time.monotonic() + 120
    while queue.get(job_id).status != "running":
        assert bot.poll() is None, bot.communicate()
        assert time.monotonic() < deadline, "the bot never started the job"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_lets_the_running_job_finish_and_claims_no_other(
    tmp_path, vehicle_photos, signum
):
    ctx, (first, second) = queued_questions(tmp_path, 2, vehicle_photos)
    bot = start_bot(tmp_path, TEST_ANSWER_S="1.5", SHUTDOWN_GRACE_S="25")
    try:
        wait_until_running(ctx, first, bot)
        bot.send_signal(signum)
        _out, err = bot.communicate(timeout=STOP_WITHIN_S)
    finally:
        bot.kill()
    assert bot.returncode == 0, err
    assert "Traceback" not in err
    queue = JobQueue(ctx)
    assert queue.get(first).status == "done"
    assert queue.get(first).answer == "Answer to: question 0?"
    assert queue.get(second).status == "queued"
    ctx.close()


def test_a_job_that_outlasts_the_grace_period_goes_back_to_the_queue(tmp_path, vehicle_photos):
    ctx, (job,) = queued_questions(tmp_path, 1, vehicle_photos)
    bot = start_bot(tmp_path, TEST_ANSWER_S="600", SHUTDOWN_GRACE_S="0.5")
    try:
        wait_until_running(ctx, job, bot)
        bot.send_signal(signal.SIGTERM)
        _out, err = bot.communicate(timeout=STOP_WITHIN_S)
    finally:
        bot.kill()
    assert bot.returncode == 0, err
    assert "handing it back to the queue" in err
    handed_back = JobQueue(ctx).get(job)
    assert handed_back.status == "queued" and handed_back.worker_id is None
    ctx.close()
