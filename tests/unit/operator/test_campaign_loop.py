"""Pure decisions of the closed loop: a campaign's spec.rollout over the policy's rollout, and campaign rounds."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from routenlp.api import DistillationCampaign, RoutingPolicy
from routenlp.operator import campaign, rollout
from routenlp.operator import campaign_flow as cm

API = "routenlp.io/v1alpha1"
T0, T1, T2 = "2026-11-27T12:00:00Z", "2026-11-27T12:20:00Z", "2026-11-27T12:31:00Z"


def dc(**spec) -> DistillationCampaign:
    body = {"policyRef": "p", "studentTier": "s", "teacherTier": "t", "maxStageRetries": 1}
    body.update(spec)
    return DistillationCampaign.model_validate({"apiVersion": API, "kind": "DistillationCampaign",
                                                "metadata": {"name": "c"}, "spec": body})


def rp(**router) -> RoutingPolicy:
    return RoutingPolicy.model_validate({"apiVersion": API, "kind": "RoutingPolicy", "metadata": {"name": "p"},
                                         "spec": {"tiers": [{"name": "a"}], "tasks": [{"name": "t"}],
                                                  "cascade": {"riskLevel": 0.05}, "router": router}})


def stored(name: str, version: str, time: str, phase: str = "Succeeded", **rollout_spec) -> dict:
    return {"metadata": {"name": name}, "spec": {"policyRef": "p", **({"rollout": rollout_spec} if rollout_spec else {})},
            "status": {"phase": phase, "routerVersion": version, "lastRunTime": time}}


# ---------------------------------------------------------------- spec.rollout


def test_router_offer_is_the_latest_campaign_version_with_its_rollout_settings():
    offer = cm.router_offer([stored("a", "v1", T0), stored("b", "v2", T1, canaryPercent=40, promoteAfter="30m"),
                             stored("x", "v9", T2, phase="Failed"), {**stored("y", "v8", T2), "spec": {"policyRef": "q"}}],
                            "p")
    assert offer == cm.RouterOffer("v2", False, 40, 1800.0)
    assert cm.router_offer([stored("a", "v1", T0)], "p") == cm.RouterOffer("v1", False, None, 0.0)
    assert cm.router_offer([stored("a", "v1", T0, phase="Proposed")], "p").propose_only
    assert cm.router_offer([], "p") == cm.RouterOffer()
    # round 2 is clustering: round 1's version still is what the campaign offers
    assert cm.router_offer([stored("a", "v1", T0, phase="Clustering")], "p").version == "v1"


def test_campaign_canary_percent_overrides_the_policy_for_its_version_only():
    p = rp(canaryPercent=10, promotionGuard={"minRequests": 100})
    st = rollout.decide(p, {}, "v1", None, T0)[0]
    st, ev = rollout.decide(p, st, "v2", None, T0, canary_percent=50)
    assert st["canary"] == "v2" and st["canaryPercent"] == 50 and ev[0][2].endswith("(50PercentOfTraffic)")
    st0 = rollout.decide(p, rollout.decide(p, {}, "v1", None, T0)[0], "v2", None, T0, canary_percent=0)[0]
    assert st0["current"] == "v2" and st0["history"][-1]["reason"] == "NoCanary"
    # without a campaign setting the policy's percent applies
    assert rollout.decide(p, rollout.decide(p, {}, "v1", None, T0)[0], "v2", None, T0)[0]["canaryPercent"] == 10


def test_campaign_promote_after_delays_promotion_but_never_a_rollback():
    p = rp(canaryPercent=10, promotionGuard={"minRequests": 100})
    st = rollout.decide(p, rollout.decide(p, {}, "v1", None, T0)[0], "v2", None, T0, promote_after=1800)[0]
    good = rollout.CanaryStats(900, 0.0, 0.9, 0.9, 100)
    waiting = rollout.decide(p, st, "v2", good, T1, promote_after=1800)[0]  # 20 min of 30
    assert waiting["canary"] == "v2" and "current" in waiting and waiting["current"] == "v1"
    promoted = rollout.decide(p, st, "v2", good, T2, promote_after=1800)[0]  # 31 min
    assert promoted["current"] == "v2" and promoted["history"][-1]["reason"] == "GuardHeld"
    bad = rollout.CanaryStats(900, 0.3, 0.9, 0.9, 100)
    rb = rollout.decide(p, st, "v2", bad, T1, promote_after=1800)[0]
    assert "canary" not in rb and rb["history"][-1]["action"] == "RolledBack"
    # without promoteAfter the guard promotes as soon as it holds (the policy's behaviour)
    assert rollout.decide(p, st, "v2", good, T1)[0]["current"] == "v2"


def test_rollout_fields_default_to_the_policy():
    r = dc().spec.rollout
    assert r.canary_percent is None and r.promote_after is None
    with pytest.raises(ValidationError):
        dc(rollout={"promoteAfter": "half an hour"})


# ---------------------------------------------------------------- rounds


def job(stage: str, state: str, message: str = "", round_: int = 1, attempt: int = 1) -> cm.JobResult:
    return cm.JobResult(f"c-r1-n{round_}-{stage.lower()}-a{attempt}", stage, attempt, state, message, round=round_)


def play_round(c, st: dict, round_: int, version: str, failures: int = 300) -> dict:
    """Every Job stage of one round succeeds; returns the status in RollingOut."""
    summaries = {"Clustering": {"failures": failures, "clusters": [{"id": 0, "size": 40, "costUsd": 3.0},
                                                                   {"id": 1, "size": 20, "costUsd": 1.5}]},
                 "Distilling": {"adapter": f"{version}@/a/{version}"},
                 "Evaluating": {"qualityBefore": 0.3, "qualityAfter": 0.3 + 0.1 * round_},
                 "RetrainingRouter": {"routerVersion": version}}
    import json

    for stage, summary in summaries.items():
        assert st["phase"] == stage
        step = cm.advance(c, st, [job(stage, "Succeeded", json.dumps(summary), round_)], T0)
        st = step.status
    assert st["phase"] == "RollingOut"
    return st


def test_rounds_default_limit_and_clear_messages():
    assert dc().spec.rounds == 1
    assert dc(rounds=3).spec.rounds == 3
    with pytest.raises(ValidationError, match="spec.rounds must be between 1 and 10, got 11"):
        dc(rounds=11)
    with pytest.raises(ValidationError, match="spec.rounds must be between 1 and 10, got 0"):
        dc(rounds=0)
    with pytest.raises(ValidationError, match="autoApply and spec.retrainRouter"):
        dc(rounds=2, autoApply=False)
    with pytest.raises(ValidationError, match="autoApply and spec.retrainRouter"):
        dc(rounds=2, retrainRouter=False)


def test_three_rounds_wait_for_promotion_and_fresh_failures_and_record_figures():
    c = dc(rounds=3, trigger={"minFailures": 100})
    st = cm.advance(c, {}, [], T0, start_reason="Created").status
    assert st["round"] == 1 and st["rounds"] == [{"round": 1, "state": "Running"}]
    st = play_round(c, st, 1, "v1")
    # a canary is live but not promoted: round 1 of 3 waits (a single round would be done here)
    step = cm.advance(c, st, [], T0, {"current": "v0", "canary": "v1"})
    assert step.status["phase"] == "RollingOut" and "promote router version v1" in step.status["stages"][-1]["message"]
    pinned = cm.advance(c, st, [], T0, {"current": "v0", "proposed": "v1"})
    assert pinned.status["phase"] == "RollingOut" and "pin it to go on" in pinned.status["stages"][-1]["message"]
    step = cm.advance(c, st, [], T0, {"current": "v1"})
    assert step.status["phase"] == "Observing" and step.events[0][1] == "RoundRolledOut"
    st = step.status
    assert st["rounds"][0]["state"] == "Succeeded"
    # figures of the OLD stable version (v0) never count for round 1's version
    old = {"figuresVersion": "v0", "escalations": 900, "costReduction": 0.1}
    step = cm.advance(c, st, [], T0, {"current": "v1"}, policy_status=old)
    assert step.status["phase"] == "Observing" and step.create_job is None
    few = {"figuresVersion": "v1", "escalations": 40, "costReduction": 0.2, "violationRate": 0.03}
    step = cm.advance(c, st, [], T0, {"current": "v1"}, policy_status=few)
    assert step.status["phase"] == "Observing" and "40 of 100 escalations" in step.status["stages"][-1]["message"]
    assert step.status["rounds"][0]["costReduction"] == 0.2 and step.status["rounds"][0]["violationRate"] == 0.03
    enough = {"figuresVersion": "v1", "escalations": 150, "costReduction": 0.25}
    step = cm.advance(c, step.status, [], T0, {"current": "v1"}, policy_status=enough)
    assert step.status["phase"] == "Clustering" and step.status["round"] == 2 and step.create_job == ("Clustering", 1)
    assert step.events[0][1] == "RoundStarted" and "150 escalations under router version v1" in step.events[0][2]
    st = step.status
    assert st["routerVersion"] == "v1" and st["adapter"] == "v1@/a/v1"  # round 1's still serve
    assert cm.router_offer([{"spec": {"policyRef": "p"}, "status": st}], "p").version == "v1"
    assert cm.campaign_adapters(st) == [{"name": "v1", "source": "/a/v1"}]
    # round 1's finished Jobs never count for round 2
    assert cm.advance(c, st, [job("Clustering", "Succeeded", "{}", 1)], T0).create_job == ("Clustering", 1)
    st = play_round(c, st, 2, "v2", failures=120)
    # while v2 is a canary the tier serves both adapters (v1 for the stable router, v2 for the canary)
    assert [a["name"] for a in cm.campaign_adapters(st)] == ["v1", "v2"]
    st = cm.advance(c, st, [], T0, {"current": "v2"}).status
    st = cm.advance(c, st, [], T0, {"current": "v2"}, policy_status={"figuresVersion": "v2", "escalations": 100}).status
    assert st["round"] == 3
    st = play_round(c, st, 3, "v3", failures=90)
    step = cm.advance(c, st, [], T0, {"current": "v2", "canary": "v3"})  # the last round: live is enough
    assert step.status["phase"] == "Succeeded" and step.finished == "Succeeded"
    rounds = step.status["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3] and all(r["state"] == "Succeeded" for r in rounds)
    assert [r["failures"] for r in rounds] == [300, 120, 90]
    assert [r["routerVersion"] for r in rounds] == ["v1", "v2", "v3"]
    assert rounds[0]["targetedCostUsd"] == 4.5 and rounds[2]["qualityGain"] == pytest.approx(0.3)


def test_a_rolled_back_round_stops_the_run():
    c = dc(rounds=2)
    st = play_round(c, cm.advance(c, {}, [], T0, start_reason="Created").status, 1, "v1")
    router = {"current": "v0", "history": [{"version": "v1", "action": "RolledBack", "reason": "x", "time": T0}]}
    step = cm.advance(c, st, [], T0, router)
    assert step.status["phase"] == "Failed" and step.finished == "Failed" and step.events[0][1] == "RolledBack"
    assert step.status["rounds"][0]["state"] == "Failed"
    assert cm.campaign_adapters(step.status) == []  # nothing of this run serves


def test_a_failed_gate_in_round_two_keeps_round_one_serving():
    c = dc(rounds=2)
    st = play_round(c, cm.advance(c, {}, [], T0, start_reason="Created").status, 1, "v1")
    st = cm.advance(c, st, [], T0, {"current": "v1"}).status
    st = cm.advance(c, st, [], T0, {"current": "v1"}, policy_status={"figuresVersion": "v1", "escalations": 500}).status
    import json

    st = cm.advance(c, st, [job("Clustering", "Succeeded", json.dumps({"clusters": [{"id": 0, "size": 9}]}), 2)], T0).status
    st = cm.advance(c, st, [job("Distilling", "Succeeded", '{"adapter": "v2@/a/v2"}', 2)], T0).status
    step = cm.advance(c, st, [job("Evaluating", "Succeeded", '{"qualityBefore": 0.6, "qualityAfter": 0.6}', 2)], T0)
    assert step.status["phase"] == "Failed" and step.status["rounds"][1]["state"] == "Failed"
    assert cm.campaign_adapters(step.status) == [{"name": "v1", "source": "/a/v1"}]


def test_round_job_names_and_stage_arguments():
    assert campaign.job_name("c", 1, "Clustering", 1) == "c-r1-clustering-a1"  # round 1: names as before
    assert campaign.job_name("c", 1, "Clustering", 1, 2) == "c-r1-n2-clustering-a1"
    assert campaign.adapter_name("c", 4, 3) == "c-r4-n3"
    ctx = campaign.StageContext(student_model="m", student_url="http://s/v1", student_served_name="s",
                                teacher_url="http://t/v1", teacher_model="t", tiers=("s", "t"), risk_level=0.1,
                                delta=0.1, max_escalations=1)
    c = dc(rounds=3)
    args = campaign.stage_args(c, ctx, "cluster", 4, 3)
    assert args[args.index("--router-version") + 1] == "c-r4-n2" and "/run-4/round-3/cluster" in " ".join(args)
    args = campaign.stage_args(c, ctx, "distill", 4, 2)
    assert args[args.index("--init-adapter") + 1].endswith("/run-4/distill/adapter")  # round 1's work dir
    assert args[args.index("--adapter-name") + 1] == "c-r4-n2"
    assert args[args.index("--budget-split") + 1] == "cost"  # spec.lora.budgetSplit's default
    assert "equal" in campaign.stage_args(dc(lora={"budgetSplit": "equal"}), ctx, "distill", 1)
    args = campaign.stage_args(c, ctx, "evaluate", 4, 2)
    assert args[args.index("--baseline-adapter") + 1].endswith("/run-4/distill/adapter")
    for cmd in ("cluster", "distill", "evaluate"):
        assert not {"--router-version", "--init-adapter", "--baseline-adapter"} & set(campaign.stage_args(c, ctx, cmd, 4))
