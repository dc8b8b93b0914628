"""Fuzz the HTTP API: whatever a client sends (JSON values, raw bytes, mutated bodies, content encodings, header
bytes, bearer tokens), the router answers with healthy tiers a status below 500 and, for errors, an OpenAI-style
JSON error body. Over 1,000 generated requests per run (counted: test_over_1000_requests_were_fuzzed)."""

import collections
import gzip
import json
import string
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routenlp.router.auth import FeedbackGate
from routenlp.api.router_config import RouterConfig
from routenlp.router.server import STATE, build_app

from .fakes import FakeEncoder, FakeTier
from .live import Live, request

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
roles = st.sampled_from(["user", "system", "assistant", "tool", "robot", "", None, 3])
contents = st.one_of(st.text(max_size=40), st.none(), st.integers(),
                     st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", 1]),
                                                     "text": st.one_of(st.text(max_size=10), st.integers())}),
                              max_size=3), json_values)
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": contents}), max_size=4)
chat_bodies = st.fixed_dictionaries(
    {"messages": st.one_of(messages, json_values)},
    optional={"model": st.one_of(st.sampled_from(["support-intent", "x"]), json_values),
              "stream": st.one_of(st.booleans(), json_values), "max_tokens": st.one_of(st.integers(-5, 10), json_values),
              "temperature": st.one_of(st.floats(-1, 3), json_values), "n": st.integers(0, 3),
              "metadata": st.one_of(st.fixed_dictionaries({"task": st.one_of(st.text(max_size=8), json_values)}),
                                    json_values),
              "logprobs": json_values, "top_logprobs": json_values, "stop": json_values,
              "extra": json_values})
completion_bodies = st.fixed_dictionaries(
    {"prompt": st.one_of(st.text(max_size=30), json_values)},
    optional={"stream": st.one_of(st.booleans(), json_values), "logprobs": json_values,
              "max_tokens": st.one_of(st.integers(-5, 10), json_values)})
feedback_bodies = st.one_of(json_values, st.fixed_dictionaries(
    {"request_id": st.one_of(st.text(max_size=10), json_values)},
    optional={"accepted": json_values, "score": st.one_of(st.floats(-1, 2), json_values), "tier": json_values}))
header_text = st.text(alphabet=string.ascii_letters + string.digits + "-_. ", max_size=20)
# Header value bytes a client can put on the wire (no CR/LF/NUL: those break the HTTP framing itself).
header_bytes = st.binary(max_size=24).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7f))
TOKEN = "fuzz-labeller-token"
SENT = collections.Counter()  # requests sent per test


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    keys = tmp / "labellers"
    keys.mkdir()
    (keys / "qa").write_text(TOKEN)
    live = Live()
    fakes = [FakeTier(n, i) for i, n in enumerate(["small", "big"])]
    ports = [live.serve(f.app()) for f in fakes]
    config = RouterConfig.model_validate({
        "policy": "fuzz",
        "tiers": [{"name": f.name, "servedModelName": f.name, "baseUrl": f"http://127.0.0.1:{p}/v1",
                   "cost": {"inputPerMillion": 1, "outputPerMillion": 1}} for f, p in zip(fakes, ports)],
        "tasks": [{"name": "intent", "kind": "structured", "answers": ["refund"]}, {"name": "chat"}],
        "defaultTask": "intent", "unknownTask": "Reject",
        "router": {"artifactDir": str(tmp / "a")}, "eventLogDir": str(tmp / "e"),
        "auth": {"labellersDir": str(keys)}})
    app = build_app(config, encoder=FakeEncoder())
    app[STATE].feedback_gate = FeedbackGate(rate=1e9, burst=1e9, per_request=10**9)  # fuzz validation, not limits
    port = live.serve(app)
    yield port
    app[STATE].events.flush()
    assert app[STATE].events.healthy and app[STATE].events.dropped == 0  # nothing a client sent stopped the log
    live.close()


# aiohttp's HTTP parser decodes a compressed body itself; when the garbage arrives with the headers it rejects the
# request before any handler runs, with its own plain-text 400, which the app cannot shape (a known gap,
# docs/operations.md). Which path a request takes depends on packet timing.


def _check(status, body, name="?"):
    SENT[name] += 1
    assert status < 500, body[:300]
    if status == 400 and not body.lstrip().startswith(b"{"):  # the parser's plain-text rejection (above)
        return
    if status >= 400:
        err = json.loads(body)["error"]
        assert isinstance(err["message"], str) and err["message"]


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])


