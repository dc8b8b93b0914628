"""The chart and the real operator together: `routenlp operator` started as a process with exactly the arguments,
environment and certificate files the chart's Deployment gives it, against the Kubernetes API emulator
(tests/kube_emulator) loaded with the chart's CRDs and peering object. It must become live, join peering under the
chart's peering name, serve metrics, answer the webhook over TLS that the chart's caBundle trusts for the webhook
Service's DNS name, and reconcile the GitOps dev overlay.

Not covered (the emulator has none of it): RBAC enforcement (tests/integration/test_zz_rbac.py proves RULES are
sufficient), the API server calling the webhook, pods actually running."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from kube_emulator.emulator import Client, EmulatorThread  # noqa: E402
from kube_emulator.harness import free_port, wait_for  # noqa: E402

ROOT = TESTS.parent
MOUNT = "/etc/routenlp/webhook"  # where the chart mounts the webhook Secret


def by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]



@pytest.fixture(scope="module")
def stack(h, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chart-operator")
    health, metrics, webhook = free_port(), free_port(), free_port()
    objs = h.render({"healthPort": health, "metrics": {"enabled": True, "port": metrics},
                     "webhook": {"port": webhook}})
    emu = EmulatorThread().start()
    api = Client(emu.url)
    for crd in by_kind(objs, "CustomResourceDefinition"):  # the chart's CRDs, RouteNLP and kopf.dev
        api.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    secret = by_kind(objs, "Secret")[0]
    for key, value in secret["data"].items():
        (tmp / key).write_bytes(base64.b64decode(value))
    dep = by_kind(objs, "Deployment")[0]
    container = dep["spec"]["template"]["spec"]["containers"][0]
    args = [a.replace(MOUNT, str(tmp)) for a in container["args"]]
    env = dict(os.environ, KUBECONFIG=emu.kubeconfig(str(tmp / "kubeconfig")), POD_ID="rn-routenlp-test-pod",
               POD_NAME="rn-routenlp-test-pod", POD_NAMESPACE=h.NAMESPACE, ROUTENLP_WATCH_TIMEOUT="30")
    assert [e["name"] for e in container["env"]][:3] == ["POD_ID", "POD_NAME", "POD_NAMESPACE"]
    log = open(tmp / "operator.log", "w")
    proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "routenlp"), "operator", *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield {"objs": objs, "api": api, "emu": emu, "ports": (health, metrics, webhook), "proc": proc,
               "log": tmp / "operator.log", "ca": tmp / "ca.crt"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # graceful shutdown, as the kubelet does
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
        emu.stop()


OPERATOR_AGENTS = ("kopf/", "routenlp-operator/")


def _operator_requests(stack) -> set[tuple[str, str, str]]:
    return {(verb, g, res) for ua, verb, g, res, _ in list(stack["emu"].emulator.audit) if ua.startswith(OPERATOR_AGENTS)}


def _alive(stack) -> None:
    assert stack["proc"].poll() is None, stack["log"].read_text()[-3000:]


def test_operator_starts_with_the_chart_arguments_and_peers(stack):
    api = stack["api"]
    health, _, _ = stack["ports"]
    # kopf peering is mandatory with --peering: nothing happens until the chart's hook object exists
    peering = by_kind(stack["objs"], "ClusterKopfPeering")[0]
    api.create("/apis/kopf.dev/v1/clusterkopfpeerings", peering)
    wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=2).status == 200, 60,
             "operator liveness on the chart's healthPort")
    _alive(stack)
    # kopf resumed: it saw its peering object (it ignores objects of other names) and no same-priority peer
    wait_for(lambda: "Resuming operations after the pause" in stack["log"].read_text(), 30, "peering resumed")
    # and it keeps alive in it (the emulator keeps .status out of main-resource writes, so the PATCH is what we see)
    wait_for(lambda: ("patch", "kopf.dev", "clusterkopfpeerings") in _operator_requests(stack), 30, "keep-alive")


def test_metrics_endpoint(stack):
    _, metrics, _ = stack["ports"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5).read().decode()
    assert "routenlp_operator_reconciles_total" in text or "# TYPE routenlp_" in text, text[:500]


def _review(stack, pod: dict, ns: str) -> dict:
    """POST an AdmissionReview to the webhook path the chart configured, trusting only the chart's caBundle and
    checking the certificate for the webhook Service's DNS name."""
    mwc = by_kind(stack["objs"], "MutatingWebhookConfiguration")[0]["webhooks"][0]
    svc = mwc["clientConfig"]["service"]
    ca = base64.b64decode(mwc["clientConfig"]["caBundle"]).decode()
    ctx = ssl.create_default_context(cadata=ca)
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "5f0c6a4e-0000-4000-8000-000000000001", "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"}, "namespace": ns, "operation": "CREATE",
        "userInfo": {"username": "system:serviceaccount:apps:deployer"}, "object": pod, "dryRun": False}}
    body = json.dumps(review).encode()
    host = f"{svc['name']}.{svc['namespace']}.svc"
    with socket.create_connection(("127.0.0.1", stack["ports"][2]), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(f"POST {svc['path']} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    if b"chunked" in head.lower():
        out, rest = b"", payload
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        payload = out
    return json.loads(payload)["response"]


def test_webhook_injects_the_router_over_the_charts_tls(stack):
    api = stack["api"]
    ns = "apps"
    tier = {"apiVersion": "routenlp.io/v1alpha1", "kind": "ModelTier", "metadata": {"name": "frontier"},
            "spec": {"servedModelName": "gpt", "cost": {"inputPerMillion": 1, "outputPerMillion": 2},
                     "external": {"baseUrl": "https://api.example.com/v1", "model": "gpt"}}}
    policy = {"apiVersion": "routenlp.io/v1alpha1", "kind": "RoutingPolicy", "metadata": {"name": "side"},
              "spec": {"tiers": [{"name": "frontier"}], "tasks": [{"name": "t"}],
                       "deployment": {"mode": "sidecar"}}}
    api.create(f"/apis/routenlp.io/v1alpha1/namespaces/{ns}/modeltiers", tier)
    api.create(f"/apis/routenlp.io/v1alpha1/namespaces/{ns}/routingpolicies", policy)
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "app", "namespace": ns, "labels": {"routenlp.io/policy": "side"}},
           "spec": {"containers": [{"name": "app", "image": "app:1"}]}}
    resp = wait_for(lambda: (r := _review(stack, pod, ns)).get("patch") and r, 60, "webhook patch")
    assert resp["allowed"] is True
    ops = json.loads(base64.b64decode(resp["patch"]))
    assert any(op["op"] == "add" and "containers" in op["path"] and
               (op["value"].get("name") == "router" if isinstance(op["value"], dict) else
                any(c.get("name") == "router" for c in op["value"])) for op in ops), ops
    _alive(stack)


