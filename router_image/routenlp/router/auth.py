"""Who is calling: bearer tokens from mounted Secrets, request header hygiene, and feedback rate limits.

Everything crossing the network is hostile input, labels included. Three kinds of caller:

- a **labeller** (`auth.labellersDir`): its feedback may move thresholds (`events.LABELLER` trust);
- a **client** (`auth.clientKeysDir`): when keys are configured, `/v1/*` answers 401 without one; the client's
  name is recorded in routing and feedback events;
- anyone else: served when no client keys are configured; its feedback is logged but never moves a threshold.

Tokens are compared in constant time (SHA-256 digests, every key compared). Key directories are re-read every
`KEY_REFRESH_SECONDS`, so a rotated Secret (the kubelet swaps the mounted files) takes effect without a restart.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .protocol import ApiError

log = logging.getLogger("routenlp.router.auth")

KEY_REFRESH_SECONDS = 5.0
OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # probes: never authenticated
FEEDBACK_PATH = "/v1/feedback"
FEEDBACK_RATE = 20.0  # feedback posts per second per client (token bucket refill) ...
FEEDBACK_BURST = 100.0  # ... and bucket size
FEEDBACK_PER_REQUEST = 8  # feedback posts accepted per request id (a labeller correcting itself needs a few)
REMEMBERED = 20_000  # clients (buckets) and request ids (counts) remembered; the oldest are forgotten first
REQUEST_ID = re.compile(r"[\x20-\x7e]{1,200}")  # printable ASCII: echoed in a response header, hashed, logged


@dataclass(frozen=True)
class Caller:
    """The authenticated identity of a request (None: not authenticated as that kind)."""

    client: str | None = None
    labeller: str | None = None
    address: str | None = None

    @property
    def rate_key(self) -> str:
        """Whom the feedback rate limit counts: the client's name, else the peer address (behind a proxy that is the
        proxy's: configure client keys to limit clients one by one)."""
        return f"client:{self.client}" if self.client else f"address:{self.address}"


CALLER = web.RequestKey("routenlp_caller", Caller)


