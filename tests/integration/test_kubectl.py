"""kubectl against the emulator while the real operator runs: printer columns (server-side Tables from the CRDs)
and `kubectl describe` conditions + events. With ROUTENLP_DOCS_CAPTURE=<file> the captured output is written there
(docs/operator.md shows it)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from kube_emulator.harness import wait_for
from kube_emulator.specs import campaign, external_tier, policy, tier

KUBECTL = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "kubectl"
NS = "docs"


def kubectl(cluster, *args: str) -> str:
    out = subprocess.run([str(KUBECTL), "--kubeconfig", cluster.kubeconfig, "-n", NS, *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.skipif(not KUBECTL.exists(), reason="kubectl is not installed in .venv/bin (routenlp tools kubectl)")
def test_kubectl_get_and_describe(cluster):
    cluster.api.create(cluster.cr_path("modeltiers", NS), tier("small", replicas=2, adapterPolicy="AcceptCampaign"))
    cluster.api.create(cluster.cr_path("modeltiers", NS), tier("medium"))
    cluster.api.create(cluster.cr_path("modeltiers", NS), external_tier("frontier", secret="frontier-key"))
    cluster.api.create(cluster.cr_path("routingpolicies", NS), policy("support", ["small", "medium", "frontier"]))
    cluster.api.create(cluster.cr_path("routingpolicies", NS), policy("legal", ["small", "lawyer-70b"]))
    cluster.api.create(cluster.cr_path("distillationcampaigns", NS), campaign("support-small", "support", "small",
                                                                              "frontier"))
    # The cluster side: medium's pods run; small's second pod waits for a GPU; the router is up; clustering done.
    for name, ready in (("medium", 1), ("support-router", 1)):
        d = wait_for(lambda: cluster.api.get(f"/apis/apps/v1/namespaces/{NS}/deployments/{name}"), what=name)
        cluster.api.patch(f"/apis/apps/v1/namespaces/{NS}/deployments/{name}/status", {"status": {
            "observedGeneration": d["metadata"]["generation"], "replicas": ready, "readyReplicas": ready,
            "updatedReplicas": ready}})
    d = wait_for(lambda: cluster.api.get(f"/apis/apps/v1/namespaces/{NS}/deployments/small"), what="small")
    labels = d["spec"]["template"]["metadata"]["labels"]
    cluster.api.create(f"/api/v1/namespaces/{NS}/pods", {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "small-7d9f-x2k4p", "labels": labels}, "spec": {"containers": [{"name": "vllm", "image": "v"}]}})
    cluster.api.patch(f"/api/v1/namespaces/{NS}/pods/small-7d9f-x2k4p/status", {"status": {"conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}]}})
    cluster.api.patch(f"/apis/apps/v1/namespaces/{NS}/deployments/small/status", {"status": {
        "observedGeneration": 1, "replicas": 2, "readyReplicas": 1, "updatedReplicas": 2}})
    cluster.api.create(f"/api/v1/namespaces/{NS}/secrets", {"apiVersion": "v1", "kind": "Secret", "metadata": {
        "name": "frontier-key"}, "data": {"apiKey": "eA=="}})
    wait_for(lambda: cluster.condition("modeltiers", NS, "small")["reason"] == "InsufficientGPU", what="gpu")
    wait_for(lambda: cluster.condition("modeltiers", NS, "frontier")["status"] == "True", what="frontier")
    wait_for(lambda: cluster.condition("routingpolicies", NS, "support")["reason"] == "TiersNotReady", what="support")
    job = wait_for(lambda: cluster.api.get(f"/apis/batch/v1/namespaces/{NS}/jobs/support-small-r1-clustering-a1"),
                   what="job")
    main = job["spec"]["template"]["spec"]["containers"][0]["name"]
    cluster.api.create(f"/api/v1/namespaces/{NS}/pods", {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "support-small-r1-clustering-a1-5x7hz", "labels": {"job-name": job["metadata"]["name"]}},
        "spec": {"containers": [{"name": main, "image": "t"}]}})
    cluster.api.patch(f"/api/v1/namespaces/{NS}/pods/support-small-r1-clustering-a1-5x7hz/status", {"status": {
        "containerStatuses": [{"name": main, "state": {"terminated": {"exitCode": 0, "message":
                              '{"clusters": [{"id": 4, "size": 318, "costUsd": 41.2}, {"id": 9, "size": 120, "costUsd": 12.7}]}'}}}]}})
    cluster.api.patch(f"/apis/batch/v1/namespaces/{NS}/jobs/{job['metadata']['name']}/status", {"status": {
        "conditions": [{"type": "Complete", "status": "True"}]}})
    wait_for(lambda: cluster.get_cr("distillationcampaigns", NS, "support-small")["status"]["phase"] == "Distilling",
             what="distilling")

    get = kubectl(cluster, "get", "mt,rp,dc")
    wide = kubectl(cluster, "get", "mt", "-o", "wide")
    d_mt = kubectl(cluster, "describe", "mt", "small")
    d_rp = kubectl(cluster, "describe", "rp", "legal")
    d_dc = kubectl(cluster, "describe", "dc", "support-small")
    assert "READY" in get and "REASON" in get and "InsufficientGPU" in get and "MissingTiers" in get
    assert "Distilling" in get and "ENDPOINT" in wide
    assert "InsufficientGPU" in d_mt and "Events:" in d_mt and "Warning" in d_mt
    assert "lawyer-70b" in d_rp and "MissingTiers" in d_rp
    assert "StageSucceeded" in d_dc and "Clustering" in d_dc
    target = os.environ.get("ROUTENLP_DOCS_CAPTURE")
    if target:
        parts = [("kubectl get mt,rp,dc", get), ("kubectl get mt -o wide", wide), ("kubectl describe mt small", d_mt),
                 ("kubectl describe rp legal", d_rp), ("kubectl describe dc support-small", d_dc)]
        Path(target).write_text("".join(f"$ {cmd}\n{out}\n" for cmd, out in parts))
