"""Several workers on one database: a killed worker's job completes exactly once after a
restart, and racing workers (processes and threads) never take the same job twice."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from core.worker import AnswerResult, JobQueue, Worker
from tests.worker.races import claim_until_empty, submit_together
from tests.worker.worker_process import marking_answer

ROOT = Path(__file__).resolve().parents[2]


def start_worker_process(settings, marks: Path, worker_id: str, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "tests.worker.worker_process", str(settings.data_dir),
               str(marks), "--worker-id", worker_id, *extra]
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def wait_for(path: Path, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


def marks_of(marks: Path, kind: str) -> list[tuple[int, str]]:
    """(job id, worker id) of every `kind` mark (started or finished)."""
    found = []
    for mark in marks.glob(f"{kind}-*"):
        _, job_id, worker_id = mark.name.split("-", 2)
        found.append((int(job_id), worker_id))
    return sorted(found)


async def test_a_job_survives_its_worker_being_killed_and_completes_once(
    ctx, settings, tmp_path
):
    marks = tmp_path / "marks"
    marks.mkdir()
    queue = JobQueue(ctx, max_pending=10, per_user=10)
    first = queue.submit("discord", "alice", {}, None, "Which parts pollute?").job_id
    second = queue.submit("discord", "alice", {}, None, "And the tyres?").job_id

    doomed = start_worker_process(settings, marks, "doomed", "--sleep", "30", "--lease", "1")
    try:
        wait_for(marks / f"started-{first}-doomed")
    finally:
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
    assert queue.get(first).status == "running", "the killed worker left its job mid-answer"

    worker = Worker(ctx, marking_answer(marks, "fresh", 0.1), worker_id="fresh", lease_s=1)
    finished = []
    deadline = time.monotonic() + 20
    while len(finished) < 2:
        assert time.monotonic() < deadline, "the interrupted job was never picked up"
        job = await worker.run_once()
        if job is None:
            await asyncio.sleep(0.1)  # The dead worker's lease has not expired yet.
        else:
            finished.append(job)

    # The queued second job goes first: the first waits for the dead worker's lease to expire.
    assert [(job.id, job.status, job.attempts) for job in finished] == [
        (second, "done", 1), (first, "done", 2)
    ]
    assert finished[1].answer == f"answer {first} by fresh"
    assert marks_of(marks, "started") == [(first, "doomed"), (first, "fresh"), (second, "fresh")]
    assert marks_of(marks, "finished") == [(first, "fresh"), (second, "fresh")]


def test_two_worker_processes_share_fifty_jobs_without_running_one_twice(
    ctx, settings, tmp_path
):
    marks = tmp_path / "marks"
    marks.mkdir()
    queue = JobQueue(ctx, max_pending=50, per_user=50)
    ids = [queue.submit("slack", "u", {}, None, f"question {n}?").job_id for n in range(50)]
    go = tmp_path / "go"
    workers = [
        start_worker_process(settings, marks, name, "--sleep", "0.02", "--until-empty",
                             "--go", str(go))
        for name in ("left", "right")
    ]
    go.touch()
    for worker in workers:
        assert worker.wait(timeout=60) == 0

    finished = marks_of(marks, "finished")
    runs = Counter(job_id for job_id, _ in finished)
    assert sorted(runs) == ids and set(runs.values()) == {1}
    assert {worker_id for _, worker_id in finished} == {"left", "right"}
    assert all(queue.get(job_id).status == "done" for job_id in ids)


def test_racing_claims_on_separate_engines_never_share_a_job(ctx, settings):
    queue = JobQueue(ctx, max_pending=200, per_user=200)
    ids = [queue.submit("web", "u", {}, None, f"q{n}?").job_id for n in range(200)]
    claimed = claim_until_empty(settings.db_url)
    every_claim = [job_id for mine in claimed.values() for job_id in mine]
    assert sorted(every_claim) == ids
    assert sum(1 for mine in claimed.values() if mine) >= 2


def test_concurrent_submissions_respect_the_per_user_limit(ctx):
    queue = JobQueue(ctx, max_pending=50, per_user=2)
    assert submit_together(queue) == ["queued"] * 2 + ["refused"] * 6


async def test_two_workers_in_one_process_share_the_queue(ctx):
    queue = JobQueue(ctx, max_pending=20, per_user=20)
    ids = [queue.submit("discord", "u", {}, None, f"q{n}?").job_id for n in range(20)]
    runs: list[tuple[int, str]] = []

    def answer_as(name: str):
        def answer(job, progress):
            runs.append((job.id, name))
            time.sleep(0.01)
            return AnswerResult(text="ok")

        return answer

    workers = [Worker(ctx, answer_as(name), worker_id=name, poll_s=0.01) for name in ("a", "b")]
    tasks = [asyncio.create_task(worker.run_forever()) for worker in workers]
    try:
        while not all(queue.get(job_id).status == "done" for job_id in ids):
            await asyncio.sleep(0.05)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert sorted(job_id for job_id, _ in runs) == ids
    assert {name for _, name in runs} == {"a", "b"}
