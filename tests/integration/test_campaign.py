"""DistillationCampaign state machine driven through the emulator: the test plays the Job controller and the
trainer (a stage's result is the JSON summary in its terminated container's message)."""

from __future__ import annotations

import time

from kube_emulator.campaigns import JOBS, _finish, _job, _setup, set_earlier_run
from kube_emulator.harness import wait_for
from kube_emulator.specs import campaign, policy, tier


def _phase(cluster, ns: str, phase: str) -> dict:
    return wait_for(lambda: (c := cluster.get_cr("distillationcampaigns", ns, "c")).get("status", {}).get("phase") == phase
                    and c, what=f"phase {phase}")


def test_campaign_runs_all_stages_and_rolls_out(cluster):
    ns = "dc-full"
    _setup(cluster, ns)
    job = _job(cluster, ns, "c-r1-clustering-a1")
    tpl = job["spec"]["template"]["spec"]
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["activeDeadlineSeconds"] == 6 * 3600
    assert tpl["containers"][0]["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert tpl["containers"][0]["command"] == ["routenlp", "train", "cluster"]
    assert job["metadata"]["ownerReferences"][0]["kind"] == "DistillationCampaign"
    assert tpl["volumes"][0]["persistentVolumeClaim"]["claimName"] == "p-events"
    assert _phase(cluster, ns, "Clustering")["status"]["run"] == 1

    _finish(cluster, ns, "c-r1-clustering-a1", {"clusters": [
        {"id": 3, "size": 412, "costUsd": 18.5, "examples": ["refund my order"]},
        {"id": 7, "size": 220, "costUsd": 9.1}]})
    job = _job(cluster, ns, "c-r1-distilling-a1")
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    st = _phase(cluster, ns, "Distilling")["status"]
    assert [c["id"] for c in st["clusters"]] == [3, 7]

    _finish(cluster, ns, "c-r1-distilling-a1", None, ok=False)  # first attempt fails: bounded retry
    _job(cluster, ns, "c-r1-distilling-a2")
    stage = wait_for(lambda: next(s for s in cluster.get_cr("distillationcampaigns", ns, "c")["status"]["stages"]
                                  if s["stage"] == "Distilling" and s["attempts"] == 2), what="attempt 2")
    assert "CUDA out of memory" in stage["message"]
    _finish(cluster, ns, "c-r1-distilling-a2", {"adapter": {"name": "student-r1", "source": "pvc://p-events/a/r1"}})

    _job(cluster, ns, "c-r1-evaluating-a1")
    _finish(cluster, ns, "c-r1-evaluating-a1", {"qualityBefore": 0.61, "qualityAfter": 0.74, "regression": 0.0,
                                                "teacherQuality": 0.8})
    job = _job(cluster, ns, "c-r1-retrainingrouter-a1")
    tpl = job["spec"]["template"]["spec"]
    assert [c["name"] for c in tpl["initContainers"]] == ["retrain", "calibrate"]
    assert tpl["containers"][0]["name"] == "publish"
    # The trainer's own summary shape (routenlp.trainer.manifest): figures nested under "metrics".
    _finish(cluster, ns, "c-r1-retrainingrouter-a1", {"stage": "publish", "status": "Succeeded", "skipped": False,
                                                      "metrics": {"adapter": None, "router_version": "r-2026-11-27-1"}})

    c = _phase(cluster, ns, "Succeeded")
    st = c["status"]
    assert st["adapter"] == "student-r1@pvc://p-events/a/r1" and st["routerVersion"] == "r-2026-11-27-1"
    assert abs(st["metrics"]["qualityGain"] - 0.13) < 1e-9
    assert [s["state"] for s in st["stages"]] == ["Succeeded"] * 5
    router = cluster.get_cr("routingpolicies", ns, "p")["status"]["router"]
    assert router["current"] == "r-2026-11-27-1"  # first version: promoted without canary
    adapters = wait_for(lambda: cluster.get_cr("modeltiers", ns, "student")["status"].get("adapters"),
                        what="campaign adapter on the student tier")
    assert adapters[0]["name"] == "student-r1" and adapters[0]["origin"] == "Campaign"
    assert adapters[0]["loaded"] is False  # no vLLM pod is running it: not reported as loaded
    reasons = [e["reason"] for e in cluster.events(ns, "c")]
    assert "RunStarted" in reasons and "StageRetried" in reasons and "RunSucceeded" in reasons


def test_campaign_without_auto_apply_stops_at_proposed(cluster):
    ns = "dc-proposed"
    _setup(cluster, ns, autoApply=False, retrainRouter=False)
    _finish(cluster, ns, "c-r1-clustering-a1", {"clusters": [{"id": 1, "size": 50, "costUsd": 2.0}]})
    _finish(cluster, ns, "c-r1-distilling-a1", {"adapter": "student-r1@/adapters/r1"})
    _finish(cluster, ns, "c-r1-evaluating-a1", {"qualityBefore": 0.5, "qualityAfter": 0.6})
    job = _finish(cluster, ns, "c-r1-retrainingrouter-a1", {"routerVersion": "r9"})
    assert "initContainers" not in job["spec"]["template"]["spec"]  # retrainRouter false: publish only
    c = _phase(cluster, ns, "Proposed")
    assert c["status"]["routerVersion"] == "r9"
    router = wait_for(lambda: cluster.get_cr("routingpolicies", ns, "p")["status"]["router"].get("proposed") and
                      cluster.get_cr("routingpolicies", ns, "p")["status"]["router"], what="proposed version")
    assert router["proposed"] == "r9" and "current" not in router


def test_campaign_gate_failure_and_retry_exhaustion(cluster):
    ns = "dc-fail"
    _setup(cluster, ns)
    _finish(cluster, ns, "c-r1-clustering-a1", {"clusters": [{"id": 1, "size": 50, "costUsd": 2.0}]})
    _finish(cluster, ns, "c-r1-distilling-a1", {"adapter": "a@/x"})
    _finish(cluster, ns, "c-r1-evaluating-a1", {"qualityBefore": 0.5, "qualityAfter": 0.505})
    c = _phase(cluster, ns, "Failed")
    cond = next(x for x in c["status"]["conditions"] if x["type"] == "Ready")
    assert cond["status"] == "False" and "minQualityGain" in cond["message"]
    assert any(e["reason"] == "EvaluationGateFailed" for e in cluster.events(ns, "c"))
    # A new runId starts run 2; both attempts of clustering fail -> Failed after maxStageRetries (1).
    cluster.api.patch(cluster.cr_path("distillationcampaigns", ns, "c"), {"spec": {"trigger": {"runId": "retry-1"}}})
    _finish(cluster, ns, "c-r2-clustering-a1", None, ok=False)
    _finish(cluster, ns, "c-r2-clustering-a2", None, ok=False)
    c = _phase(cluster, ns, "Failed")
    assert c["status"]["run"] == 2
    assert c["status"]["stages"][0]["attempts"] == 2 and c["status"]["stages"][0]["state"] == "Failed"
    assert cluster.api.get(f"{JOBS}/namespaces/{ns}/jobs/c-r2-clustering-a3") is None


def test_campaign_with_missing_policy_waits(cluster):
    ns = "dc-nopolicy"
    cluster.api.create(cluster.cr_path("distillationcampaigns", ns), campaign("c", "ghost", "s", "t"))
    cond = wait_for(lambda: cluster.condition("distillationcampaigns", ns, "c"), what="condition")
    assert cond["reason"] == "PolicyNotFound"
    assert cluster.api.get(f"{JOBS}/namespaces/{ns}/jobs/c-r1-clustering-a1") is None


def _finish_run(cluster, ns: str, run: int, version: str, round_: int = 1, adapter_dir: str = "/adapters") -> None:
    """Play every stage of one round successfully; the round's router version is `version`."""
    prefix = f"c-r{run}" + (f"-n{round_}" if round_ > 1 else "")
    _finish(cluster, ns, f"{prefix}-clustering-a1", {"failures": 300, "clusters": [{"id": 1, "size": 50, "costUsd": 2.0}]})
    _finish(cluster, ns, f"{prefix}-distilling-a1", {"adapter": f"{version}@{adapter_dir}/{version}"})
    _finish(cluster, ns, f"{prefix}-evaluating-a1", {"qualityBefore": 0.5, "qualityAfter": 0.6})
    _finish(cluster, ns, f"{prefix}-retrainingrouter-a1", {"routerVersion": version})


def _policy_router(cluster, ns: str) -> dict:
    return cluster.get_cr("routingpolicies", ns, "p")["status"]["router"]


def _rollout_url(cluster, ns: str) -> str:
    """Where the operator asks the policy's router (through its Service) for its figures."""
    from routenlp.api import RoutingPolicy
    from routenlp.operator import routingpolicy

    policy = RoutingPolicy.model_validate(cluster.get_cr("routingpolicies", ns, "p"))
    return f"{routingpolicy.router_admin_url(policy, f'p-router.{ns}.svc')}/routenlp/rollout"


def _serving_v1(cluster, ns: str) -> None:
    """An earlier campaign's version v1 serves (scheduled once a year: it does not run during the test)."""
    from datetime import datetime, timedelta, timezone

    earlier = (datetime.now(timezone.utc) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    cluster.api.create(cluster.cr_path("distillationcampaigns", ns), campaign(
        "c0", "p", "student", "teacher", trigger={"mode": "Schedule", "schedule": "0 3 1 1 *"}))
    set_earlier_run(cluster, ns, "c0", {"phase": "Succeeded", "routerVersion": "v1", "lastRunTime": earlier, "run": 1},
                    lambda: _policy_router(cluster, ns).get("current") == "v1", what="v1 current")


def test_campaign_rollout_settings_drive_the_canary_of_its_version(cluster):
    """spec.rollout.canaryPercent replaces the policy's 10 % for the campaign's version; promoteAfter holds the
    promotion back although the guard holds, until the campaign's delay has passed."""
    ns = "dc-rollout"
    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("student", adapterPolicy="AcceptCampaign"))
    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("teacher"))
    cluster.api.create(cluster.cr_path("routingpolicies", ns), policy(
        "p", ["student", "teacher"], router={"canaryPercent": 10, "promotionGuard": {"minRequests": 100}}))
    wait_for(lambda: cluster.condition("routingpolicies", ns, "p", "TiersResolved"), what="policy")
    _serving_v1(cluster, ns)
    cluster.api.create(cluster.cr_path("distillationcampaigns", ns), campaign(
        "c", "p", "student", "teacher", rollout={"canaryPercent": 50, "promoteAfter": "1h"}))
    _finish_run(cluster, ns, 1, "v2")
    _phase(cluster, ns, "Succeeded")
    router = wait_for(lambda: (r := _policy_router(cluster, ns)).get("canary") == "v2" and r, what="canary v2")
    assert router["canaryPercent"] == 50 and router["current"] == "v1"
    assert router["history"][-1]["reason"] == "50PercentOfTraffic"
    # The guard holds on the canary's traffic, but the campaign's promoteAfter (1h) has not passed.
    cluster.pods.json[_rollout_url(cluster, ns)] = {
        "canary": {"version": "v2", "requests": 300, "violationRate": 0.0, "riskLabels": 60, "acceptanceRate": 0.8},
        "stable": {"requests": 900, "violationRate": 0.02, "acceptanceRate": 0.79, "costReduction": 0.4}}
    wait_for(lambda: cluster.get_cr("routingpolicies", ns, "p")["status"].get("costReduction"), what="figures read")
    time.sleep(3)  # three more policy resyncs (1 s each) with the guard holding
    router = _policy_router(cluster, ns)
    assert router["canary"] == "v2" and router["current"] == "v1"
    # A shorter delay on the campaign: the policy's next resync promotes.
    cluster.api.patch(cluster.cr_path("distillationcampaigns", ns, "c"), {"spec": {"rollout": {"promoteAfter": "1s"}}})
    router = wait_for(lambda: (r := _policy_router(cluster, ns)).get("current") == "v2" and r, what="promotion")
    assert router["history"][-1]["reason"] == "GuardHeld"


