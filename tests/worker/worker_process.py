"""A worker in its own process, for the restart and race tests:
`python -m tests.worker.worker_process DATA_DIR MARKS_DIR --worker-id W [--sleep S] ...`.

Its answer function leaves marks a test can count: `started-<job>-<worker>` on entry and
`finished-<job>-<worker>` once it ran to completion, so "ran exactly once" is a file count.
"""

import argparse
import asyncio
import time
from pathlib import Path

from core.context import AppContext
from core.settings import Settings
from core.worker import AnswerResult, JobView, Progress, Worker


def marking_answer(marks: Path, worker_id: str, sleep_s: float):
    def answer(job: JobView, progress: Progress) -> AnswerResult:
        (marks / f"started-{job.id}-{worker_id}").touch()
        steps = 10
        for step in range(steps):
            progress(f"step {step}")
            time.sleep(sleep_s / steps)
        (marks / f"finished-{job.id}-{worker_id}").touch()
        return AnswerResult(text=f"answer {job.id} by {worker_id}")

    return answer


async def work(args: argparse.Namespace) -> None:
    ctx = AppContext.open(Settings(data_dir=args.data_dir, database_url=None))
    answer = marking_answer(args.marks, args.worker_id, args.sleep)
    worker = Worker(ctx, answer, worker_id=args.worker_id, lease_s=args.lease, poll_s=0.05)
    if args.go is not None:
        while not args.go.exists():
            await asyncio.sleep(0.01)
    if args.until_empty:
        while await worker.run_once() is not None:
            pass
    else:
        await worker.run_forever()
    ctx.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("marks", type=Path)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--lease", type=float, default=30.0)
    parser.add_argument("--until-empty", action="store_true")
    parser.add_argument("--go", type=Path, help="wait until this file exists before working")
    asyncio.run(work(parser.parse_args()))


if __name__ == "__main__":
    main()
