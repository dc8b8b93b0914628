"""RoutingPolicy end to end: tier resolution, router ConfigMap + gateway, config-hash rollout, sidecar webhook,
deprecated fields (admission warnings and a DeprecatedField Event)."""

from __future__ import annotations

import base64
import json
import ssl
import time
import urllib.request

import yaml
from kube_emulator.harness import wait_for
from kube_emulator.specs import external_tier, policy, tier

DEP = "/apis/apps/v1"


def _make_ready(cluster, ns: str, name: str) -> None:
    dep = cluster.api.get(f"{DEP}/namespaces/{ns}/deployments/{name}")
    n = dep["spec"]["replicas"]
    cluster.api.patch(f"{DEP}/namespaces/{ns}/deployments/{name}/status", {"status": {
        "observedGeneration": dep["metadata"]["generation"], "replicas": n, "readyReplicas": n, "updatedReplicas": n}})


def _config(cluster, ns: str, name: str) -> dict:
    cm = cluster.api.get(f"/api/v1/namespaces/{ns}/configmaps/{name}-router-config")
    return yaml.safe_load(cm["data"]["router.yaml"]) if cm else None


def test_missing_tier_then_resolved_renders_router(cluster):
    ns = "rp-resolve"
    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("small"))
    cluster.api.create(cluster.cr_path("routingpolicies", ns), policy("support", ["small", "large"]))
    cond = wait_for(lambda: cluster.condition("routingpolicies", ns, "support", "TiersResolved"), what="TiersResolved")
    assert cond["status"] == "False" and cond["reason"] == "MissingTiers" and "large" in cond["message"]
    st = cluster.get_cr("routingpolicies", ns, "support")["status"]
    assert st["missingTiers"] == ["large"] and st["phase"] == "Pending"
    assert any(e["reason"] == "MissingTiers" for e in cluster.events(ns, "support"))
    assert _config(cluster, ns, "support") is None  # nothing rendered from a partial portfolio

    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("large"))
    wait_for(lambda: cluster.condition("routingpolicies", ns, "support", "TiersResolved")["status"] == "True",
             what="resolved after the tier appears")
    cfg = wait_for(lambda: _config(cluster, ns, "support"), what="router config")
    assert [t["name"] for t in cfg["tiers"]] == ["small", "large"]
    assert cfg["tiers"][0]["baseUrl"] == f"http://small.{ns}.svc:8000/v1"
    assert cfg["policy"] == "support" and cfg["tasks"][0]["name"] == "intent"
    dep = wait_for(lambda: cluster.api.get(f"{DEP}/namespaces/{ns}/deployments/support-router"), what="router")
    assert cluster.api.get(f"/api/v1/namespaces/{ns}/services/support-router")
    assert cluster.api.get(f"/api/v1/namespaces/{ns}/persistentvolumeclaims/support-events")
    st = cluster.get_cr("routingpolicies", ns, "support")["status"]
    assert dep["spec"]["template"]["metadata"]["annotations"]["routenlp.io/config-hash"] == st["configHash"]
    assert st["endpoint"] == f"http://support-router.{ns}.svc:8080/v1"
    # Router not ready yet -> Progressing; then tiers not ready -> Degraded; then all Ready.
    assert cluster.condition("routingpolicies", ns, "support")["reason"] == "RouterNotReady"
    _make_ready(cluster, ns, "support-router")
    wait_for(lambda: cluster.condition("routingpolicies", ns, "support")["reason"] == "TiersNotReady", what="Degraded")
    _make_ready(cluster, ns, "small")
    _make_ready(cluster, ns, "large")
    wait_for(lambda: cluster.condition("routingpolicies", ns, "support")["status"] == "True", what="Ready")
    assert cluster.get_cr("routingpolicies", ns, "support")["status"]["phase"] == "Ready"


def test_config_change_rolls_gateway(cluster):
    ns = "rp-roll"
    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("a"))
    cluster.api.create(cluster.cr_path("modeltiers", ns), external_tier("b", secret=None))
    cluster.api.create(cluster.cr_path("routingpolicies", ns), policy("p", ["a", "b"]))
    dep = wait_for(lambda: cluster.api.get(f"{DEP}/namespaces/{ns}/deployments/p-router"), what="router")
    h1 = dep["spec"]["template"]["metadata"]["annotations"]["routenlp.io/config-hash"]
    cluster.api.patch(cluster.cr_path("routingpolicies", ns, "p"), {"spec": {"cascade": {"riskLevel": 0.02}}})

    def rolled():
        # Other reconciles (a tier's status turning up) may roll the hash first: wait for the one that carries the
        # patched risk level, then the status must name the hash the Deployment carries.
        d = cluster.api.get(f"{DEP}/namespaces/{ns}/deployments/p-router")
        h = d["spec"]["template"]["metadata"]["annotations"]["routenlp.io/config-hash"]
        st = cluster.get_cr("routingpolicies", ns, "p")["status"]
        return (h != h1 and _config(cluster, ns, "p")["cascade"]["riskLevel"] == 0.02
                and st.get("configHash") == h and h)
    assert wait_for(rolled, what="config hash change with the new risk level, in the status")
    # A tier's cost change also reaches the router configuration.
    cluster.api.patch(cluster.cr_path("modeltiers", ns, "b"), {"spec": {"cost": {"inputPerMillion": 5}}})
    wait_for(lambda: _config(cluster, ns, "p")["tiers"][1]["cost"]["inputPerMillion"] == 5, what="tier cost in config")


