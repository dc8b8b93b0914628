"""The router over HTTP against fake OpenAI-compatible tiers: every routing decision, errors, feedback, reload."""

import json
import math
import time

import numpy as np
import pytest

from routenlp.router import cascade
from routenlp.router.artifacts import Calibration, save_artifact
from routenlp.api.router_config import RouterConfig
from routenlp.router.conformal import ThresholdResult
from routenlp.router.difficulty import DifficultyRouter
from routenlp.router.eventlog import read_events
from routenlp.router.events import FeedbackEvent, RoutingEvent
from routenlp.router.server import STATE, build_app

from .fakes import FakeEncoder, FakeTier
from .live import Live, request

TIERS = ["small", "medium", "big"]
COST = [0.1, 1.0, 10.0]


def make_config(tmp_path, ports, **over):
    cascade_cfg = {"riskLevel": 0.05, "delta": 0.1, "minCalibrationSamples": 200, "maxEscalations": 2,
                   **over.pop("cascade", {})}
    doc = {
        "policy": "support",
        "tiers": [{"name": n, "servedModelName": f"{n}-model", "baseUrl": f"http://127.0.0.1:{p}/v1",
                   "cost": {"inputPerMillion": c, "outputPerMillion": c}, "timeoutSeconds": 5}
                  for n, p, c in zip(TIERS, ports, COST)],
        "tasks": [{"name": "intent", "kind": "structured", "answers": ["refund", "card"], "qualityTarget": 0.9,
                   "match": {"models": ["support-intent"], "patterns": ["(?i)refund"]}},
                  {"name": "chat", "kind": "generation", "match": {"pathPrefixes": ["/tasks/chat"]}}],
        "defaultTask": "intent",
        "cascade": cascade_cfg,
        "router": {"artifactDir": str(tmp_path / "artifacts"), **over.pop("router", {})},
        "eventLogDir": str(tmp_path / "events"),
        **over,
    }
    return RouterConfig.model_validate(doc)


def calibrated(thr=0.5):
    res = ThresholdResult(thr, 500, 300, 0.01, True)
    return Calibration(0.05, 0.1, tasks={"intent": {"small": res, "medium": res}})


