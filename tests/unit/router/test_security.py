"""The router as an attacker meets it (issue 14): labels are trusted input, client keys, the admin port, client
errors answered 4xx, and an event log no request can stop."""

import json
import logging
import socket
import time

import pytest

from routenlp.router import server
from routenlp.router.auth import Caller, FeedbackGate, KeyDir, authenticate
from routenlp.api.router_config import RouterConfig
from routenlp.router.eventlog import EventLogWriter
from routenlp.router.events import JUDGE, LABELLER, FeedbackEvent, RoutingEvent
from routenlp.router.protocol import ApiError
from routenlp.router.server import build_app

from .fakes import FakeEncoder
from .live import request
from .test_server import QA, calibrated, labeller_dir, wait_for
from .test_server import stack_factory  # noqa: F401  (fixture)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(s, path, body, headers=None):
    return request(s.port, "POST", path, body, headers=headers)


# ---- labels are trusted input ---------------------------------------------------------------------------------
def test_anonymous_labels_cannot_certify_a_bad_tier_and_a_labellers_can(stack_factory, tmp_path):
    """Issue 14's attack: hard queries on the exploration sample, then `accepted: true` for the cheap tier's wrong
    answers from anyone. Before, the later label replaced the judge's and one recalibration certified the tier
    (it then answered hard queries wrongly, and again after a restart). Now the judge's labels stand; only an
    authenticated labeller's label replaces them."""
    s = stack_factory(cascade={"riskLevel": 0.2, "minCalibrationSamples": 40}, shadowSampleRate=1.0,
                      auth={"labellersDir": labeller_dir(tmp_path, qa="qa-token-1")})
    n = 50
    for i in range(n):
        assert s.chat(f"hard question {i}", headers={"x-request-id": f"atk-{i}"})[1]["x-routenlp-tier"] == "big"
    wait_for(lambda: len(s.state.window.get(("intent", "small"), ())) == n)
    for i in range(n):
        status, _, body = post(s, "/v1/feedback", {"request_id": f"atk-{i}", "tier": "small", "accepted": True})
        assert status == 202 and json.loads(body) == {"status": "recorded", "known_request": True, "trusted": False}
    assert not any(ok for _, ok in s.state.window[("intent", "small")])
    s.state.recalibrate()
    assert not s.state.online[("intent", "small")].certified
    assert s.chat("hard question again")[1]["x-routenlp-tier"] == "big"
    assert s.metric("routenlp_feedback_not_applied_total", reason="unauthenticated") == n
    # after a restart the log's anonymous labels do not count either
    s.state.events.flush()
    state2 = s.live.run(_started(build_app(s.config, encoder=FakeEncoder())))
    assert not any(ok for _, ok in state2.window[("intent", "small")])
    assert not state2.online[("intent", "small")].certified
    # the control: the same labels from an authenticated labeller replace the judge's (and conflict with them)
    for i in range(n):
        status, _, body = post(s, "/v1/feedback", {"request_id": f"atk-{i}", "tier": "small", "accepted": True}, QA)
        assert json.loads(body)["trusted"] is True
    assert sum(ok for _, ok in s.state.window[("intent", "small")]) == n  # (the request after the attack: judged bad)
    assert s.metric("routenlp_label_conflicts_total", resolution="replaced") == n
    s.state.recalibrate()
    assert s.state.online[("intent", "small")].certified


async def _started(app):
    """Run an app's start-up hooks (no listener) and hand back its state."""
    for hook in app.on_startup:
        await hook(app)
    return app[server.STATE]


def test_the_judge_never_overturns_a_labeller_and_conflicts_are_counted(stack_factory):
    s = stack_factory(shadowSampleRate=1.0)
    s.chat("easy", headers={"x-request-id": "r1"})
    wait_for(lambda: len(s.state.window.get(("intent", "small"), ())) == 1)  # the judge: acceptable
    ev = s.state.recent["r1"]
    assert s.state.add_label(ev, "small", False, LABELLER)  # a labeller disagrees: replaces, counted
    assert not s.state.add_label(ev, "small", True, JUDGE)  # the judge again: kept the labeller's, counted
    assert list(s.state.window[("intent", "small")])[0][1] is False
    assert s.metric("routenlp_label_conflicts_total", resolution="replaced") == 1
    assert s.metric("routenlp_label_conflicts_total", resolution="kept") == 1


def test_without_labellers_feedback_is_logged_never_applied_and_said_at_start_up(stack_factory, caplog):
    with caplog.at_level(logging.WARNING, logger="routenlp.router"):
        s = stack_factory(artifacts=[("v1", {"router": None, "calibration": calibrated()})])
    assert "never moves a threshold" in caplog.text
    s.chat("easy", headers={"x-request-id": "r1"})
    status, _, body = post(s, "/v1/feedback", {"request_id": "r1", "accepted": False}, QA)  # a token: ignored
    assert status == 202 and json.loads(body)["trusted"] is False
    assert s.state.violations == {} and s.metric("routenlp_feedback_total") is None
    assert [(e.request_id, e.labeller) for e in s.events() if isinstance(e, FeedbackEvent)] == [("r1", None)]