def test_campaign_runs_rounds_on_the_failures_of_the_previous_rounds_router(cluster):
    """rounds: 2. Round 1's version is promoted (the first version: at once), the campaign observes until the
    router reports minFailures escalations under it, then round 2 clusters only those failures, continues round
    1's adapter and rolls out with the canary guard; status keeps per-round figures."""
    ns = "dc-rounds"
    cache = {"engine": {"model": "Qwen/Qwen2.5-0.5B-Instruct", "modelCache": {"claimName": "weights"}}}
    _setup(cluster, ns, student=cache, rounds=2, trigger={"minFailures": 50})
    # publish writes adapters onto the student's model-cache PVC, mounted in the Job (campaign.ADAPTER_MOUNT)
    in_job = "file:///var/lib/routenlp-adapters/adapters"
    _finish_run(cluster, ns, 1, "c-r1", adapter_dir=in_job)
    c = _phase(cluster, ns, "Observing")
    assert c["status"]["round"] == 1 and c["status"]["rounds"][0]["state"] == "Succeeded"
    assert _policy_router(cluster, ns)["current"] == "c-r1"
    rollout_url = _rollout_url(cluster, ns)
    cluster.pods.json[rollout_url] = {"stable": {"version": "c-r1", "requests": 400, "escalations": 20,
                                                 "costReduction": 0.31, "violationRate": 0.04}}
    c = wait_for(lambda: (x := cluster.get_cr("distillationcampaigns", ns, "c"))["status"]["rounds"][0]
                 .get("costReduction") and x, what="round 1 figures")
    assert c["status"]["phase"] == "Observing" and "20 of 50 escalations" in c["status"]["stages"][-1]["message"]
    assert cluster.api.get(f"{JOBS}/namespaces/{ns}/jobs/c-r1-n2-clustering-a1") is None
    cluster.pods.json[rollout_url] = {"stable": {"version": "c-r1", "requests": 900, "escalations": 75,
                                                 "costReduction": 0.33, "violationRate": 0.04}}
    job = _job(cluster, ns, "c-r1-n2-clustering-a1")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--router-version") + 1] == "c-r1"
    assert job["metadata"]["labels"]["routenlp.io/round"] == "2"
    c = _phase(cluster, ns, "Clustering")
    assert c["status"]["round"] == 2 and c["status"]["routerVersion"] == "c-r1"
    # round 1's adapter keeps serving on the student tier while round 2 works
    adapters = wait_for(lambda: cluster.get_cr("modeltiers", ns, "student")["status"].get("adapters"), what="adapter")
    assert [a["name"] for a in adapters] == ["c-r1"]
    assert c["status"]["rounds"][0]["adapter"] == "c-r1@pvc://weights/adapters/c-r1"  # as the tier loads it

    _finish_run(cluster, ns, 1, "c-r1-n2", round_=2, adapter_dir=in_job)
    job = _job(cluster, ns, "c-r1-n2-distilling-a1")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--init-adapter") + 1].endswith("/campaigns/c/run-1/distill/adapter")
    c = _phase(cluster, ns, "Succeeded")  # the last round: its canary being live is enough
    router = _policy_router(cluster, ns)
    assert router["current"] == "c-r1" and router["canary"] == "c-r1-n2"
    st = c["status"]
    assert st["round"] == 2 and [r["routerVersion"] for r in st["rounds"]] == ["c-r1", "c-r1-n2"]
    assert st["rounds"][0]["failures"] == 300 and st["rounds"][0]["costReduction"] == 0.33
    assert st["rounds"][1]["qualityGain"] == 0.1 and st["rounds"][1]["state"] == "Succeeded"
    reasons = [e["reason"] for e in cluster.events(ns, "c")]
    assert "RoundRolledOut" in reasons and "RoundStarted" in reasons