def wait_for(cond, timeout=20.0):
    """Poll until cond() is true (labels are written in the background after the response)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


class Stack:
    def __init__(self, tmp_path, artifacts=(), encoder=None, **over):
        self.live = Live()
        self.fakes = [FakeTier(n, i) for i, n in enumerate(TIERS)]
        self.tier_ports = [self.live.serve(f.app()) for f in self.fakes]
        for version, kw in artifacts:
            save_artifact(tmp_path / "artifacts", version, **kw)
        self.config = make_config(tmp_path, self.tier_ports, **over)
        self.app = build_app(self.config, encoder=encoder or FakeEncoder())
        self.port = self.live.serve(self.app)
        self.state = self.app[STATE]
        self.tmp = tmp_path

    def chat(self, text, headers=None, path="/v1/chat/completions", **body):
        payload = {"model": body.pop("model", "support-intent"), "messages": [{"role": "user", "content": text}], **body}
        return request(self.port, "POST", path, payload, headers=headers)

    def events(self):
        self.state.events.flush()
        return list(read_events(self.tmp / "events"))

    def metric(self, name, **labels):
        _, _, body = request(self.port, "GET", "/metrics")
        for line in body.decode().splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        return None

    def close(self):
        self.live.close()


@pytest.fixture
def stack_factory(tmp_path):
    made = []

    def make(**kw):
        d = tmp_path / f"stack{len(made)}"
        d.mkdir()
        s = Stack(d, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_uncalibrated_tiers_are_skipped_outside_the_exploration_sample(stack_factory):
    s = stack_factory()  # shadowSampleRate 0: no exploration; small and medium have no threshold
    status, h, body = s.chat("I want a refund, easy")
    assert status == 200 and h["x-routenlp-tier"] == "big" and h["x-routenlp-escalations"] == "0"
    assert not s.fakes[0].calls and not s.fakes[1].calls  # never paid for a call that could only escalate


def test_uncalibrated_escalates_conservatively_and_labels_by_reference(stack_factory):
    s = stack_factory(shadowSampleRate=1.0)  # every request is in the exploration sample: uncalibrated tiers tried
    status, h, body = s.chat("I want a refund, easy")
    assert status == 200, body
    assert h["x-routenlp-tier"] == "big" and h["x-routenlp-escalations"] == "2"
    assert h["x-routenlp-router-version"] == "none"
    assert json.loads(body)["choices"][0]["message"]["content"] == "refund"
    assert json.loads(body)["choices"][0]["logprobs"] is None  # not asked for: stripped
    assert all(c["logprobs"] is True for f in s.fakes for c in f.calls)  # the router always asks tiers for them
    assert s.metric("routenlp_calibrated", task="intent", tier="small") == 0
    wait_for(lambda: sum(isinstance(e, FeedbackEvent) for e in s.events()) == 2)
    evs = s.events()
    req = [e for e in evs if isinstance(e, RoutingEvent)]
    assert len(req) == 1 and [a.tier for a in req[0].attempts] == TIERS and req[0].outcome == "accepted"
    assert req[0].attempts[0].threshold is None and req[0].attempts[0].score == pytest.approx(math.exp(-0.02), 1e-3)
    labels = {(e.tier, e.accepted, e.source) for e in evs if isinstance(e, FeedbackEvent)}
    assert labels == {("small", True, "judge"), ("medium", True, "judge")}
    cost = s.metric("routenlp_cost_usd_total", task="intent", tier="small")
    assert cost == pytest.approx(12 * 0.1 / 1e6)
    assert s.metric("routenlp_escalations_total", from_tier="small", to_tier="medium") == 1


def test_calibrated_cascade_accepts_escalates_by_confidence(stack_factory):
    s = stack_factory(artifacts=[("v1", {"router": None, "calibration": calibrated()})])
    _, h, _ = s.chat("refund please, easy")
    assert (h["x-routenlp-tier"], h["x-routenlp-escalations"], h["x-routenlp-router-version"]) == ("small", "0", "v1")
    assert float(h["x-routenlp-confidence"]) == pytest.approx(math.exp(-0.02), abs=1e-3)
    _, h, _ = s.chat("refund please, medium")
    assert (h["x-routenlp-tier"], h["x-routenlp-escalations"]) == ("medium", "1")
    _, h, body = s.chat("refund please, hard")
    assert (h["x-routenlp-tier"], h["x-routenlp-escalations"]) == ("big", "2")
    assert s.metric("routenlp_calibrated", task="intent", tier="small") == 1
    assert s.metric("routenlp_threshold", task="intent", tier="small") == 0.5
    assert s.metric("routenlp_requests_total", task="intent", tier="small", outcome="accepted") == 1
    assert s.metric("routenlp_reference_cost_usd_total", task="intent") == pytest.approx(3 * 12 * 10 / 1e6)
    # the other task has no thresholds in this artifact: conservative
    _, h, _ = s.chat("easy", path="/v1/chat/completions", headers={"X-RouteNLP-Task": "chat"})
    assert h["x-routenlp-tier"] == "big"


def test_calibration_at_a_looser_risk_level_is_not_used(stack_factory):
    cal = calibrated()
    cal.risk_level = 0.2  # the policy asks for 0.05: these thresholds do not certify it
    s = stack_factory(artifacts=[("v1", {"router": None, "calibration": cal})])
    _, h, _ = s.chat("refund please, easy")
    assert h["x-routenlp-tier"] == "big"


def test_calibration_for_another_risk_measure_is_not_used(stack_factory):
    # thresholds certified for `acceptedAnswers` say nothing about `allRequests` and vice versa
    s = stack_factory(artifacts=[("v1", {"router": None, "calibration": calibrated()})],
                      cascade={"riskMeasure": "allRequests"})
    _, h, _ = s.chat("refund please, easy")
    assert h["x-routenlp-tier"] == "big"
    cal = calibrated()
    cal.risk_measure = "allRequests"
    s = stack_factory(artifacts=[("v1", {"router": None, "calibration": cal})], cascade={"riskMeasure": "allRequests"})
    _, h, _ = s.chat("refund please, easy")
    assert h["x-routenlp-tier"] == "small"


def test_max_escalations_jumps_to_reference(stack_factory):
    s = stack_factory(artifacts=[("v1", {"router": None, "calibration": calibrated()})], cascade={"maxEscalations": 1})
    _, h, _ = s.chat("medium")
    assert (h["x-routenlp-tier"], h["x-routenlp-escalations"]) == ("big", "1")
    assert len(s.fakes[1].calls) == 0


def test_max_escalations_zero_is_a_fallback(stack_factory):
    s = stack_factory(artifacts=[("v1", {"router": None, "calibration": calibrated()})], cascade={"maxEscalations": 0})
    _, h, body = s.chat("hard")
    assert (h["x-routenlp-tier"], h["x-routenlp-escalations"]) == ("small", "0")
    time.sleep(0.1)
    assert [e.outcome for e in s.events() if isinstance(e, RoutingEvent)] == ["fallback"]


def test_router_prior_picks_start_tier(stack_factory, tmp_path):
    enc = FakeEncoder()
    x = enc.encode(["skip me", "other"])
    r = DifficultyRouter(TIERS, ["intent", "chat"])
    # teach it: "skip me" -> small and medium fail, big fine
    q = np.array([[0, 0, 1], [1, 1, 1]], dtype=np.float32)
    r.fit(np.repeat(x, 50, 0), np.zeros(100, int), np.repeat(q, 50, 0), epochs=40, seed=0)
    s = stack_factory(artifacts=[("v1", {"router": r, "calibration": calibrated()})], encoder=enc)
    _, h, _ = s.chat("skip me")
    assert (h["x-routenlp-tier"], h["x-routenlp-escalations"]) == ("big", "0")
    assert len(s.fakes[0].calls) == 0
    _, h, _ = s.chat("other")
    assert h["x-routenlp-tier"] == "small"
    time.sleep(0.1)
    ev = [e for e in s.events() if isinstance(e, RoutingEvent)][0]
    assert ev.attempts[0].predicted > 0.5


def test_a_tasks_cost_weight_makes_the_start_rule_weigh_tier_prices(stack_factory, tmp_path):
    """tasks[].costWeight replaces the qualityTarget rule: predicted acceptance minus the weight x each tier's price
    over the reference's. The router predicts only the big tier answers "skip me"; a light weight still starts it
    there, a heavy one at the small tier (0 - 100 x 0.01 = -1 beats 1 - 100 x 1 = -99: the price dominates)."""
    enc = FakeEncoder()
    x = enc.encode(["skip me"])
    r = DifficultyRouter(TIERS, ["intent", "chat"])
    r.fit(np.repeat(x, 50, 0), np.zeros(50, int), np.repeat(np.array([[0, 0, 1]], np.float32), 50, 0), epochs=40,
          seed=0)
    for weight, first in ((0.05, "big"), (100.0, "small")):
        tasks = [{"name": "intent", "kind": "structured", "answers": ["refund", "card"], "costWeight": weight,
                  "match": {"models": ["support-intent"]}}]
        s = stack_factory(artifacts=[("v1", {"router": r, "calibration": calibrated()})], encoder=enc, tasks=tasks)
        assert s.state.start_rule("intent").relative_cost == pytest.approx((0.01, 0.1, 1.0))
        s.chat("skip me")
        time.sleep(0.1)
        ev = [e for e in s.events() if isinstance(e, RoutingEvent)][0]
        assert ev.attempts[0].tier == first


def test_a_floor_certified_version_starts_requests_by_the_rule_it_was_certified_with(stack_factory, tmp_path):
    """Under a quality floor the trainer certifies chain, start rule and level together: the router applies the
    certificate's start rule (here a heavy cost weight: start at the small tier) while the version is certified for
    the floor in force, and the policy's own rule (qualityTarget 0.9: "skip me" starts at big) otherwise."""
    enc = FakeEncoder()
    x = enc.encode(["skip me"])
    r = DifficultyRouter(TIERS, ["intent", "chat"])
    r.fit(np.repeat(x, 50, 0), np.zeros(50, int), np.repeat(np.array([[0, 0, 1]], np.float32), 50, 0), epochs=40,
          seed=0)
    cert = {"floor_certificates": {"intent": {"floor": 0.95, "scope": "task", "level": 0.5,
                                              "start_rule": {"costWeight": 100.0}}}}
    art = [("v1", {"router": r, "calibration": calibrated(), "metadata": cert})]
    for floor, first in ((0.95, "small"), (0.9, "big")):  # certified for 0.95 only
        tasks = [{"name": "intent", "kind": "structured", "answers": ["refund", "card"], "qualityTarget": 0.9,
                  "qualityFloor": floor, "match": {"models": ["support-intent"]}}]
        s = stack_factory(artifacts=art, encoder=enc, tasks=tasks)
        s.chat("skip me")
        time.sleep(0.1)
        assert [e for e in s.events() if isinstance(e, RoutingEvent)][0].attempts[0].tier == first


