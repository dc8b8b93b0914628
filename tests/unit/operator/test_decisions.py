"""Pure decisions: campaign state machine, router rollout, tier roll-up, conditions, merge patches, adapters."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from routenlp.api import DistillationCampaign, RoutingPolicy
from routenlp.api.figures import RolloutAnswer
from routenlp.operator import campaign_flow as cm
from routenlp.operator import rollout, status
from routenlp.operator.adapters import WantedAdapter, adapter_path, reconcile_adapters, wanted_adapters

API = "routenlp.io/v1alpha1"
NOW = "2026-11-27T12:00:00Z"


def dc(**spec) -> DistillationCampaign:
    body = {"policyRef": "p", "studentTier": "s", "teacherTier": "t", "maxStageRetries": 1}
    body.update(spec)
    return DistillationCampaign.model_validate({"apiVersion": API, "kind": "DistillationCampaign",
                                                "metadata": {"name": "c"}, "spec": body})


def job(stage: str, attempt: int, state: str, message: str = "") -> cm.JobResult:
    return cm.JobResult(f"c-r1-{stage.lower()}-a{attempt}", stage, attempt, state, message)


# ---------------------------------------------------------------- campaign


def test_campaign_happy_path():
    c = dc()
    step = cm.advance(c, {}, [], NOW, start_reason="Created")
    assert step.status["phase"] == "Clustering" and step.create_job == ("Clustering", 1) and step.status["run"] == 1
    st = step.status
    step = cm.advance(c, st, [job("Clustering", 1, "Running")], NOW)
    assert step.create_job is None and step.status["phase"] == "Clustering"
    step = cm.advance(c, st, [job("Clustering", 1, "Succeeded", '{"clusters": [{"id": 1, "size": 9, "costUsd": 1}]}')], NOW)
    assert step.status["phase"] == "Distilling" and step.create_job == ("Distilling", 1)
    st = step.status
    step = cm.advance(c, st, [job("Distilling", 1, "Succeeded", 'log line\n{"adapter": "a@/x"}')], NOW)
    assert step.status["adapter"] == "a@/x" and step.create_job == ("Evaluating", 1)
    st = step.status
    step = cm.advance(c, st, [job("Evaluating", 1, "Succeeded", '{"qualityBefore": 0.5, "qualityAfter": 0.6}')], NOW)
    assert step.status["metrics"]["qualityGain"] == pytest.approx(0.1) and step.create_job == ("RetrainingRouter", 1)
    st = step.status
    step = cm.advance(c, st, [job("RetrainingRouter", 1, "Succeeded", '{"routerVersion": "v2"}')], NOW)
    assert step.status["phase"] == "RollingOut" and step.status["routerVersion"] == "v2"
    st = step.status
    assert cm.advance(c, st, [], NOW, {"current": "v1"}).status["phase"] == "RollingOut"
    step = cm.advance(c, st, [], NOW, {"current": "v1", "canary": "v2"})
    assert step.status["phase"] == "Succeeded" and step.finished == "Succeeded"


def test_campaign_retries_are_bounded():
    c = dc(maxStageRetries=1)
    st = cm.advance(c, {}, [], NOW, start_reason="Created").status
    step = cm.advance(c, st, [job("Clustering", 1, "Failed", "OOM")], NOW)
    assert step.create_job == ("Clustering", 2) and step.status["phase"] == "Clustering"
    step = cm.advance(c, step.status, [job("Clustering", 1, "Failed"), job("Clustering", 2, "Failed", "OOM again")], NOW)
    assert step.status["phase"] == "Failed" and step.create_job is None and step.finished == "Failed"
    assert "OOM again" in step.status["stages"][0]["message"]


def test_campaign_gate_and_proposed():
    c = dc(autoApply=False, evaluation={"minQualityGain": 0.05})
    st = {"phase": "Evaluating", "run": 1, "stages": [{"stage": "Evaluating", "attempts": 1, "state": "Running"}]}
    step = cm.advance(c, st, [job("Evaluating", 1, "Succeeded", '{"qualityBefore": 0.5, "qualityAfter": 0.52}')], NOW)
    assert step.status["phase"] == "Failed" and step.events[0][1] == "EvaluationGateFailed"
    st = {"phase": "RetrainingRouter", "run": 1, "stages": []}
    step = cm.advance(c, st, [job("RetrainingRouter", 1, "Succeeded", '{"routerVersion": "v3"}')], NOW)
    assert step.status["phase"] == "Proposed"


def test_campaign_reads_the_trainer_summary_shape():
    c = dc()
    st = cm.advance(c, {}, [], NOW, start_reason="Created").status
    msg = 'progress...\n{"stage": "cluster", "status": "Succeeded", "metrics": {"clusters": 3, "failures": 410}}'
    step = cm.advance(c, st, [job("Clustering", 1, "Succeeded", msg)], NOW)
    assert step.status["phase"] == "Distilling" and step.status["clusters"] == []
    assert step.status["stages"][0]["message"] == "3 clusters"
    st = {"phase": "Evaluating", "run": 1, "stages": []}
    msg = '{"stage": "evaluate", "metrics": {"quality_before": 0.4, "quality_after": 0.5, "regression": 0.0}}'
    step = cm.advance(c, st, [job("Evaluating", 1, "Succeeded", msg)], NOW)
    assert step.status["metrics"]["qualityGain"] == pytest.approx(0.1) and step.create_job == ("RetrainingRouter", 1)
    st = {"phase": "RetrainingRouter", "run": 1, "stages": []}
    msg = '{"stage": "publish", "metrics": {"adapter": "c-r1@file:///x/c-r1", "router_version": "c-r1"}}'
    step = cm.advance(c, st, [job("RetrainingRouter", 1, "Succeeded", msg)], NOW)
    assert step.status["adapter"] == "c-r1@file:///x/c-r1" and step.status["routerVersion"] == "c-r1"


def test_campaign_no_clusters_is_a_successful_empty_run():
    c = dc()
    st = cm.advance(c, {}, [], NOW, start_reason="Created").status
    step = cm.advance(c, st, [job("Clustering", 1, "Succeeded", '{"clusters": []}')], NOW)
    assert step.status["phase"] == "Succeeded" and step.events[0][1] == "NothingToDistill"


def test_missing_job_is_recreated():
    c = dc()
    st = {"phase": "Distilling", "run": 1, "stages": [{"stage": "Distilling", "attempts": 2, "state": "Running"}]}
    assert cm.advance(c, st, [], NOW).create_job == ("Distilling", 2)


def test_triggers():
    now = datetime(2026, 11, 27, 12, tzinfo=timezone.utc)
    manual = dc()
    assert cm.should_start(manual, {}, None, now, None, None) == "Created"
    assert cm.should_start(manual, {"phase": "Succeeded", "run": 1}, None, now, None, None) is None
    rerun = dc(trigger={"runId": "b"})
    assert cm.should_start(rerun, {"phase": "Failed", "run": 1}, "a", now, None, None) == "RunIdChanged"
    assert cm.should_start(rerun, {"phase": "Distilling", "run": 1}, "a", now, None, None) is None  # no overlap
    sched = dc(trigger={"mode": "Schedule", "schedule": "0 3 * * *", "cooldown": "1h"})
    last = (now - timedelta(days=1)).isoformat()
    assert cm.should_start(sched, {"phase": "Succeeded", "run": 1, "lastRunTime": last}, None, now, None, None) == "Schedule"
    recent = (now - timedelta(minutes=10)).isoformat()
    assert cm.should_start(sched, {"phase": "Succeeded", "run": 1, "lastRunTime": recent}, None, now, None, None) is None
    esc = dc(trigger={"mode": "EscalationRate", "escalationRateThreshold": 0.3, "cooldown": "1h"})
    assert cm.should_start(esc, {"phase": "Pending"}, None, now, 0.2, None) is None
    assert cm.should_start(esc, {"phase": "Pending"}, None, now, 0.35, None) == "EscalationRate"
    assert cm.should_start(esc, {"phase": "Pending"}, None, now, 0.35, 10) is None  # below minFailures


def test_job_result_reads_termination_message():
    j = {"metadata": {"name": "c-r1-evaluating-a2", "labels": {"routenlp.io/stage": "Evaluating"},
                      "annotations": {"routenlp.io/attempt": "2"}},
         "spec": {"template": {"spec": {"containers": [{"name": "evaluate"}]}}},
         "status": {"conditions": [{"type": "Complete", "status": "True"}], "startTime": "2026-11-27T10:00:00Z",
                    "completionTime": "2026-11-27T10:01:30Z"}}
    pods = [{"status": {"containerStatuses": [{"name": "evaluate", "state": {"terminated": {"message": '{"x": 1}'}}}]}}]
    r = cm.job_result(j, pods)
    assert (r.stage, r.attempt, r.state, r.seconds) == ("Evaluating", 2, "Succeeded", 90.0)
    assert cm.parse_summary(r.message) == {"x": 1}
    assert cm.parse_summary("no json here") == {}
    # a summary whose fields do not validate reads as none: the stage reported nothing usable, the reconcile goes on
    assert cm.stage_result('{"metrics": {"qualityGain": "high"}}') == cm.StageResult()


# ---------------------------------------------------------------- rollout


def rp(**router) -> RoutingPolicy:
    return RoutingPolicy.model_validate({"apiVersion": API, "kind": "RoutingPolicy", "metadata": {"name": "p"},
                                         "spec": {"tiers": [{"name": "a"}], "tasks": [{"name": "t"}],
                                                  "cascade": {"riskLevel": 0.05}, "router": router}})


def test_rollout_canary_promote_and_rollback():
    p = rp(canaryPercent=10, promotionGuard={"minRequests": 100})
    st, _ = rollout.decide(p, {}, "v1", None, NOW)
    assert st["current"] == "v1"
    st, ev = rollout.decide(p, st, "v2", None, NOW)
    assert st["canary"] == "v2" and st["canaryPercent"] == 10 and ev[0][1] == "RouterCanary"
    few = rollout.CanaryStats(50, 0.0, 0.9, 0.9)
    assert rollout.decide(p, st, "v2", few, NOW)[0]["canary"] == "v2"  # not enough requests yet
    bad = rollout.CanaryStats(200, 0.09, 0.9, 0.9)
    rb, ev = rollout.decide(p, st, "v2", bad, NOW)
    assert "canary" not in rb and rb["current"] == "v1" and rb["history"][-1]["reason"] == "ViolationRateAboveRisk"
    assert ev[0][0] == "Warning"
    assert "canary" not in rollout.decide(p, rb, "v2", None, NOW)[0]  # a rolled-back version is not retried
    drop = rollout.CanaryStats(200, 0.01, 0.70, 0.80)
    assert rollout.decide(p, st, "v2", drop, NOW)[0]["history"][-1]["reason"] == "AcceptanceDropped"
    good = rollout.CanaryStats(200, 0.01, 0.80, 0.80)
    pr, _ = rollout.decide(p, st, "v2", good, NOW)
    assert pr["current"] == "v2" and "canary" not in pr and pr["history"][-1]["reason"] == "GuardHeld"


def test_rollout_waits_for_min_labels_before_deciding_on_the_violation_rate():
    """One unacceptable label in three is a rate of 0.33: no evidence either way; the guard waits for minLabels
    (default 30) labels of the risk measure's sample, then decides on the rate."""
    p = rp(canaryPercent=10, promotionGuard={"minRequests": 100})
    assert p.spec.router.promotion_guard.min_labels == 30
    st = rollout.decide(p, rollout.decide(p, {}, "v1", None, NOW)[0], "v2", None, NOW)[0]
    for rate, labels in ((0.33, 3), (0.0, 29)):
        assert rollout.decide(p, st, "v2", rollout.CanaryStats(900, rate, 0.9, 0.9, labels), NOW)[0]["canary"] == "v2"
    assert rollout.decide(p, st, "v2", rollout.CanaryStats(900, 0.0, 0.9, 0.9, 30), NOW)[0]["current"] == "v2"
    rb = rollout.decide(p, st, "v2", rollout.CanaryStats(900, 0.2, 0.9, 0.9, 40), NOW)[0]
    assert rb["history"][-1]["reason"] == "ViolationRateAboveRisk"
    # an acceptance drop needs no labels
    drop = rollout.decide(p, st, "v2", rollout.CanaryStats(900, None, 0.5, 0.9, 0), NOW)[0]
    assert drop["history"][-1]["reason"] == "AcceptanceDropped"
    # the figure comes from the router's answer
    ans = RolloutAnswer.model_validate({"canary": {"version": "v2", "requests": 900, "violationRate": 0.0,
                                                   "riskLabels": 12}, "stable": {}})
    assert rollout.CanaryStats.from_answer(ans, "v2").risk_labels == 12


