"""The same queue on PostgreSQL (DATABASE_URL), on a throw-away local server: claims skip rows
another worker holds (SKIP LOCKED), the limits hold under concurrent submissions, and a worker
answers a job end to end. Skipped where the PostgreSQL binaries or psycopg are missing."""

import itertools
import os
import shutil
import subprocess
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest

from core.context import AppContext
from core.settings import Settings
from core.worker import JobQueue, Worker
from storage import jobs as job_rows
from storage.models import Job, utcnow
from tests.worker.fakes import echo_answer
from tests.worker.races import claim_until_empty, submit_together

psycopg = pytest.importorskip("psycopg")
PORT = 55_433
_databases = itertools.count()


def _as_server_user(command: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root.
    return ["runuser", "-u", "nobody", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="module")
def postgres_socket_dir():
    if not (shutil.which("initdb") and shutil.which("pg_ctl")):
        pytest.skip("the PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    root = Path(tempfile.mkdtemp(prefix="talkmosaic-pg-"))
    root.chmod(0o777)
    data = root / "data"
    run = dict(check=True, capture_output=True)
    subprocess.run(_as_server_user(["initdb", "-D", str(data), "-U", "postgres",
                                    "--auth=trust", "-E", "UTF8", "--no-sync"]), **run)
    options = f"-k {root} -p {PORT} -c listen_addresses='' -c fsync=off"
    subprocess.run(_as_server_user(["pg_ctl", "-D", str(data), "-o", options, "-l",
                                    str(root / "log"), "-w", "start"]), **run)
    yield root
    subprocess.run(_as_server_user(["pg_ctl", "-D", str(data), "-m", "immediate", "stop"]),
                   **run)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_ctx(postgres_socket_dir, tmp_path):
    name = f"jobs_{os.getpid()}_{next(_databases)}"
    with psycopg.connect(host=str(postgres_socket_dir), port=PORT, user="postgres",
                         dbname="postgres", autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    url = f"postgresql+psycopg://postgres@/{name}?host={postgres_socket_dir}&port={PORT}"
    context = AppContext.open(Settings(data_dir=tmp_path / "data", database_url=url))
    yield context
    context.close()


def test_racing_claims_skip_each_others_rows(pg_ctx):
    queue = JobQueue(pg_ctx, max_pending=100, per_user=100)
    ids = [queue.submit("web", "u", {}, None, f"q{n}?").job_id for n in range(100)]
    claimed = claim_until_empty(pg_ctx.settings.db_url)
    assert sorted(job_id for mine in claimed.values() for job_id in mine) == ids


def test_concurrent_submissions_respect_the_per_user_limit(pg_ctx):
    queue = JobQueue(pg_ctx, max_pending=50, per_user=2)
    assert submit_together(queue) == ["queued"] * 2 + ["refused"] * 6


async def test_a_worker_answers_and_recovers_interrupted_jobs(pg_ctx):
    queue = JobQueue(pg_ctx)
    job_id = queue.submit("web", "alice", {}, None, "Which parts pollute?").job_id
    with pg_ctx.db.session() as session:
        job_rows.claim_next(session, "dead-worker", utcnow() - timedelta(seconds=1))
    job = await Worker(pg_ctx, echo_answer).run_once()
    assert (job.id, job.status, job.attempts) == (job_id, "done", 2)
    assert job.timings["queue_wait_s"] >= 0
    assert queue.position(job_id) is None
    with pg_ctx.db.session() as session:
        assert session.get(Job, job_id).answer == "You asked: Which parts pollute?"