def test_prefer_cheaper_switch_starts_every_request_at_the_cheapest_tier(stack_factory, tmp_path):
    """The operator's budget switch (a file it keeps in a ConfigMap outside the config hash) is applied live: the
    difficulty router no longer skips the cheap tier; thresholds still decide what is accepted."""
    enc = FakeEncoder()
    x = enc.encode(["skip me", "other"])
    r = DifficultyRouter(TIERS, ["intent", "chat"])
    r.fit(np.repeat(x, 50, 0), np.zeros(100, int), np.repeat(np.array([[0, 0, 1], [1, 1, 1]], np.float32), 50, 0),
          epochs=40, seed=0)
    state_file = tmp_path / "state.yaml"
    s = stack_factory(artifacts=[("v1", {"router": r, "calibration": calibrated()})], encoder=enc,
                      statePath=str(state_file))
    assert s.chat("skip me")[1]["x-routenlp-tier"] == "big"  # no state file yet: the defaults
    state_file.write_text("preferCheaper: true\n")
    s.state.load_state()
    _, h, _ = s.chat("skip me")
    assert (h["x-routenlp-tier"], h["x-routenlp-escalations"]) == ("small", "0")  # the cheap answer passed its threshold
    assert s.metric("routenlp_prefer_cheaper", policy="support") == 1
    state_file.write_text("preferCheaper: [not, yaml: {")  # unreadable: back to the defaults, never a crash
    s.state.load_state()
    assert s.chat("skip me")[1]["x-routenlp-tier"] == "big" and s.metric("routenlp_prefer_cheaper") == 0


