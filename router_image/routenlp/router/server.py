"""The router's HTTP server: an OpenAI-compatible gateway doing difficulty-aware routing and conformal cascading.

`routenlp router --config FILE [--host H] [--port P]`. Endpoints: POST /v1/chat/completions, /v1/completions
(streaming SSE too), GET /v1/models, /healthz, /readyz, /metrics, /routenlp/rollout (per-version figures the
operator reads: see figures.py), POST /v1/feedback.

Laid out as vLLM's OpenAI entrypoint is: this module holds the thin aiohttp routes (body reading, errors as OpenAI
error bodies), the app's life (start-up, the background loop of hot reload and recalibration, shutdown) and the CLI;
protocol.py what a client may send; serving.py what a request does; state.py what the router holds, with
versions.py (hot reload, canary split) and calibration.py (label windows, online recalibration).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from routenlp.api.common import parse_duration
from routenlp.api.router_config import RouterConfig

from .auth import auth_middleware, caller_of
from .encoder import EncoderSpec, configure_threads, shared_encoder_for
from .eventlog import EventLogWriter
from .figures_store import ADOPT_SECONDS, SAVE_SECONDS
from .protocol import ApiError, parse_json_body
from .serving import Arrival, Reply, RouterServing
from .state import RouterState

log = logging.getLogger("routenlp.router")

MAX_BODY_BYTES = 1 << 20
BODY_READ_SECONDS = 30.0  # the whole request body must arrive within this
BODY_ENCODINGS = ("identity", "gzip", "deflate")  # Content-Encodings aiohttp decodes
RELOAD_SECONDS = float(os.environ.get("ROUTENLP_RELOAD_SECONDS", "2"))

STATE = web.AppKey("routenlp_state", RouterState)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def shared_encoder(path: str | None) -> Any:
    """One fp32 torch MiniLM per folder per process (loading takes seconds)."""
    return shared_encoder_for(EncoderSpec(), path)


# ---- HTTP ---------------------------------------------------------------------------------------------------------
def _error(status: int, message: str) -> web.Response:
    return web.json_response(ApiError(status, message).body(), status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return web.json_response(e.body(), status=e.status, headers=e.headers)
    except web.HTTPRequestEntityTooLarge:
        return _error(413, f"request body larger than {MAX_BODY_BYTES} bytes")
    except web.HTTPException as e:
        if e.status >= 400:
            return _error(e.status, e.reason or "error")
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return _error(500, "internal router error")


async def read_json(request: web.Request) -> Any:
    """The request body as JSON (`protocol.parse_json_body`); 4xx for what a client got wrong: too large (413),
    an encoding aiohttp does not decode (415) or a body it cannot decode (400), sent too slowly (408)."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in BODY_ENCODINGS:  # aiohttp passes other encodings through undecoded
        raise ApiError(415, f"Content-Encoding {encoding!r} is not supported; send {', '.join(BODY_ENCODINGS)}")
    try:
        async with asyncio.timeout(BODY_READ_SECONDS):  # a slow upload must not hold a connection forever
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes") from None
    except web.RequestPayloadError:
        raise ApiError(400, f"request body could not be decoded (Content-Encoding {encoding})") from None
    except TimeoutError:
        raise ApiError(408, f"request body not received within {BODY_READ_SECONDS:g} s") from None
    return parse_json_body(raw)