def test_rollout_pinned_version_is_never_overridden():
    p = rp(version="v0")
    st, _ = rollout.decide(p, {"current": "v1"}, "v5", None, NOW)
    assert st["current"] == "v0" and st["proposed"] == "v5"
    assert [h["action"] for h in st["history"]] == ["Pinned", "Proposed"]


def test_rollout_propose_only():
    st, _ = rollout.decide(rp(), {"current": "v1"}, "v2", None, NOW, propose_only=True)
    assert st["current"] == "v1" and st["proposed"] == "v2" and "canary" not in st


# ---------------------------------------------------------------- tier status, conditions, merge patch


@pytest.mark.parametrize("obs,reason,ok", [
    (status.TierObservation(desired=2, replicas=2, ready=2, updated=2), "PodsReady", True),
    (status.TierObservation(desired=0), "ScaledToZero", True),
    (status.TierObservation(desired=2, replicas=2, ready=0, updated=2,
                            unschedulable_messages=("0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",)),
     "InsufficientGPU", False),
    (status.TierObservation(desired=2, replicas=2, ready=1, updated=1), "Progressing", False),
    (status.TierObservation(desired=2, replicas=2, ready=2, updated=2, deployment_generation_observed=False),
     "Progressing", False),
    (status.TierObservation(desired=2, replicas=2, ready=1, updated=2), "PodsNotReady", False),
])
def test_tier_rollup(obs, reason, ok):
    phase, cond = status.tier_rollup(obs, "nvidia.com/gpu", 3)
    assert cond["reason"] == reason and (cond["status"] == "True") == ok and cond["observedGeneration"] == 3
    assert phase in ("Ready", "Pending", "Progressing", "Degraded")


