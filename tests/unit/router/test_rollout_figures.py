"""GET /routenlp/rollout: per-version figures (pure counters, merge over pods, and the real app over HTTP)."""

import json

import pytest

from routenlp.api.figures import RolloutAnswer, merge
from routenlp.router.figures import RolloutFigures, SpendWindow

from .live import request
from .test_server import QA, calibrated, labeller_dir, stack_factory, wait_for  # noqa: F401  (fixture)


class Clock:
    def __init__(self, t=1_800_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


def test_counters_rates_and_version_windows():
    clock = Clock()
    f = RolloutFigures(clock)
    f.set_versions("v1", None)
    f.answered("v1", True, False, 10.0)
    f.spent("v1", 1.0)
    f.answered("v1", False, True, 10.0)
    f.spent("v1", 1.0)
    f.spent("v1", 10.0)
    for ok in (True, False, True, True):  # user labels of accepted answers
        f.label("v1", ok, accepted=True, sampled=False)
    f.label("v1", False, accepted=False, sampled=False)  # a rejected answer's label is no violation
    a = f.answer()
    s = a["stable"]
    assert (s["version"], s["requests"], s["escalations"]) == ("v1", 2, 1)
    assert (s["acceptanceRate"], s["escalationRate"], s["violationRate"]) == (0.5, 0.5, 0.25)
    assert (s["labelled"], s["violations"], s["riskMeasure"]) == (4, 1, "acceptedAnswers")
    assert s["costReduction"] == pytest.approx(1 - 12 / 20)
    assert a["canary"] is None and a["spentUsd24h"] == 12.0
    f.answered("v9", True, False, 5.0)  # a version no longer served is not counted
    assert f.answer()["stable"]["requests"] == 2
    # canary v2 counts separately; promoting it keeps its figures, the old stable's are dropped
    f.set_versions("v1", "v2")
    f.answered("v2", True, False, 1.0)
    assert f.answer()["canary"]["requests"] == 1 and f.answer()["canary"]["violationRate"] is None
    f.set_versions("v2", None)
    assert f.answer()["stable"]["requests"] == 1 and f.answer()["canary"] is None
    f.set_versions("v3", None)
    empty = f.answer()["stable"]
    assert (empty["requests"], empty["acceptanceRate"], empty["costReduction"]) == (0, None, None)


def test_violation_rate_follows_the_risk_measure():
    """allRequests: over random-sample labels of the requests reaching a cheaper tier, the share accepted there and
    unacceptable (what riskLevel bounds); labels that are not a random sample (user feedback on accepted answers)
    do not enter it. acceptedAnswers: over labels of accepted answers."""
    f = RolloutFigures(Clock(), risk_measure="allRequests")
    f.set_versions("v1", None)
    for ok, accepted in ((False, True), (True, True), (False, False), (True, False), (True, True)):
        f.label("v1", ok, accepted=accepted, sampled=True)
    for _ in range(3):
        f.label("v1", False, accepted=True, sampled=False)  # complaints on accepted answers: a biased sample
    s = f.answer()["stable"]
    assert (s["sampled"], s["sampledViolations"], s["riskMeasure"]) == (5, 1, "allRequests")
    assert s["violationRate"] == pytest.approx(1 / 5)
    assert (s["labelled"], s["violations"]) == (6, 4)
    f.risk_measure = "acceptedAnswers"
    assert f.answer()["stable"]["violationRate"] == pytest.approx(4 / 6)
    # a later label of the same attempt replaces the earlier one (a user correcting the judge)
    f.label("v1", True, accepted=True, sampled=True, attempt=("r1", "small"))
    f.label("v1", False, accepted=True, sampled=True, attempt=("r1", "small"))
    s2 = f.answer()["stable"]
    assert (s2["labelled"], s2["violations"], s2["sampled"], s2["sampledViolations"]) == (7, 5, 6, 2)
    f.risk_measure = "everything"
    with pytest.raises(ValueError):
        f.answer()


def test_spend_window_forgets_after_a_day():
    w = SpendWindow()
    w.add(2.0, 0.0)
    w.add(3.0, 23 * 3600.0)
    assert w.total(23 * 3600.0) == 5.0
    assert w.total(24 * 3600.0 + 120) == 3.0
    assert w.total(48 * 3600.0) == 0.0


def test_merge_sums_counts_and_recomputes_rates():
    a = {"stable": {"version": "v1", "since": "2026-01-02T00:00:00Z", "requests": 100, "accepted": 50,
                    "escalations": 40, "labelled": 10, "violations": 1, "spentUsd": 1.0, "referenceCostUsd": 4.0},
         "canary": None, "spentUsd24h": 1.0}
    b = {"stable": {"version": "v1", "since": "2026-01-01T00:00:00Z", "requests": 300, "accepted": 250,
                    "escalations": 60, "labelled": 30, "violations": 1, "spentUsd": 3.0, "referenceCostUsd": 4.0},
         "canary": {"version": "v2", "requests": 7, "accepted": 7, "escalations": 0, "labelled": 0,
                    "violations": 0, "spentUsd": 0.1, "referenceCostUsd": 1.0}, "spentUsd24h": 3.1}
    m = merged(a, b)
    s = m["stable"]
    assert (s["requests"], s["escalations"], s["pods"], s["since"]) == (400, 100, 2, "2026-01-01T00:00:00Z")
    assert (s["acceptanceRate"], s["escalationRate"], s["violationRate"]) == (0.75, 0.25, 0.05)
    assert s["costReduction"] == 0.5 and m["spentUsd24h"] == pytest.approx(4.1)
    assert m["canary"]["requests"] == 7 and m["canary"]["pods"] == 1
    # under allRequests the merged rate is over the random-sample labels of all pods
    for blk, (n, v) in ((a["stable"], (20, 1)), (b["stable"], (30, 4))):
        blk.update(riskMeasure="allRequests", sampled=n, sampledViolations=v)
    s = merged(a, b)["stable"]
    assert (s["riskMeasure"], s["sampled"], s["violationRate"]) == ("allRequests", 50, 0.1)


def merged(*answers):
    """`merge` over the pods' answers as the operator receives them (JSON)."""
    return merge([RolloutAnswer.model_validate(a) for a in answers]).wire()


def test_rollout_endpoint_over_http(stack_factory, tmp_path):
    s = stack_factory(artifacts=[("v1", {"router": None, "calibration": calibrated()}),
                                 ("v2", {"router": None, "calibration": calibrated()})],
                      router={"current": "v1", "canary": "v2", "canaryPercent": 30},
                      auth={"labellersDir": labeller_dir(tmp_path, qa="qa-token-1")})
    # Find request ids that land on each version (the split is a stable hash of the id).
    from routenlp.router import cascade
    ids = [f"r{i}" for i in range(200)]
    stable_ids = [i for i in ids if cascade.canary_bucket(i) >= 30][:3]
    canary_ids = [i for i in ids if cascade.canary_bucket(i) < 30][:2]
    for rid, text in zip(stable_ids, ["refund easy", "refund medium", "refund hard"]):
        assert s.chat(text, headers={"x-request-id": rid})[1]["x-routenlp-router-version"] == "v1"
    for rid in canary_ids:
        assert s.chat("refund easy", headers={"x-request-id": rid})[1]["x-routenlp-router-version"] == "v2"
    # a labeller's labels: the stable's accepted small answer was wrong, the canary's fine (anonymous ones never count)
    for rid, ok in ((stable_ids[0], False), (canary_ids[0], True)):
        assert request(s.port, "POST", "/v1/feedback", {"request_id": rid, "accepted": ok}, headers=QA)[0] == 202
    assert request(s.port, "POST", "/v1/feedback", {"request_id": stable_ids[0], "accepted": True})[0] == 202
    status, _, body = request(s.port, "GET", "/routenlp/rollout")
    assert status == 200
    a = json.loads(body)
    st, ca = a["stable"], a["canary"]
    assert (st["version"], st["requests"], st["escalations"]) == ("v1", 3, 2)
    assert st["acceptanceRate"] == pytest.approx(1 / 3) and st["escalationRate"] == pytest.approx(2 / 3)
    # judge labels of the escalated requests (medium: small rejected -> not an accepted answer; hard likewise)
    # do not count; only the labeller's label on the accepted small answer does.
    assert (st["labelled"], st["violations"], st["violationRate"]) == (1, 1, 1.0)
    assert (ca["version"], ca["requests"], ca["acceptanceRate"], ca["violationRate"]) == ("v2", 2, 1.0, 0.0)
    # cost: tiers cost 0.1 / 1 / 10 per million tokens; 12 tokens per answer (fake tiers)
    spent = 12 * (0.1 + (0.1 + 1.0) + (0.1 + 1.0 + 10.0)) / 1e6
    assert st["spentUsd"] == pytest.approx(spent) and st["referenceCostUsd"] == pytest.approx(3 * 12 * 10 / 1e6)
    assert st["costReduction"] == pytest.approx(1 - spent / (3 * 12 * 10 / 1e6))
    total = spent + 2 * 12 * 0.1 / 1e6
    assert a["spentUsd24h"] == pytest.approx(total)
    # same definition as the metrics: spend = sum of routenlp_cost_usd_total
    metric_spent = sum(s.metric("routenlp_cost_usd_total", tier=t) or 0 for t in ("small", "medium", "big"))
    assert a["spentUsd24h"] == pytest.approx(metric_spent)


def test_rollout_violation_rate_under_all_requests_over_http(stack_factory, tmp_path):
    """allRequests: the served violationRate is over shadow (random-sample) labels of the requests reaching the cheaper
    tiers; a labeller's complaint about an accepted answer counts as an accepted-answer label but not in that rate."""
    from routenlp.router.artifacts import Calibration
    from routenlp.router.conformal import ALL_REQUESTS, ThresholdResult

    res = ThresholdResult(0.5, 500, 300, 0.01, True)
    cal = Calibration(0.05, 0.1, tasks={"intent": {"small": res, "medium": res}}, risk_measure=ALL_REQUESTS)
    s = stack_factory(artifacts=[("v1", {"router": None, "calibration": cal})], router={"current": "v1"},
                      shadowSampleRate=1.0, cascade={"riskMeasure": ALL_REQUESTS},
                      auth={"labellersDir": labeller_dir(tmp_path, qa="qa-token-1")})
    ids = [f"q{i}" for i in range(3)]
    for rid in ids:
        status, h, _ = s.chat("refund easy", headers={"x-request-id": rid})
        assert status == 200 and h["x-routenlp-tier"] == "small"  # accepted at the cheap tier, then shadowed
    wait_for(lambda: _figures(s)["stable"]["sampled"] == 3)
    assert request(s.port, "POST", "/v1/feedback", {"request_id": ids[0], "accepted": False}, headers=QA)[0] == 202
    st = _figures(s)["stable"]
    assert st["riskMeasure"] == ALL_REQUESTS
    # The shadow judge found every cheap answer right; the labeller's later label of q0's answer replaces the judge's
    # (one label per attempt, as the trainer reads the log): one sampled violation in three, not four labels.
    assert (st["sampled"], st["sampledViolations"], st["violationRate"]) == (3, 1, pytest.approx(1 / 3))
    assert (st["labelled"], st["violations"]) == (3, 1)


def _figures(stack):
    status, _, body = request(stack.port, "GET", "/routenlp/rollout")
    assert status == 200
    return json.loads(body)
