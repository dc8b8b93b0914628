"""ModelTier end to end: real kopf operator over HTTP against the emulator."""

from __future__ import annotations

import json

from kube_emulator.harness import wait_for
from kube_emulator.specs import external_tier, tier

DEP = "/apis/apps/v1"


def _ready_deployment(cluster, ns: str, name: str, replicas: int) -> None:
    """Play the Deployment controller: report `replicas` ready pods of the current generation."""
    dep = cluster.api.get(cluster.core_path(f"{DEP}", ns, f"deployments/{name}"))
    cluster.api.patch(cluster.core_path(DEP, ns, f"deployments/{name}", "status"), {"status": {
        "observedGeneration": dep["metadata"]["generation"], "replicas": replicas, "readyReplicas": replicas,
        "updatedReplicas": replicas, "availableReplicas": replicas}})


def test_create_makes_deployment_and_service_then_ready(cluster):
    ns = "mt-create"
    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("small", replicas=2))
    dep = wait_for(lambda: cluster.api.get(f"{DEP}/namespaces/{ns}/deployments/small"), what="deployment")
    svc = wait_for(lambda: cluster.api.get(f"/api/v1/namespaces/{ns}/services/small"), what="service")
    mt = cluster.get_cr("modeltiers", ns, "small")
    assert dep["metadata"]["ownerReferences"][0]["uid"] == mt["metadata"]["uid"]
    assert dep["metadata"]["labels"]["routenlp.io/tier"] == "small"
    assert dep["spec"]["replicas"] == 2
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    cond = wait_for(lambda: cluster.condition("modeltiers", ns, "small"), what="Ready condition")
    assert cond["status"] == "False" and cond["reason"] == "Progressing"
    _ready_deployment(cluster, ns, "small", 2)
    wait_for(lambda: cluster.condition("modeltiers", ns, "small")["status"] == "True", what="Ready=True")
    st = cluster.get_cr("modeltiers", ns, "small")["status"]
    assert st["phase"] == "Ready" and st["readyReplicas"] == 2
    assert st["endpoint"] == f"http://small.{ns}.svc:8000/v1"
    assert st["selector"]


def test_update_bumps_generation_and_rolls_out(cluster):
    ns = "mt-update"
    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("mid"))
    wait_for(lambda: cluster.api.get(f"{DEP}/namespaces/{ns}/deployments/mid"), what="deployment")
    _ready_deployment(cluster, ns, "mid", 1)
    wait_for(lambda: cluster.condition("modeltiers", ns, "mid")["status"] == "True", what="Ready")
    mt = cluster.api.patch(cluster.cr_path("modeltiers", ns, "mid"),
                           {"spec": {"engine": {"model": "Qwen/Qwen2.5-1.5B-Instruct", "maxModelLen": 4096}}})
    assert mt["metadata"]["generation"] == 2

    def rolled():
        dep = cluster.api.get(f"{DEP}/namespaces/{ns}/deployments/mid")
        args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        return "Qwen/Qwen2.5-1.5B-Instruct" in args and "4096" in args and dep
    dep = wait_for(rolled, what="new vLLM args")
    assert dep["metadata"]["generation"] == 2
    # The Deployment controller has not caught up: the tier reports Progressing for generation 2.
    cond = wait_for(lambda: (c := cluster.condition("modeltiers", ns, "mid")) and c.get("observedGeneration") == 2 and c,
                    what="condition for generation 2")
    assert cond["status"] == "False" and cond["reason"] == "Progressing"
    _ready_deployment(cluster, ns, "mid", 1)
    wait_for(lambda: cluster.condition("modeltiers", ns, "mid")["status"] == "True", what="Ready again")
    assert cluster.get_cr("modeltiers", ns, "mid")["status"]["observedGeneration"] == 2


def test_drift_is_repaired(cluster):
    ns = "mt-drift"
    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("drifty", replicas=2))
    wait_for(lambda: cluster.api.get(f"{DEP}/namespaces/{ns}/deployments/drifty"), what="deployment")
    # Someone edits a field the operator owns...
    cluster.api.patch(f"{DEP}/namespaces/{ns}/deployments/drifty", {"spec": {"replicas": 7}})
    wait_for(lambda: cluster.api.get(f"{DEP}/namespaces/{ns}/deployments/drifty")["spec"]["replicas"] == 2,
             what="replicas restored")
    # ... or deletes an owned object.
    cluster.api.delete(f"/api/v1/namespaces/{ns}/services/drifty")
    wait_for(lambda: cluster.api.get(f"/api/v1/namespaces/{ns}/services/drifty"), what="service recreated")


