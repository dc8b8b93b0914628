"""Campaign helpers for operator tests against the emulator: the test plays the Job controller and the trainer
(a stage's result is the JSON summary in its terminated container's message)."""

from __future__ import annotations

import json
import time

from .harness import wait_for
from .specs import campaign, policy, tier

JOBS = "/apis/batch/v1"


def _setup(cluster, ns: str, student: dict | None = None, **campaign_spec) -> None:
    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("student", adapterPolicy="AcceptCampaign",
                                                               **(student or {})))
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


def set_earlier_run(cluster, ns: str, name: str, status: dict, until, what: str, timeout: float = 60.0):
    """Give campaign `name` the status an earlier run left, and wait for `until()`. The operator's create-time
    reconcile may read the campaign before this patch and write its own status after it (its status merge patch
    carries no resourceVersion precondition, so the API server takes it), so the patch is repeated until `until()`
    holds: repeating it is harmless when the reconcile was merely slow."""
    deadline = time.monotonic() + timeout
    while True:
        cluster.api.patch(cluster.cr_path("distillationcampaigns", ns, name, "status"), {"status": status})
        try:
            return wait_for(until, timeout=min(10.0, max(deadline - time.monotonic(), 0.1)), what=what)
        except AssertionError:
            if time.monotonic() >= deadline:
                raise