_RESOLVED = status.condition("TiersResolved", True, "AllTiersFound", "2 tiers resolved")
_ROUTER = status.condition("RouterReady", True, "RouterReady", "2/2 router pods ready")
_TIERS = status.condition("TiersReady", True, "AllTiersReady", "every tier is Ready")


@pytest.mark.parametrize("conds,phase,reason,message", [
    ([_RESOLVED, _ROUTER, _TIERS], "Ready", "Ready", "router serving; every tier Ready"),
    ([status.condition("TiersResolved", False, "MissingTiers", "missing ModelTiers: b")], "Pending", "MissingTiers",
     "missing ModelTiers: b"),
    # auth first: the router cannot start without its Secrets, whatever else is wrong
    ([_RESOLVED, status.condition("RouterReady", False, "RouterNotReady", "0/2 router pods ready, 0 updated"),
      status.condition("AuthSecretsFound", False, "SecretNotFound", "Secret 'k' does not exist"),
      status.condition("TiersReady", False, "TiersNotReady", "not ready: b")], "Failed", "SecretNotFound",
     "Secret 'k' does not exist"),
    ([_RESOLVED, status.condition("RouterReady", False, "RouterNotReady", "0/2 router pods ready, 0 updated"),
      status.condition("TiersReady", False, "TiersNotReady", "not ready: b")], "Progressing", "RouterNotReady",
     "0/2 router pods ready, 0 updated"),
    ([_RESOLVED, _ROUTER, status.condition("TiersReady", False, "TiersNotReady", "not ready: b")], "Degraded",
     "TiersNotReady", "not ready: b"),
    # a Secret the operator may not read does not hold Ready back (the kubelet checks it)
    ([_RESOLVED, _ROUTER, status.condition("AuthSecretsFound", None, "SecretNotChecked", "not checked"), _TIERS],
     "Ready", "Ready", "router serving; every tier Ready"),
])
def test_policy_rollup(conds, phase, reason, message):
    got_phase, ready = status.policy_rollup(conds, 4)
    assert (got_phase, ready["type"], ready["reason"], ready["message"]) == (phase, "Ready", reason, message)
    assert ready["status"] == ("True" if phase == "Ready" else "False") and ready["observedGeneration"] == 4


