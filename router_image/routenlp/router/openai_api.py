"""OpenAI wire format, as pure functions: request validation (clear 400s), task resolution, answer/logprob
extraction, SSE framing, and the answer-agreement judge used for shadow labels."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from routenlp.api.router_config import RouterConfig

ROLES = {"system", "user", "assistant", "tool", "developer", "function"}
MAX_TOKENS_LIMIT = 1 << 20
MAX_JSON_DEPTH = 64  # deeper nesting is refused before json.loads recurses into it


class ApiError(Exception):
    """A client mistake, answered with `status` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
                503: "service_unavailable"}.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


_STRING_ESCAPES = re.compile(rb"\\.", re.DOTALL)
_STRINGS = re.compile(rb'"[^"]*"')
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = np.zeros(256, dtype=np.int8)
_STEP[list(b"[{")], _STEP[list(b"]}")] = 1, -1


def json_depth(raw: bytes) -> int:
    """Deepest [ / { nesting of a JSON text, in linear time and without recursion (strings are cut out first: escapes,
    then quoted runs, so a bracket inside a string never counts). Exact for valid JSON; for invalid JSON some number
    json.loads will refuse anyway."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return 0  # cannot be deeper than the limit: skip the scan (the common case)
    brackets = _STRINGS.sub(b"", _STRING_ESCAPES.sub(b"", raw)).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    return int(np.cumsum(_STEP[np.frombuffer(brackets, dtype=np.uint8)], dtype=np.int64).max())


def parse_json_body(raw: bytes):
    """A request body as JSON, or a 400 that says what is wrong with it: not UTF-8, not JSON, nested deeper than
    MAX_JSON_DEPTH, or holding a lone surrogate escape (no Unicode text; it would break logging and the encoder)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {e.start})") from None
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise ApiError(400, f"request body is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        raise ApiError(400, "request body is not valid JSON") from None
    if _SURROGATE_ESCAPE.search(raw):  # rare: check that every \uD8xx-\uDFxx escape is half of a pair
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "request body holds a lone UTF-16 surrogate escape (\\uD800-\\uDFFF without its "
                           "pair): not valid Unicode text") from None
    return body


@dataclass
class ParsedRequest:
    kind: str  # "chat" | "completions"
    body: dict
    query: str  # text the router embeds (last user message / prompt)
    stream: bool
    wants_logprobs: bool
    metadata_task: str | None


def _text_of(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise ApiError(400, f"{where}[{j}] must be an object with a string 'type'", where)
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise ApiError(400, f"{where}[{j}].text must be a string", where)
                parts.append(part["text"])
        return "\n".join(parts)
    raise ApiError(400, f"{where} must be a string or a list of content parts", where)


def _check_common(body: dict) -> tuple[bool, str | None]:
    if "model" in body and not isinstance(body["model"], str):
        raise ApiError(400, "'model' must be a string", "model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", "stream")
    for name in ("max_tokens", "max_completion_tokens"):
        v = body.get(name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= MAX_TOKENS_LIMIT):
            raise ApiError(400, f"'{name}' must be a positive integer", name)
    for name, lo, hi in (("temperature", 0, 2), ("top_p", 0, 1), ("presence_penalty", -2, 2),
                         ("frequency_penalty", -2, 2)):
        v = body.get(name)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi):
            raise ApiError(400, f"'{name}' must be a number in [{lo}, {hi}]", name)
    n = body.get("n")
    if n is not None and n != 1:
        raise ApiError(400, "'n' must be 1: the router returns one answer per request", "n")
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise ApiError(400, "'stop' must be a string or a list of strings", "stop")
    meta = body.get("metadata")
    task = None
    if meta is not None:
        if not isinstance(meta, dict):
            raise ApiError(400, "'metadata' must be an object", "metadata")
        task = meta.get("task")
        if task is not None and not isinstance(task, str):
            raise ApiError(400, "'metadata.task' must be a string", "metadata.task")
    return stream, task


def parse_chat(body) -> ParsedRequest:
    """Validate a /v1/chat/completions body."""
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    query, last_any = None, ""
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", f"messages[{i}]")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {sorted(ROLES)}", f"messages[{i}].role")
        text = _text_of(m.get("content"), f"messages[{i}].content")
        last_any = text or last_any
        if role == "user":
            query = text
    stream, task = _check_common(body)
    lp = body.get("logprobs", False)
    if not isinstance(lp, bool):
        raise ApiError(400, "'logprobs' must be a boolean", "logprobs")
    top = body.get("top_logprobs")
    if top is not None and (not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= 20):
        raise ApiError(400, "'top_logprobs' must be an integer in [0, 20]", "top_logprobs")
    return ParsedRequest("chat", body, query if query is not None else last_any, stream, lp, task)


def parse_completion(body) -> ParsedRequest:
    """Validate a /v1/completions body."""
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "'prompt' must be a non-empty string (or a list of one string)", "prompt")
    stream, task = _check_common(body)
    lp = body.get("logprobs")
    if lp is not None and (not isinstance(lp, int) or isinstance(lp, bool) or not 0 <= lp <= 20):
        raise ApiError(400, "'logprobs' must be an integer in [0, 20]", "logprobs")
    return ParsedRequest("completions", body, prompt, stream, lp is not None, task)


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


def answer_text(kind: str, body: dict | None) -> str | None:
    """The answer's text from an upstream response (None if absent)."""
    if body is None:
        return None
    try:
        choice = body["choices"][0]
        return choice["message"].get("content") if kind == "chat" else choice.get("text")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None


def token_logprobs(kind: str, body: dict | None) -> list[float] | None:
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


def usage(body: dict | None) -> tuple[int, int]:
    if body is None:
        return 0, 0
    try:
        u = body.get("usage") or {}
        return int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
    except (AttributeError, TypeError, ValueError):
        return 0, 0


def sse_events(kind: str, body: dict, request_id: str) -> list[bytes]:
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


def canonical_label(text: str, labels: list[str]) -> str:
    """A structured answer reduced to its label: the first allowed label it names, else its normalised text."""
    norm = normalise(text)
    best = None
    for lab in labels:
        n = normalise(lab)
        if n and (norm == n or re.search(rf"(^|\s){re.escape(n)}(\s|$)", norm)):
            pos = norm.find(n)
            if best is None or pos < best[0]:
                best = (pos, n)
    return best[1] if best else norm


def structured_agree(answer: str, reference: str, labels: list[str]) -> bool:
    """Same label as the reference answer?"""
    return canonical_label(answer, labels) == canonical_label(reference, labels)