def test_gitops_dev_overlay_is_reconciled(h, stack):
    """The dev overlay applied to the emulated cluster: the operator resolves the policy's tiers and makes the tier
    Deployments (no pods run here, so nothing becomes Ready)."""
    api = stack["api"]
    objs = h.docs(h.run(h.tool("kubectl"), "kustomize", str(ROOT / "examples/gitops/portfolio/overlays/dev")).stdout)
    plural = {"ModelTier": "modeltiers", "RoutingPolicy": "routingpolicies", "DistillationCampaign": "distillationcampaigns"}
    for o in objs:
        if o["kind"] in plural:
            api.create(f"/apis/routenlp.io/v1alpha1/namespaces/{o['metadata']['namespace']}/{plural[o['kind']]}", o)

    def resolved():
        rp = api.get("/apis/routenlp.io/v1alpha1/namespaces/routenlp-dev/routingpolicies/assistant") or {}
        conds = {c["type"]: c for c in (rp.get("status") or {}).get("conditions", [])}
        return conds.get("TiersResolved", {}).get("status") == "True" and conds
    conds = wait_for(resolved, 60, "RoutingPolicy assistant TiersResolved")
    assert conds["TiersReady"]["reason"] == "TiersNotReady"  # no pods run in the emulator
    for tier in ("small", "mid", "frontier"):
        mt = wait_for(lambda: (api.get(f"/apis/routenlp.io/v1alpha1/namespaces/routenlp-dev/modeltiers/{tier}")
                               or {}).get("status"), 30, f"status of {tier}")
        assert mt["phase"] in ("Pending", "Progressing"), mt
    _alive(stack)


def test_zz_every_request_of_the_operator_is_allowed_by_the_charts_clusterrole(stack):
    """Everything the real operator did in the tests above (peering, CRD watch, reconciles, status, events) is
    allowed by the ClusterRole the chart renders; so the chart's RBAC is sufficient, not just equal to RULES."""
    used = _operator_requests(stack)
    assert {("watch", "routenlp.io", "routingpolicies"), ("patch", "routenlp.io", "routingpolicies/status"),
            ("create", "apps", "deployments")} <= used, sorted(used)
    rules = by_kind(stack["objs"], "ClusterRole")[0]["rules"]
    allowed = {(v, g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    # server-side apply of an existing object is a PATCH; of a new one the API server needs create + patch
    denied = sorted(t for t in used if t not in allowed)
    assert not denied, f"requests the chart's ClusterRole would deny: {denied}"


RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def restricted_violations(spec: dict) -> list[str]:
    """Pod Security Standard `restricted` (what the prod overlay's namespace enforces), checked on a pod spec."""
    out = []
    psc = spec.get("securityContext") or {}
    if any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")):
        out.append("host namespaces")
    for v in spec.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {v['name']}: {kinds}")
    for c in (spec.get("initContainers") or []) + spec["containers"]:
        sc = c.get("securityContext") or {}
        where = f"container {c['name']}"
        if sc.get("privileged"):
            out.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{where}: allowPrivilegeEscalation not false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []) or set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{where}: capabilities")
        if not (sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True):
            out.append(f"{where}: runAsNonRoot")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            out.append(f"{where}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{where}: seccompProfile {seccomp}")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            out.append(f"{where}: hostPort")
    return out


def test_pss_checker_catches_violations():
    bad = {"containers": [{"name": "c", "securityContext": {"privileged": True}}],
           "volumes": [{"name": "h", "hostPath": {"path": "/"}}]}
    assert len(restricted_violations(bad)) >= 5


def test_zz_operator_pods_meet_restricted_pod_security(h, stack):
    """The prod overlay labels its namespace `pod-security.kubernetes.io/enforce: restricted`: the tier and router
    Deployments the operator made for the dev overlay (same builders) must be admitted there; so must the chart's."""
    api = stack["api"]
    def made():
        items = (api.get("/apis/apps/v1/namespaces/routenlp-dev/deployments") or {}).get("items") or []
        kinds = sorted(d["metadata"]["labels"].get("app.kubernetes.io/component") for d in items)
        return kinds == ["model-tier", "model-tier", "model-tier", "router"] and items
    deps = wait_for(made, 30, "three tier Deployments and a router Deployment")
    problems = {d["metadata"]["name"]: restricted_violations(d["spec"]["template"]["spec"]) for d in deps}
    problems.update({f"chart {name}": restricted_violations(spec) for name, spec in h.pod_specs(stack["objs"])})
    assert not {k: v for k, v in problems.items() if v}, problems
