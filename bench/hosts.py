"""Several app hosts against one PostgreSQL: tile look-ups/s and jobs/min with one and with two
app hosts (each its own process: gallery + worker, DATABASE_URL and MEDIA_URL on the same
PostgreSQL server over TCP), and media read p50/p99 of the folder, PostgreSQL and S3 stores.

S3 is moto's server mode on loopback, the protocol stand-in (no S3 server is packaged here), so
its latency is moto's, not a real object store's. The jobs' answer is a 0.2 s wait standing
for a GPU answer, so jobs/min measures the shared queue (claims, leases), not the model.

    python bench/hosts.py [--photos 200] [--cols 24] [--lookups 1500] [--jobs 60]
                          [--out bench/results/hosts-cpu.txt]
"""

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bot.__main__ import serve  # noqa: E402
from core.context import AppContext  # noqa: E402
from core.library import ingest_paths  # noqa: E402
from core.mosaic import MosaicOptions, build_mosaic, format_coordinate  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.worker import AnswerResult, JobQueue  # noqa: E402
from storage.media import open_media_store  # noqa: E402
from storage.models import Job  # noqa: E402
from tests.storage.servers import (  # noqa: E402
    fake_aws_credentials,
    free_port,
    moto_s3_server,
    postgres_server,
)

VEHICLES = ROOT.parent / "shared" / "data" / "vehicles"
PG_PORT = 55_435
ANSWER_S = 0.2
CONCURRENCY = 64


# An app host: `python bench/hosts.py --serve`, configured by the environment ------------------


def _answer(job, progress) -> AnswerResult:
    time.sleep(ANSWER_S)
    return AnswerResult(text=f"answer {job.id}")


async def _serve_host() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await serve(Settings(), stop, gallery=True, answer_fn=_answer)


