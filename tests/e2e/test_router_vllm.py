"""The router over HTTP against a real vLLM CPU server (SmolLM2-135M, shared session fixture) and the oracle stand-in
for a frontier model as the reference tier: routing, logprob confidence, escalation on low confidence, hot reload of a
new router artifact, feedback, and tier-down fallback. Router versions are written with the router's own artifact
code; the router picks the newest one up by hot reload."""

from __future__ import annotations

import math
import threading
import time

import pytest
import requests

from routenlp.api import parse
from routenlp.local import banking77 as b77
from routenlp.local.standins import ORACLE, StandinServer
from routenlp.local.threaded import AppThread

TASK = b77.TASK
SMOL, REF = "smollm2", "frontier-oracle"


def _router_config(tiers: list[tuple[str, str, str]], tmp, labels):
    from routenlp.api.router_config import RouterConfig

    policy = parse({
        "apiVersion": "routenlp.io/v1alpha1", "kind": "RoutingPolicy", "metadata": {"name": "e2e"},
        "spec": {"tiers": [{"name": n} for n, _, _ in tiers],
                 "tasks": [{"name": TASK, "kind": "structured", "answers": list(labels)}],
                 "cascade": {"riskLevel": 0.1, "delta": 0.1, "minCalibrationSamples": 1000,
                             "recalibrationInterval": "1h", "maxEscalations": 1},
                 # every request is in the router's exploration sample: uncalibrated cheaper tiers are tried too
                 "feedback": {"shadowSampleRate": 1.0}}})
    costs = {SMOL: {"inputPerMillion": 0.005, "outputPerMillion": 0.02},
             REF: {"inputPerMillion": 2.0, "outputPerMillion": 8.0}}
    return RouterConfig.model_validate({
        "policy": "e2e", "tasks": [t.to_k8s() for t in policy.spec.tasks], "cascade": policy.spec.cascade.to_k8s(),
        "tiers": [{"name": n, "servedModelName": m, "baseUrl": u, "cost": costs[n], "timeoutSeconds": 60}
                  for n, m, u in tiers],
        "router": {"artifactDir": str(tmp / "artifacts")}, "eventLogDir": str(tmp / "events"),
        "shadowSampleRate": policy.spec.feedback.shadow_sample_rate})


def publish(artifact_dir, version: str, smol_threshold: float | None):
    """A router version whose calibration certifies `smol_threshold` for SmolLM2 (None: nothing certified)."""
    from routenlp.router.artifacts import Calibration, save_artifact
    from routenlp.router.conformal import ThresholdResult

    tiers = {} if smol_threshold is None else {
        SMOL: ThresholdResult(smol_threshold, 500, 250, 0.05, True)}
    save_artifact(artifact_dir, version, None, calibration=Calibration(0.1, 0.1, tasks={TASK: tiers}),
                  metadata={"test": "e2e"})


@pytest.fixture(scope="module")
def reference():
    """This module's own oracle stand-in (a test stops it to take the reference tier down)."""
    s = StandinServer(ORACLE, "frontier-oracle").start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def router(vllm_server, reference, tmp_path_factory):
    from routenlp.router import server

    tmp = tmp_path_factory.mktemp("router")
    labels = b77.labels()
    cfg = _router_config([(SMOL, vllm_server.served_model_name, vllm_server.base_url),
                          (REF, "frontier-oracle", reference.base_url)], tmp, labels)
    publish(cfg.router.artifact_dir, "v1", None)
    old = server.RELOAD_SECONDS
    server.RELOAD_SECONDS = 0.3  # hot-reload poll period (module attribute read on every loop)
    app = server.build_app(cfg)
    t = AppThread(app, name="router").start()
    t.state = app[server.STATE] if hasattr(server, "STATE") else app["state"]
    t.cfg, t.labels = cfg, labels
    yield t
    t.stop()
    server.RELOAD_SECONDS = old


@pytest.fixture(scope="module")
def queries():
    return b77.sample("test", 12, seed=7)


def ask(router, ex, **extra):
    r = requests.post(f"{router.url}/v1/chat/completions", headers={"X-RouteNLP-Task": TASK}, timeout=120,
                      json={"model": TASK, "messages": b77.messages(ex.text, router.labels), "max_tokens": 12,
                            "temperature": 0, **extra})
    return r