def test_tier_errors_escalate_and_open_the_circuit(stack_factory):
    s = stack_factory(artifacts=[("v1", {"router": None, "calibration": calibrated()})])
    s.fakes[0].fail_status = 500
    for _ in range(3):
        status, h, _ = s.chat("easy")
        assert status == 200 and h["x-routenlp-tier"] == "medium"
    calls = len(s.fakes[0].calls)
    assert calls == 3
    status, h, _ = s.chat("easy")
    assert status == 200 and h["x-routenlp-tier"] == "medium" and len(s.fakes[0].calls) == calls  # skipped: open
    assert s.metric("routenlp_tier_up", tier="small") == 0
    assert s.metric("routenlp_tier_errors_total", tier="small") == 3


def test_connection_refused_retries_then_escalates(stack_factory):
    s = stack_factory(artifacts=[("v1", {"router": None, "calibration": calibrated()})])
    s.live.stop(0)  # small tier's server is gone
    status, h, _ = s.chat("easy")
    assert status == 200 and h["x-routenlp-tier"] == "medium"


def test_all_tiers_down_is_503_with_retry_after(stack_factory):
    s = stack_factory()
    for f in s.fakes:
        f.fail_status = 503
    status, h, body = s.chat("easy")
    assert status == 503 and int(h["retry-after"]) >= 1
    assert json.loads(body)["error"]["type"] == "service_unavailable"
    for _ in range(3):
        s.chat("easy")
    status, h, _ = s.chat("easy")  # every circuit open now: refused without calling anyone
    assert status == 503 and "retry-after" in h
    r = request(s.port, "GET", "/readyz")
    assert r[0] == 503


def test_upstream_client_error_is_passed_through(stack_factory):
    s = stack_factory()
    status, h, body = s.chat("easy", max_tokens=999999)
    assert status == 400 and "max_tokens" in json.loads(body)["error"]["message"]


