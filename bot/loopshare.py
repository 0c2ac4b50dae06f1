"""Sharing the event loop under a burst of gallery requests: the chat adapters run in the same
loop, and 500 tile look-ups answered from memory would otherwise all run in one loop turn.

A request that arrives when this turn has already spent its slice waits for the next turn, so
timers, heartbeats and other connections get the loop between slices. Objects alive at start-up
are kept out of the garbage collector's full passes, which otherwise stall the loop.
"""

import asyncio
import gc
import time
from collections.abc import Callable
from functools import cache

from aiohttp import web

# Handler work allowed in one loop turn before the rest waits for the next.
SLICE_S = 0.02


class LoopShare:
    """Counts the time spent since the current loop turn began; `wait_turn()` returns at once
    while the slice lasts and otherwise yields until a turn with time left."""

    def __init__(self, slice_s: float = SLICE_S, clock: Callable[[], float] = time.perf_counter):
        self.slice_s = slice_s
        self._clock = clock
        self._turn_began: float | None = None

    def _next_turn(self) -> None:
        self._turn_began = None

    async def wait_turn(self) -> None:
        while True:
            now = self._clock()
            if self._turn_began is None:
                self._turn_began = now
                # Runs at the start of the next turn, before the requests sent there to wait.
                asyncio.get_running_loop().call_soon(self._next_turn)
                return
            if now - self._turn_began < self.slice_s:
                return
            await asyncio.sleep(0)


def loop_share_middleware(slice_s: float = SLICE_S):
    share = LoopShare(slice_s)

    @web.middleware
    async def take_turns(request: web.Request, handler):
        await share.wait_turn()
        return await handler(request)

    return take_turns


@cache
def freeze_startup_objects() -> None:
    """Once per process, when the gallery listens: what is alive by then (modules, settings,
    the app) lives as long as the process, so the collector's full passes need not walk it
    while the loop waits; they took 0.2-0.3 s each under a 500-request burst here."""
    gc.freeze()
