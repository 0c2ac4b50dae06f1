"""What the Discord and Slack stand-ins share: an aiohttp server on 127.0.0.1 (any free port)
that keeps every call it answers in `calls`, in arrival order, and lets a test wait for one."""

import asyncio
from typing import Self

from aiohttp import web


class RecordingServer:
    """Subclasses add their routes in `add_routes` and call `_record` for each request."""

    def __init__(self):
        self.calls: list = []
        self.base_url = ""
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None

    def add_routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self, host: str = "127.0.0.1") -> Self:
        """Listen on `host` (any 127.x.y.z is this machine: a second one is "another host")."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        self.add_routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, 0).start()
        self.base_url = f"http://{host}:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def wait_for(self, condition, timeout: float = 30.0):
        """Wait until condition(calls) is truthy; return its value."""
        async with asyncio.timeout(timeout):
            while not (result := condition(self.calls)):
                self._changed.clear()
                await self._changed.wait()
        return result

    def _record(self, call) -> None:
        self.calls.append(call)
        self._changed.set()