def test_task_resolution_order(stack_factory):
    s = stack_factory(unknownTask="Reject")
    s.chat("hello", headers={"X-RouteNLP-Task": "chat"})
    s.chat("hello", metadata={"task": "chat"}, model="x")
    s.chat("hello", model="support-intent")
    s.chat("I need a refund", model="x")
    s.chat("hello", model="x")
    status, _, body = s.chat("hello", headers={"X-RouteNLP-Task": "nope"})
    assert status == 400 and json.loads(body)["error"]["code"] == "unknown_task"
    time.sleep(0.1)
    assert [e.task for e in s.events() if isinstance(e, RoutingEvent)] == ["chat", "chat", "intent", "intent", "intent"]


def test_unknown_task_uses_default(stack_factory):
    s = stack_factory()
    status, _, _ = s.chat("hello", headers={"X-RouteNLP-Task": "nope"})
    assert status == 200
    time.sleep(0.1)
    assert [e.task for e in s.events() if isinstance(e, RoutingEvent)] == ["intent"]


@pytest.mark.parametrize("raw,status,fragment", [
    (b"{not json", 400, "valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"messages": []}).encode(), 400, "messages"),
    (json.dumps({"messages": [{"role": "user"}], "stream": "yes"}).encode(), 400, "stream"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), 400, "role"),
    (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), 400, "content"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}).encode(), 400, "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 3}).encode(), 400, "'n'"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "metadata": []}).encode(), 400, "metadata"),
    (b"{" + b'"a":"' + b"x" * (2 << 20) + b'"}', 413, "larger"),
])
def test_bad_input_is_4xx_with_openai_error(stack_factory, raw, status, fragment):
    s = stack_factory()
    got, _, body = request(s.port, "POST", "/v1/chat/completions", raw=raw)
    assert got == status
    err = json.loads(body)["error"]
    assert fragment in err["message"] and err["type"] == "invalid_request_error"


def test_unknown_route_is_json_404(stack_factory):
    s = stack_factory()
    status, _, body = request(s.port, "GET", "/v1/nothing")
    assert status == 404 and "error" in json.loads(body)
    status, _, _ = request(s.port, "GET", "/v1/chat/completions")
    assert status == 405