class AppHosts:
    """N app-host processes on the same database and media store, each on its own port."""

    def __init__(self, count: int, url: str, workdir: Path, tile_cache_mb: float):
        self.ports = [free_port() for _ in range(count)]
        self.processes = []
        workdir.mkdir(parents=True, exist_ok=True)
        self.logs = [workdir / f"host{n}.log" for n in range(count)]
        for n, port in enumerate(self.ports):
            env = dict(os.environ, DATABASE_URL=url, MEDIA_URL=url, GALLERY_PORT=str(port),
                       TALKMOSAIC_DATA_DIR=str(workdir / f"host{n}"),
                       GALLERY_TILE_CACHE_MB=str(tile_cache_mb), OMP_NUM_THREADS="1")
            self.processes.append(subprocess.Popen(
                [sys.executable, __file__, "--serve"], env=env, cwd=workdir,
                stdout=subprocess.DEVNULL, stderr=self.logs[n].open("w")))

    async def wait_ready(self, session: aiohttp.ClientSession) -> None:
        for port in self.ports:
            deadline = time.monotonic() + 60
            while True:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/api/mosaics") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    logs = "\n".join(log.read_text()[-2000:] for log in self.logs)
                    raise RuntimeError(f"app host on port {port} did not start:\n{logs}")
                await asyncio.sleep(0.2)

    def stop(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


async def _lookups(ports: list[int], mosaic_id: int, coords: list[str], count: int) -> float:
    """Look-ups/s: each look-up is the tile's JSON then its photo, as the gallery page does,
    spread round-robin over the hosts."""
    work = [(ports[n % len(ports)], random.choice(coords)) for n in range(count)]
    errors = 0

    async def one(session, port, coord) -> None:
        nonlocal errors
        base = f"http://127.0.0.1:{port}/api/mosaics/{mosaic_id}/tiles/{coord}"
        for url in (base, base + "/photo"):
            async with session.get(url) as response:
                await response.read()
                errors += response.status != 200

    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def gated(port, coord):
            async with gate:
                await one(session, port, coord)

        started = time.perf_counter()
        await asyncio.gather(*(gated(port, coord) for port, coord in work))
        elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{errors} look-ups failed")
    return count / elapsed


def _jobs_per_minute(ctx: AppContext, jobs: int) -> float:
    queue = JobQueue(ctx, max_pending=jobs + 1, per_user=jobs + 1)
    started = time.perf_counter()
    ids = [queue.submit("web", "bench", {}, None, f"Which parts pollute, car {n}?").job_id
           for n in range(jobs)]
    while True:
        with ctx.db.session() as session:
            left = session.query(Job).filter(Job.id.in_(ids), Job.status != "done").count()
        if left == 0:
            break
        time.sleep(0.05)
    return jobs / (time.perf_counter() - started) * 60


async def _measure_hosts(url, workdir, mosaic_id, coords, args, ctx) -> dict:
    results = {}
    for cache_mb, label in ((0, "off"), (64, "on")):
        for count in (1, 2):
            hosts = AppHosts(count, url, workdir / f"{label}{count}", cache_mb)
            try:
                async with aiohttp.ClientSession() as session:
                    await hosts.wait_ready(session)
                results[("lookups", label, count)] = await _lookups(
                    hosts.ports, mosaic_id, coords, args.lookups)
                if label == "off":
                    results[("jobs", count)] = await asyncio.to_thread(
                        _jobs_per_minute, ctx, args.jobs)
            finally:
                hosts.stop()
    return results


def _media_reads(urls: dict[str, str], workdir: Path, reads: int) -> dict:
    """p50/p99 ms of a whole read, a library photo (6 KB) and a render (2 MB), per backend."""
    sizes = {"photo 6 KB": 6 * 1024, "render 2 MB": 2 * 1024 * 1024}
    results = {}
    for backend, url in urls.items():
        store = open_media_store(url, workdir / "folder-media")
        for size_name, size in sizes.items():
            keys = [store.put(os.urandom(size)) for _ in range(10)]
            store.read(keys[0])
            times = []
            for _ in range(reads):
                key = random.choice(keys)
                started = time.perf_counter()
                data = store.read(key)
                times.append((time.perf_counter() - started) * 1000)
                assert len(data) == size
            cuts = statistics.quantiles(times, n=100)
            results[(backend, size_name)] = (cuts[49], cuts[98])
        store.close()
    return results


def _table(hosts: dict, media: dict, args, setup: str) -> str:
    lines = [f"Several app hosts on one PostgreSQL 15 (this machine: {os.cpu_count()} cores, "
             f"app hosts and load generator share them; load average {os.getloadavg()[0]:.1f} "
             f"at the end); {setup}", ""]
    lines.append(f"{'app hosts':<10}{'look-ups/s cache off':>22}{'x 1 host':>10}"
                 f"{'look-ups/s cache on':>21}{'x 1 host':>10}{'jobs/min':>10}{'x 1 host':>10}")
    for count in (1, 2):
        off, on = hosts[("lookups", "off", count)], hosts[("lookups", "on", count)]
        jobs = hosts[("jobs", count)]
        lines.append(f"{count:<10}{off:>22.0f}{off / hosts[('lookups', 'off', 1)]:>9.2f}x"
                     f"{on:>21.0f}{on / hosts[('lookups', 'on', 1)]:>9.2f}x"
                     f"{jobs:>10.0f}{jobs / hosts[('jobs', 1)]:>9.2f}x")
    lines += ["", f"Media read, ms ({args.reads} whole reads each; S3 = moto's server on "
              "loopback, the protocol stand-in)",
              f"{'backend':<12}{'object':<14}{'p50':>8}{'p99':>8}{'p50 x folder':>14}"]
    for (backend, size_name), (p50, p99) in media.items():
        base = media[("folder", size_name)][0]
        lines.append(f"{backend:<12}{size_name:<14}{p50:>8.2f}{p99:>8.2f}{p50 / base:>13.1f}x")
    return "\n".join(lines)


async def _main(args) -> str:
    fake_aws_credentials(os.environ)
    photos = sorted(VEHICLES.glob("*/*.jpg"))[: args.photos]
    if not photos:
        raise SystemExit(f"no photos in {VEHICLES}")
    with tempfile.TemporaryDirectory(prefix="talkmosaic-hosts-") as tmp, \
            postgres_server(port=PG_PORT, listen=["127.0.0.1"]) as server, \
            moto_s3_server() as s3_endpoint:
        workdir = Path(tmp)
        server.create_database("app")
        url = server.url("app", host="127.0.0.1")
        ctx = AppContext.open(Settings(data_dir=workdir / "builder", database_url=url,
                                       media_url=url))
        ingest_paths(ctx, photos, progress=False)
        mosaic = build_mosaic(ctx, _target(), "bench", options=MosaicOptions(cols=args.cols))
        coords = [format_coordinate(r, c) for r in range(mosaic.rows) for c in range(mosaic.cols)]
        hosts = await _measure_hosts(url, workdir, mosaic.id, coords, args, ctx)
        ctx.close()

        import boto3

        boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="bench")
        server.create_database("media")
        media = _media_reads({"folder": str(workdir / "folder-media"),
                              "postgresql": server.url("media", host="127.0.0.1"),
                              "s3 (moto)": f"s3://bench/m?endpoint_url={s3_endpoint}"},
                             workdir, args.reads)
    setup = (f"{len(photos)} photos, mosaic {mosaic.cols}x{mosaic.rows}, {args.lookups} look-ups "
             f"(JSON + photo) at {CONCURRENCY} at once, {args.jobs} jobs of {ANSWER_S} s")
    return _table(hosts, media, args, setup)


def _target() -> bytes:
    from io import BytesIO

    from PIL import Image

    out = BytesIO()
    Image.radial_gradient("L").resize((320, 240)).convert("RGB").save(out, "PNG")
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--cols", type=int, default=24)
    parser.add_argument("--lookups", type=int, default=1500)
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--reads", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "hosts-cpu.txt")
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve_host())
        return
    table = asyncio.run(_main(args))
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