def test_bad_policy_spec_condition_and_event(cluster):
    ns = "rp-bad"
    bad = policy("dup", ["x", "x"])
    cluster.api.create(cluster.cr_path("routingpolicies", ns), bad)
    cond = wait_for(lambda: cluster.condition("routingpolicies", ns, "dup"), what="condition")
    assert cond["reason"] == "InvalidSpec" and "unique" in cond["message"]
    assert wait_for(lambda: [e for e in cluster.events(ns, "dup") if e["reason"] == "InvalidSpec"], what="event")


def test_router_version_auto_follows_campaign_and_canary_promotes(cluster):
    ns = "rp-rollout"
    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("s"))
    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("t"))
    cluster.api.create(cluster.cr_path("routingpolicies", ns), policy(
        "p", ["s", "t"], router={"version": "auto", "canaryPercent": 20, "promotionGuard": {"minRequests": 100}}))
    wait_for(lambda: cluster.condition("routingpolicies", ns, "p", "TiersResolved"), what="resolved")
    # Two finished campaign runs report versions through their status (the operator never edits the policy spec).
    from datetime import datetime, timedelta, timezone

    from kube_emulator.campaigns import set_earlier_run
    from kube_emulator.specs import campaign
    now = datetime.now(timezone.utc)
    times = [(now - timedelta(hours=h)).strftime("%Y-%m-%dT%H:%M:%SZ") for h in (2, 1)]
    for (name, version), t in zip((("c1", "v1"), ("c2", "v2")), times):
        # Scheduled once a year and just run: no new run starts during the test.
        c = campaign(name, "p", "s", "t", trigger={"mode": "Schedule", "schedule": "0 3 1 1 *"})
        cluster.api.create(cluster.cr_path("distillationcampaigns", ns), c)
        # each version reaches status.router before the next (set_earlier_run: the create-time reconcile's race)
        set_earlier_run(cluster, ns, name, {"phase": "Succeeded", "routerVersion": version, "lastRunTime": t, "run": 1},
                        lambda v=version: v in (cluster.get_cr("routingpolicies", ns, "p")["status"].get("router")
                                                or {}).values(), what=f"{version} in status.router")
        if name == "c1":
            assert cluster.get_cr("routingpolicies", ns, "p")["status"]["router"]["current"] == "v1"
    router = wait_for(lambda: (r := cluster.get_cr("routingpolicies", ns, "p")["status"]["router"]).get("canary") and r,
                      what="canary")
    assert router == {**router, "current": "v1", "canary": "v2", "canaryPercent": 20}
    cfg = _config(cluster, ns, "p")
    assert cfg["router"]["canary"] == "v2" and cfg["router"]["canaryPercent"] == 20
    # The router reports the canary's labelled traffic: guard holds -> promoted.
    cluster.pods.json[f"http://p-router.{ns}.svc:9091/routenlp/rollout"] = {
        "canary": {"requests": 150, "violationRate": 0.01, "acceptanceRate": 0.8},
        "stable": {"requests": 900, "violationRate": 0.02, "acceptanceRate": 0.79, "escalationRate": 0.21,
                   "costReduction": 0.46}}
    router = wait_for(lambda: (r := cluster.get_cr("routingpolicies", ns, "p")["status"]["router"]).get("current") == "v2"
                      and r, what="promotion")
    assert "canary" not in router
    assert [(h["version"], h["action"], h["reason"]) for h in router["history"]] == [
        ("v1", "Promoted", "FirstVersion"), ("v2", "Canary", "20PercentOfTraffic"), ("v2", "Promoted", "GuardHeld")]
    assert cluster.get_cr("routingpolicies", ns, "p")["spec"]["router"]["version"] == "auto"  # spec untouched
    st = wait_for(lambda: (s := cluster.get_cr("routingpolicies", ns, "p")["status"]).get("costReduction") and s,
                  what="observed figures")
    assert (st["costReduction"], st["escalationRate"], st["violationRate"]) == (0.46, 0.21, 0.02)