def test_streaming_synthesised_after_cascade_and_passthrough(stack_factory):
    s = stack_factory(artifacts=[("v1", {"router": None, "calibration": calibrated()})])
    status, h, body = s.chat("medium", stream=True)
    assert status == 200 and h["content-type"].startswith("text/event-stream") and h["x-routenlp-tier"] == "medium"
    chunks = [json.loads(line[6:]) for line in body.decode().split("\n\n") if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "refund"
    assert body.decode().rstrip().endswith("data: [DONE]")
    s2 = stack_factory(cascade={"maxEscalations": 0}, shadowSampleRate=1.0)  # one-tier plan: streamed straight through
    status, h, body = s2.chat("easy", stream=True)
    assert status == 200 and h["x-routenlp-tier"] == "small"
    assert s2.fakes[0].calls[-1]["stream"] is True
    chunks = [json.loads(line[6:]) for line in body.decode().split("\n\n") if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "refund"
    time.sleep(0.1)
    assert [e.attempts[0].response for e in s2.events() if isinstance(e, RoutingEvent)] == ["refund"]


def test_completions_endpoint(stack_factory):
    s = stack_factory(artifacts=[("v1", {"router": None, "calibration": calibrated()})])
    status, h, body = request(s.port, "POST", "/v1/completions", {"model": "support-intent", "prompt": "easy refund",
                                                                   "logprobs": 1})
    assert status == 200 and h["x-routenlp-tier"] == "small"
    assert json.loads(body)["choices"][0]["logprobs"]["token_logprobs"] == [-0.02]  # asked for: kept
    status, _, body = request(s.port, "POST", "/v1/completions", {"prompt": ""})
    assert status == 400


def test_models_health_metrics(stack_factory):
    s = stack_factory()
    status, _, body = request(s.port, "GET", "/v1/models")
    assert status == 200 and {m["id"] for m in json.loads(body)["data"]} >= {"intent", "chat", "small", "big"}
    assert request(s.port, "GET", "/healthz")[0] == 200
    status, _, body = request(s.port, "GET", "/readyz")
    assert status == 200 and json.loads(body)["ready"] is True
    assert s.metric("routenlp_risk_level", task="intent") == 0.05
    assert s.metric("routenlp_router_version_info", version="none", role="stable") == 1


def labeller_dir(tmp_path, **tokens):
    """A directory like a mounted Secret: one file per labeller (or client), holding its token."""
    d = tmp_path / f"keys-{len(list(tmp_path.glob('keys-*')))}"
    d.mkdir()
    for name, token in tokens.items():
        (d / name).write_text(token + "\n")
    return str(d)


QA = {"Authorization": "Bearer qa-token-1"}


def test_feedback_is_logged_and_validated(stack_factory, tmp_path):
    s = stack_factory(artifacts=[("v1", {"router": None, "calibration": calibrated()})],
                      auth={"labellersDir": labeller_dir(tmp_path, qa="qa-token-1")})
    _, h, _ = s.chat("easy", headers={"x-request-id": "req-1"})
    assert h["x-request-id"] == "req-1"
    status, _, body = request(s.port, "POST", "/v1/feedback", {"request_id": "req-1", "accepted": False}, headers=QA)
    assert status == 202 and json.loads(body) == {"status": "recorded", "known_request": True, "trusted": True}
    status, _, body = request(s.port, "POST", "/v1/feedback", {"request_id": "other", "score": 0.9}, headers=QA)
    assert status == 202 and json.loads(body)["known_request"] is False
    for bad in ({"accepted": True}, {"request_id": "x"}, {"request_id": "x", "score": 2},
                {"request_id": "x", "accepted": "yes"}, {"request_id": "x", "accepted": True, "tier": "nope"}):
        assert request(s.port, "POST", "/v1/feedback", bad, headers=QA)[0] == 400
    assert s.metric("routenlp_feedback_total", task="intent", tier="small", accepted="false") == 1
    assert s.metric("routenlp_feedback_not_applied_total", reason="unknown_request") == 1
    # an accepted answer labelled unacceptable shows in the violation rate
    s.state.publish_thresholds()
    assert s.metric("routenlp_violation_rate", task="intent", tier="small") == 1.0
    time.sleep(0.1)
    fbs = [e for e in s.events() if isinstance(e, FeedbackEvent) and e.source == "user"]
    assert [(f.request_id, f.accepted, f.score, f.labeller) for f in fbs] == [("req-1", False, None, "qa"),
                                                                             ("other", None, 0.9, "qa")]


def test_canary_split_is_stable_by_request_id(stack_factory):
    s = stack_factory(artifacts=[("v1", {"router": None, "calibration": calibrated()}),
                                 ("v2", {"router": None, "calibration": calibrated()})],
                      router={"current": "v1", "canary": "v2", "canaryPercent": 30})
    seen = {}
    for i in range(40):
        rid = f"id-{i}"
        _, h, _ = s.chat("easy", headers={"x-request-id": rid})
        seen[rid] = h["x-routenlp-router-version"]
        expect = "v2" if cascade.canary_bucket(rid) < 30 else "v1"
        assert seen[rid] == expect
    assert set(seen.values()) == {"v1", "v2"}
    assert s.metric("routenlp_router_version_info", version="v2", role="canary") == 1


def test_hot_reload_without_dropping_requests(stack_factory):
    import concurrent.futures

    s = stack_factory(artifacts=[("v1", {"router": None, "calibration": None})])
    for f in s.fakes:
        f.delay = 0.05
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(s.chat, "easy") for _ in range(24)]
        time.sleep(0.05)
        save_artifact(s.tmp / "artifacts", "v2", router=None, calibration=calibrated())
        s.live.run(__import__("asyncio").to_thread(s.state.load_versions))
        results = [f.result() for f in futs]
    assert all(r[0] == 200 for r in results)
    _, h, _ = s.chat("easy")
    assert (h["x-routenlp-router-version"], h["x-routenlp-tier"]) == ("v2", "small")


def test_online_recalibration_certifies_after_enough_labels(stack_factory):
    s = stack_factory(cascade={"riskLevel": 0.2, "minCalibrationSamples": 40}, shadowSampleRate=1.0)
    for i in range(50):
        assert s.chat(f"easy refund {i}")[1]["x-routenlp-tier"] == "big"
    wait_for(lambda: len(s.state.window.get(("intent", "small"), ())) == 50)  # judge labels come after responses
    s.state.recalibrate()
    assert s.metric("routenlp_calibrated", task="intent", tier="small") == 1
    assert s.metric("routenlp_calibration_samples", task="intent", tier="small") == 50
    _, h, _ = s.chat("easy refund again")
    assert (h["x-routenlp-tier"], h["x-routenlp-escalations"]) == ("small", "0")
    # a fresh router on the same event log starts calibrated (labels warm-started from the log)
    s.state.events.flush()
    app2 = build_app(s.config, encoder=FakeEncoder())
    port2 = s.live.serve(app2)
    _, h, _ = request(port2, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "easy"}]})
    assert h["x-routenlp-tier"] == "small"