def test_a_wrong_labeller_token_is_refused_and_rotation_needs_no_restart(stack_factory, tmp_path):
    keys = labeller_dir(tmp_path, qa="qa-token-1")
    s = stack_factory(auth={"labellersDir": keys})
    s.state.labellers.refresh_seconds = 0
    status, h, body = post(s, "/v1/feedback", {"request_id": "x", "accepted": True}, {"Authorization": "Bearer nope"})
    assert status == 401 and h["www-authenticate"] == "Bearer"
    assert json.loads(body)["error"]["code"] == "invalid_api_key"
    (tmp_path / keys.rsplit("/", 1)[1] / "qa").write_text("qa-token-2")  # the Secret was rotated
    assert post(s, "/v1/feedback", {"request_id": "x", "accepted": True}, QA)[0] == 401
    status, _, body = post(s, "/v1/feedback", {"request_id": "x", "accepted": True},
                           {"Authorization": "Bearer qa-token-2"})
    assert status == 202 and json.loads(body)["trusted"] is True
    assert s.state.metrics.auth_failures.labels("support")._value.get() == 2


def test_feedback_rate_limit_and_cap_per_request_id(stack_factory, tmp_path):
    s = stack_factory(auth={"labellersDir": labeller_dir(tmp_path, qa="qa-token-1")})
    s.state.feedback_gate = FeedbackGate(rate=0.5, burst=3, per_request=2)
    codes = [post(s, "/v1/feedback", {"request_id": f"u{i}", "accepted": True})[0] for i in range(3)]
    status, h, body = post(s, "/v1/feedback", {"request_id": "u9", "accepted": True})
    assert codes == [202] * 3 and status == 429 and int(h["retry-after"]) >= 1
    assert json.loads(body)["error"]["type"] == "rate_limit_error"
    # labellers are authenticated: not rate limited, and anonymous posts cannot use up their cap per request id
    assert [post(s, "/v1/feedback", {"request_id": "u0", "accepted": True}, QA)[0] for _ in range(3)] == [202, 202, 429]
    assert s.metric("routenlp_feedback_refused_total", reason="rate_limited") == 1
    assert s.metric("routenlp_feedback_refused_total", reason="request_cap") == 1


def test_token_buckets_refill():
    now = [0.0]
    gate = FeedbackGate(rate=2, burst=2, clock=lambda: now[0])
    anon = Caller(address="10.0.0.1")
    gate.admit_client(anon)
    gate.admit_client(anon)
    with pytest.raises(ApiError) as e:
        gate.admit_client(anon)
    assert e.value.status == 429 and e.value.headers == {"Retry-After": "1"}
    gate.admit_client(Caller(address="10.0.0.2"))  # another client has its own bucket
    now[0] = 0.5
    gate.admit_client(anon)  # refilled by rate * 0.5 s = 1 token


def test_client_keys_guard_v1_and_name_the_client(stack_factory, tmp_path):
    s = stack_factory(auth={"clientKeysDir": labeller_dir(tmp_path, acme="sk-acme"),
                            "labellersDir": labeller_dir(tmp_path, qa="qa-token-1")})
    status, h, body = s.chat("easy")
    assert status == 401 and h["www-authenticate"] == "Bearer"
    assert json.loads(body)["error"]["type"] == "authentication_error"
    assert s.chat("easy", headers={"Authorization": "Bearer sk-other"})[0] == 401
    assert request(s.port, "GET", "/v1/models")[0] == 401
    assert request(s.port, "GET", "/metrics")[0] == 401  # no admin port: behind the same keys
    assert request(s.port, "GET", "/healthz")[0] == 200 and request(s.port, "GET", "/readyz")[0] == 200
    acme = {"Authorization": "Bearer sk-acme"}
    status, h, _ = s.chat("easy", headers={**acme, "x-request-id": "c1"})
    assert status == 200
    # feedback: a client key is a client (untrusted labels), a labeller token needs no client key
    status, _, body = post(s, "/v1/feedback", {"request_id": "c1", "accepted": True}, acme)
    assert status == 202 and json.loads(body)["trusted"] is False
    assert json.loads(post(s, "/v1/feedback", {"request_id": "c1", "accepted": True}, QA)[2])["trusted"] is True
    assert post(s, "/v1/feedback", {"request_id": "c1", "accepted": True})[0] == 401
    fbs = [(e.client, e.labeller) for e in s.events() if isinstance(e, FeedbackEvent)]
    assert fbs == [("acme", None), (None, "qa")]
    assert [e.client for e in s.events() if isinstance(e, RoutingEvent)] == ["acme"]  # who sent the request


