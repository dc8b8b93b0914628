"""DistillationCampaign state machine driven through the emulator: the test plays the Job controller and the
trainer (a stage's result is the JSON summary in its terminated container's message)."""

from __future__ import annotations

import json

from kube_emulator.harness import wait_for
from kube_emulator.specs import campaign, policy, tier

JOBS = "/apis/batch/v1"


def _setup(cluster, ns: str, **campaign_spec) -> None:
    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("student", adapterPolicy="AcceptCampaign"))
    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("teacher"))
    cluster.api.create(cluster.cr_path("routingpolicies", ns), policy("p", ["student", "teacher"]))
    wait_for(lambda: cluster.condition("routingpolicies", ns, "p", "TiersResolved"), what="policy")
    cluster.api.create(cluster.cr_path("distillationcampaigns", ns), campaign("c", "p", "student", "teacher",
                                                                              **campaign_spec))


def _job(cluster, ns: str, name: str) -> dict:
    return wait_for(lambda: cluster.api.get(f"{JOBS}/namespaces/{ns}/jobs/{name}"), what=f"job {name}")


def _finish(cluster, ns: str, name: str, summary: dict | None, ok: bool = True) -> dict:
    """Play the Job controller + kubelet: a pod whose main container terminated with the stage's summary."""
    job = _job(cluster, ns, name)
    main = job["spec"]["template"]["spec"]["containers"][0]["name"]
    pod = f"{name}-pod"
    cluster.api.create(f"/api/v1/namespaces/{ns}/pods", {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": pod, "labels": {"job-name": name}}, "spec": {"containers": [{"name": main, "image": "t"}]}})
    message = "loading...\n" + (json.dumps(summary) if summary is not None else "Traceback: CUDA out of memory")
    cluster.api.patch(f"/api/v1/namespaces/{ns}/pods/{pod}/status", {"status": {
        "phase": "Succeeded" if ok else "Failed", "containerStatuses": [{"name": main, "state": {"terminated": {
            "exitCode": 0 if ok else 1, "message": message}}}]}})
    cluster.api.patch(f"{JOBS}/namespaces/{ns}/jobs/{name}/status", {"status": {
        "startTime": "2026-11-27T10:00:00Z", "completionTime": "2026-11-27T10:05:00Z",
        "conditions": [{"type": "Complete" if ok else "Failed", "status": "True",
                        **({} if ok else {"reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"})}]}})
    return job


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
