"""OpenAI wire format, as pure functions: task resolution, answer/logprob extraction, SSE framing, and the
answer-agreement judge used for shadow labels. What a client may send (and the 400s) is protocol.py's."""

from __future__ import annotations

import json
import re
import time
from typing import Any

from routenlp.api.router_config import RouterConfig

from .protocol import ApiError


def resolve_task(config: RouterConfig, header: str | None, metadata_task: str | None, model: str | None,
                 path: str, query: str) -> str:
    """Task of a request: X-RouteNLP-Task header, then metadata.task, then the tasks' match rules (model, path
    prefix, pattern), then the default task. A named task that is not configured follows unknown_task
    (UseDefault or Reject -> 400)."""
    names = [t.name for t in config.tasks]
    default = config.default_task or names[0]
    named = header or metadata_task
    if named:
        if named in names:
            return named
        if config.unknown_task == "Reject":
            raise ApiError(400, f"unknown task {named!r}; this policy serves: {', '.join(names)}", "task",
                           "unknown_task")
        return default
    for t in config.tasks:
        if model and model in t.match.models:
            return t.name
        if any(path.startswith(p) for p in t.match.path_prefixes):
            return t.name
    for t in config.tasks:
        for pat in t.match.patterns:
            try:
                if re.search(pat, query):
                    return t.name
            except re.error:
                continue
    return default


def answer_text(kind: str, body: dict[str, Any] | None) -> str | None:
    """The answer's text from an upstream response (None if absent or not a string: an answer event's text must be
    one)."""
    if body is None:
        return None
    try:
        choice = body["choices"][0]
        text = choice["message"].get("content") if kind == "chat" else choice.get("text")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    return text if isinstance(text, str) else None


def token_logprobs(kind: str, body: dict[str, Any] | None) -> list[float] | None:
    """Per-token logprobs of the answer (vLLM / OpenAI formats), or None."""
    if body is None:
        return None
    try:
        lp = body["choices"][0].get("logprobs")
        if not lp:
            return None
        if kind == "chat":
            return [float(t["logprob"]) for t in (lp.get("content") or []) if t.get("logprob") is not None]
        return [float(x) for x in (lp.get("token_logprobs") or []) if x is not None]
    except (KeyError, IndexError, TypeError, AttributeError, ValueError):
        return None


def usage(body: dict[str, Any] | None) -> tuple[int, int]:
    if body is None:
        return 0, 0
    try:
        u = body.get("usage") or {}
        return int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
    except (AttributeError, TypeError, ValueError):
        return 0, 0


def sse_events(kind: str, body: dict[str, Any], request_id: str) -> list[bytes]:
    """A finished answer re-framed as an OpenAI SSE stream (content chunk, finish chunk, [DONE])."""
    text = answer_text(kind, body) or ""
    try:
        finish = body["choices"][0].get("finish_reason") or "stop"
    except (KeyError, IndexError, TypeError):
        finish = "stop"
    created = int(body.get("created") or time.time())
    model = body.get("model", "")
    rid = body.get("id") or request_id
    first: dict[str, Any]
    last: dict[str, Any]
    if kind == "chat":
        obj = "chat.completion.chunk"
        first = {"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None}
        last = {"index": 0, "delta": {}, "finish_reason": finish}
    else:
        obj = "text_completion"
        first = {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
        last = {"index": 0, "text": "", "logprobs": None, "finish_reason": finish}
    out = []
    for choice in (first, last):
        chunk = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
        out.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


def stream_delta_text(kind: str, line: bytes) -> str:
    """Text carried by one upstream SSE line (for logging a streamed answer)."""
    if not line.startswith(b"data:"):
        return ""
    payload = line[5:].strip()
    if payload == b"[DONE]" or not payload:
        return ""
    try:
        choice = json.loads(payload)["choices"][0]
        return (choice.get("delta", {}).get("content") or "") if kind == "chat" else (choice.get("text") or "")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return ""


_PUNCT = re.compile(r"[^\w\s-]")


def normalise(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def canonical_answer(text: str, answers: list[str]) -> str:
    """A structured answer reduced to the allowed answer it names (the task's `answers`, the first one named), else
    its normalised text."""
    norm = normalise(text)
    best = None
    for allowed in answers:
        n = normalise(allowed)
        if n and (norm == n or re.search(rf"(^|\s){re.escape(n)}(\s|$)", norm)):
            pos = norm.find(n)
            if best is None or pos < best[0]:
                best = (pos, n)
    return best[1] if best else norm


def structured_agree(answer: str, reference: str, answers: list[str]) -> bool:
    """Does `answer` name the same allowed answer as the reference tier's?"""
    return canonical_answer(answer, answers) == canonical_answer(reference, answers)