@FUZZ
@given(body=chat_bodies, task=st.one_of(st.none(), header_text), rid=st.one_of(st.none(), header_text))
def test_chat_never_5xx(router, body, task, rid):
    headers = {k: v for k, v in {"X-RouteNLP-Task": task, "x-request-id": rid}.items() if v}
    status, _, out = request(router, "POST", "/v1/chat/completions", body, headers=headers)
    _check(status, out, "chat")


@FUZZ
@given(body=completion_bodies)
def test_completions_never_5xx(router, body):
    _check(*request(router, "POST", "/v1/completions", body)[::2], "completions")


@FUZZ
@given(body=feedback_bodies, auth=st.sampled_from([None, f"Bearer {TOKEN}", "Bearer wrong", "Basic eA=="]))
def test_feedback_never_5xx(router, body, auth):
    headers = {"Authorization": auth} if auth else {}
    _check(*request(router, "POST", "/v1/feedback", body, headers=headers)[::2], "feedback")


PATHS = st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/feedback"])


@FUZZ
@given(raw=st.binary(max_size=200), path=PATHS)
def test_raw_bytes_never_5xx(router, raw, path):
    _check(*request(router, "POST", path, raw=raw)[::2], "raw")


VALID = {"/v1/chat/completions": {"messages": [{"role": "user", "content": "refund please, easy"}], "max_tokens": 4},
         "/v1/completions": {"prompt": "refund please", "max_tokens": 4},
         "/v1/feedback": {"request_id": "fuzz-1", "accepted": True}}


@st.composite
def mutated_bodies(draw):
    """A valid body as bytes, then byte edits, deep nesting or escapes a JSON parser accepts but text cannot hold."""
    path = draw(PATHS)
    raw = bytearray(json.dumps(VALID[path]).encode())
    kind = draw(st.sampled_from(["edit", "nest", "surrogate", "none"]))
    if kind == "edit":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(raw)))
            op = draw(st.sampled_from(["insert", "delete", "replace"]))
            b = draw(st.binary(min_size=1, max_size=3))
            if op == "insert":
                raw[i:i] = b
            elif op == "delete":
                del raw[i:i + len(b)]
            else:
                raw[i:i + len(b)] = b
    elif kind == "nest":
        depth = draw(st.integers(1, 3000))
        raw = raw[:-1] + b',"x":' + b"[" * depth + b"]" * draw(st.sampled_from([depth, depth - 1, 0])) + b"}"
    elif kind == "surrogate":
        esc = draw(st.sampled_from([b"\\ud800", b"\\udfff", b"\\uDBFF\\u0041", b"\\ud83d\\ude00"]))
        at = raw.index(b'"', raw.index(b":") + 1) + 1 if b'":"' in raw else 1
        raw[at:at] = esc
    return path, bytes(raw)


ENCODINGS = st.sampled_from([None, "identity", "gzip", "deflate", "gzip-garbage", "deflate-garbage", "compress",
                             "GZIP", "gzip, deflate", "x-unknown"])


@settings(FUZZ, max_examples=300)
@given(case=mutated_bodies(), encoding=ENCODINGS, rid=st.one_of(st.none(), header_bytes),
       task=st.one_of(st.none(), header_bytes), auth=st.one_of(st.none(), header_bytes.map(lambda b: b"Bearer " + b)))
def test_mutated_requests_never_5xx(router, case, encoding, rid, task, auth):
    path, raw = case
    headers = {}
    if encoding == "gzip":
        raw, headers["Content-Encoding"] = gzip.compress(raw), "gzip"
    elif encoding == "deflate":
        raw, headers["Content-Encoding"] = zlib.compress(raw), "deflate"
    elif encoding in ("gzip-garbage", "deflate-garbage"):
        headers["Content-Encoding"] = encoding.split("-")[0]  # claims compression, sends plain bytes
    elif encoding:
        headers["Content-Encoding"] = encoding
    for name, value in (("x-request-id", rid), ("X-RouteNLP-Task", task), ("Authorization", auth)):
        if value is not None:
            headers[name] = value.strip()  # http.client refuses leading/trailing whitespace
    _check(*request(router, "POST", path, raw=raw, headers=headers)[::2], "mutated")


def test_over_1000_requests_were_fuzzed():
    """Runs last: the generated requests above (hypothesis may stop early when a strategy is exhausted)."""
    assert sum(SENT.values()) >= 1000, f"only {dict(SENT)}: run the whole module"
