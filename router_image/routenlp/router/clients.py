"""Upstream tier clients: pooled aiohttp sessions, per-tier timeouts, retries on connection errors only, and a
circuit breaker per tier. API keys come from the environment variable the config names and are never logged."""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from routenlp.api.router_config import TierEndpoint

MAX_HOLD_SECONDS = 300.0  # a tier's Retry-After holds its breaker open at most this long


class CircuitBreaker:
    """Closed -> open after `failures` consecutive failures; after `reset_seconds` one probe is let through
    (half-open): success closes it, failure opens it again."""

    def __init__(self, failures: int = 3, reset_seconds: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.threshold, self.reset_seconds, self.clock = failures, reset_seconds, clock
        self.consecutive = 0
        self.opened_at: float | None = None
        self._open_for = reset_seconds  # this opening's length (longer when the tier said Retry-After)
        self._probing = False

    @property
    def is_open(self) -> bool:
        """True while calls are refused (open and not yet due for a probe)."""
        if self.opened_at is None:
            return False
        return self.clock() - self.opened_at < self._open_for or self._probing

    def allow(self) -> bool:
        """May a call go out now? Takes the half-open probe slot when due."""
        if self.opened_at is None:
            return True
        if self.clock() - self.opened_at >= self._open_for and not self._probing:
            self._probing = True
            return True
        return False

    def retry_after(self) -> float:
        if self.opened_at is None:
            return 0.0
        return max(0.0, self._open_for - (self.clock() - self.opened_at))

    def success(self) -> None:
        self.consecutive, self.opened_at, self._probing = 0, None, False
        self._open_for = self.reset_seconds

    def failure(self) -> None:
        self.consecutive += 1
        self._probing = False
        if self.consecutive >= self.threshold or self.opened_at is not None:
            self.opened_at = self.clock()
            self._open_for = self.reset_seconds

    def hold(self, seconds: float) -> None:
        """Open now for `seconds` (at least reset_seconds): the tier said so (429/503 with Retry-After)."""
        self.consecutive += 1
        self._probing = False
        self.opened_at = self.clock()
        self._open_for = max(self.reset_seconds, min(float(seconds), MAX_HOLD_SECONDS))


class UpstreamError(Exception):
    """The tier could not be reached or did not answer in time (connection refused/reset, timeout)."""


@dataclass
class UpstreamResult:
    status: int
    body: dict[str, Any] | None  # parsed JSON object (None if the body was not a JSON object)
    text: str
    latency_s: float
    retry_after: float | None = None  # the tier's Retry-After header, in seconds

    @classmethod
    def read(cls, status: int, text: str, retry_after: str | None, latency_s: float) -> "UpstreamResult":
        """An HTTP answer as the engine judges it: the body parsed when it is a JSON object."""
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError):
            parsed = None
        return cls(status, parsed if isinstance(parsed, dict) else None, text, latency_s,
                   parse_retry_after(retry_after))


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds form; an HTTP date or garbage -> None)."""
    try:
        v = float(value) if value is not None else None
    except ValueError:
        return None
    return v if v is not None and math.isfinite(v) and v >= 0 else None


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

    async def post(self, path: str, body: dict[str, Any], timeout: float | None = None) -> UpstreamResult:
        """POST JSON and return whatever HTTP answer came back (the cascade engine decides what a status means and
        books it on the breaker); raises UpstreamError when no answer came: connection errors (after retries) and
        timeouts (`timeout` seconds, default the tier's timeoutSeconds), which count on the breaker here."""
        url = self.base_url + path
        t0 = time.perf_counter()
        limit = self.tier.timeout_seconds if timeout is None else max(0.001, min(timeout, self.tier.timeout_seconds))
        for attempt in range(self.retries + 1):
            try:
                async with self.session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=limit)) as resp:
                    raw = await resp.read()
                    status = resp.status
                    retry_after = resp.headers.get("Retry-After")
                break
            except self.RETRY_EXCEPTIONS as exc:
                if attempt < self.retries:
                    await asyncio.sleep(0.02 * (attempt + 1))
                    continue
                self.breaker.failure()
                raise UpstreamError(f"{self.tier.name}: {type(exc).__name__}") from None
            except asyncio.TimeoutError:
                self.breaker.failure()
                raise UpstreamError(f"{self.tier.name}: timed out after {limit:.3g}s") from None
        return UpstreamResult.read(status, raw.decode("utf-8", errors="replace"), retry_after, time.perf_counter() - t0)

    async def open_stream(self, path: str, body: dict[str, Any],
                          timeout: float | None = None) -> aiohttp.ClientResponse:
        """Start a streaming POST; the caller reads it with `stream_lines` and releases it. The connection and the
        response headers must come within `timeout` (default timeoutSeconds); after that timeoutSeconds bounds each
        wait for the next chunk (an idle timeout), not the whole stream. Statuses are returned, not judged."""
        url = self.base_url + path
        limit = self.tier.timeout_seconds if timeout is None else max(0.001, min(timeout, self.tier.timeout_seconds))
        per_chunk = aiohttp.ClientTimeout(total=None, connect=limit, sock_connect=limit,
                                          sock_read=self.tier.timeout_seconds)
        for attempt in range(self.retries + 1):
            try:
                return await asyncio.wait_for(self.session.post(url, json=body, timeout=per_chunk), limit)
            except self.RETRY_EXCEPTIONS:
                if attempt < self.retries:
                    await asyncio.sleep(0.02 * (attempt + 1))
                    continue
                self.breaker.failure()
                raise UpstreamError(f"{self.tier.name}: connection failed") from None
            except asyncio.TimeoutError:
                self.breaker.failure()
                raise UpstreamError(f"{self.tier.name}: timed out") from None
        raise AssertionError("unreachable")

    async def stream_lines(self, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        """The lines of a streaming response; UpstreamError when the tier goes silent for timeoutSeconds or the
        connection breaks mid-stream (counted on the breaker)."""
        try:
            async for line in resp.content:
                yield line
        except (asyncio.TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            self.breaker.failure()
            kind = "idle for longer than timeoutSeconds" if isinstance(exc, asyncio.TimeoutError) else "broke off"
            raise UpstreamError(f"{self.tier.name}: stream {kind}") from None