async def send(request: web.Request, reply: Reply) -> web.StreamResponse:
    """A serving `Reply` on the wire: JSON, or server-sent events written as they come."""
    if reply.chunks is None:
        return web.json_response(reply.body, headers=reply.headers)
    resp = web.StreamResponse(headers={**reply.headers, "Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)
    async with contextlib.aclosing(reply.chunks) as chunks:  # a client gone mid-stream still frees the tier
        async for chunk in chunks:
            await resp.write(chunk)
    await resp.write_eof()
    return resp


class Routes:
    """The HTTP routes: read the request, hand it to serving, write what it answers."""

    def __init__(self, state: RouterState):
        self.s, self.serving = state, RouterServing(state)

    async def completion(self, request: web.Request, kind: str) -> web.StreamResponse:
        # Timed from arrival: the body's upload counts. The id's shape is checked by the auth middleware.
        arrival = Arrival(request.headers.get("x-request-id") or uuid.uuid4().hex,
                          request.headers.get("x-routenlp-task"), request.path, caller_of(request).client)
        reply = await self.serving.completion(kind, await read_json(request), arrival)
        return await send(request, reply)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self.completion(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self.completion(request, "completions")

    async def feedback(self, request: web.Request) -> web.Response:
        """A label for an answered request (serving.RouterServing.feedback): 202 once logged."""
        caller = caller_of(request)
        self.serving.admit_feedback(caller)  # rate-limited before the body is read
        ack = self.serving.feedback(await read_json(request), caller)
        return web.json_response(ack.model_dump(), status=202)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(self.serving.models().model_dump(exclude_none=True))

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        ready = self.serving.readiness()
        return web.json_response(ready.model_dump(), status=200 if ready.ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        self.s.tiers_up()
        return web.Response(body=generate_latest(self.s.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def rollout(self, request: web.Request) -> web.Response:
        """Per-version figures since each version was first served (figures.py): the operator's input."""
        return web.json_response(self.s.figures.answer())


async def _background(state: RouterState) -> None:
    """Hot reload (config file, artifact dir, the operator's state file), periodic recalibration and the rollout
    figures' snapshots, in one loop: a reload that replaces the stable version and a recalibration never overlap."""
    interval = parse_duration(state.config.cascade.recalibration_interval)
    last_recal = last_save = last_adopt = time.monotonic()
    while True:
        await asyncio.sleep(RELOAD_SECONDS)  # read on every turn: tests shorten it
        now = time.monotonic()
        if now - last_save >= SAVE_SECONDS:
            last_save = now
            # Routers that went away while this one runs leave snapshots too: look for them now and then.
            adopt = now - last_adopt >= ADOPT_SECONDS
            if adopt:
                last_adopt = now
            await state.persist_figures(adopt=adopt)
        try:
            await asyncio.to_thread(state.reload)
        except Exception:
            log.exception("router artifact reload failed; keeping the versions in use")
        state.load_state()
        if time.monotonic() - last_recal >= interval:
            last_recal = time.monotonic()
            try:
                await asyncio.to_thread(state.recalibrate, state.label_snapshot())
            except Exception:
                log.exception("recalibration failed; keeping the thresholds in force")


def import_encoder_modules() -> None:
    """Import torch and transformers' encoder classes on the calling (main) thread, before encoders load in worker
    threads. transformers resolves its classes lazily, on first use, and a package's first import running in two
    threads at once can hand one of them a half-initialised module (`cannot import name 'AutoModel'`, `Could not
    import module 'BertModel'`: 4 of 8 fresh processes of tests/unit/router/test_import_race.py's scenario without
    this, 0 of 8 with it). Local imports: torch is heavy and only a router that loads its own encoders needs it."""
    import torch  # noqa: F401
    from transformers import AutoModel, AutoTokenizer, BertModel  # noqa: F401  (MiniLM is a BertModel)


async def _open(state: RouterState) -> None:
    """The answer encoder and the event log."""
    config = state.config
    state.batcher = await asyncio.to_thread(state.encoders.load, EncoderSpec())
    state.encoder = state.batcher.encoder
    state.events = EventLogWriter(config.event_log_dir,
                                  on_drop=state.metrics.event_log_dropped.labels(config.policy).inc,
                                  on_replace=state.metrics.event_log_replaced.labels(config.policy).inc)
    if state.labellers is None:
        log.warning("no labellers configured (auth.labellersDir): /v1/feedback is logged for the trainer but never "
                    "moves a threshold; only the router's own judge labels calibrate")


async def _start(state: RouterState) -> None:
    """The versions and thresholds in force, the figures of earlier routers, the background loop; then serve."""
    try:
        state.load_state()
        await asyncio.to_thread(state.load_versions)
        await asyncio.to_thread(state.warm_from_log)
        state.recalibrate()
    except FileNotFoundError as e:
        log.warning("router artifact missing (%s): starting at the cheapest tier, escalating conservatively", e)
        state.start_without_artifact()
    await state.persist_figures(adopt=True, restore=True)
    state.tiers_up()
    state.background.append(asyncio.get_running_loop().create_task(_background(state)))
    state.ready = True


async def _stop(state: RouterState) -> None:
    for t in state.background:
        t.cancel()
    if state.ready:
        await state.persist_figures(released=True)  # a clean shutdown: the next router adopts them at once
    for c in state.clients:
        await c.close()
    if state.events is not None:
        await asyncio.to_thread(state.events.close)
    state.encoders.close()


def build_app(config: RouterConfig, config_path: str | None = None, encoder: Any = None,
              admin_host: str = "0.0.0.0") -> web.Application:
    """The router as an aiohttp application. `encoder`: an Encoder-like object used for the embedding space it gives
    (default: for each router version, the encoder variant it names, from the config's encoder_path; shared per
    process). With `config.admin_port`, `/metrics` and `/routenlp/*` are served only there (on `admin_host`), by a
    second listener this app starts and stops; it checks no client keys (the NetworkPolicy keeps clients off it)."""
    if encoder is None:  # encoders will load in worker threads
        import_encoder_modules()
    state = RouterState(config, config_path, encoder)
    failed_auth = state.metrics.auth_failures.labels(config.policy).inc
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[
        errors_middleware, auth_middleware(state.labellers, state.client_keys, on_failure=failed_auth)])
    app[STATE] = state
    admin = web.Application(middlewares=[errors_middleware]) if config.admin_port else app
    admin_runner: list[web.AppRunner] = []
    h = Routes(state)
    app.router.add_post("/v1/chat/completions", h.chat)
    app.router.add_post("/v1/completions", h.completions)
    app.router.add_get("/v1/models", h.models)
    app.router.add_post("/v1/feedback", h.feedback)
    app.router.add_get("/healthz", h.healthz)
    app.router.add_get("/readyz", h.readyz)
    admin.router.add_get("/metrics", h.metrics)
    admin.router.add_get("/routenlp/rollout", h.rollout)

    async def on_startup(app: web.Application) -> None:
        await _open(state)
        if admin is not app and config.admin_port:
            admin_runner.append(web.AppRunner(admin, access_log=None))
            await admin_runner[0].setup()
            await web.TCPSite(admin_runner[0], admin_host, config.admin_port).start()
            log.info("admin endpoints (/metrics, /routenlp/*) on %s:%d", admin_host, config.admin_port)
        await _start(state)

    async def on_cleanup(app: web.Application) -> None:
        for r in admin_runner:
            await r.cleanup()
        await _stop(state)

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def main(argv: list[str] | None = None) -> int:
    """`routenlp router --config FILE [--host H] [--port P]`."""
    ap = argparse.ArgumentParser(prog="routenlp router", description="Run the RouteNLP router (OpenAI-compatible).")
    ap.add_argument("--config", required=True, help="router config YAML (RouterConfig)")
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    configure_threads()
    try:
        config = RouterConfig.load(args.config)
    except FileNotFoundError:
        print(f"routenlp router: config file {args.config} not found", file=sys.stderr)
        return 2
    except Exception as e:  # pydantic ValidationError names the field
        print(f"routenlp router: invalid config {args.config}: {e}", file=sys.stderr)
        return 2
    web.run_app(build_app(config, config_path=args.config, admin_host=args.host), host=args.host, port=args.port,
                access_log=None)
    return 0
