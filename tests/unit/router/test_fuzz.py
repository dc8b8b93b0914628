"""Fuzz the HTTP API: whatever a client sends, the router answers with a status below 500 and, for errors, an
OpenAI-style JSON error body."""

import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routenlp.router.config import RouterConfig
from routenlp.router.server import build_app

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


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    live = Live()
    fakes = [FakeTier(n, i) for i, n in enumerate(["small", "big"])]
    ports = [live.serve(f.app()) for f in fakes]
    config = RouterConfig.model_validate({
        "policy": "fuzz",
        "tiers": [{"name": f.name, "servedModelName": f.name, "baseUrl": f"http://127.0.0.1:{p}/v1",
                   "cost": {"inputPerMillion": 1, "outputPerMillion": 1}} for f, p in zip(fakes, ports)],
        "tasks": [{"name": "intent", "kind": "structured", "labels": ["refund"]}, {"name": "chat"}],
        "defaultTask": "intent", "unknownTask": "Reject",
        "router": {"artifactDir": str(tmp / "a")}, "eventLogDir": str(tmp / "e")})
    port = live.serve(build_app(config, encoder=FakeEncoder()))
    yield port
    live.close()


def _check(status, body):
    assert status < 500, body[:300]
    if status >= 400:
        err = json.loads(body)["error"]
        assert isinstance(err["message"], str) and err["message"]


FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])


@FUZZ
@given(body=chat_bodies, task=st.one_of(st.none(), header_text), rid=st.one_of(st.none(), header_text))
def test_chat_never_5xx(router, body, task, rid):
    headers = {k: v for k, v in {"X-RouteNLP-Task": task, "x-request-id": rid}.items() if v}
    status, _, out = request(router, "POST", "/v1/chat/completions", body, headers=headers)
    _check(status, out)


@FUZZ
@given(body=completion_bodies)
def test_completions_never_5xx(router, body):
    _check(*request(router, "POST", "/v1/completions", body)[::2])


@FUZZ
@given(body=feedback_bodies)
def test_feedback_never_5xx(router, body):
    _check(*request(router, "POST", "/v1/feedback", body)[::2])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200), path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/feedback"]))
def test_raw_bytes_never_5xx(router, raw, path):
    _check(*request(router, "POST", path, raw=raw)[::2])
