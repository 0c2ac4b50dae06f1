"""`talkmosaic chat`: a terminal conversation through the bots' commands layer, driven with a
script of lines as stdin (in-process with a fast answer function, and as a real subprocess)."""

import io
import subprocess
import sys
from pathlib import Path

from bot.terminal import HELP, chat
from core.worker import AnswerResult, JobQueue
from storage.models import FollowUp, Job
from tests.bot.conftest import MOSAIC_NAME, car_at, fake_answer, fox_image

ROOT = Path(__file__).resolve().parents[2]


async def talk(ctx, *lines: str, answer_fn=fake_answer) -> list[str]:
    out = io.StringIO()
    assert await chat(ctx, io.StringIO("".join(f"{line}\n" for line in lines)), out,
                      answer_fn=answer_fn) == 0
    return out.getvalue().splitlines()


def saved(lines: list[str], after: str) -> Path:
    """The image path printed right after the line starting with `after`."""
    index = next(i for i, line in enumerate(lines) if line.startswith(after))
    return Path(lines[index + 1].removeprefix("  image: "))


async def test_a_tile_typed_after_a_mosaic_is_shown_gives_that_car(ctx, mosaic):
    lines = await talk(ctx, f"/mosaic show {MOSAIC_NAME}", "C7")
    assert lines[1].startswith(f"Mosaic {MOSAIC_NAME}: 10x10 tiles")
    assert saved(lines, "Mosaic ").read_bytes()[:3] == b"\xff\xd8\xff"
    assert saved(lines, "C7 of ").read_bytes() == car_at(ctx, mosaic, row=6, col=2)


async def test_build_makes_a_mosaic_from_a_path_with_its_progress(ctx, car_library, tmp_path):
    target = tmp_path / "owl.png"
    target.write_bytes(fox_image(90))
    lines = await talk(ctx, f"/mosaic build {target} 'snowy owl' 8", "/mosaic list", "B2")
    assert any(line.startswith("  ... Building snowy owl: ") for line in lines)
    assert "  ... Building snowy owl: rendering the mosaic." in lines
    assert any(line.startswith("Built snowy owl: 8x8 tiles") for line in lines)
    assert "snowy owl (8x8 tiles)" in lines
    assert any(line.startswith("B2 of snowy owl: ") for line in lines)


async def test_a_photo_question_then_a_follow_up_about_the_same_photo(ctx, tmp_path,
                                                                        vehicle_photos):
    photo = tmp_path / "my car.jpg"
    photo.write_bytes(vehicle_photos[0].read_bytes())
    lines = await talk(ctx, f'/ask "{photo}" which parts pollute?', "and its tyres?")
    assert "Fake answer to: which parts pollute?" in lines
    assert "Fake answer to: and its tyres?" in lines
    assert lines.index("Fake answer to: which parts pollute?") < lines.index(
        "Fake answer to: and its tyres?")
    with ctx.db.session() as session:
        first, second = session.query(Job).order_by(Job.id).all()
        assert session.get(FollowUp, second.id).parent_job_id == first.id
    assert first.platform == "terminal" and second.image_media_key == first.image_media_key


async def test_ask_about_a_tile_of_the_last_mosaic(ctx, mosaic):
    lines = await talk(ctx, f"/mosaic show {MOSAIC_NAME}", "/ask C7 is it a diesel?")
    assert "Fake answer to: is it a diesel?" in lines
    with ctx.db.session() as session:
        [job] = session.query(Job).all()
        assert ctx.media.read(job.image_media_key) == car_at(ctx, mosaic, row=6, col=2)


async def test_the_status_of_a_question_shows_as_it_moves(ctx, tmp_path, vehicle_photos):
    photo = tmp_path / "car.jpg"
    photo.write_bytes(vehicle_photos[0].read_bytes())
    lines = await talk(ctx, f"/ask {photo} what fuel?")
    assert lines[1] == "  ... Your question is next in line; the answer will follow here."
    assert "  ... Working on your question." in lines
    assert "  ... Looking at your photo." in lines
    assert lines[-1] == "Fake answer to: what fuel?"


async def test_a_failed_answer_is_one_sentence_and_not_followed_up(ctx, tmp_path, vehicle_photos):
    def broken(_job, _progress) -> AnswerResult:
        raise RuntimeError("model on fire")

    photo = tmp_path / "car.jpg"
    photo.write_bytes(vehicle_photos[0].read_bytes())
    lines = await talk(ctx, f"/ask {photo} what fuel?", "and the tyres?", answer_fn=broken)
    assert "Sorry, something went wrong while answering; please try again later." in lines
    assert lines[-1] == ("Type /help for the commands; ask about a car photo with "
                         "/ask PATH QUESTION.")
    assert not any("Traceback" in line for line in lines)


