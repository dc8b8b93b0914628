"""What every kind's objects share: labels, names, owner references, pod hardening, scratch space, NetworkPolicies.

Pure: no I/O. Each kind's module (modeltier, routingpolicy, campaign) builds its objects from these.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import kopf

from routenlp.api import ModelTier

FIELD_MANAGER = "routenlp-operator"
MANAGED_BY = {"app.kubernetes.io/managed-by": FIELD_MANAGER}  # on every object the operator writes
VLLM_PORT = 8000
# Root filesystems are read-only: what a process writes goes to emptyDirs (/tmp and this cache directory).
CACHE_DIR = "/var/cache/routenlp"
RUN_AS_USER = 1000
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set on every namespace by the API server

Obj = dict[str, Any]


def labels(component: str, instance: str, **routenlp: str) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "routenlp",
        "app.kubernetes.io/instance": instance,
        "app.kubernetes.io/component": component,
        **MANAGED_BY,
    }
    out.update({f"routenlp.io/{k}": v for k, v in routenlp.items()})
    return out


def selector_labels(component: str, instance: str) -> dict[str, str]:
    """The immutable subset used in Deployment selectors (never add to it: selectors cannot change)."""
    return {"app.kubernetes.io/instance": instance, "app.kubernetes.io/component": component}


def selector_string(sel: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(sel.items()))



def metadata(name: str, namespace: str, owner: Obj, lbls: dict[str, str],
             annotations: dict[str, str] | None = None) -> Obj:
    """Metadata of an owned object: deleting `owner` (the custom resource) garbage-collects it."""
    meta: Obj = {"name": name, "namespace": namespace, "labels": lbls,
                 "ownerReferences": [kopf.build_owner_reference(owner)]}
    if annotations:
        meta["annotations"] = annotations
    return meta


def short_name(*parts: str, limit: int = 63) -> str:
    """Join parts with '-', keeping it a DNS label: too long -> truncated + a stable hash suffix."""
    name = "-".join(parts)
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9].rstrip('-')}-{digest}"


def restricted_security_context() -> Obj:
    return {
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context() -> Obj:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER, "fsGroup": RUN_AS_USER}


def scratch_env() -> list[Obj]:
    """HOME and the XDG caches (Hugging Face, torch, pip...) on the writable emptyDirs, not the read-only root."""
    return [{"name": "HOME", "value": "/tmp"}, {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
            {"name": "XDG_CONFIG_HOME", "value": f"{CACHE_DIR}/config"}]


def scratch_volumes(prefix: str = "") -> tuple[list[Obj], list[Obj]]:
    """(volumes, mounts) of the writable emptyDirs: /tmp and CACHE_DIR. `prefix` keeps their names apart from an
    application's own volumes in a sidecar-injected pod."""
    tmp, cache = f"{prefix}tmp", f"{prefix}cache"
    return ([{"name": tmp, "emptyDir": {}}, {"name": cache, "emptyDir": {}}],
            [{"name": tmp, "mountPath": "/tmp"}, {"name": cache, "mountPath": CACHE_DIR}])


def host_resources(cpu: str | None, memory: str | None, extra: dict[str, str] | None = None) -> Obj:
    limits: dict[str, str] = {}
    requests: dict[str, str] = {}
    if cpu:
        requests["cpu"] = limits["cpu"] = cpu
    if memory:
        requests["memory"] = limits["memory"] = memory
    for k, v in (extra or {}).items():  # extended resources: requests must equal limits
        requests[k] = limits[k] = v
    out: Obj = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out



def tier_endpoint(tier: ModelTier, namespace: str) -> str:
    """Where a tier serves the OpenAI API: its Service, or its external base URL (policies and campaigns call it)."""
    if tier.spec.external is not None:
        return tier.spec.external.base_url.rstrip("/")
    return f"http://{tier.metadata.name}.{namespace}.svc:{VLLM_PORT}/v1"


# ---------------------------------------------------------------- NetworkPolicies

# The chart's operator pod labels without the release name: the default when the operator is not told its own.
DEFAULT_OPERATOR_LABELS = {"app.kubernetes.io/name": "routenlp", "app.kubernetes.io/component": "operator"}


@dataclass(frozen=True)
class NetworkPeers:
    """Who the NetworkPolicies let in besides a policy's routers, clients and campaign Jobs: the operator (LoRA
    loading into tier pods, rollout figures from routers) and the monitoring namespace (router metrics)."""

    operator_namespace: str | None = None  # None: operator pods in any namespace
    operator_labels: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_OPERATOR_LABELS))
    monitoring_namespace: str | None = None  # None: no one scrapes router metrics

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "NetworkPeers | None":
        """From the operator's environment (`routenlp operator` flags, the chart); None = render no NetworkPolicy."""
        if env.get("ROUTENLP_NETWORK_POLICIES", "true").lower() in ("0", "false", "no", "off"):
            return None
        pairs = [p.split("=", 1) for p in env.get("ROUTENLP_OPERATOR_POD_LABELS", "").split(",") if "=" in p]
        return cls(env.get("POD_NAMESPACE") or None, {k.strip(): v.strip() for k, v in pairs} or
                   dict(DEFAULT_OPERATOR_LABELS), env.get("ROUTENLP_MONITORING_NAMESPACE") or None)

    def operator(self) -> Obj:
        namespaces = {"matchLabels": {NAMESPACE_NAME_LABEL: self.operator_namespace}} if self.operator_namespace else {}
        return {"namespaceSelector": namespaces, "podSelector": {"matchLabels": dict(self.operator_labels)}}

    def monitoring(self) -> list[Obj]:
        if not self.monitoring_namespace:
            return []
        return [{"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: self.monitoring_namespace}}}]


def tcp(*ports: int) -> list[Obj]:
    return [{"protocol": "TCP", "port": p} for p in ports]


def network_policy(name: str, namespace: str, owner: Obj, lbls: dict[str, str], pod_selector: Obj,
                   ingress: list[Obj]) -> Obj:
    """Ingress only: the selected pods accept what one of `ingress` allows (and what other policies selecting them
    allow: NetworkPolicies add up). Egress stays open (tiers may be external APIs; DNS)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(name, namespace, owner, lbls),
        "spec": {"podSelector": pod_selector, "policyTypes": ["Ingress"], "ingress": ingress},
    }

