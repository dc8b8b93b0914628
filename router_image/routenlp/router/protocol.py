"""The router's HTTP protocol: what a client may send and what it gets back, as pydantic models.

Every body a client sends is hostile until this module has read it: `parse_json_body` refuses bytes that are not
UTF-8 JSON (or nest too deep, or hold lone surrogates) and the request models refuse values of the wrong type or
range. A refusal is an `ApiError`: a 4xx with an OpenAI-style error body naming the first field at fault, in the
order the checks always ran (payload, sampling fields, logprobs). Unknown fields are allowed: the body goes on to
the tiers as the client sent it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Self, get_args

import numpy as np
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictStr, Tag, ValidationError,
                      ValidationInfo, field_validator, model_validator)
from pydantic_core import ErrorDetails

MAX_TOKENS_LIMIT = 1 << 20
MAX_JSON_DEPTH = 64  # deeper nesting is refused before json.loads recurses into it
MAX_REQUEST_ID = 200  # characters of a feedback's request_id (the router's ids are 32)

Role = Literal["system", "user", "assistant", "tool", "developer", "function"]
ROLES = set(get_args(Role))


class ApiError(Exception):
    """A client mistake, answered with `status` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
                503: "service_unavailable"}.get(self.status, "invalid_request_error")
        return ErrorResponse(error=ErrorInfo(message=self.message, type=kind, param=self.param,
                                             code=self.code)).model_dump()


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---- raw bytes ------------------------------------------------------------------------------------------------
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


def parse_json_body(raw: bytes) -> Any:
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


# ---- request models -------------------------------------------------------------------------------------------
class _Body(BaseModel):
    """A client's JSON object. `ERRORS`: the message (and param) for a field at fault, by its name."""

    model_config = ConfigDict(extra="allow")
    ERRORS: ClassVar[dict[str, str]] = {}

    @classmethod
    def refusal(cls, loc: tuple[int | str, ...]) -> ApiError:
        """The 400 for the first invalid location pydantic reports."""
        if not loc:
            return ApiError(400, "request body must be a JSON object")
        name = str(loc[0])
        if name == "metadata" and len(loc) > 1:
            name = "metadata.task"  # the only metadata key the router reads
        return ApiError(400, cls.ERRORS[name], name)

    @classmethod
    def read(cls, raw: Any, context: dict[str, Any] | None = None) -> Self:
        """Validate a decoded JSON body; the first invalid field becomes a 400."""
        try:
            return cls.model_validate(raw, context=context)
        except ValidationError as e:
            first: ErrorDetails = e.errors(include_url=False)[0]
            raise cls.refusal(first["loc"]) from None


# Absent and null differ for some fields, as they always did: `stream`, `model` and chat `logprobs` may be absent but
# not null (a default, not Optional); the sampling fields and `metadata` may be null.
_SAMPLING = {"temperature": (0, 2), "top_p": (0, 1), "presence_penalty": (-2, 2), "frequency_penalty": (-2, 2)}


def _within(name: str) -> Any:
    lo, hi = _SAMPLING[name]
    return Field(None, strict=True, ge=lo, le=hi)


Tokens = Annotated[int, Field(strict=True, gt=0, le=MAX_TOKENS_LIMIT)]
LogprobCount = Annotated[int, Field(strict=True, ge=0, le=20)]


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    task: StrictStr | None = None


class SamplingParams(_Body):
    """The fields both completion endpoints share."""

    model: StrictStr = ""
    stream: StrictBool = False
    max_tokens: Tokens | None = None
    max_completion_tokens: Tokens | None = None
    temperature: float | None = _within("temperature")
    top_p: float | None = _within("top_p")
    presence_penalty: float | None = _within("presence_penalty")
    frequency_penalty: float | None = _within("frequency_penalty")
    n: Any = None  # the router returns one answer: absent, null or 1 (JSON 1.0 and true compare equal to 1)
    stop: StrictStr | list[StrictStr] | None = None
    metadata: Metadata | None = None

    ERRORS = {"model": "'model' must be a string", "stream": "'stream' must be a boolean",
              **{f: f"'{f}' must be a positive integer" for f in ("max_tokens", "max_completion_tokens")},
              **{f: f"'{f}' must be a number in [{lo}, {hi}]" for f, (lo, hi) in _SAMPLING.items()},
              "n": "'n' must be 1: the router returns one answer per request",
              "stop": "'stop' must be a string or a list of strings", "metadata": "'metadata' must be an object",
              "metadata.task": "'metadata.task' must be a string"}

    @field_validator("n")
    @classmethod
    def _one_answer(cls, n: Any) -> Any:
        if n is not None and n != 1:
            raise ValueError("n")
        return n

    @property
    def task(self) -> str | None:
        return self.metadata.task if self.metadata else None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: StrictStr


class OtherPart(BaseModel):
    """An image, audio, ... part: passed on to the tiers, not embedded."""

    model_config = ConfigDict(extra="allow")
    type: StrictStr


def _part_kind(part: Any) -> str:
    return "text" if isinstance(part, dict) and part.get("type") == "text" else "other"


def _content_kind(content: Any) -> str | None:
    return "str" if isinstance(content, str) else "parts" if isinstance(content, list) else None


ContentPart = Annotated[Annotated[TextPart, Tag("text")] | Annotated[OtherPart, Tag("other")],
                        Discriminator(_part_kind)]
