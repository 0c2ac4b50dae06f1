"""Load check of the chat command layer: 200 concurrent tile look-ups and 20 concurrent /ask
submissions on a real mosaic (real car photos, temp data dir), with a fast fake answer function.

Pass: no errors, nothing lost (every look-up returns the right car, every question one answer),
and the event loop never blocked for more than 100 ms (a 5 ms ticker measures the lag). Peers in
the same run: the idle loop (lag floor), the look-ups run directly on the loop (what blocking
looks like), and the look-ups called one by one without the command layer (throughput ratio).

    python bench/load.py [--photos 1600] [--cols 60] [--out bench/results/load-cpu.txt]
"""

import argparse
import asyncio
import random
import sys
import tempfile
import time
from importlib.resources import files
from pathlib import Path

from sqlalchemy import select

from bot.commands import Commands, Cooldowns, JobUpdates
from core.context import AppContext
from core.gallery import tile_lookup
from core.library import ingest_paths
from core.mosaic import MosaicOptions, build_mosaic, format_coordinate
from core.settings import Settings
from core.worker import AnswerResult, JobQueue, Worker
from storage.models import Car, Tile

VEHICLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "vehicles"
LOOKUPS = 200
ASKS = 20
MAX_LAG_MS = 100.0
TICK_S = 0.005


class LagMeter:
    """A ticker that wakes every 5 ms and keeps the worst lateness: how long the loop blocked."""

    def __init__(self):
        self.max_lag = 0.0
        self._task: asyncio.Task | None = None

    async def _tick(self) -> None:
        while True:
            expected = time.perf_counter() + TICK_S
            await asyncio.sleep(TICK_S)
            self.max_lag = max(self.max_lag, time.perf_counter() - expected)

    async def __aenter__(self) -> "LagMeter":
        self._task = asyncio.get_running_loop().create_task(self._tick())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *_exc) -> None:
        # Let the ticker wake once more: a block that just ended is only seen when it does.
        await asyncio.sleep(2 * TICK_S)
        self._task.cancel()


def fake_answer(job, progress) -> AnswerResult:
    progress("Looking at your photo.")
    time.sleep(0.02)  # a fast stand-in for the model, off the loop like the real one
    return AnswerResult(f"answer {job.id}: {job.question}")


class RecordedStatus:
    def __init__(self):
        self.updates: list[str] = []
        self.answers: list[str] = []
        self.done = asyncio.Event()

    async def update(self, text: str) -> None:
        self.updates.append(text)

    async def finish(self, text: str) -> None:
        self.answers.append(text)
        self.done.set()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def row(name, ops, errors, lost, wall, latencies, lag, ratio="") -> list[str]:
    return [name, str(ops), str(errors), str(lost), f"{wall:.2f}", f"{ops / wall:.0f}",
            f"{percentile(latencies, 0.5) * 1000:.1f}" if latencies else "-",
            f"{percentile(latencies, 0.95) * 1000:.1f}" if latencies else "-",
            "-" if lag is None else f"{lag * 1000:.1f}", ratio]


async def timed(coro) -> tuple[object, float]:
    started = time.perf_counter()
    result = await coro
    return result, time.perf_counter() - started


