"""Tier faults over HTTP (issue: hardening the router): a cheaper tier's 401/403/404/429 falls back to a healthy tier,
provider error bodies never reach the client verbatim, streams use an idle timeout and end with an error event, and a
per-request deadline bounds the whole cascade. Each of these failed on the router before the cascade engine."""

import asyncio
import json
import time

import pytest
from aiohttp import web

from routenlp.router.clients import TierClient

from .test_server import calibrated, stack_factory, wait_for  # noqa: F401  (fixture)
from routenlp.router.events import RoutingEvent

SECRET_BODY = {"error": {"message": "Incorrect API key provided: sk-proj-abcdefghijklmnopqrstuvwxyz123456",
                         "type": "invalid_request_error"}}


@pytest.mark.parametrize("status", [401, 403, 404, 429])
def test_cheaper_tier_4xx_falls_back_and_counts_on_its_breaker(stack_factory, status):
    s = stack_factory(artifacts=[("v1", {"router": None, "calibration": calibrated()})])
    s.fakes[0].fail_status = status
    for _ in range(3):
        code, h, body = s.chat("refund please, easy")
        assert code == 200, body
        assert h["x-routenlp-tier"] in ("medium", "big")
        assert b"boom" not in body
    assert s.metric("routenlp_tier_errors_total", tier="small") >= 3
    assert s.metric("routenlp_tier_up", tier="small") == 0  # 3 consecutive faults open the breaker
    calls = len(s.fakes[0].calls)
    s.chat("refund please, easy")
    assert len(s.fakes[0].calls) == calls  # open: not called again until its probe


def test_reference_client_error_is_a_redacted_4xx(stack_factory):
    s = stack_factory()
    big = s.fakes[2]

    async def refuse(request):
        await request.read()
        return web.json_response(SECRET_BODY | {"error": {**SECRET_BODY["error"],
                                                          "message": "context too long; key sk-proj-abcdefghijklmnopqrstuvwxyz123456"}},
                                 status=400)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", refuse)
    port = s.live.serve(app)
    s.config.tiers[2].base_url = f"http://127.0.0.1:{port}/v1"
    s.state.clients[2] = TierClient(s.config.tiers[2])
    code, _, body = s.chat("easy")
    assert code == 400
    err = json.loads(body)["error"]
    assert "context too long" in err["message"] and "sk-proj" not in body.decode() and big.calls == []


def _streaming_tier(chunks: int, gap: float, stall_after: int | None = None):
    async def chat(request):
        body = await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(chunks):
            if stall_after is not None and i == stall_after:
                await asyncio.sleep(30)
            chunk = {"id": "x", "object": "chat.completion.chunk", "model": body["model"],
                     "choices": [{"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await asyncio.sleep(gap)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


def _stream_through(s, app, timeout_seconds):
    port = s.live.serve(app)
    s.config.tiers[0].base_url = f"http://127.0.0.1:{port}/v1"
    s.config.tiers[0].timeout_seconds = timeout_seconds
    s.state.clients[0] = TierClient(s.config.tiers[0])


def test_a_slow_but_live_stream_is_not_cut_at_timeout_seconds(stack_factory):
    s = stack_factory(cascade={"maxEscalations": 0}, shadowSampleRate=1.0)  # one-tier plan: streamed through
    # 3 s in all, never more than 0.25 s between chunks: the idle limit (2 s) is 8x the gap, so a loaded CI machine
    # (one shared event loop for the fake tier and the router) does not turn a live stream into a stalled one.
    _stream_through(s, _streaming_tier(chunks=12, gap=0.25), timeout_seconds=2)
    code, h, body = s.chat("easy", stream=True)
    assert code == 200 and body.rstrip().endswith(b"data: [DONE]"), body
    assert body.count(b"chat.completion.chunk") == 12


def test_a_stalled_stream_ends_with_an_error_event_and_is_logged(stack_factory):
    s = stack_factory(cascade={"maxEscalations": 0}, shadowSampleRate=1.0)
    _stream_through(s, _streaming_tier(chunks=4, gap=0.05, stall_after=2), timeout_seconds=1)
    t0 = time.monotonic()
    code, _, body = s.chat("easy", stream=True)
    assert code == 200 and time.monotonic() - t0 < 10
    events = [json.loads(line[5:]) for line in body.split(b"\n\n") if line.startswith(b"data: {")]
    assert "error" in events[-1] and events[-1]["error"]["type"] == "upstream_error"
    assert s.metric("routenlp_tier_errors_total", tier="small") == 1
    wait_for(lambda: any(isinstance(e, RoutingEvent) and e.outcome == "error" for e in s.events()))


def test_request_deadline_bounds_the_whole_cascade(stack_factory):
    s = stack_factory(artifacts=[("v1", {"router": None, "calibration": calibrated()})],
                      cascade={"requestDeadline": "1s"})
    s.fakes[0].delay = 6.0  # the cheap tier hangs past the deadline and past its own timeoutSeconds (5)
    t0 = time.monotonic()
    code, _, body = s.chat("refund please, easy")
    assert code == 504 and "requestDeadline" in json.loads(body)["error"]["message"]
    assert time.monotonic() - t0 < 4  # the 1 s deadline ended it, not the tier's 5 s timeout (slack for a busy CI)
    assert s.fakes[2].calls == []  # no time left for the reference: not called
