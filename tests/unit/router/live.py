"""Run aiohttp apps (fake tiers, the router) on a background event loop so tests can stay synchronous."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading

from aiohttp import web


class Live:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners: list[web.AppRunner] = []

    def run(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def serve(self, app: web.Application) -> int:
        async def start():
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.runners.append(runner)
            return runner.addresses[0][1]

        return self.run(start())

    def stop(self, runner_index: int | None = None) -> None:
        async def stop(runners):
            for r in runners:
                await r.cleanup()

        runners = self.runners if runner_index is None else [self.runners[runner_index]]
        self.run(stop(list(runners)))
        if runner_index is None:
            self.runners.clear()

    def close(self):
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def request(port: int, method: str, path: str, body=None, headers=None, raw: bytes | None = None, timeout=30):
    """(status, headers (lower-case), body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    h = {"Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body=data, headers=h)
    resp = conn.getresponse()
    out = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    conn.close()
    return out