def test_retrain_job_carries_the_tasks_cost_weights_and_every_tiers_relative_price(cluster):
    """A task with costWeight: the operator reads every tier of the policy (not only student and teacher) for their
    prices, so the trainer starts calibration requests as the router will."""
    import json

    ns = "dc-costweight"
    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("student", adapterPolicy="AcceptCampaign"))
    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("teacher", cost={"inputPerMillion": 1.0,
                                                                               "outputPerMillion": 2.0}))
    cluster.api.create(cluster.cr_path("routingpolicies", ns), policy(
        "p", ["student", "teacher"], tasks=[{"name": "intent", "kind": "generation", "costWeight": 0.3}]))
    wait_for(lambda: cluster.condition("routingpolicies", ns, "p", "TiersResolved"), what="policy")
    cluster.api.create(cluster.cr_path("distillationcampaigns", ns), campaign("c", "p", "student", "teacher"))
    _finish(cluster, ns, "c-r1-clustering-a1", {"failures": 300, "clusters": [{"id": 1, "size": 50, "costUsd": 2.0}]})
    _finish(cluster, ns, "c-r1-distilling-a1", {"adapter": "v2@/adapters/v2"})
    _finish(cluster, ns, "c-r1-evaluating-a1", {"qualityBefore": 0.5, "qualityAfter": 0.6})
    args = _job(cluster, ns, "c-r1-retrainingrouter-a1")["spec"]["template"]["spec"]["initContainers"][0]["args"]
    assert json.loads(args[args.index("--cost-weights") + 1]) == {"intent": 0.3}
    # blended 3:1 prices: student 0.125, teacher 1.25 per million tokens
    assert json.loads(args[args.index("--relative-costs") + 1]) == [0.1, 1.0]