def event(router, r):
    return router.state.recent[r.headers["x-request-id"]]


def wait_version(router, ex, version, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = ask(router, ex)
        if r.headers.get("x-routenlp-router-version") == version:
            return r
        time.sleep(0.2)
    raise AssertionError(f"router did not load version {version} within {timeout} s")


def test_uncalibrated_vllm_tier_is_explored_then_escalated(router, queries):
    ex = queries[0]
    r = ask(router, ex)
    assert r.status_code == 200, r.text
    assert r.headers["x-routenlp-tier"] == REF
    assert r.headers["x-routenlp-escalations"] == "1"
    assert r.headers["x-routenlp-router-version"] == "v1"
    assert r.json()["choices"][0]["message"]["content"] == ex.label  # the oracle stand-in's gold label
    ev = event(router, r)
    smol, ref = ev.attempts
    assert (smol.tier, smol.model, smol.accepted, smol.threshold) == (SMOL, "smollm2-135m", False, None)
    assert smol.response and smol.input_tokens > 100 and smol.output_tokens >= 1 and smol.cost_usd > 0
    assert ref.tier == REF and ref.accepted and ev.final_tier == REF and ev.outcome == "accepted"
    assert ev.cost_usd == pytest.approx(smol.cost_usd + ref.cost_usd)


def test_logprob_confidence_comes_from_vllm_token_logprobs(router, vllm_server, queries):
    """The score the router gives SmolLM2's answer is the confidence of vLLM's own token logprobs for that answer."""
    from routenlp.router.confidence import answer_features, fallback_score

    ex = queries[1]
    ev = event(router, ask(router, ex))
    direct = requests.post(
        f"{vllm_server.base_url}/chat/completions", timeout=120,
        json={"model": vllm_server.served_model_name, "messages": b77.messages(ex.text, router.labels),
              "max_tokens": 12, "temperature": 0, "logprobs": True}).json()
    lps = [t["logprob"] for t in direct["choices"][0]["logprobs"]["content"]]
    assert direct["choices"][0]["message"]["content"] == ev.attempts[0].response  # greedy: same answer
    expected = fallback_score(answer_features(lps, True, None))
    assert 0 < expected <= 1 and not math.isnan(expected)
    assert ev.attempts[0].score == pytest.approx(expected, rel=0.02, abs=1e-4)


def test_uncalibrated_vllm_tier_is_skipped_outside_exploration(router, queries):
    """Without a certified threshold SmolLM2 can only escalate, so outside the exploration sample it is not called."""
    router.state.config.shadow_sample_rate = 0.0
    try:
        r = ask(router, queries[0])
    finally:
        router.state.config.shadow_sample_rate = 1.0
    assert (r.headers["x-routenlp-tier"], r.headers["x-routenlp-escalations"]) == (REF, "0")
    assert [a.tier for a in event(router, r).attempts] == [REF]


def test_escalates_exactly_the_low_confidence_answers(router, queries):
    # scores of SmolLM2's answers under the uncalibrated version, then a threshold between them
    scores = sorted(event(router, ask(router, ex)).attempts[0].score for ex in queries[:8])
    assert scores[0] < scores[-1], f"SmolLM2's confidences are all equal: {scores}"
    thr = (scores[3] + scores[4]) / 2
    publish(router.cfg.router.artifact_dir, "v2", thr)
    wait_version(router, queries[0], "v2")
    seen = set()
    for ex in queries[:8]:
        r = ask(router, ex)
        ev = event(router, r)
        s = ev.attempts[0].score
        assert ev.attempts[0].threshold == pytest.approx(thr)
        if s >= thr:
            assert (r.headers["x-routenlp-tier"], r.headers["x-routenlp-escalations"]) == (SMOL, "0")
            assert float(r.headers["x-routenlp-confidence"]) == pytest.approx(s, abs=1e-4)
            assert len(ev.attempts) == 1 and ev.attempts[0].accepted
        else:
            assert (r.headers["x-routenlp-tier"], r.headers["x-routenlp-escalations"]) == (REF, "1")
            assert not ev.attempts[0].accepted
        seen.add(ev.final_tier)
    assert seen == {SMOL, REF}, "the threshold should split these answers between the tiers"


def test_hot_reload_serves_every_request(router, queries):
    """A new version is picked up while requests keep flowing; none fails."""
    results, stop = [], threading.Event()

    def traffic():
        i = 0
        while not stop.is_set():
            r = ask(router, queries[i % len(queries)])
            results.append((r.status_code, r.headers.get("x-routenlp-router-version")))
            i += 1

    th = threading.Thread(target=traffic)
    th.start()
    try:
        time.sleep(1.0)
        publish(router.cfg.router.artifact_dir, "v3", 0.0)  # accept every SmolLM2 answer
        r = wait_version(router, queries[0], "v3")
        assert r.headers["x-routenlp-tier"] == SMOL and r.headers["x-routenlp-escalations"] == "0"
        time.sleep(1.0)
    finally:
        stop.set()
        th.join()
    assert results and all(status == 200 for status, _ in results), results
    versions = [v for _, v in results]
    assert "v3" in versions and versions[-1] == "v3"


def test_feedback_is_recorded_in_the_event_log(router, queries):
    from routenlp.router.eventlog import read_events
    from routenlp.router.events import FeedbackEvent

    r = ask(router, queries[2])
    rid = r.headers["x-request-id"]
    fb = requests.post(f"{router.url}/v1/feedback", json={"request_id": rid, "accepted": False, "tier": SMOL},
                       timeout=10)
    assert fb.status_code == 202 and fb.json()["known_request"] is True
    bad = requests.post(f"{router.url}/v1/feedback", json={"request_id": rid, "accepted": "yes"}, timeout=10)
    assert bad.status_code == 400 and "accepted" in bad.json()["error"]["message"]
    router.state.events.flush()
    evs = [e for e in read_events(router.cfg.event_log_dir) if e.request_id == rid]
    assert any(isinstance(e, FeedbackEvent) and e.tier == SMOL and e.accepted is False for e in evs)
    assert any(getattr(e, "type", "") == "request" and e.final_tier == SMOL for e in evs)


def test_reference_tier_down_falls_back_to_vllm(router, reference, queries):
    """Stop the reference tier's server: an answer still comes back (SmolLM2's), marked as a fallback."""
    publish(router.cfg.router.artifact_dir, "v4", 1.01)  # nothing accepted: every request needs the reference
    wait_version(router, queries[0], "v4")
    reference.stop()
    r = ask(router, queries[3])
    assert r.status_code == 200, r.text
    assert r.headers["x-routenlp-tier"] == SMOL
    ev = event(router, r)
    assert ev.attempts[-1].tier == REF and ev.attempts[-1].error
    assert ev.outcome == "fallback"


def test_every_tier_down_is_503_with_retry_after(tmp_path):
    from routenlp.local.vllm import free_port
    from routenlp.router import server

    dead = [f"http://127.0.0.1:{free_port()}/v1" for _ in range(2)]
    cfg = _router_config([(SMOL, "smollm2-135m", dead[0]), (REF, "frontier-oracle", dead[1])], tmp_path,
                         b77.labels())
    with AppThread(server.build_app(cfg), name="dead-router") as t:
        t.labels = cfg.tasks[0].answers
        codes = [ask(t, b77.Example("I lost my card", "lost_or_stolen_card")) for _ in range(6)]
    assert codes[-1].status_code == 503 and int(codes[-1].headers["Retry-After"]) >= 1
    assert "error" in codes[-1].json()


def test_classifier_standin_is_a_real_classifier(banking77_classifier):
    """The encoder-classifier tier answers with labels and logprobs, accurately (trained on the train split only)."""
    exs = b77.sample("test", 60, seed=11)
    correct, probs = 0, []
    for ex in exs:
        body = requests.post(f"{banking77_classifier.base_url}/chat/completions", timeout=30, json={
            "model": "banking77-classifier", "messages": b77.messages(ex.text), "logprobs": True,
            "top_logprobs": 3}).json()
        c = body["choices"][0]
        correct += c["message"]["content"] == ex.label
        tok = c["logprobs"]["content"][0]
        assert len(tok["top_logprobs"]) == 3 and tok["logprob"] <= 0
        probs.append(math.exp(tok["logprob"]))
        assert body["usage"]["prompt_tokens"] > 0
    assert correct / len(exs) >= 0.8, f"accuracy {correct}/{len(exs)}"
    assert min(probs) < max(probs)