def caller_of(request: web.Request) -> Caller:
    """The caller `auth_middleware` established (an anonymous one for apps without it)."""
    return request.get(CALLER) or Caller(address=request.remote)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class KeyDir:
    """Named bearer tokens from a directory (a mounted Secret: file name = name, content = token). A missing or
    unreadable directory holds no keys: everything it guards is refused (fail closed)."""

    def __init__(self, path: str | Path, refresh_seconds: float = KEY_REFRESH_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.path, self.refresh_seconds, self.clock = Path(path), refresh_seconds, clock
        self._keys: dict[str, bytes] = {}
        self._loaded_at: float | None = None
        self._problem: str | None = None

    def _load(self) -> None:
        keys = {}
        try:
            for f in sorted(self.path.iterdir()):
                # Secret volumes hold `..data` and timestamped folders beside the key files: skip hidden entries.
                if f.name.startswith(".") or not f.is_file():
                    continue
                token = f.read_text(encoding="utf-8", errors="surrogateescape").strip()
                if token:
                    keys[f.name] = _digest(token)
            problem = None if keys else f"{self.path} holds no keys"
        except OSError as e:
            problem = f"{self.path} unreadable: {e.strerror or e}"
        if problem is not None and problem != self._problem:
            log.warning("auth keys: %s; every token it should accept is refused", problem)
        self._problem = problem
        self._keys = keys

    def names(self) -> list[str]:
        self._refresh()
        return sorted(self._keys)

    def _refresh(self) -> None:
        now = self.clock()
        if self._loaded_at is None or now - self._loaded_at >= self.refresh_seconds:
            self._loaded_at = now
            self._load()

    def match(self, token: str | None) -> str | None:
        """The name whose token this is, or None. Compares against every key (no early exit) in constant time."""
        if not token:
            return None
        self._refresh()
        d, found = _digest(token), None
        for name, key in self._keys.items():
            if hmac.compare_digest(d, key):
                found = name
        return found


def bearer_token(header: str | None) -> str | None:
    """The token of `Authorization: Bearer <token>`; None when absent or another scheme."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def authenticate(path: str, authorization: str | None, address: str | None, labellers: KeyDir | None,
                 clients: KeyDir | None) -> Caller:
    """The caller of one request, or a 401 ApiError. On /v1/feedback a labeller token is accepted in place of a
    client key; a token that matches nothing where a token is checked is refused rather than ignored, so a
    mistyped or revoked labeller token fails loudly instead of turning its labels into untrusted ones."""
    if path in OPEN_PATHS:
        return Caller(address=address)
    token = bearer_token(authorization)
    if path == FEEDBACK_PATH and labellers is not None and token:
        name = labellers.match(token)
        if name is not None:
            return Caller(labeller=name, address=address)
        if clients is None:
            raise _unauthorized("unknown labeller token")
    if clients is None:
        return Caller(address=address)
    name = clients.match(token)
    if name is None:
        raise _unauthorized("missing API key (Authorization: Bearer <key>)" if token is None else "invalid API key")
    return Caller(client=name, address=address)


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def check_headers(headers: Mapping[str, str]) -> None:
    """400 for header bytes that are not UTF-8 (aiohttp hands them over as lone surrogates, which cannot be echoed,
    logged or hashed) and for an x-request-id that is not 1-200 printable ASCII characters."""
    for name, value in headers.items():
        try:
            name.encode("utf-8")
            value.encode("utf-8")
        except UnicodeEncodeError:
            shown = name.encode("utf-8", "replace").decode().lower()
            raise ApiError(400, f"header {shown!r} is not valid UTF-8", shown) from None
    rid = headers.get("x-request-id")
    if rid is not None and not REQUEST_ID.fullmatch(rid):
        raise ApiError(400, "x-request-id must be 1-200 printable ASCII characters", "x-request-id")


class TokenBuckets:
    """A token bucket per key (`rate` per second, `burst` deep), remembering the `size` most recently seen keys."""

    def __init__(self, rate: float, burst: float, size: int = REMEMBERED, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.size, self.clock = rate, burst, size, clock
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def take(self, key: str) -> float:
        """0 when a token was taken; else the seconds until one is available (nothing taken)."""
        now = self.clock()
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
        self._buckets[key] = (tokens - 1 if wait == 0 else tokens, now)
        while len(self._buckets) > self.size:
            self._buckets.popitem(last=False)
        return wait


class FeedbackGate:
    """Feedback admission: a rate limit per client (429 with Retry-After) and a cap per request id (429), so no
    client can flood the event log or relabel one request without end. Authenticated labellers are trusted: they are
    not rate limited, and each has its own cap per request id, so anonymous posts cannot use up a labeller's."""

    def __init__(self, rate: float = FEEDBACK_RATE, burst: float = FEEDBACK_BURST,
                 per_request: int = FEEDBACK_PER_REQUEST, clock: Callable[[], float] = time.monotonic):
        self.buckets = TokenBuckets(rate, burst, clock=clock)
        self.per_request = per_request
        self._counts: collections.OrderedDict[str, int] = collections.OrderedDict()

    def admit_client(self, caller: Caller) -> None:
        if caller.labeller:
            return
        wait = self.buckets.take(caller.rate_key)
        if wait > 0:
            raise ApiError(429, "too much feedback from this client; slow down", code="rate_limited",
                           headers={"Retry-After": str(max(1, int(wait + 0.999)))})

    def admit_request_id(self, request_id: str, caller: Caller) -> None:
        key = f"{caller.labeller or ''}\0{request_id}"
        n = self._counts.pop(key, 0)
        self._counts[key] = n + 1 if n < self.per_request else n
        while len(self._counts) > REMEMBERED:
            self._counts.popitem(last=False)
        if n >= self.per_request:
            raise ApiError(429, f"request {request_id!r} already has {self.per_request} labels", "request_id",
                           "request_cap")


def auth_middleware(labellers: KeyDir | None, clients: KeyDir | None,
                    on_failure: Callable[[], None] | None = None) -> Middleware:
    """aiohttp middleware: header hygiene, then `authenticate`; the caller is stored under CALLER."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        check_headers(request.headers)
        try:
            caller = authenticate(request.path, request.headers.get("Authorization"), request.remote, labellers,
                                  clients)
        except ApiError:
            if on_failure is not None:
                on_failure()
            raise
        request[CALLER] = caller
        return await handler(request)

    return middleware