def test_authenticate_decisions():
    class Keys:
        def __init__(self, **names):
            self.by_token = {v: k for k, v in names.items()}

        def match(self, token):
            return self.by_token.get(token)

    labellers, clients = Keys(qa="L"), Keys(acme="C")
    assert authenticate("/v1/feedback", "Bearer L", "a", labellers, clients) == Caller(labeller="qa", address="a")
    assert authenticate("/v1/feedback", "Bearer C", "a", labellers, clients) == Caller(client="acme", address="a")
    assert authenticate("/v1/chat/completions", "bearer C", "a", labellers, clients).client == "acme"
    assert authenticate("/readyz", None, "a", labellers, clients) == Caller(address="a")
    for path, header in (("/v1/chat/completions", "Bearer L"), ("/v1/chat/completions", None),
                         ("/v1/chat/completions", "Basic C"), ("/v1/feedback", "Bearer x")):
        with pytest.raises(ApiError) as e:
            authenticate(path, header, "a", labellers, clients)
        assert e.value.status == 401
    assert authenticate("/v1/chat/completions", "Bearer anything", "a", labellers, None) == Caller(address="a")


def test_key_dir_reads_a_mounted_secret_and_fails_closed(tmp_path):
    now = [0.0]
    d = tmp_path / "secret"
    (d / "..2026_12_07").mkdir(parents=True)  # what the kubelet puts beside the key files
    (d / "..data").symlink_to("..2026_12_07")
    (d / "..2026_12_07" / "qa").write_text("tok\n")
    (d / "qa").symlink_to("..data/qa")
    keys = KeyDir(d, refresh_seconds=5, clock=lambda: now[0])
    assert keys.match("tok") == "qa" and keys.names() == ["qa"] and keys.match("tok2") is None
    assert keys.match("") is None and keys.match(None) is None
    (d / "..2026_12_07" / "qa").write_text("tok2")
    assert keys.match("tok2") is None  # read again only after refresh_seconds
    now[0] = 5
    assert keys.match("tok2") == "qa"
    assert KeyDir(tmp_path / "missing").match("tok") is None


# ---- ports -----------------------------------------------------------------------------------------------------
def test_admin_port_serves_metrics_and_rollout_only_there(stack_factory):
    port = free_port()
    s = stack_factory(adminPort=port)
    assert request(s.port, "GET", "/metrics")[0] == 404
    assert request(s.port, "GET", "/routenlp/rollout")[0] == 404
    assert request(s.port, "GET", "/readyz")[0] == 200 and s.chat("easy")[0] == 200
    status, _, body = request(port, "GET", "/metrics")
    assert status == 200 and b"routenlp_requests_total" in body
    assert request(port, "GET", "/routenlp/rollout")[0] == 200
    assert request(port, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})[0] == 404


def test_config_names_match_the_operator_rendering():
    doc = {"policy": "p", "tiers": [{"name": "t", "servedModelName": "t", "baseUrl": "http://x/v1",
                                     "cost": {"inputPerMillion": 1, "outputPerMillion": 1}}],
           "tasks": [{"name": "a"}], "router": {"artifactDir": "/a"}, "eventLogDir": "/e",
           "auth": {"labellersDir": "/secrets/labellers", "clientKeysDir": "/secrets/clients"}, "adminPort": 9091}
    cfg = RouterConfig.model_validate(doc)
    assert (cfg.auth.labellers_dir, cfg.auth.client_keys_dir, cfg.admin_port) == ("/secrets/labellers",
                                                                                 "/secrets/clients", 9091)
    assert cfg.to_k8s()["auth"] == doc["auth"] and cfg.to_k8s()["adminPort"] == 9091


# ---- client errors are 4xx ----------------------------------------------------------------------------------
CHAT = json.dumps({"messages": [{"role": "user", "content": "easy"}]}).encode()


def _deflate_garbage():
    return b"\x00\x01garbage that is not deflate"


