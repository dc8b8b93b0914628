"""The exact Kubernetes API permissions the operator uses, as data (the Helm chart renders its ClusterRole from it).

Each entry is (apiGroups, resources, verbs) in ClusterRole rule form. tests/integration/test_zz_rbac.py records every
request the real operator (kopf and our own client) makes against the emulator and proves each is allowed by RULES,
and that every verb listed here was used, so the list is sufficient and no wider than needed. Server-side apply of an
object that does not exist yet needs `create` besides `patch`.
"""

from __future__ import annotations

from typing import Any

GROUP = "routenlp.io"

# What the operator always needs.
RULES: list[dict[str, list[str]]] = [
    # The three custom resources: kopf watches them and patches metadata (finalizer, handler progress annotations).
    {"apiGroups": [GROUP], "resources": ["modeltiers", "routingpolicies", "distillationcampaigns"],
     "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": [GROUP], "resources": ["modeltiers/status", "routingpolicies/status",
                                          "distillationcampaigns/status"], "verbs": ["patch"]},
    # Children, applied server-side; deployments/services/configmaps are also watched for drift repair.
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list", "watch", "create", "patch"]},
    {"apiGroups": [""], "resources": ["services", "configmaps"], "verbs": ["list", "watch", "create", "patch"]},
    {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["create", "patch"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["list", "watch", "create", "patch"]},
    # A campaign's distill stage on a distributed engine (resources.distillRunner); its node Jobs are watched above.
    {"apiGroups": ["jobset.x-k8s.io"], "resources": ["jobsets"], "verbs": ["create", "patch"]},
    {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"], "verbs": ["create", "patch"]},
    # NetworkPolicies of tiers and routers (re-applied on every resync, so no watch is needed to repair drift).
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["create", "patch"]},
    # Tier pods (readiness, scheduling reasons, pod IPs for LoRA loading) and stage Job pods (termination message).
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    # kopf's resource discovery follows CRDs being added or removed.
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]},
]

# Checking that the Secrets a ModelTier (API key) or RoutingPolicy (spec.auth) names exist and hold the keys named;
# their values are never read into status or logs. Kept apart from RULES because the chart grants it only in the
# namespaces it is asked to (rbac.secretNamespaces, or the watched namespaces when namespaced): without it the
# operator reports the Secret as not checked and the kubelet holds the pod until the Secret exists.
SECRET_RULES: list[dict[str, list[str]]] = [
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
]

# Only with `--peering NAME` (several replicas; kopf peering picks one active operator), with --all-namespaces: the
# ClusterKopfPeering. tests/integration/test_peering.py checks these are exactly the peering calls kopf makes.
PEERING_RULES: list[dict[str, list[str]]] = [
    {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings"], "verbs": ["list", "watch", "patch"]},
]

# Only with `--peering NAME` and -n/--namespace (the chart's scope namespaced): the KopfPeering in each served
# namespace, granted by a Role there. No `get`: kopf only lists, watches and patches peering objects.
# tests/integration/test_peering.py runs a namespaced replica and checks these are exactly the calls it makes.
NAMESPACED_PEERING_RULES: list[dict[str, list[str]]] = [
    {"apiGroups": ["kopf.dev"], "resources": ["kopfpeerings"], "verbs": ["list", "watch", "patch"]},
]


def allows(rules: list[dict[str, list[str]]], group: str, resource: str, verb: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)


def triples(rules: list[dict[str, list[str]]]) -> set[tuple[str, str, str]]:
    return {(g, res, v) for r in rules for g in r["apiGroups"] for res in r["resources"] for v in r["verbs"]}


def cluster_role(name: str = "routenlp-operator", peering: bool = True) -> dict[str, Any]:
    """The ClusterRole of a cluster-wide (--all-namespaces) install."""
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name},
            "rules": RULES + SECRET_RULES + (PEERING_RULES if peering else [])}