def test_all_requests_measure_recalibrates_and_reports_its_own_risk(stack_factory):
    s = stack_factory(cascade={"riskLevel": 0.2, "minCalibrationSamples": 40, "riskMeasure": "allRequests"},
                      shadowSampleRate=1.0)
    for i in range(30):
        s.chat(f"easy refund {i}")
    for i in range(20):
        s.chat(f"hard question {i}")  # the small tier's answer to these is unacceptable
    wait_for(lambda: len(s.state.window.get(("intent", "small"), ())) == 50)
    s.state.recalibrate()
    r = s.state.online[("intent", "small")]
    assert r.certified and r.empirical_risk <= 0.2
    w = s.state.window[("intent", "small")]
    assert any(not ok for _, ok in w) and any(ok for _, ok in w)
    expect = sum(1 for score, ok in w if score >= r.threshold and not ok) / len(w)
    assert s.metric("routenlp_violation_rate", task="intent", tier="small") == pytest.approx(expect)


def test_shadow_requests_label_accepted_answers(stack_factory):
    s = stack_factory(artifacts=[("v1", {"router": None, "calibration": calibrated()})], shadowSampleRate=1.0)
    _, h, _ = s.chat("easy")
    assert h["x-routenlp-tier"] == "small"
    wait_for(lambda: any(isinstance(e, FeedbackEvent) for e in s.events()))
    assert len(s.fakes[2].calls) == 1  # the reference was asked in the background
    fbs = [e for e in s.events() if isinstance(e, FeedbackEvent)]
    assert [(f.tier, f.accepted, f.source, f.reference_response) for f in fbs] == [("small", True, "shadow", "refund")]
    ev = [e for e in s.events() if isinstance(e, RoutingEvent)][0]
    assert ev.shadow is True


def test_explored_requests_that_escalate_label_the_calibration_window_too(stack_factory):
    """The exploration sample is picked by a hash before any tier answers, so every attempt of an explored request
    belongs to the random sample, the rejected ones as much as the accepted ones (leaving rejected attempts out of the
    window would make it a sample biased towards high scores). Requests off the sample that escalate are judged
    too, but their labels are not random and stay out."""
    s = stack_factory(artifacts=[("v1", {"router": None, "calibration": calibrated()})], shadowSampleRate=1.0)
    _, h, _ = s.chat("hard question")  # the small and medium tiers answer `card` unsure: rejected, escalated
    assert h["x-routenlp-tier"] == "big"
    wait_for(lambda: sum(isinstance(e, FeedbackEvent) for e in s.events()) == 2)
    ev = [e for e in s.events() if isinstance(e, RoutingEvent)][0]
    assert (ev.explored, ev.shadow) == (True, False)  # reached the reference itself: judged, no shadow call
    w = list(s.state.window[("intent", "small")])
    assert len(w) == 1 and w[0][1] is False and w[0][0] < 0.5  # the rejected attempt's label, in the window
    s.state.config.shadow_sample_rate = 0.0  # off the sample: judged, but not a random label
    _, h, _ = s.chat("hard question again")
    assert h["x-routenlp-tier"] == "big"
    wait_for(lambda: sum(isinstance(e, FeedbackEvent) for e in s.events()) == 4)
    assert len(s.state.window[("intent", "small")]) == 1