async def run(photos: int, cols: int) -> tuple[list[list[str]], bool]:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp) / "data", database_url=None)
        ctx = AppContext.open(settings)
        paths = sorted(VEHICLES.glob("*/*.jpg"))[:: max(1, 1600 // photos)][:photos]
        ingest_paths(ctx, paths, progress=False)
        target = files("core.assets").joinpath("panda.png").read_bytes()
        mosaic = build_mosaic(ctx, target, "load", options=MosaicOptions(cols=cols))
        with ctx.db.session() as session:
            tiles = session.execute(
                select(Tile.row, Tile.col, Car.media_key)
                .join(Car, Car.id == Tile.car_id)
                .where(Tile.mosaic_id == mosaic.id)
            ).all()
        expected = {format_coordinate(r, c): ctx.media.read(key) for r, c, key in tiles}
        rng = random.Random(0)
        coords = [rng.choice(list(expected)) for _ in range(LOOKUPS)]

        queue = JobQueue(ctx, max_pending=ASKS * 2, per_user=1)
        updates = JobUpdates(queue)
        commands = Commands(ctx, queue, Cooldowns(0))
        await commands.remember("bench", "c1", "m1", mosaic.id)
        limit = settings.preview_max_bytes
        rows = []

        async with LagMeter() as idle:
            await asyncio.sleep(1.0)
        rows.append(row("idle loop (lag floor)", 0, 0, 0, 1.0, [], idle.max_lag))

        started = time.perf_counter()
        for coord in coords:
            tile_lookup(ctx, mosaic, coord)
        direct_wall = time.perf_counter() - started
        rows.append(row("core look-ups, one by one", LOOKUPS, 0, 0, direct_wall, [], None, "1.00"))

        async def blocking_lookup(coord: str):
            return tile_lookup(ctx, mosaic, coord)

        async with LagMeter() as lag:
            started = time.perf_counter()
            await asyncio.gather(*(blocking_lookup(c) for c in coords))
            wall = time.perf_counter() - started
        rows.append(row("look-ups on the loop (naive)", LOOKUPS, 0, 0, wall, [], lag.max_lag,
                        f"{direct_wall / wall:.2f}"))

        async def lookups() -> tuple[int, int, list[float], float]:
            started = time.perf_counter()
            results = await asyncio.gather(*(timed(commands.tile_for_message(
                "bench", "c1", "m1", c, limit)) for c in coords), return_exceptions=True)
            wall = time.perf_counter() - started
            errors = sum(isinstance(r, BaseException) or r[0].ephemeral for r in results)
            lost = sum(not isinstance(r, BaseException) and not r[0].ephemeral
                       and r[0].files[0][1] != expected[c]
                       for r, c in zip(results, coords, strict=True))
            latencies = [r[1] for r in results if not isinstance(r, BaseException)]
            return errors, lost, latencies, wall

        async with LagMeter() as lag:
            errors, lost, latencies, wall = await lookups()
        lookup_ok = errors == 0 and lost == 0 and lag.max_lag * 1000 < MAX_LAG_MS
        rows.append(row("200 tile look-ups (commands)", LOOKUPS, errors, lost, wall, latencies,
                        lag.max_lag, f"{direct_wall / wall:.2f}"))

        worker = Worker(ctx, fake_answer, on_update=updates, poll_s=0.05)
        worker_task = asyncio.create_task(worker.run_forever())
        photo_bytes = [p.read_bytes() for p in paths[:ASKS]]

        async def one_ask(i: int) -> tuple[RecordedStatus | None, float]:
            status = RecordedStatus()

            async def show(text: str) -> RecordedStatus:
                status.updates.append(text)
                return status

            started = time.perf_counter()
            reply = await updates.follow(commands.ask(
                "bench", f"user{i}", {"n": i}, photo_bytes[i], f"question {i}?"), show)
            if reply.job_id is None:
                return None, 0.0
            await asyncio.wait_for(status.done.wait(), 120)
            return status, time.perf_counter() - started

        async def asks(first: int) -> tuple[int, int, list[float], float]:
            started = time.perf_counter()
            numbers = range(first, first + ASKS)
            results = await asyncio.gather(*(one_ask(i) for i in numbers),
                                           return_exceptions=True)
            wall = time.perf_counter() - started
            errors = sum(isinstance(r, BaseException) or r[0] is None for r in results)
            lost = sum(not isinstance(r, BaseException) and r[0] is not None
                       and (len(r[0].answers) != 1 or f": question {i}?" not in r[0].answers[0])
                       for i, r in zip(numbers, results, strict=True))
            latencies = [r[1] for r in results if not isinstance(r, BaseException) and r[0]]
            return errors, lost, latencies, wall

        async with LagMeter() as lag:
            errors, lost, latencies, wall = await asks(0)
        ask_ok = errors == 0 and lost == 0 and lag.max_lag * 1000 < MAX_LAG_MS
        rows.append(row("20 /ask, submit to answer", ASKS, errors, lost, wall, latencies,
                        lag.max_lag))

        # Both at once: new users, so the per-user queue limit does not refuse them.
        photo_bytes = photo_bytes * 2
        async with LagMeter() as lag:
            (e1, l1, lat1, w1), (e2, l2, lat2, w2) = await asyncio.gather(
                lookups(), asks(ASKS))
        mixed_ok = e1 + e2 + l1 + l2 == 0 and lag.max_lag * 1000 < MAX_LAG_MS
        rows.append(row("both at once", LOOKUPS + ASKS, e1 + e2, l1 + l2, max(w1, w2),
                        lat1 + lat2, lag.max_lag))

        worker_task.cancel()
        await asyncio.gather(worker_task, return_exceptions=True)
        ctx.close()
        return rows, lookup_ok and ask_ok and mixed_ok


HEADER = ["scenario", "ops", "errors", "lost", "wall s", "ops/s", "p50 ms", "p95 ms",
          "max loop lag ms", "speed vs one by one"]


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True))
             for r in [HEADER, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=1600)
    parser.add_argument("--cols", type=int, default=60)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows, passed = asyncio.run(run(args.photos, args.cols))
    report = (
        f"Load check: {LOOKUPS} tile look-ups and {ASKS} /ask through bot.commands, real "
        f"mosaic ({args.cols} cols) of {args.photos} real car photos, fake 20 ms answers; "
        f"loop lag limit {MAX_LAG_MS:.0f} ms\n\n{table(rows)}\n\n"
        f"result: {'PASS' if passed else 'FAIL'}\n"
    )
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