Content = Annotated[Annotated[str, Tag("str")] | Annotated[list[ContentPart], Tag("parts")],
                    Discriminator(_content_kind)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Role
    content: Content | None = None

    @property
    def text(self) -> str:
        """What the router reads of the message: its text parts, one per line."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "\n".join(p.text for p in self.content if isinstance(p, TextPart))


class _Messages(_Body):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]

    @classmethod
    def refusal(cls, loc: tuple[int | str, ...]) -> ApiError:
        if not loc or loc[0] != "messages":
            return super().refusal(loc)
        if len(loc) == 1:
            return ApiError(400, "'messages' must be a non-empty list", "messages")
        where = f"messages[{loc[1]}]"
        if len(loc) == 2:
            return ApiError(400, f"{where} must be an object", where)
        if loc[2] == "role":
            return ApiError(400, f"{where}.role must be one of {sorted(ROLES)}", f"{where}.role")
        where += ".content"  # loc: content, "parts", part index, "text" | "other", field
        if len(loc) <= 4:
            return ApiError(400, f"{where} must be a string or a list of content parts", where)
        if loc[-1] == "text" and loc[-2] == "text":
            return ApiError(400, f"{where}[{loc[4]}].text must be a string", where)
        return ApiError(400, f"{where}[{loc[4]}] must be an object with a string 'type'", where)


class _ChatLogprobs(_Body):
    logprobs: StrictBool = False
    top_logprobs: LogprobCount | None = None

    ERRORS = {"logprobs": "'logprobs' must be a boolean",
              "top_logprobs": "'top_logprobs' must be an integer in [0, 20]"}


# Bases from the last-checked to the first: pydantic orders fields base by base starting from the last one.
class ChatCompletionRequest(_ChatLogprobs, SamplingParams, _Messages):
    """A /v1/chat/completions body."""

    ERRORS = {**SamplingParams.ERRORS, **_ChatLogprobs.ERRORS}

    @property
    def query(self) -> str:
        """The text the router embeds: the last user message, else the last message with any text."""
        user = [m.text for m in self.messages if m.role == "user"]
        return user[-1] if user else next((m.text for m in reversed(self.messages) if m.text), "")


class _Prompt(_Body):
    prompt: str

    ERRORS = {"prompt": "'prompt' must be a non-empty string (or a list of one string)"}

    @field_validator("prompt", mode="plain")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> str:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt")
        return prompt


class _CompletionLogprobs(_Body):
    logprobs: LogprobCount | None = None

    ERRORS = {"logprobs": "'logprobs' must be an integer in [0, 20]"}


class CompletionRequest(_CompletionLogprobs, SamplingParams, _Prompt):
    """A /v1/completions body."""

    ERRORS = {**_Prompt.ERRORS, **SamplingParams.ERRORS, **_CompletionLogprobs.ERRORS}


class FeedbackRequest(_Body):
    """A /v1/feedback body: a label for an answered request. Validate with context {"tiers": the portfolio}."""

    request_id: Annotated[str, Field(strict=True, min_length=1, max_length=MAX_REQUEST_ID)]
    accepted: StrictBool | None = None
    score: Annotated[float, Field(strict=True, ge=0, le=1)] | None = None
    tier: str | None = None  # checked against the portfolio after the label is (below)

    ERRORS = {"request_id": "'request_id' must be a non-empty string", "accepted": "'accepted' must be a boolean",
              "score": "'score' must be a number in [0, 1]"}

    @field_validator("tier", mode="plain")
    @classmethod
    def _later(cls, tier: Any) -> Any:
        return tier

    @model_validator(mode="after")
    def _label_and_tier(self, info: ValidationInfo) -> Self:
        if self.accepted is None and self.score is None:
            raise ApiError(400, "give 'accepted' (boolean) or 'score' (0..1)", "accepted")
        tiers: list[str] = (info.context or {})["tiers"]
        if self.tier is not None and (not isinstance(self.tier, str) or self.tier not in tiers):
            raise ApiError(400, f"'tier' must be one of {', '.join(tiers)}", "tier")
        return self


# ---- what the routes answer ---------------------------------------------------------------------------------
class FeedbackAck(BaseModel):
    """202 to /v1/feedback: the label is logged; `trusted` ones of `known_request`s move thresholds now."""

    status: Literal["recorded"] = "recorded"
    known_request: bool
    trusted: bool


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "routenlp"
    routenlp_task: bool | None = None
    routenlp_tier: bool | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Readiness(BaseModel):
    """/readyz: 200 when `ready`, else 503."""

    ready: bool
    encoder: bool
    router_version: str | None
    tiers_up: dict[str, bool]
    event_log: str


# ---- what the cascade reads of a request ----------------------------------------------------------------------
@dataclass
class ParsedRequest:
    kind: str  # "chat" | "completions"
    body: dict[str, Any]  # as the client sent it (forwarded to the tiers)
    query: str  # text the router embeds (last user message / prompt)
    stream: bool
    wants_logprobs: bool
    metadata_task: str | None


def parse_chat(body: Any) -> ParsedRequest:
    """Validate a /v1/chat/completions body."""
    req = ChatCompletionRequest.read(body)
    return ParsedRequest("chat", body, req.query, req.stream, req.logprobs, req.task)


def parse_completion(body: Any) -> ParsedRequest:
    """Validate a /v1/completions body."""
    req = CompletionRequest.read(body)
    return ParsedRequest("completions", body, req.prompt, req.stream, req.logprobs is not None, req.task)


def parse_feedback(body: Any, tiers: list[str]) -> FeedbackRequest:
    """Validate a /v1/feedback body against the router's portfolio."""
    return FeedbackRequest.read(body, {"tiers": tiers})
