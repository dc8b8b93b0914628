"""Stand-in tiers over HTTP: the OpenAI wire format (chat + completions, logprobs, streaming, usage) and bad input.

The oracle runs on the real BANKING77 data; the classifier's HTTP layer is exercised with a fixed-answer model here
(the trained classifier itself runs in tests/e2e)."""

import json
import math

import pytest
from aiohttp.test_utils import TestClient, TestServer

from routenlp.local import banking77 as b77
from routenlp.local.standins import CLASSIFIER, ORACLE, OracleModel, completion_body, make_app, parse_request


class FixedClassifier:
    kind = CLASSIFIER
    description = "fixed answers"

    def answer(self, query):
        return [("card_arrival", math.log(0.6)), ("card_linking", math.log(0.3)), ("top_up_failed", math.log(0.1))]


@pytest.fixture
async def oracle_client():
    model = OracleModel()
    async with TestClient(TestServer(make_app(model, "frontier-oracle"))) as c:
        yield c


@pytest.fixture
async def clf_client():
    async with TestClient(TestServer(make_app(FixedClassifier(), "clf"))) as c:
        yield c


async def test_oracle_answers_gold_label_and_says_what_it_is(oracle_client):
    ex = b77.load_split("test")[123]
    r = await oracle_client.post("/v1/chat/completions", json={"model": "frontier-oracle",
                                                               "messages": b77.messages(ex.text)})
    assert r.status == 200 and r.headers["x-routenlp-standin"] == ORACLE
    body = await r.json()
    assert body["choices"][0]["message"]["content"] == ex.label
    assert body["usage"]["prompt_tokens"] > 100 and body["usage"]["completion_tokens"] >= 1
    models = await (await oracle_client.get("/v1/models")).json()
    assert "oracle-quality stand-in for a frontier model" in models["data"][0]["description"]


async def test_oracle_rejects_unknown_query(oracle_client):
    r = await oracle_client.post("/v1/chat/completions", json={
        "model": "frontier-oracle", "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert r.status == 400
    assert "only knows BANKING77 queries" in (await r.json())["error"]["message"]


async def test_classifier_logprobs_chat(clf_client):
    r = await clf_client.post("/v1/chat/completions", json={
        "model": "clf", "messages": [{"role": "user", "content": "where is my card"}], "logprobs": True,
        "top_logprobs": 2})
    body = await r.json()
    c = body["choices"][0]
    assert c["message"]["content"] == "card_arrival"
    tok = c["logprobs"]["content"][0]
    assert tok["token"] == "card_arrival" and tok["logprob"] == pytest.approx(math.log(0.6))
    assert [t["token"] for t in tok["top_logprobs"]] == ["card_arrival", "card_linking"]


async def test_classifier_no_logprobs_unless_asked(clf_client):
    body = await (await clf_client.post("/v1/chat/completions", json={
        "model": "clf", "messages": [{"role": "user", "content": "x"}]})).json()
    assert body["choices"][0]["logprobs"] is None


async def test_completions_api(clf_client):
    body = await (await clf_client.post("/v1/completions", json={
        "model": "clf", "prompt": "Classify:\nwhere is my card\n", "logprobs": 1})).json()
    c = body["choices"][0]
    assert c["text"] == "card_arrival" and c["logprobs"]["token_logprobs"] == [pytest.approx(math.log(0.6))]
    assert body["object"] == "text_completion"


async def test_streaming(clf_client):
    r = await clf_client.post("/v1/chat/completions", json={
        "model": "clf", "messages": [{"role": "user", "content": "x"}], "stream": True,
        "stream_options": {"include_usage": True}})
    assert r.headers["Content-Type"].startswith("text/event-stream")
    lines = [ln[6:] for ln in (await r.text()).splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["content"] == "card_arrival"
    assert chunks[1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[2]["usage"]["total_tokens"] > 0


@pytest.mark.parametrize("payload,status,msg", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"model": "other", "messages": [{"role": "user", "content": "x"}]}).encode(), 404, "does not exist"),
    (json.dumps({"model": "clf", "messages": []}).encode(), 400, "non-empty list"),
    (json.dumps({"model": "clf", "messages": [{"role": "user", "content": "  "}]}).encode(), 400, "empty"),
    (json.dumps({"model": "clf", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 99}).encode(),
     400, "top_logprobs"),
])
async def test_bad_input_is_4xx_with_reason(clf_client, payload, status, msg):
    r = await clf_client.post("/v1/chat/completions", data=payload, headers={"Content-Type": "application/json"})
    assert r.status == status
    assert msg in (await r.json())["error"]["message"]


def test_completion_body_usage_is_consistent():
    req = parse_request({"model": "m", "messages": [{"role": "user", "content": "a b c"}]}, True, "m")
    body = completion_body([("card_arrival", 0.0)], req, "m", chat=True)
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["prompt_tokens"] == 3
