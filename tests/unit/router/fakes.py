"""In-process fake OpenAI-compatible tiers (recorded-style responses with logprobs) and a fake encoder."""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
from aiohttp import web

# The answer each fake tier gives to a query containing a keyword, and the token logprobs it reports.
# "easy": every tier answers `refund` confidently; "hard": cheap tiers answer `card` with low confidence.
CONFIDENT, UNSURE = -0.02, -2.5


class FakeTier:
    """A fake vLLM: answers depend on the query keyword and the tier's `skill` (0 cheapest .. 2 reference)."""

    def __init__(self, name: str, skill: int):
        self.name, self.skill = name, skill
        self.calls: list[dict] = []
        self.auth: list[str | None] = []
        self.fail_status: int | None = None  # answer every call with this HTTP status
        self.delay = 0.0

    def answer(self, query: str) -> tuple[str, float]:
        if "hard" in query and self.skill < 2:
            return "card", UNSURE
        if "medium" in query and self.skill < 1:
            return "card", UNSURE
        return "refund", CONFIDENT

    def app(self) -> web.Application:
        @web.middleware
        async def bad_request(request, handler):  # like vLLM: a request it cannot read is a 400, not a crash
            try:
                return await handler(request)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
                return web.json_response({"error": {"message": f"bad request: {e}"}}, status=400)

        app = web.Application(middlewares=[bad_request])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        return app

    async def _common(self, request):
        body = await request.json()
        self.calls.append(body)
        self.auth.append(request.headers.get("Authorization"))
        if self.delay:
            import asyncio

            await asyncio.sleep(self.delay)
        if self.fail_status:
            return body, web.json_response({"error": {"message": "boom"}}, status=self.fail_status)
        if body.get("max_tokens") == 999999:
            return body, web.json_response({"error": {"message": "max_tokens too large", "type": "BadRequestError"}},
                                           status=400)
        return body, None

    async def _chat(self, request):
        body, err = await self._common(request)
        if err is not None:
            return err
        users = [m for m in body["messages"] if m["role"] == "user"] or body["messages"]
        query = users[-1].get("content") or ""
        text, lp = self.answer(query if isinstance(query, str) else json.dumps(query))
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for piece in (text[:2], text[2:]):
                chunk = {"id": "x", "object": "chat.completion.chunk", "model": body["model"],
                         "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        content = [{"token": text, "logprob": lp, "top_logprobs": []}] if body.get("logprobs") else None
        return web.json_response({
            "id": f"chatcmpl-{self.name}", "object": "chat.completion", "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": {"content": content} if content else None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}})

    async def _completions(self, request):
        body, err = await self._common(request)
        if err is not None:
            return err
        text, lp = self.answer(body["prompt"])
        return web.json_response({
            "id": f"cmpl-{self.name}", "object": "text_completion", "created": int(time.time()), "model": body["model"],
            "choices": [{"index": 0, "text": text, "finish_reason": "stop",
                         "logprobs": {"tokens": [text], "token_logprobs": [lp]} if body.get("logprobs") is not None else None}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}})


class FakeEncoder:
    """Deterministic unit vectors from a text hash (same text -> same vector), with the Encoder interface."""

    dim = 384

    def __init__(self):
        self.batch_sizes: list[int] = []

    def _encode_batch(self, texts):
        self.batch_sizes.append(len(texts))
        out = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "big")
            v = np.random.default_rng(seed).normal(size=self.dim).astype(np.float32)
            out.append(v / np.linalg.norm(v))
        return np.stack(out)

    def encode(self, texts, batch_size=64, progress=False):
        return self._encode_batch(list(texts))