def test_conditions_keep_transition_time():
    c1 = status.merge_conditions([], [status.condition("Ready", False, "A")], "t1")
    c2 = status.merge_conditions(c1, [status.condition("Ready", False, "B", "other")], "t2")
    c3 = status.merge_conditions(c2, [status.condition("Ready", True, "C")], "t3")
    assert c2[0]["lastTransitionTime"] == "t1" and c3[0]["lastTransitionTime"] == "t3"


def test_merge_patch():
    old = {"phase": "Ready", "router": {"current": "v1", "canary": "v2"}, "costReduction": 0.4}
    assert status.merge_patch(old, {"phase": "Ready", "router": {"current": "v2"}}) == {"router": {"current": "v2", "canary": None}}
    assert status.merge_patch(old, {"phase": "Ready"}) == {}


# ---------------------------------------------------------------- adapters


class Pods:
    def __init__(self, models, broken=()):
        self.models, self.broken = models, set(broken)

    async def get_json(self, url):
        ip = url.split("//")[1].split(":")[0]
        if ip not in self.models:
            raise ConnectionError("refused")
        return {"data": [{"id": m} for m in self.models[ip]]}

    async def post_json(self, url, body):
        ip = url.split("//")[1].split(":")[0]
        if body["lora_name"] not in self.broken:
            self.models[ip].add(body["lora_name"])
        return 200, "ok"


