"""A minimal OpenAI-compatible chat client for the trainer (stdlib only: stage Jobs need no extra packages)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Answer:
    text: str
    token_logprobs: list[float] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None


def chat(base_url: str, model: str, messages: list[dict], *, max_tokens: int = 24, logprobs: bool = True,
         api_key: str | None = None, timeout: float = 120.0) -> Answer:
    """One greedy chat completion; errors come back in `Answer.error` (the caller decides what a failure means)."""
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    if logprobs:
        body["logprobs"] = True
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(base_url.rstrip("/") + "/chat/completions", data=json.dumps(body).encode(),
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return Answer("", error=f"HTTP {exc.code}: {exc.read()[:300].decode(errors='replace')}")
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        return Answer("", error=f"{type(exc).__name__}: {exc}")
    choice = data["choices"][0]
    lps = [c["logprob"] for c in ((choice.get("logprobs") or {}).get("content") or []) if c.get("logprob") is not None]
    usage = data.get("usage") or {}
    return Answer((choice["message"].get("content") or "").strip(), lps, int(usage.get("prompt_tokens", 0)),
                  int(usage.get("completion_tokens", 0)))


def chat_many(base_url: str, model: str, conversations: list[list[dict]], *, concurrency: int = 8,
              progress: Callable | None = None, **kw) -> list[Answer]:
    """Many chat completions in parallel (a vLLM server batches concurrent requests), results in input order."""
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        it = pool.map(lambda m: chat(base_url, model, m, **kw), conversations)
        if progress is not None:
            it = progress(it, total=len(conversations))
        return list(it)