@pytest.mark.parametrize("raw,headers,status,fragment", [
    (b"[" * 1000 + b"]" * 1000, {}, 400, "nested deeper"),  # was a RecursionError: 500
    (b'{"messages":' + b"[" * 65 + b"]" * 65 + b"}", {}, 400, "nested deeper"),
    (_deflate_garbage(), {"Content-Encoding": "deflate"}, 400, "could not be decoded"),  # was 500
    (_deflate_garbage(), {"Content-Encoding": "gzip"}, 400, "could not be decoded"),
    (CHAT, {"Content-Encoding": "compress"}, 415, "not supported"),
    (CHAT, {"x-request-id": b"\xff\xfe"}, 400, "x-request-id"),  # was 500 (echoed as a response header)
    (CHAT, {"x-request-id": "caf\u00e9".encode()}, 400, "printable ASCII"),
    (CHAT, {"x-request-id": "r" * 201}, 400, "printable ASCII"),
    (CHAT, {"X-RouteNLP-Task": b"\xc3\x28"}, 400, "not valid UTF-8"),
    (b'{"messages":[{"role":"user","content":"\\ud800"}]}', {}, 400, "surrogate"),
    (b'{"messages":[{"role":"user","content":"\xff"}]}', {}, 400, "UTF-8"),
])
def test_client_errors_are_4xx_with_the_openai_error_body(stack_factory, raw, headers, status, fragment):
    s = stack_factory()
    got, _, body = request(s.port, "POST", "/v1/chat/completions", raw=raw, headers=headers)
    assert got == status, body
    err = json.loads(body)["error"]
    assert fragment in err["message"] and err["type"] == "invalid_request_error"


def test_compressed_and_paired_surrogate_bodies_are_served(stack_factory):
    import gzip

    s = stack_factory()
    status, h, _ = request(s.port, "POST", "/v1/chat/completions", raw=gzip.compress(CHAT),
                           headers={"Content-Encoding": "gzip"})
    assert status == 200
    emoji = b'{"messages":[{"role":"user","content":"easy \\ud83d\\ude00"}]}'  # a valid pair
    assert request(s.port, "POST", "/v1/chat/completions", raw=emoji)[0] == 200


def test_slow_upload_times_out_with_408(stack_factory, monkeypatch):
    monkeypatch.setattr(server, "BODY_READ_SECONDS", 0.5)
    s = stack_factory()
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
        c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"messages\":")
        t0 = time.monotonic()
        reply = c.recv(65536)
    assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 5
    assert b"not received within" in reply


# ---- the event log cannot die quietly ---------------------------------------------------------------------------
def test_lone_surrogates_in_every_field_then_every_later_event_lands(stack_factory, tmp_path):
    """Issue 14: one request with a lone surrogate killed the event-log writer; every later event was lost, the
    dropped metric stayed 0 and /readyz 200. Now such requests are refused at the door (400), and whatever reaches
    the writer serialises (test_eventlog), so every later event lands."""
    s = stack_factory(auth={"labellersDir": labeller_dir(tmp_path, qa="qa-token-1")})
    bad, chat = "\ud800x", {"messages": [{"role": "user", "content": "easy"}]}
    attempts = [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": bad}]}, {}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "easy"}], "model": bad}, {}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "easy"}], "metadata": {"task": bad}}, {}),
        ("/v1/chat/completions", chat, {"x-request-id": b"\xed\xa0\x80"}),  # a surrogate's UTF-8-like bytes
        ("/v1/chat/completions", chat, {"X-RouteNLP-Task": b"\xff"}),
        ("/v1/completions", {"prompt": bad}, {}),
        ("/v1/feedback", {"request_id": bad, "accepted": True}, QA),
        ("/v1/feedback", {"request_id": "x", "accepted": True, "tier": bad}, QA),
        ("/v1/feedback", {"request_id": "x", "accepted": True}, {**QA, "User-Agent": b"\xc0"}),
    ]
    for path, body, headers in attempts:  # json.dumps writes the surrogate as the escape "\ud800"
        status, _, out = request(s.port, "POST", path, body, headers=headers)
        assert status == 400, (path, body, headers, out)
    for i in range(10):
        assert s.chat("easy", headers={"x-request-id": f"later-{i}"})[0] == 200
        assert post(s, "/v1/feedback", {"request_id": f"later-{i}", "accepted": True}, QA)[0] == 202
    wait_for(lambda: {e.request_id for e in s.events() if isinstance(e, RoutingEvent)} == {f"later-{i}"
                                                                                        for i in range(10)})
    assert sum(isinstance(e, FeedbackEvent) and e.labeller == "qa" for e in s.events()) == 10
    assert s.state.events.healthy and s.metric("routenlp_event_log_dropped_total") == 0
    assert request(s.port, "GET", "/readyz")[0] == 200


def test_readyz_is_503_while_the_event_log_cannot_be_written(stack_factory, monkeypatch):
    s = stack_factory()
    s.state.events.retry_delays = (0.01,)
    real = EventLogWriter._write

    def full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(EventLogWriter, "_write", full)
    assert s.chat("easy")[0] == 200  # serving goes on
    wait_for(lambda: not s.state.events.healthy)
    status, _, body = request(s.port, "GET", "/readyz")
    assert status == 503 and "No space left" in json.loads(body)["event_log"]
    assert s.metric("routenlp_event_log_dropped_total", policy="support") == 1
    monkeypatch.setattr(EventLogWriter, "_write", real)  # the volume is back
    s.chat("easy")
    wait_for(lambda: s.state.events.healthy)
    assert request(s.port, "GET", "/readyz")[0] == 200
