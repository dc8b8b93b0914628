"""Least privilege in the cluster, end to end against the emulator: the operator applies the NetworkPolicies of tiers
and routers with owner references, mounts the policy's auth Secrets into the router and reports them missing,
present, or not readable (403: the chart's default grants no Secret `get`)."""

from __future__ import annotations

import yaml
from kube_emulator.harness import wait_for
from kube_emulator.specs import external_tier, policy, tier

NP = "/apis/networking.k8s.io/v1"
DEP = "/apis/apps/v1"


def _netpol(cluster, ns: str, name: str) -> dict | None:
    return cluster.api.get(f"{NP}/namespaces/{ns}/networkpolicies/{name}")


def test_network_policies_are_applied_and_owned(cluster):
    ns = "sec-netpol"
    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("small"))
    cluster.api.create(cluster.cr_path("modeltiers", ns), external_tier("big", secret=None))
    cluster.api.create(cluster.cr_path("routingpolicies", ns), policy(
        "p", ["small", "big"], deployment={"mode": "gateway", "replicas": 1,
                                           "network": {"allowedClientNamespaces": ["apps"]}}))
    tier_np = wait_for(lambda: _netpol(cluster, ns, "small-tier"), what="the tier's NetworkPolicy")
    router_np = wait_for(lambda: _netpol(cluster, ns, "p-router"), what="the router's NetworkPolicy")
    access_np = wait_for(lambda: _netpol(cluster, ns, "p-tiers"), what="the policy's tier-access NetworkPolicy")
    assert _netpol(cluster, ns, "big-tier") is None  # an external tier has no pods to guard
    small = cluster.get_cr("modeltiers", ns, "small")
    p = cluster.get_cr("routingpolicies", ns, "p")
    assert [(r["kind"], r["uid"]) for r in tier_np["metadata"]["ownerReferences"]] == [
        ("ModelTier", small["metadata"]["uid"])]
    for np in (router_np, access_np):  # deleting the policy garbage-collects them
        assert [(r["kind"], r["uid"]) for r in np["metadata"]["ownerReferences"]] == [
            ("RoutingPolicy", p["metadata"]["uid"])]
    clients = router_np["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchExpressions"][0]
    assert sorted(clients["values"]) == ["apps", ns]
    assert access_np["spec"]["podSelector"]["matchExpressions"][0]["values"] == ["small"]
    # A user's edit is taken back on the next resync (server-side apply by the operator's field manager).
    cluster.api.patch(f"{NP}/namespaces/{ns}/networkpolicies/p-router", {"spec": {"ingress": [{}]}})
    wait_for(lambda: _netpol(cluster, ns, "p-router")["spec"]["ingress"] == router_np["spec"]["ingress"],
             what="drift repaired")


def _config(cluster, ns: str, name: str) -> dict:
    return yaml.safe_load(cluster.api.get(f"/api/v1/namespaces/{ns}/configmaps/{name}-router-config")["data"]
                          ["router.yaml"])


def test_auth_secrets_are_mounted_and_reported(cluster):
    ns = "sec-auth"
    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("small"))
    cluster.api.create(cluster.cr_path("routingpolicies", ns), policy(
        "p", ["small"], auth={"labellersSecret": "labellers", "clientKeysSecret": "client-keys"}))
    cond = wait_for(lambda: cluster.condition("routingpolicies", ns, "p", "AuthSecretsFound"), what="auth condition")
    assert (cond["status"], cond["reason"]) == ("False", "SecretNotFound") and "labellers" in cond["message"]
    ready = cluster.condition("routingpolicies", ns, "p")
    assert (ready["status"], ready["reason"]) == ("False", "SecretNotFound")
    assert cluster.get_cr("routingpolicies", ns, "p")["status"]["phase"] == "Failed"
    assert _config(cluster, ns, "p")["auth"] == {"labellersDir": "/var/run/routenlp/labellers",
                                                 "clientKeysDir": "/var/run/routenlp/client-keys"}
    pod = cluster.api.get(f"{DEP}/namespaces/{ns}/deployments/p-router")["spec"]["template"]["spec"]
    assert {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v} == {"labellers", "client-keys"}

    cluster.api.create(f"/api/v1/namespaces/{ns}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "labellers"}, "data": {"alice": "c2VjcmV0LXRva2Vu"}})
    cluster.api.create(f"/api/v1/namespaces/{ns}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "client-keys"}, "data": {}})
    cond = wait_for(lambda: (c := cluster.condition("routingpolicies", ns, "p", "AuthSecretsFound"))["reason"]
                    == "SecretHasNoKeys" and c, what="empty client-keys Secret")
    assert "client-keys" in cond["message"]
    cluster.api.patch(f"/api/v1/namespaces/{ns}/secrets/client-keys", {"data": {"shop": "c2hvcC1rZXk="}})
    wait_for(lambda: cluster.condition("routingpolicies", ns, "p", "AuthSecretsFound")["status"] == "True",
             what="Secrets found")
    assert cluster.condition("routingpolicies", ns, "p")["reason"] == "RouterNotReady"  # next: the pods
    status = cluster.get_cr("routingpolicies", ns, "p")["status"]
    assert "c2VjcmV0LXRva2Vu" not in str(status) and "secret-token" not in str(status)  # never a value

    cluster.api.patch(cluster.cr_path("routingpolicies", ns, "p"), {"spec": {"auth": None}})
    wait_for(lambda: cluster.condition("routingpolicies", ns, "p", "AuthSecretsFound") is None,
             what="condition gone with spec.auth")


def test_secret_get_forbidden_is_reported_not_checked(cluster, monkeypatch):
    """Without Secret `get` in a namespace (the chart's default cluster-wide install), the external tier and the
    policy say the Secret was not checked instead of failing the reconcile."""
    from routenlp.operator.kube import ApiError, Kube

    real_get = Kube.get

    async def forbidden(self, kind, namespace, name):
        if kind == "Secret" and namespace == "sec-forbidden":
            raise ApiError(403, 'secrets "x" is forbidden')
        return await real_get(self, kind, namespace, name)

    monkeypatch.setattr(Kube, "get", forbidden)
    ns = "sec-forbidden"
    cluster.api.create(cluster.cr_path("modeltiers", ns), external_tier("big", secret="frontier-key"))
    cluster.api.create(cluster.cr_path("routingpolicies", ns), policy("p", ["big"], auth={"labellersSecret": "l"}))
    ready = wait_for(lambda: cluster.condition("modeltiers", ns, "big"), what="tier status")
    assert (ready["status"], ready["reason"]) == ("True", "ExternalEndpoint")
    assert "not checked" in ready["message"] and "rbac.secretNamespaces" in ready["message"]
    cond = wait_for(lambda: cluster.condition("routingpolicies", ns, "p", "AuthSecretsFound"), what="auth condition")
    assert (cond["status"], cond["reason"]) == ("Unknown", "SecretNotChecked")
