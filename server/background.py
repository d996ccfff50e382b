"""A reward server on its own event loop in a background thread: for notebooks, benchmarks and tests.

    >>> with ServerThread(config) as server:                  # doctest: +SKIP
    ...     server.client().score([("Hi", " there")])
"""

from __future__ import annotations

import asyncio
import threading

from grmserve.clients.reward_client import RewardClient

from .app import RewardServer


class ServerThread:
    """Starts `RewardServer(config, engine)` in a daemon thread; `stop()` drains it (up to `grace` s)."""

    def __init__(self, config, engine=None, *, grace: float = 5.0, start_timeout: float = 600.0):
        self.config = config
        self.engine = engine
        self.grace = grace
        self.start_timeout = start_timeout
        self.app: RewardServer | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="grm-serve")

    def _run(self) -> None:
        async def main():
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self.app = RewardServer(self.config, self.engine)
            await self.app.start()
            self._ready.set()
            await self._stop.wait()
            await self.app.stop(grace=self.grace)

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()

    def start(self) -> "ServerThread":
        """Start and wait until the server is SERVING; re-raises a start-up error (bad checkpoint, port in use)."""
        self._thread.start()
        if not self._ready.wait(self.start_timeout):
            raise TimeoutError(f"the reward server did not start within {self.start_timeout:g} s")
        if self._error:
            raise self._error
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.app.port}"

    @property
    def http_url(self) -> str:
        """Base URL of the HTTP door (with `--server.http_port`)."""
        return f"http://127.0.0.1:{self.app.http_port}"

    def client(self, **kw) -> RewardClient:
        return RewardClient(self.target, **kw)

    def stop(self) -> None:
        """Drain and stop the server; a second call does nothing."""
        if self._loop and self._stop and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