def _admission_review(cluster, obj: dict, ns: str, path: str = "routenlp-sidecar",
                      resource: tuple[str, str, str, str] = ("", "v1", "Pod", "pods")) -> dict:
    group, version, kind, plural = resource
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "0d3c0c6e-1111-2222-3333-444455556666", "kind": {"group": group, "version": version, "kind": kind},
        "resource": {"group": group, "version": version, "resource": plural}, "namespace": ns, "operation": "CREATE",
        "userInfo": {"username": "test"}, "object": obj, "dryRun": False}}
    ctx = ssl.create_default_context(cafile=cluster.webhook_ca)
    req = urllib.request.Request(f"https://{cluster.webhook_host}:{cluster.webhook_port}/{path}",
                                 data=json.dumps(review).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
        return json.loads(r.read())


def test_sidecar_webhook_injects_router(cluster):
    ns = "rp-sidecar"
    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("s"))
    cluster.api.create(cluster.cr_path("routingpolicies", ns), policy("side", ["s"], mode="sidecar"))
    wait_for(lambda: _config(cluster, ns, "side"), what="config map")
    assert cluster.api.get(f"{DEP}/namespaces/{ns}/deployments/side-router") is None  # no gateway in sidecar mode
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "app", "namespace": ns,
                                                            "labels": {"routenlp.io/policy": "side"}},
           "spec": {"containers": [{"name": "app", "image": "app:1"}]}}

    def patched():
        resp = _admission_review(cluster, pod, ns)["response"]
        return resp.get("patch") and resp
    resp = wait_for(patched, what="webhook patch (index warmed up)")
    assert resp["allowed"] is True and resp["uid"] == "0d3c0c6e-1111-2222-3333-444455556666"
    ops = json.loads(base64.b64decode(resp["patch"]))
    import jsonpatch
    out = jsonpatch.apply_patch(pod, ops)
    names = [c["name"] for c in out["spec"]["containers"]]
    assert names == ["app", "router"]
    router = out["spec"]["containers"][1]
    assert {"name": "router-config", "mountPath": "/etc/routenlp", "readOnly": True} in router["volumeMounts"]
    assert {"name": "router-config", "configMap": {"name": "side-router-config"}} in out["spec"]["volumes"]
    # Labelled as the policy's router, so the tiers' NetworkPolicy (side-tiers) admits the pod.
    assert out["metadata"]["labels"]["routenlp.io/router"] == "side"
    access = cluster.api.get(f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies/side-tiers")
    assert {"podSelector": {"matchLabels": {"routenlp.io/router": "side"}}} in access["spec"]["ingress"][0]["from"]
    assert {p["name"] for p in router["ports"]} == {"router", "admin"} and router["securityContext"][
        "readOnlyRootFilesystem"] is True
    # A pod naming an unknown policy is refused with a reason.
    pod["metadata"]["labels"]["routenlp.io/policy"] = "nope"
    resp = _admission_review(cluster, pod, ns)["response"]
    assert resp["allowed"] is False and "nope" in resp["status"]["message"]


def test_deprecated_labels_serve_as_answers_with_admission_warnings_and_one_event(cluster):
    """`spec.tasks[].labels`, renamed `answers` in v0.2: a policy that still sets it is admitted with kubectl's warning
    (the validating webhook), reconciles as before (router.yaml keeps the `labels` spelling for the previous
    release's routers) and gets one Warning Event `DeprecatedField` for its generation, not one per resync."""
    ns = "rp-deprecated"
    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("s"))
    body = policy("old", ["s"], tasks=[{"name": "intent", "kind": "structured", "labels": ["refund", "card"]}])
    resp = _admission_review(cluster, body, ns, "routenlp-deprecations",
                             ("routenlp.io", "v1alpha1", "RoutingPolicy", "routingpolicies"))["response"]
    assert resp["allowed"] is True and resp["warnings"] == [(
        "spec.tasks[0].labels is deprecated since v0.2: use spec.tasks[0].answers (same meaning); the old name is "
        "accepted until v0.3")]
    cluster.api.create(cluster.cr_path("routingpolicies", ns), body)
    cfg = wait_for(lambda: _config(cluster, ns, "old"), what="router config")
    assert cfg["tasks"][0]["labels"] == ["refund", "card"] and "answers" not in cfg["tasks"][0]
    [event] = wait_for(lambda: [e for e in cluster.events(ns, "old") if e["reason"] == "DeprecatedField"],
                       what="DeprecatedField event")
    assert event["type"] == "Warning" and event["message"] == resp["warnings"][0]
    time.sleep(2.5)  # resyncs every second here: still one Event for the generation
    assert len([e for e in cluster.events(ns, "old") if e["reason"] == "DeprecatedField"]) == 1