def test_api_key_from_named_env_var_is_sent_never_shown(stack_factory, monkeypatch, caplog):
    import logging

    monkeypatch.setenv("BIG_TIER_KEY", "sk-secret-123")
    s = stack_factory(shadowSampleRate=1.0)  # explore: the uncalibrated small tier is called too
    s.config.tiers[2].api_key_env = "BIG_TIER_KEY"
    from routenlp.router.clients import TierClient

    client = TierClient(s.config.tiers[2])
    s.state.clients[2] = client
    with caplog.at_level(logging.DEBUG):
        s.chat("easy")
        s.fakes[2].fail_status = 500
        s.chat("easy")
    assert s.fakes[2].auth[0] == "Bearer sk-secret-123" and s.fakes[0].auth[0] is None
    assert "sk-secret" not in repr(client) and "sk-secret" not in caplog.text
    _, _, metrics = request(s.port, "GET", "/metrics")
    assert b"sk-secret" not in metrics
    # nor in the event log or the rollout figures' snapshots beside it
    files = [p for p in (s.tmp / "events").rglob("*") if p.is_file()]
    assert any(p.parent.name == "rollout-figures" for p in files)
    assert all("sk-secret" not in p.read_text() for p in files)


def test_config_file_reload_switches_versions(stack_factory, tmp_path, monkeypatch):
    from routenlp.router import server

    monkeypatch.setattr(server, "RELOAD_SECONDS", 0.1)
    s = stack_factory(artifacts=[("v1", {"router": None, "calibration": None})])
    path = tmp_path / "router.yaml"
    path.write_text(s.config.dump_yaml())
    app = build_app(RouterConfig.load(path), config_path=str(path), encoder=FakeEncoder())
    port = s.live.serve(app)
    body = {"messages": [{"role": "user", "content": "easy"}]}
    assert request(port, "POST", "/v1/chat/completions", body)[1]["x-routenlp-router-version"] == "v1"
    save_artifact(s.tmp / "artifacts", "v2", router=None, calibration=calibrated())
    cfg = RouterConfig.load(path)
    cfg.router.stable, cfg.router.canary, cfg.router.canary_percent = "v1", "v2", 100
    time.sleep(0.05)
    path.write_text(cfg.dump_yaml())
    os_time = time.time() + 10
    seen = set()
    while time.time() < os_time and "v2" not in seen:
        seen.add(request(port, "POST", "/v1/chat/completions", body)[1]["x-routenlp-router-version"])
        time.sleep(0.05)
    assert "v2" in seen


def test_tier_timeout_escalates(stack_factory):
    s = stack_factory(artifacts=[("v1", {"router": None, "calibration": calibrated()})])
    s.state.clients[0].tier.timeout_seconds = 0.2
    s.state.clients[0]._session = None
    s.fakes[0].delay = 1.0
    status, h, _ = s.chat("easy")
    assert status == 200 and h["x-routenlp-tier"] == "medium"
    assert len(s.fakes[0].calls) == 1  # a timeout is not retried (the tier may be busy, not unreachable)


def test_circuit_breaker_half_open_probe():
    from routenlp.router.clients import CircuitBreaker

    now = [0.0]
    b = CircuitBreaker(failures=2, reset_seconds=5, clock=lambda: now[0])
    b.failure()
    assert not b.is_open and b.allow()
    b.failure()
    assert b.is_open and not b.allow() and b.retry_after() == 5
    now[0] = 5.0
    assert b.allow()  # one probe goes out ...
    assert b.is_open and not b.allow()  # ... and only one
    b.failure()  # probe failed: open again for a full period
    assert b.is_open and not b.allow()
    now[0] = 10.0
    assert b.allow()
    b.success()
    assert not b.is_open and b.allow()


def test_cli_rejects_bad_config(tmp_path, capsys):
    from routenlp.router.server import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: p\ntiers: []\n")
    assert main(["--config", str(bad)]) == 2
    assert "tiers" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2


def test_malformed_tier_answer_escalates(stack_factory):
    s = stack_factory(artifacts=[("v1", {"router": None, "calibration": calibrated()})])
    from aiohttp import web

    async def broken(request):
        return web.json_response({"choices": []})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", broken)
    port = s.live.serve(app)
    s.state.clients[0].base_url = f"http://127.0.0.1:{port}/v1"
    status, h, _ = s.chat("easy")
    assert status == 200 and h["x-routenlp-tier"] == "medium"
    time.sleep(0.1)
    ev = [e for e in s.events() if isinstance(e, RoutingEvent)][0]
    assert ev.attempts[0].error == "malformed response"
