"""Serve an aiohttp application from a background thread with its own event loop, for synchronous callers
(tests, the trainer, scripts): `with AppThread(app) as t: requests.get(t.url + "/healthz")`."""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web


class AppThread:
    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0, name: str = "app"):
        self.app, self.host, self.port, self.name = app, host, port, name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 120.0) -> "AppThread":
        ready = threading.Event()
        error: list[BaseException] = []

        def run():
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            runner = web.AppRunner(self.app, access_log=None)
            try:
                loop.run_until_complete(runner.setup())  # runs the app's on_startup hooks
                site = web.TCPSite(runner, self.host, self.port)
                loop.run_until_complete(site.start())
                self.port = site._server.sockets[0].getsockname()[1]
            except BaseException as e:  # port in use, a failing startup hook, ...
                error.append(e)
                ready.set()
                loop.run_until_complete(runner.cleanup())
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())  # on_cleanup hooks: closes clients, flushes the event log
            loop.close()

        self._thread = threading.Thread(target=run, name=f"appthread-{self.name}", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"{self.name} did not start within {timeout} s")
        if error:
            raise error[0]
        return self

    def call(self, coro, timeout: float = 60.0):
        """Run a coroutine on the app's loop (e.g. to inspect or change its state safely) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
        self._loop = self._thread = None

    def __enter__(self) -> "AppThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