async def test_bad_input_gets_one_clear_sentence_each(ctx, mosaic, tmp_path):
    not_a_photo = tmp_path / "notes.txt"
    not_a_photo.write_text("hello")
    lines = await talk(
        ctx, "C7", "/random", "/mosaic", "/mosaic build", "/mosaic build nowhere.png owl",
        f"/mosaic show {MOSAIC_NAME}", "Z99", "/mosaic show nothing", "/ask", "/ask nowhere.jpg hi",
        f"/ask {not_a_photo} what car?", '/ask "unclosed', "/paint", "what is this?",
    )
    nothing_shown = ("Show or build a mosaic first (/mosaic show NAME), then type a tile such "
                     "as C7.")
    assert lines[1:6] == [
        nothing_shown, nothing_shown,
        "Usage: /mosaic build PATH NAME [COLUMNS], /mosaic show NAME, /mosaic list, "
        "/mosaic tile NAME C7.",
        "Usage: /mosaic build PATH NAME [COLUMNS], e.g. /mosaic build panda.png panda 60.",
        "There is no file at nowhere.png.",
    ]
    rest = lines[8:]
    assert rest[0].startswith("Z99 is off the grid")
    assert rest[1] == 'There is no mosaic named "nothing" here.'
    assert rest[2].startswith("Usage: /ask PATH QUESTION")
    assert rest[3] == "There is no file at nowhere.jpg."
    assert rest[4] == "The file is not an image in a format we can read."
    assert rest[5:] == [
        "That line has an unclosed quote; close it and try again.",
        "There is no command /paint; type /help for the list.",
        "Type /help for the commands; ask about a car photo with /ask PATH QUESTION.",
    ]
    with ctx.db.session() as session:
        assert session.query(Job).count() == 0


async def test_help_and_quit(ctx):
    lines = await talk(ctx, "/help", "/quit", "/mosaic list")
    assert "\n".join(lines[1:]) == HELP


def test_talkmosaic_chat_runs_on_piped_stdin(tmp_path, ctx, mosaic):
    script = f"/mosaic list\n/mosaic show {MOSAIC_NAME}\nC7\n/quit\n"
    env = {"TALKMOSAIC_DATA_DIR": str(ctx.settings.data_dir), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(ROOT)}
    # cwd: a folder without a .env, so only this environment counts.
    finished = subprocess.run([sys.executable, "-m", "core.cli", "chat"], input=script,
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert "Traceback" not in finished.stderr
    out = finished.stdout.splitlines()
    assert f"{MOSAIC_NAME} (10x10 tiles)" in out
    c7 = next(line for line in out if line.startswith("C7 of "))
    assert c7.startswith(f"C7 of {MOSAIC_NAME}: ")
    assert (ctx.settings.data_dir / "chat" / f"{MOSAIC_NAME}-C7.jpg").read_bytes() == car_at(
        ctx, mosaic, row=6, col=2)


async def test_the_chat_never_takes_another_platforms_question(ctx, tmp_path, vehicle_photos):
    """A Slack question queued in the same database stays for the bot that can post it."""
    photo_bytes = vehicle_photos[0].read_bytes()
    slack_job = JobQueue(ctx).submit("slack", "U1", {"channel": "C1"}, photo_bytes, "what car?")
    photo = tmp_path / "car.jpg"
    photo.write_bytes(photo_bytes)
    lines = await talk(ctx, f"/ask {photo} what fuel?")
    assert lines[-1] == "Fake answer to: what fuel?"
    assert JobQueue(ctx).get(slack_job.job_id).status == "queued"


def test_quitting_while_an_answer_cannot_be_stopped_exits_cleanly(tmp_path, vehicle_photos):
    """An answer past JOB_TIMEOUT_S still inside torch: leaving must not abort the process."""
    photo = tmp_path / "car.jpg"
    photo.write_bytes(vehicle_photos[0].read_bytes())
    env = {"TALKMOSAIC_DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(ROOT), "JOB_TIMEOUT_S": "1"}
    finished = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "bot" / "chat_process.py")],
        input=f"/ask {photo} what car?\n/quit\n", cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert "Sorry, answering took longer than 1 s, so I stopped" in finished.stdout