def test_scale_subresource_sets_replicas(cluster):
    ns = "mt-scale"
    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("scaled"))
    wait_for(lambda: cluster.get_cr("modeltiers", ns, "scaled").get("status", {}).get("selector"), what="selector")
    scale = cluster.api.patch(cluster.cr_path("modeltiers", ns, "scaled", "scale"), {"spec": {"replicas": 3}})
    assert scale["spec"]["replicas"] == 3 and scale["status"]["selector"]
    wait_for(lambda: cluster.api.get(f"{DEP}/namespaces/{ns}/deployments/scaled")["spec"]["replicas"] == 3,
             what="deployment scaled")


def test_insufficient_gpu_is_reported(cluster):
    ns = "mt-gpu"
    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("big"))
    dep = wait_for(lambda: cluster.api.get(f"{DEP}/namespaces/{ns}/deployments/big"), what="deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    cluster.api.create(f"/api/v1/namespaces/{ns}/pods", {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "big-abc", "labels": labels}, "spec": {"containers": [{"name": "vllm", "image": "x"}]}})
    cluster.api.patch(f"/api/v1/namespaces/{ns}/pods/big-abc/status", {"status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}})
    cluster.api.patch(f"{DEP}/namespaces/{ns}/deployments/big/status", {"status": {
        "observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 0}})
    cond = wait_for(lambda: (c := cluster.condition("modeltiers", ns, "big")) and c["reason"] == "InsufficientGPU" and c,
                    what="InsufficientGPU")
    assert cond["status"] == "False" and "Insufficient nvidia.com/gpu" in cond["message"]
    assert any(e["reason"] == "InsufficientGPU" and e["type"] == "Warning" for e in cluster.events(ns, "big"))


def test_bad_spec_gives_condition_and_event(cluster):
    ns = "mt-bad"
    bad = tier("broken")
    bad["spec"]["external"] = {"baseUrl": "https://x.example/v1", "model": "m"}  # engine AND external
    cluster.api.create(cluster.cr_path("modeltiers", ns), bad)
    cond = wait_for(lambda: cluster.condition("modeltiers", ns, "broken"), what="InvalidSpec condition")
    assert cond["status"] == "False" and cond["reason"] == "InvalidSpec"
    assert "exactly one of spec.engine" in cond["message"]
    ev = wait_for(lambda: [e for e in cluster.events(ns, "broken") if e["reason"] == "InvalidSpec"], what="event")
    assert ev[0]["type"] == "Warning"
    assert cluster.api.get(f"{DEP}/namespaces/{ns}/deployments/broken") is None
    # Fixing the spec recovers without restarting anything.
    cluster.api.patch(cluster.cr_path("modeltiers", ns, "broken"), {"spec": {"external": None}})
    wait_for(lambda: cluster.api.get(f"{DEP}/namespaces/{ns}/deployments/broken"), what="deployment after fix")


def test_bad_resource_quantity_is_invalid_spec_before_any_object(cluster):
    """The CRD types quantities as strings; the operator parses them (kubernetes client) before building the
    Deployment, so a typo is the tier's InvalidSpec naming the field, not an API server refusal in its log."""
    ns = "mt-quantity"
    bad = tier("typo", engine={"model": "Qwen/Qwen2.5-0.5B-Instruct", "resources": {"cpu": "2", "memory": "32GB "}})
    cluster.api.create(cluster.cr_path("modeltiers", ns), bad)
    cond = wait_for(lambda: cluster.condition("modeltiers", ns, "typo"), what="InvalidSpec condition")
    assert cond["status"] == "False" and cond["reason"] == "InvalidSpec"
    assert "spec.engine.resources.memory: not a Kubernetes resource quantity (got '32GB ')" in cond["message"]
    ev = wait_for(lambda: [e for e in cluster.events(ns, "typo") if e["reason"] == "InvalidSpec"], what="event")
    assert ev[0]["type"] == "Warning" and "spec.engine.resources.memory" in ev[0]["message"]
    assert cluster.api.get(f"{DEP}/namespaces/{ns}/deployments/typo") is None
    cluster.api.patch(cluster.cr_path("modeltiers", ns, "typo"), {"spec": {"engine": {"resources": {"memory": "32Gi"}}}})
    dep = wait_for(lambda: cluster.api.get(f"{DEP}/namespaces/{ns}/deployments/typo"), what="deployment after fix")
    assert dep["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] == "32Gi"


def test_external_tier_checks_secret(cluster):
    ns = "mt-external"
    cluster.api.create(cluster.cr_path("modeltiers", ns), external_tier("frontier"))
    cond = wait_for(lambda: (c := cluster.condition("modeltiers", ns, "frontier")) and c, what="condition")
    assert cond["status"] == "False" and cond["reason"] == "SecretNotFound"
    cluster.api.create(f"/api/v1/namespaces/{ns}/secrets", {"apiVersion": "v1", "kind": "Secret",
                                                             "metadata": {"name": "frontier-key"},
                                                             "data": {"apiKey": "c2VjcmV0"}})
    wait_for(lambda: cluster.condition("modeltiers", ns, "frontier")["status"] == "True", what="Ready")
    st = cluster.get_cr("modeltiers", ns, "frontier")["status"]
    assert st["endpoint"] == "https://api.example.com/v1" and st["phase"] == "Ready"
    assert cluster.api.get(f"{DEP}/namespaces/{ns}/deployments/frontier") is None
    # The key's value (base64 or plain) never leaves the Secret.
    seen = json.dumps(st) + json.dumps(cluster.events(ns, "frontier"))
    assert "c2VjcmV0" not in seen and '"secret"' not in seen


def test_adapters_loaded_at_runtime_and_verified(cluster):
    ns = "mt-lora"
    spec = tier("student", replicas=2, adapters=[{"name": "billing", "source": "/adapters/billing"},
                                                 {"name": "refunds", "source": "/adapters/refunds"}])
    cluster.api.create(cluster.cr_path("modeltiers", ns), spec)
    dep = wait_for(lambda: cluster.api.get(f"{DEP}/namespaces/{ns}/deployments/student"), what="deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--enable-lora" in args
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    cluster.pods.broken.add("refunds")  # answers 200 to the load but never serves it
    for i, ip in enumerate(["10.9.0.1", "10.9.0.2"]):
        cluster.pods.add_pod(ip, "student")
        cluster.api.create(f"/api/v1/namespaces/{ns}/pods", {"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": f"student-{i}", "labels": labels}, "spec": {"containers": [{"name": "vllm", "image": "x"}]}})
        cluster.api.patch(f"/api/v1/namespaces/{ns}/pods/student-{i}/status", {"status": {
            "phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}})
    _ready_deployment(cluster, ns, "student", 2)

    def adapters():
        st = cluster.get_cr("modeltiers", ns, "student").get("status", {})
        ads = {a["name"]: a for a in st.get("adapters", [])}
        return ads if ads.get("billing", {}).get("loadedPods") == 2 and ads["billing"]["loaded"] else None
    ads = wait_for(adapters, what="billing loaded in both pods")
    assert ads["refunds"]["loaded"] is False and "not listed in /v1/models" in ads["refunds"]["message"]
    assert "billing" in cluster.pods.models["10.9.0.1"] and "billing" in cluster.pods.models["10.9.0.2"]
    cond = cluster.condition("modeltiers", ns, "student", "AdaptersLoaded")
    assert cond["status"] == "False" and "refunds" in cond["message"]


def test_delete_removes_finalizer_and_object(cluster):
    ns = "mt-delete"
    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("gone"))
    wait_for(lambda: cluster.api.get(f"{DEP}/namespaces/{ns}/deployments/gone"), what="deployment")
    mt = wait_for(lambda: (m := cluster.get_cr("modeltiers", ns, "gone")) and m["metadata"].get("finalizers") and m,
                  what="finalizer")
    assert "routenlp.io/operator" in mt["metadata"]["finalizers"]
    cluster.api.delete(cluster.cr_path("modeltiers", ns, "gone"))
    wait_for(lambda: cluster.get_cr("modeltiers", ns, "gone") is None, what="object deleted")
    # Children carry the owner reference: the cluster's garbage collector (not emulated) deletes them.
    dep = cluster.api.get(f"{DEP}/namespaces/{ns}/deployments/gone")
    assert dep["metadata"]["ownerReferences"][0]["uid"] == mt["metadata"]["uid"]