async def test_adapters_verified_per_pod():
    pods = Pods({"1.1.1.1": {"base"}, "1.1.1.2": {"base"}}, broken={"bad"})
    wanted = [WantedAdapter("good", "/a/good", "Spec"), WantedAdapter("bad", "/a/bad", "Spec")]
    out = {a["name"]: a for a in await reconcile_adapters(pods, ["1.1.1.1", "1.1.1.2", "1.1.1.3"], wanted, None)}
    assert out["good"]["loadedPods"] == 2 and out["good"]["loaded"] is False  # the third pod is unreachable
    assert "1.1.1.3" in out["good"]["message"]
    out = {a["name"]: a for a in await reconcile_adapters(pods, ["1.1.1.1", "1.1.1.2"], wanted, None)}
    assert out["good"]["loaded"] is True and out["bad"]["loaded"] is False
    none = await reconcile_adapters(pods, [], wanted, None)
    assert none[0]["loaded"] is False and "no ready pods" in none[0]["message"]


def test_adapter_sources():
    assert adapter_path("pvc://cache/adapters/x", "/models") == "/models/adapters/x"
    assert adapter_path("/abs/x", None) == "/abs/x"
    w = wanted_adapters([{"name": "a", "source": "/a"}], [{"name": "a", "source": "/b"}, {"name": "c", "source": "/c"}], True)
    assert [(x.name, x.origin) for x in w] == [("a", "Spec"), ("c", "Campaign")]
    assert [x.name for x in wanted_adapters([], [{"name": "c", "source": "/c"}], False)] == []
