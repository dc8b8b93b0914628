"""Upstream tier clients: pooled aiohttp sessions, per-tier timeouts, retries on connection errors only, and a
circuit breaker per tier. API keys come from the environment variable the config names and are never logged."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

import aiohttp

from .config import TierEndpoint


class CircuitBreaker:
    """Closed -> open after `failures` consecutive failures; after `reset_seconds` one probe is let through
    (half-open): success closes it, failure opens it again."""

    def __init__(self, failures: int = 3, reset_seconds: float = 5.0, clock=time.monotonic):
        self.threshold, self.reset_seconds, self.clock = failures, reset_seconds, clock
        self.consecutive = 0
        self.opened_at: float | None = None
        self._probing = False

    @property
    def is_open(self) -> bool:
        """True while calls are refused (open and not yet due for a probe)."""
        if self.opened_at is None:
            return False
        return self.clock() - self.opened_at < self.reset_seconds or self._probing

    def allow(self) -> bool:
        """May a call go out now? Takes the half-open probe slot when due."""
        if self.opened_at is None:
            return True
        if self.clock() - self.opened_at >= self.reset_seconds and not self._probing:
            self._probing = True
            return True
        return False

    def retry_after(self) -> float:
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.reset_seconds - (self.clock() - self.opened_at))

    def success(self) -> None:
        self.consecutive, self.opened_at, self._probing = 0, None, False

    def failure(self) -> None:
        self.consecutive += 1
        self._probing = False
        if self.consecutive >= self.threshold or self.opened_at is not None:
            self.opened_at = self.clock()


class UpstreamError(Exception):
    """The tier could not answer (connection refused/reset, timeout, 5xx). Counts against its circuit."""


@dataclass
class UpstreamResult:
    status: int
    body: dict | None  # parsed JSON (None if the body was not JSON)
    text: str
    latency_s: float


class TierClient:
    """One tier's OpenAI-compatible endpoint."""

    RETRY_EXCEPTIONS = (aiohttp.ClientConnectionError,)  # refused, reset, DNS: the request never got an answer

    def __init__(self, tier: TierEndpoint, retries: int = 2, breaker: CircuitBreaker | None = None,
                 max_connections: int = 256):
        self.tier = tier
        self.retries = retries
        self.breaker = breaker or CircuitBreaker()
        self.base_url = tier.base_url.rstrip("/")
        self._headers = {"Content-Type": "application/json"}
        key = os.environ.get(tier.api_key_env) if tier.api_key_env else None
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # never show headers (API key)
        return f"TierClient({self.tier.name!r}, {self.base_url!r})"

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=60),
                timeout=aiohttp.ClientTimeout(total=self.tier.timeout_seconds), headers=self._headers)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def post(self, path: str, body: dict) -> UpstreamResult:
        """POST JSON; returns 2xx/4xx results; raises UpstreamError for connection errors (after retries),
        timeouts and 5xx, recording them on the circuit breaker."""
        url = self.base_url + path
        t0 = time.perf_counter()
        for attempt in range(self.retries + 1):
            try:
                async with self.session.post(url, json=body) as resp:
                    text = await resp.text()
                    status = resp.status
                break
            except self.RETRY_EXCEPTIONS as exc:
                if attempt < self.retries:
                    await asyncio.sleep(0.02 * (attempt + 1))
                    continue
                self.breaker.failure()
                raise UpstreamError(f"{self.tier.name}: {type(exc).__name__}") from None
            except asyncio.TimeoutError:
                self.breaker.failure()
                raise UpstreamError(f"{self.tier.name}: timed out after {self.tier.timeout_seconds}s") from None
        latency = time.perf_counter() - t0
        if status >= 500:
            self.breaker.failure()
            raise UpstreamError(f"{self.tier.name}: HTTP {status}")
        self.breaker.success()
        try:
            import json

            parsed = json.loads(text)
            body_json = parsed if isinstance(parsed, dict) else None
        except ValueError:
            body_json = None
        return UpstreamResult(status, body_json, text, latency)

    async def open_stream(self, path: str, body: dict) -> aiohttp.ClientResponse:
        """Start a streaming POST (caller reads and releases the response). Same error handling as `post`."""
        url = self.base_url + path
        for attempt in range(self.retries + 1):
            try:
                resp = await self.session.post(url, json=body)
                break
            except self.RETRY_EXCEPTIONS:
                if attempt < self.retries:
                    await asyncio.sleep(0.02 * (attempt + 1))
                    continue
                self.breaker.failure()
                raise UpstreamError(f"{self.tier.name}: connection failed") from None
            except asyncio.TimeoutError:
                self.breaker.failure()
                raise UpstreamError(f"{self.tier.name}: timed out") from None
        if resp.status >= 500:
            resp.release()
            self.breaker.failure()
            raise UpstreamError(f"{self.tier.name}: HTTP {resp.status}")
        self.breaker.success()
        return resp
