"""Q&A job rows: add, count what is pending, claim the next one atomically, renew its lease,
finish it, cancel it, and number the waiting ones. Every write that races is one conditional
UPDATE whose row count (or RETURNING row) says who won.

A job moves queued -> running -> done | failed | timed_out, or to cancelled from either of the
first two; an interrupted running job (lease expired) goes back to queued until it has used
`max_attempts` starts, then fails. Once finished, its outcome is posted to the chat once:
`claim_posting` marks it (`posted_at`), and only the caller that marked it posts.
"""

from collections.abc import Collection
from datetime import datetime

from sqlalchemy import func, or_, select, text, true, update
from sqlalchemy.orm import Session

from storage.models import UNPOSTED, Job, utcnow

PENDING = ("queued", "running")
FINAL = ("done", "failed", "cancelled", "timed_out")
# Any constant works: it names the advisory lock that serialises submissions on PostgreSQL.
SUBMIT_LOCK_KEY = 7_311_004


def lock_for_submit(session: Session) -> None:
    """Serialise submissions so the pending counts stay exact under concurrency.

    SQLite needs nothing: the INSERT that precedes the count takes the database's write lock.
    PostgreSQL counts with read-committed snapshots, so take a transaction-scoped advisory lock."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SUBMIT_LOCK_KEY})


def pending_counts(session: Session, user_id: str) -> tuple[int, int]:
    """(this user's queued + running jobs, everybody's queued + running jobs)."""
    mine = func.count().filter(Job.user_id == user_id)
    row = session.execute(select(mine, func.count()).where(Job.status.in_(PENDING))).one()
    return row[0], row[1]


def job_by_id(session: Session, job_id: int) -> Job | None:
    return session.get(Job, job_id)


def claim_next(
    session: Session, worker_id: str, lease_until: datetime,
    platforms: Collection[str] | None = None,
) -> Job | None:
    """Take the oldest queued job for this worker (of `platforms` only, when given), or None if
    nothing is queued.

    One UPDATE picks and takes the row, so two workers never get the same job: SQLite runs the
    statement under its write lock; PostgreSQL skips rows another claimer has locked (SKIP
    LOCKED, which SQLite's compiler leaves out)."""
    oldest = (
        select(Job.id)
        .where(Job.status == "queued",
               Job.platform.in_(platforms) if platforms is not None else true())
        .order_by(Job.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    claimed = session.execute(
        update(Job)
        .where(Job.id == oldest, Job.status == "queued")
        .values(
            status="running",
            worker_id=worker_id,
            lease_until=lease_until,
            started_at=utcnow(),
            attempts=Job.attempts + 1,
        )
        .returning(Job.id)
    ).scalar()
    if claimed is None:
        return None
    return session.execute(
        select(Job).where(Job.id == claimed).execution_options(populate_existing=True)
    ).scalar_one()


def recover_interrupted(
    session: Session, now: datetime, max_attempts: int, dead_worker: str | None = None
) -> list[int]:
    """Put running jobs whose lease expired (or owned by `dead_worker`, a worker known to have
    died, e.g. this very worker id before a restart) back in the queue; those that already used
    `max_attempts` starts fail instead. Returns the ids of the jobs that failed."""
    interrupted = Job.lease_until < now
    if dead_worker is not None:
        interrupted = or_(interrupted, Job.worker_id == dead_worker)
    exhausted = session.execute(
        update(Job)
        .where(Job.status == "running", interrupted, Job.attempts >= max_attempts)
        .values(
            status="failed",
            finished_at=now,
            lease_until=None,
            error=(
                f"I could not answer this question: answering it was interrupted "
                f"{max_attempts} times."
            ),
        )
        .returning(Job.id)
    ).scalars().all()
    session.execute(
        update(Job)
        .where(Job.status == "running", interrupted)
        .values(status="queued", worker_id=None, lease_until=None, started_at=None)
    )
    return list(exhausted)


def renew_lease(session: Session, job_id: int, worker_id: str, lease_until: datetime) -> bool:
    """Extend this worker's lease; False if the job is no longer running here (cancelled,
    or taken back after this worker stalled past its lease)."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker_id == worker_id, Job.status == "running")
        .values(lease_until=lease_until)
    )
    return result.rowcount == 1


def finish_job(session: Session, job_id: int, worker_id: str, status: str, **values) -> bool:
    """Record the outcome if this worker still owns the running job; False means the outcome
    is discarded because the job was cancelled, timed out or taken back meanwhile."""
    assert status in FINAL
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker_id == worker_id, Job.status == "running")
        .values(status=status, finished_at=utcnow(), lease_until=None, **values)
    )
    return result.rowcount == 1


def release_job(session: Session, job_id: int, worker_id: str) -> bool:
    """Give a running job back to the queue (the worker is shutting down); the start it used
    does not count as an attempt."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker_id == worker_id, Job.status == "running")
        .values(
            status="queued",
            worker_id=None,
            lease_until=None,
            started_at=None,
            attempts=Job.attempts - 1,
        )
    )
    return result.rowcount == 1


def cancel_job(session: Session, job_id: int, user_id: str) -> bool:
    """Cancel this user's queued or running job; False if it is not theirs or already over."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.user_id == user_id, Job.status.in_(PENDING))
        .values(
            status="cancelled",
            finished_at=utcnow(),
            lease_until=None,
            error="The question was cancelled by the person who asked it.",
        )
    )
    return result.rowcount == 1


def cancel_queued_job(session: Session, job_id: int, user_id: str) -> bool:
    """Cancel this user's job only if no worker has started it; False otherwise."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.user_id == user_id, Job.status == "queued")
        .values(
            status="cancelled",
            finished_at=utcnow(),
            error="The question was cancelled by the person who asked it.",
            # The canceller's own reply shows this outcome: nothing else is to be posted.
            posted_at=utcnow(),
        )
    )
    return result.rowcount == 1


def unposted_outcomes(session: Session, platforms: Collection[str], limit: int = 50
                      ) -> list[Job]:
    """Finished jobs of these platforms whose outcome no chat adapter has posted, oldest first.
    One query on ix_jobs_unposted: it holds only finished, unposted jobs, and the search by
    platform reads only these platforms' (web questions, never posted, are not read)."""
    if not platforms:
        return []
    return list(session.scalars(
        select(Job).where(text(UNPOSTED), Job.platform.in_(platforms)).order_by(Job.id)
        .limit(limit)
    ))


def claim_posting(session: Session, job_id: int) -> bool:
    """Mark this job's outcome as posted; True for the one caller that marked it (the one that
    must post it), False when another process or path did already."""
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.posted_at.is_(None)).values(posted_at=utcnow())
    )
    return result.rowcount == 1


def release_posting(session: Session, job_id: int) -> None:
    """Unmark a job whose outcome could not be posted, so that it is tried again."""
    session.execute(update(Job).where(Job.id == job_id).values(posted_at=None))


def queue_positions(session: Session, now: datetime) -> dict[int, int]:
    """Each queued job's place in line, 1 = next: the queued jobs before it, plus the jobs
    running under a live lease, plus one. Counting running jobs is the honest answer to "how
    many answers come before mine" when one worker is busy."""
    running = session.scalar(
        select(func.count()).where(Job.status == "running", Job.lease_until >= now)
    )
    queued = session.scalars(select(Job.id).where(Job.status == "queued").order_by(Job.id))
    return {job_id: running + index + 1 for index, job_id in enumerate(queued)}


def queue_position(session: Session, job_id: int, now: datetime) -> int | None:
    """One queued job's place in line (see `queue_positions`); None if it is not queued."""
    if session.scalar(select(Job.status).where(Job.id == job_id)) != "queued":
        return None
    before = session.scalar(
        select(func.count()).where(
            or_(
                (Job.status == "queued") & (Job.id < job_id),
                (Job.status == "running") & (Job.lease_until >= now),
            )
        )
    )
    return before + 1
