"""Races run the same way on every database: threads released together by a barrier, each
claiming jobs on its own engine or submitting for the same user."""

import threading
from collections.abc import Callable
from datetime import timedelta

from core.errors import QueueFull
from core.worker import JobQueue
from storage import jobs as job_rows
from storage.db import Database
from storage.models import utcnow


def run_together(target: Callable[..., None], args_per_thread: list[tuple]) -> None:
    """Start one thread per args tuple, let them all begin at once, wait for every one."""
    start = threading.Barrier(len(args_per_thread))

    def released(*args) -> None:
        start.wait()
        target(*args)

    threads = [threading.Thread(target=released, args=args) for args in args_per_thread]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def claim_until_empty(db_url: str, claimers: int = 4) -> dict[str, list[int]]:
    """Each claimer opens its own engine (as separate processes would) and claims jobs until
    none is left; returns the job ids each one took."""
    claimed: dict[str, list[int]] = {f"t{n}": [] for n in range(claimers)}

    def claimer(name: str) -> None:
        db = Database.open(db_url)
        while True:
            with db.session() as session:
                job = job_rows.claim_next(session, name, utcnow() + timedelta(seconds=60))
            if job is None:
                break
            claimed[name].append(job.id)
        db.close()

    run_together(claimer, [(name,) for name in claimed])
    return claimed


def submit_together(queue: JobQueue, attempts: int = 8) -> list[str]:
    """The same user submits `attempts` questions at once: "queued" or "refused" for each."""
    outcomes: list[str] = []

    def submit() -> None:
        try:
            queue.submit("web", "alice", {}, None, "Which parts pollute?")
            outcomes.append("queued")
        except QueueFull:
            outcomes.append("refused")

    run_together(submit, [()] * attempts)
    return sorted(outcomes)
