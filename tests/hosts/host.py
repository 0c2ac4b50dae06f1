"""One host of the multi-host test, run inside its network namespace:

- `serve MARKS LABEL [--no-gallery]`: `python -m bot`'s own serve() (gallery and worker, or a
  worker alone) with the real answering pipeline, wrapped to leave marks a test can count:
  `started-<job>-<LABEL>` on entry, `finished-<job>-<LABEL>` once an answer came back.
- `submit PHOTO...`: queue one question per photo; prints the job ids as JSON.
- `lookup BASE_URL MOSAIC_ID COORD...`: each tile's JSON and photo over HTTP; prints JSON
  {coord: {"status": .., "photo_sha256": ..}}.

Everything is read from the environment like the product: DATABASE_URL, MEDIA_URL, ...
"""

import argparse
import asyncio
import hashlib
import json
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path

from bot.__main__ import serve
from core.context import AppContext
from core.settings import Settings
from core.worker import JobQueue

QUESTIONS = ["Which parts of this car pollute?", "What tyre should I buy to lower its impact?",
             "What emission standard does it meet?"]


def marking(answer_fn, marks: Path, label: str):
    def answer(job, progress):
        (marks / f"started-{job.id}-{label}").touch()
        result = answer_fn(job, progress)
        (marks / f"finished-{job.id}-{label}").touch()
        return result

    return answer


async def serve_host(marks: Path, label: str, gallery: bool) -> None:
    from core.qa.pipeline import AnswerPipeline

    settings = Settings()
    ctx = AppContext.open(settings)
    pipeline = await asyncio.to_thread(AnswerPipeline, ctx)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await serve(settings, stop, gallery=gallery,
                answer_fn=marking(pipeline.answer_job, marks, label))
    ctx.close()


def submit(photos: list[Path]) -> None:
    ctx = AppContext.open(Settings())
    queue = JobQueue(ctx, max_pending=100, per_user=100)
    ids = [queue.submit("web", f"asker-{n}", {}, photo.read_bytes(),
                        QUESTIONS[n % len(QUESTIONS)]).job_id
           for n, photo in enumerate(photos)]
    ctx.close()
    print(json.dumps(ids))


def lookup(base_url: str, mosaic_id: int, coords: list[str]) -> None:
    found = {}
    for coord in coords:
        url = f"{base_url}/api/mosaics/{mosaic_id}/tiles/{coord}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                json.load(response)
            with urllib.request.urlopen(url + "/photo", timeout=30) as response:
                photo = response.read()
            found[coord] = {"status": 200, "photo_sha256": hashlib.sha256(photo).hexdigest()}
        except urllib.error.HTTPError as error:
            found[coord] = {"status": error.code}
    print(json.dumps(found))


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    serving = commands.add_parser("serve")
    serving.add_argument("marks", type=Path)
    serving.add_argument("label")
    serving.add_argument("--no-gallery", action="store_true")
    submitting = commands.add_parser("submit")
    submitting.add_argument("photos", type=Path, nargs="+")
    looking = commands.add_parser("lookup")
    looking.add_argument("base_url")
    looking.add_argument("mosaic_id", type=int)
    looking.add_argument("coords", nargs="+")
    args = parser.parse_args()
    if args.command == "serve":
        asyncio.run(serve_host(args.marks, args.label, gallery=not args.no_gallery))
    elif args.command == "submit":
        submit(args.photos)
    else:
        lookup(args.base_url, args.mosaic_id, args.coords)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
