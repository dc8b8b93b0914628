"""Pure builders: a custom resource's spec -> the Kubernetes objects the operator applies.

Nothing here does I/O. Each builder takes the parsed resource (routenlp.api models) plus what the handler observed,
and returns plain dicts ready for server-side apply. Every object gets the app.kubernetes.io/* and routenlp.io/*
labels and an owner reference to the custom resource that made it (so deleting the CR garbage-collects them).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from routenlp.api import API_VERSION, DistillationCampaign, ModelTier, RoutingPolicy
from routenlp.api.common import SecretKeyRef
from routenlp.api.routingpolicy import ALL_NAMESPACES, RiskMeasure
from routenlp.api.router_config import RouterAuth, RouterConfig, RouterVersions, TierEndpoint

FIELD_MANAGER = "routenlp-operator"
VLLM_PORT = 8000
ROUTER_CONFIG_KEY = "router.yaml"
ROUTER_CONFIG_DIR = "/etc/routenlp"
# What the operator tells running routers without restarting them (a ConfigMap outside the config hash; the kubelet
# refreshes the mounted file, the router re-reads it): today the budget's PreferCheaper switch.
ROUTER_STATE_DIR = "/etc/routenlp-state"
ROUTER_STATE_KEY = "state.yaml"
DATA_DIR = "/var/lib/routenlp"  # event log + router versions (the policy's PVC)
# The policy's auth Secrets, mounted read-only into the router (RouterConfig.auth names these directories).
LABELLERS_DIR = "/var/run/routenlp/labellers"
CLIENT_KEYS_DIR = "/var/run/routenlp/client-keys"
# Gateway pods set fsGroup = RUN_AS_USER: the files are root:1000, readable by the router's group only. An application
# pod (sidecar) may set no fsGroup, so there they are readable by all users of the one container that mounts them.
SECRET_FILE_MODE = {"gateway": 0o440, "sidecar": 0o444}
# Root filesystems are read-only: what a process writes goes to emptyDirs (/tmp and this cache directory).
CACHE_DIR = "/var/cache/routenlp"
ROUTER_SCRATCH_PREFIX = "routenlp-"  # the router's emptyDirs are named apart from a sidecar pod's own volumes
RUN_AS_USER = 1000
PRESTOP_SECONDS = 10
# Pods the policy's NetworkPolicies let reach its tiers: its routers (gateway pods and sidecar-injected pods) and its
# campaigns' stage Jobs (student probes). Not `routenlp.io/policy`: that label asks the webhook for a sidecar.
ROUTER_LABEL = "routenlp.io/router"
CAMPAIGN_POLICY_LABEL = "routenlp.io/campaign-policy"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set on every namespace by the API server

Obj = dict[str, Any]


# ---------------------------------------------------------------- metadata


def labels(component: str, instance: str, **routenlp: str) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "routenlp",
        "app.kubernetes.io/instance": instance,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "routenlp-operator",
    }
    out.update({f"routenlp.io/{k}": v for k, v in routenlp.items()})
    return out


def selector_labels(component: str, instance: str) -> dict[str, str]:
    """The immutable subset used in Deployment selectors (never add to it: selectors cannot change)."""
    return {"app.kubernetes.io/instance": instance, "app.kubernetes.io/component": component}


def selector_string(sel: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(sel.items()))


def owner_reference(owner: Obj) -> Obj:
    meta = owner["metadata"]
    return {
        "apiVersion": owner.get("apiVersion", API_VERSION),
        "kind": owner["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(name: str, namespace: str, owner: Obj, lbls: dict[str, str], annotations: dict[str, str] | None = None) -> Obj:
    meta: Obj = {"name": name, "namespace": namespace, "labels": lbls, "ownerReferences": [owner_reference(owner)]}
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


def _host_resources(cpu: str | None, memory: str | None, extra: dict[str, str] | None = None) -> Obj:
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


def _tcp(*ports: int) -> list[Obj]:
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


# ---------------------------------------------------------------- ModelTier


def tier_names(tier: ModelTier) -> dict[str, str]:
    name = tier.metadata.name
    return {"deployment": name, "service": name}


def tier_endpoint(tier: ModelTier, namespace: str) -> str:
    if tier.spec.external is not None:
        return tier.spec.external.base_url.rstrip("/")
    return f"http://{tier_names(tier)['service']}.{namespace}.svc:{VLLM_PORT}/v1"


def tier_selector(tier: ModelTier) -> dict[str, str]:
    return selector_labels("model-tier", tier.metadata.name)


def vllm_args(tier: ModelTier) -> list[str]:
    """`vllm serve` arguments derived from the spec; spec.engine.extraArgs come last so they win."""
    spec, engine = tier.spec, tier.spec.engine
    assert engine is not None
    model = engine.model
    if model.startswith("pvc://"):  # pvc://claim/path -> the path inside the model-cache mount
        mount = engine.model_cache.mount_path if engine.model_cache else "/models"
        model = f"{mount.rstrip('/')}/{model.split('/', 3)[3] if model.count('/') >= 3 else ''}".rstrip("/")
    args = [
        "--model", model,
        "--served-model-name", spec.served_model_name,
        "--host", "0.0.0.0",
        "--port", str(VLLM_PORT),
        "--tensor-parallel-size", str(engine.tensor_parallel_size),
        "--gpu-memory-utilization", str(engine.gpu_memory_utilization),
        "--dtype", engine.dtype,
    ]
    if engine.revision:
        args += ["--revision", engine.revision]
    if engine.max_model_len:
        args += ["--max-model-len", str(engine.max_model_len)]
    if engine.quantization:
        args += ["--quantization", str(engine.quantization)]
    if spec.lora_enabled:
        args += ["--enable-lora", "--max-loras", str(spec.max_loras), "--max-lora-rank", str(spec.max_lora_rank)]
    return args + list(engine.extra_args)


def tier_deployment(tier: ModelTier, owner: Obj, namespace: str) -> Obj:
    spec, engine = tier.spec, tier.spec.engine
    assert engine is not None, "external tiers have no Deployment"
    name = tier.metadata.name
    lbls = labels("model-tier", name, tier=name)
    res = engine.resources
    gpu = {res.gpu_resource_name: str(res.gpu_count)} if res.gpu_count else {}
    env: list[Obj] = [
        {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True" if spec.lora_enabled else "False"},
        {"name": "HF_HOME", "value": f"{engine.model_cache.mount_path}/hf" if engine.model_cache else "/tmp/hf"},
        *scratch_env(),
        # vLLM's own writable paths (compile caches, usage-stats file) default to ~/.cache and ~/.config.
        {"name": "VLLM_CACHE_ROOT", "value": f"{CACHE_DIR}/vllm"},
        {"name": "VLLM_CONFIG_ROOT", "value": f"{CACHE_DIR}/config/vllm"},
        {"name": "TRITON_CACHE_DIR", "value": f"{CACHE_DIR}/triton"},
        {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
    ]
    if engine.hub_token_secret_ref:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": engine.hub_token_secret_ref.name, "key": engine.hub_token_secret_ref.key}}})
    scratch, scratch_mounts = scratch_volumes()
    volumes: list[Obj] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": res.shm_size}}, *scratch]
    mounts: list[Obj] = [{"name": "dshm", "mountPath": "/dev/shm"}, *scratch_mounts]
    if engine.model_cache:
        volumes.append({"name": "model-cache", "persistentVolumeClaim": {
            "claimName": engine.model_cache.claim_name, "readOnly": engine.model_cache.read_only}})
        mounts.append({"name": "model-cache", "mountPath": engine.model_cache.mount_path,
                       "readOnly": engine.model_cache.read_only})
    probe = {"httpGet": {"path": "/health", "port": "http"}}
    container: Obj = {
        "name": "vllm",
        "image": engine.image,
        "command": ["vllm", "serve"],
        "args": vllm_args(tier),
        "ports": [{"name": "http", "containerPort": VLLM_PORT, "protocol": "TCP"}],
        "env": env,
        "resources": _host_resources(res.cpu, res.memory, gpu),
        "volumeMounts": mounts,
        # Weights can take many minutes to load: only the startup probe waits that long.
        "startupProbe": {**probe, "periodSeconds": 10, "failureThreshold": max(1, engine.startup_timeout_seconds // 10)},
        "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {**probe, "periodSeconds": 15, "failureThreshold": 4},
        # Let endpoints drop the pod before vLLM stops taking requests.
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SECONDS}}},
        "securityContext": restricted_security_context(),
    }
    pod_spec: Obj = {
        "containers": [container],
        "volumes": volumes,
        "securityContext": pod_security_context(),
        "terminationGracePeriodSeconds": PRESTOP_SECONDS + 30,
        "automountServiceAccountToken": False,
    }
    if engine.node_selector:
        pod_spec["nodeSelector"] = dict(engine.node_selector)
    if engine.tolerations:
        pod_spec["tolerations"] = [t.to_k8s() for t in engine.tolerations]
    if engine.affinity:
        pod_spec["affinity"] = engine.affinity
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(name, namespace, owner, lbls),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": tier_selector(tier)},
            # GPUs are scarce: replace pods one at a time without surging above the GPU budget.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": {"metadata": {"labels": lbls}, "spec": pod_spec},
        },
    }


def tier_service(tier: ModelTier, owner: Obj, namespace: str) -> Obj:
    name = tier.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(name, namespace, owner, labels("model-tier", name, tier=name)),
        "spec": {
            "type": "ClusterIP",
            "selector": tier_selector(tier),
            "ports": [{"name": "http", "port": VLLM_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def tier_network_policy(tier: ModelTier, owner: Obj, namespace: str, peers: NetworkPeers) -> Obj:
    """Isolates the tier's pods, letting in the operator only; each RoutingPolicy listing the tier adds its routers
    and campaign Jobs with its own NetworkPolicy (policy_tiers_network_policy), owned by the policy."""
    name = tier.metadata.name
    # `-tier`: a policy's NetworkPolicies end in -router / -tiers, so no tier name can collide with them.
    return network_policy(short_name(name, "tier"), namespace, owner, labels("model-tier", name, tier=name),
                          {"matchLabels": tier_selector(tier)},
                          [{"from": [peers.operator()], "ports": _tcp(VLLM_PORT)}])


def tier_objects(tier: ModelTier, owner: Obj, namespace: str, peers: NetworkPeers | None = None) -> list[Obj]:
    if tier.spec.external is not None:
        return []
    objs = [tier_deployment(tier, owner, namespace), tier_service(tier, owner, namespace)]
    return objs + ([tier_network_policy(tier, owner, namespace, peers)] if peers else [])


# ---------------------------------------------------------------- RoutingPolicy


def policy_names(name: str) -> dict[str, str]:
    return {
        "configmap": short_name(name, "router-config"),
        "state": short_name(name, "router-state"),
        "deployment": short_name(name, "router"),
        "service": short_name(name, "router"),
        "pvc": short_name(name, "events"),
        "router-netpol": short_name(name, "router"),
        "tiers-netpol": short_name(name, "tiers"),
    }


def api_key_env(tier_name: str) -> str:
    return "ROUTENLP_API_KEY_" + tier_name.upper().replace("-", "_")


def router_config(policy: RoutingPolicy, tiers: list[ModelTier], namespace: str, versions: Obj | None = None) -> RouterConfig:
    """The router's configuration from the policy and its resolved tiers (in the policy's order)."""
    spec = policy.spec
    endpoints = []
    for t in tiers:
        ext = t.spec.external
        endpoints.append(TierEndpoint(
            name=t.metadata.name,
            served_model_name=ext.model if ext else t.spec.served_model_name,
            base_url=tier_endpoint(t, namespace),
            cost=t.spec.cost,
            api_key_env=api_key_env(t.metadata.name) if ext and ext.api_key_secret_ref else None,
            timeout_seconds=ext.timeout_seconds if ext else 60,
            adapters=[a.name for a in t.spec.adapters],
        ))
    versions = versions or {}
    return RouterConfig(
        policy=policy.metadata.name,
        tiers=endpoints,
        tasks=spec.tasks,
        default_task=spec.default_task,
        unknown_task=spec.unknown_task,
        cascade=spec.cascade,
        router=RouterVersions(
            artifact_dir=f"{DATA_DIR}/routers",
            current=versions.get("current"),
            canary=versions.get("canary"),
            canary_percent=versions.get("canaryPercent", 0) if versions.get("canary") else 0,
        ),
        shadow_sample_rate=spec.feedback.shadow_sample_rate,
        event_log_dir=f"{DATA_DIR}/events",
        state_path=f"{ROUTER_STATE_DIR}/{ROUTER_STATE_KEY}",
        # Directories only: the tokens stay in the Secrets (mounted by router_volumes), never in the ConfigMap.
        auth=RouterAuth(labellers_dir=LABELLERS_DIR if spec.auth.labellers_secret else None,
                        client_keys_dir=CLIENT_KEYS_DIR if spec.auth.client_keys_secret else None),
        admin_port=spec.deployment.admin_port,
    )


def config_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def router_configmap(policy: RoutingPolicy, owner: Obj, namespace: str, config_yaml: str) -> Obj:
    name = policy.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(policy_names(name)["configmap"], namespace, owner, labels("router", name, policy=name),
                             {"routenlp.io/config-hash": config_hash(config_yaml)}),
        "data": {ROUTER_CONFIG_KEY: config_yaml},
    }


def events_pvc(policy: RoutingPolicy, owner: Obj, namespace: str) -> Obj:
    name = policy.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(policy_names(name)["pvc"], namespace, owner, labels("event-log", name, policy=name)),
        "spec": {
            # Gateway replicas and campaign Jobs share it.
            "accessModes": ["ReadWriteMany"],
            "resources": {"requests": {"storage": policy.spec.feedback.event_log_size}},
        },
    }


def events_claim(policy: RoutingPolicy) -> str:
    return policy.spec.feedback.event_log_claim_name or policy_names(policy.metadata.name)["pvc"]


def router_container(policy: RoutingPolicy, tiers: list[ModelTier]) -> Obj:
    dep = policy.spec.deployment
    env: list[Obj] = [{"name": "HF_HUB_OFFLINE", "value": "1"}]
    for t in tiers:
        ref = t.spec.external.api_key_secret_ref if t.spec.external else None
        if ref:  # key read from the Secret by the kubelet; never in the ConfigMap or logs
            env.append({"name": api_key_env(t.metadata.name),
                        "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    mounts: list[Obj] = [
        {"name": "router-config", "mountPath": ROUTER_CONFIG_DIR, "readOnly": True},
        {"name": "router-state", "mountPath": ROUTER_STATE_DIR, "readOnly": True},
        {"name": "routenlp-data", "mountPath": DATA_DIR},
        *scratch_volumes(ROUTER_SCRATCH_PREFIX)[1],
    ]
    auth = policy.spec.auth
    if auth.labellers_secret:
        mounts.append({"name": "routenlp-labellers", "mountPath": LABELLERS_DIR, "readOnly": True})
    if auth.client_keys_secret:
        mounts.append({"name": "routenlp-client-keys", "mountPath": CLIENT_KEYS_DIR, "readOnly": True})
    return {
        "name": "router",
        "image": dep.image,
        "command": ["routenlp", "router"],
        "args": ["--config", f"{ROUTER_CONFIG_DIR}/{ROUTER_CONFIG_KEY}", "--host", "0.0.0.0",
                 "--port", str(dep.service.port)],
        # `router`: /v1/*, /healthz, /readyz for clients; `admin`: /metrics and /routenlp/* (RouterConfig.admin_port)
        # for the operator and Prometheus only (router_network_policy).
        "ports": [{"name": "router", "containerPort": dep.service.port, "protocol": "TCP"},
                  {"name": "admin", "containerPort": dep.admin_port, "protocol": "TCP"}],
        "env": env + scratch_env(),
        "resources": {"requests": {"cpu": dep.cpu, "memory": dep.memory}, "limits": {"memory": dep.memory}},
        "volumeMounts": mounts,
        # The router's own endpoints: /readyz once its config and encoder are loaded, /healthz while alive.
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "router"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "router"}, "periodSeconds": 15, "failureThreshold": 4},
        "securityContext": restricted_security_context() | {"runAsUser": RUN_AS_USER},
    }


def router_volumes(policy: RoutingPolicy) -> list[Obj]:
    out = [
        {"name": "router-config", "configMap": {"name": policy_names(policy.metadata.name)["configmap"]}},
        # optional: a router started before the operator wrote its state runs with the defaults
        {"name": "router-state", "configMap": {"name": policy_names(policy.metadata.name)["state"], "optional": True}},
        {"name": "routenlp-data", "persistentVolumeClaim": {"claimName": events_claim(policy)}},
        *scratch_volumes(ROUTER_SCRATCH_PREFIX)[0],
    ]
    # Not optional: a router must not start without the credentials its policy names (it would accept anyone).
    auth, mode = policy.spec.auth, SECRET_FILE_MODE[policy.spec.deployment.mode]
    if auth.labellers_secret:
        out.append({"name": "routenlp-labellers", "secret": {"secretName": auth.labellers_secret, "defaultMode": mode}})
    if auth.client_keys_secret:
        out.append({"name": "routenlp-client-keys",
                    "secret": {"secretName": auth.client_keys_secret, "defaultMode": mode}})
    return out


def router_deployment(policy: RoutingPolicy, tiers: list[ModelTier], owner: Obj, namespace: str, cfg_hash: str) -> Obj:
    name = policy.metadata.name
    lbls = labels("router", name, policy=name)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(policy_names(name)["deployment"], namespace, owner, lbls),
        "spec": {
            "replicas": policy.spec.deployment.replicas,
            "selector": {"matchLabels": selector_labels("router", name)},
            "template": {
                # The hash rolls the pods when the rendered configuration changes.
                "metadata": {"labels": lbls | {ROUTER_LABEL: name},
                             "annotations": {"routenlp.io/config-hash": cfg_hash}},
                "spec": {
                    "containers": [router_container(policy, tiers)],
                    "volumes": router_volumes(policy),
                    "securityContext": pod_security_context(),
                    "automountServiceAccountToken": False,
                },
            },
        },
    }


def router_service(policy: RoutingPolicy, owner: Obj, namespace: str) -> Obj:
    name = policy.metadata.name
    svc = policy.spec.deployment.service
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(policy_names(name)["service"], namespace, owner, labels("router", name, policy=name)),
        "spec": {
            "type": svc.type,
            "selector": selector_labels("router", name),
            # `admin` (metrics, rollout figures) is reachable only where router_network_policy lets it be.
            "ports": [{"name": "http", "port": svc.port, "targetPort": "router", "protocol": "TCP"},
                      {"name": "admin", "port": policy.spec.deployment.admin_port, "targetPort": "admin",
                       "protocol": "TCP"}],
        },
    }


def router_admin_url(policy: RoutingPolicy, host: str) -> str:
    """Base URL of a router's admin endpoints (/metrics, /routenlp/rollout) on a pod IP or the Service name."""
    return f"http://{host}:{policy.spec.deployment.admin_port}"


def router_network_policy(policy: RoutingPolicy, owner: Obj, namespace: str, peers: NetworkPeers) -> Obj:
    """Gateway routers accept clients on the client port from the policy's namespace, the allowed namespaces and
    CIDRs; the admin port only from the operator and the monitoring namespace."""
    name = policy.metadata.name
    dep = policy.spec.deployment
    net = dep.network
    if ALL_NAMESPACES in net.allowed_client_namespaces:
        clients: list[Obj] = [{"namespaceSelector": {}}]
    else:
        allowed = sorted({namespace, *net.allowed_client_namespaces})
        clients = [{"namespaceSelector": {"matchExpressions": [
            {"key": NAMESPACE_NAME_LABEL, "operator": "In", "values": allowed}]}}]
    clients += [{"ipBlock": {"cidr": cidr}} for cidr in net.allowed_client_cidrs]
    return network_policy(policy_names(name)["router-netpol"], namespace, owner, labels("router", name, policy=name),
                          {"matchLabels": selector_labels("router", name)},
                          [{"from": clients, "ports": _tcp(dep.service.port)},
                           {"from": [peers.operator(), *peers.monitoring()], "ports": _tcp(dep.admin_port)}])


def policy_tiers_network_policy(policy: RoutingPolicy, tiers: list[ModelTier], owner: Obj,
                                namespace: str) -> Obj | None:
    """Lets the policy's routers (gateway or sidecar) and its campaigns' stage Jobs into the pods of its engine tiers
    (which tier_network_policy isolates). None when every tier is external."""
    name = policy.metadata.name
    engine = sorted(t.metadata.name for t in tiers if t.spec.external is None)
    if not engine:
        return None
    selector = {"matchLabels": {"app.kubernetes.io/component": "model-tier"},
                "matchExpressions": [{"key": "routenlp.io/tier", "operator": "In", "values": engine}]}
    peers = [{"podSelector": {"matchLabels": {ROUTER_LABEL: name}}},
             {"podSelector": {"matchLabels": {CAMPAIGN_POLICY_LABEL: name}}}]
    return network_policy(policy_names(name)["tiers-netpol"], namespace, owner, labels("router", name, policy=name),
                          selector, [{"from": peers, "ports": _tcp(VLLM_PORT)}])


def router_endpoint(policy: RoutingPolicy, namespace: str) -> str:
    return (f"http://{policy_names(policy.metadata.name)['service']}.{namespace}.svc:"
            f"{policy.spec.deployment.service.port}/v1")


def router_state_configmap(policy: RoutingPolicy, owner: Obj, namespace: str, prefer_cheaper: bool) -> Obj:
    """The live switches of the policy's routers (`RouterConfig.state_path`); not part of the config hash, so
    flipping one does not restart the router pods (which would also reset the spend they report)."""
    name = policy.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(policy_names(name)["state"], namespace, owner, labels("router", name, policy=name)),
        "data": {ROUTER_STATE_KEY: yaml.safe_dump({"preferCheaper": bool(prefer_cheaper)})},
    }


def policy_objects(policy: RoutingPolicy, tiers: list[ModelTier], owner: Obj, namespace: str,
                   versions: Obj | None = None, prefer_cheaper: bool = False,
                   peers: NetworkPeers | None = None) -> tuple[list[Obj], str]:
    """Objects of a policy whose tiers all resolved, and the hash of the rendered configuration. `peers`: render the
    NetworkPolicies (None: none)."""
    cfg = router_config(policy, tiers, namespace, versions).dump_yaml()
    h = config_hash(cfg)
    objs = [router_configmap(policy, owner, namespace, cfg), router_state_configmap(policy, owner, namespace,
                                                                                  prefer_cheaper)]
    if not policy.spec.feedback.event_log_claim_name:
        objs.append(events_pvc(policy, owner, namespace))
    if policy.spec.deployment.mode == "gateway":
        objs += [router_deployment(policy, tiers, owner, namespace, h), router_service(policy, owner, namespace)]
    if peers is not None:
        tiers_np = policy_tiers_network_policy(policy, tiers, owner, namespace)
        objs += [tiers_np] if tiers_np else []
        if policy.spec.deployment.mode == "gateway":
            objs.append(router_network_policy(policy, owner, namespace, peers))
    return objs, h


def sidecar_patch(pod: Obj, policy: RoutingPolicy, tiers: list[ModelTier]) -> list[Obj]:
    """JSON patch that injects the router container and its volumes into a pod, and labels the pod as one of the
    policy's routers (its tiers' NetworkPolicy lets it in). Idempotent: no-op if present."""
    spec = pod.get("spec", {})
    if any(c.get("name") == "router" for c in spec.get("containers", [])):
        return []
    meta = pod.get("metadata") or {}
    ops: list[Obj] = [{"op": "add", "path": "/spec/containers/-", "value": router_container(policy, tiers)}]
    if "metadata" not in pod:
        ops.append({"op": "add", "path": "/metadata", "value": {}})
    if "labels" not in meta:
        ops.append({"op": "add", "path": "/metadata/labels", "value": {}})
    ops.append({"op": "add", "path": "/metadata/labels/" + ROUTER_LABEL.replace("~", "~0").replace("/", "~1"),
                "value": policy.metadata.name})
    if "volumes" not in spec:
        ops.append({"op": "add", "path": "/spec/volumes", "value": []})
    existing = {v.get("name") for v in spec.get("volumes", [])}
    ops += [{"op": "add", "path": "/spec/volumes/-", "value": v}
            for v in router_volumes(policy) if v["name"] not in existing]
    return ops


# ---------------------------------------------------------------- DistillationCampaign

# Stage -> the `routenlp train` commands its Job runs, in order (all but the last as init containers, so the main
# container's termination message carries the stage's result).
STAGE_COMMANDS: dict[str, list[str]] = {
    "Clustering": ["cluster"],
    "Distilling": ["distill"],
    "Evaluating": ["evaluate"],
    "RetrainingRouter": ["retrain", "calibrate", "publish"],
}


def stage_commands(campaign: DistillationCampaign, stage: str) -> list[str]:
    if stage == "RetrainingRouter" and not campaign.spec.retrain_router:
        return ["publish"]
    return STAGE_COMMANDS[stage]


def _round(round_: int) -> list[str]:
    """Name part of a campaign round: none for round 1 (the names a single-round run always had)."""
    return [f"n{round_}"] if round_ > 1 else []


def job_name(campaign: str, run: int, stage: str, attempt: int, round_: int = 1) -> str:
    return short_name(campaign, f"r{run}", *_round(round_), stage.lower(), f"a{attempt}")


def campaign_work_dir(campaign: str, run: int, round_: int = 1) -> str:
    return f"{DATA_DIR}/campaigns/{campaign}/run-{run}" + (f"/round-{round_}" if round_ > 1 else "")


@dataclass(frozen=True)
class StageContext:
    """What the stage Jobs need to know beyond the campaign: the tiers and policy they work on."""

    student_model: str  # the student's model (path/hub id), what the trainer loads
    student_url: str  # the student tier's OpenAI-compatible base URL
    student_served_name: str
    teacher_url: str
    teacher_model: str  # `model` sent to the teacher
    tiers: tuple[str, ...]  # the policy's tiers, cheapest first
    risk_level: float
    delta: float
    max_escalations: int
    risk_measure: str = RiskMeasure.ACCEPTED_ANSWERS.value
    generation_tasks: tuple[str, ...] = ()  # tasks of kind generation: the trainer scores them as the router does
    teacher_key: SecretKeyRef | None = None
    student_cache_claim: str | None = None  # student tier's model-cache PVC: where adapters are published
    chains: tuple[tuple[str, tuple[str, ...]], ...] = ()  # pinned tasks[].chain (other tasks' chains are learnt)
    quality_floors: tuple[tuple[str, float], ...] = ()  # tasks[].qualityFloor; "*": cascade.qualityFloor


ADAPTER_MOUNT = "/var/lib/routenlp-adapters"  # the student's model-cache PVC inside stage Jobs


def adapter_name(campaign: str, run: int, round_: int = 1) -> str:
    """The adapter's name, which is also the router version the round produces."""
    return short_name(campaign, f"r{run}", *_round(round_))


def stage_args(campaign: DistillationCampaign, ctx: StageContext, cmd: str, run: int, round_: int = 1) -> list[str]:
    """Arguments of `routenlp train <cmd>` (trainer_image/routenlp/trainer) for this campaign run and round. From
    round 2 on, cluster reads only the failures logged under the previous round's router version, and distill and
    evaluate start from the previous round's adapter."""
    spec = campaign.spec
    work = campaign_work_dir(campaign.metadata.name, run, round_)
    events, routers = f"{DATA_DIR}/events", f"{work}/routers"
    version = adapter_name(campaign.metadata.name, run, round_)
    previous = [] if round_ == 1 else [adapter_name(campaign.metadata.name, run, round_ - 1),
                                       campaign_work_dir(campaign.metadata.name, run, round_ - 1)]
    teacher = ["--teacher-url", ctx.teacher_url, "--teacher-model", ctx.teacher_model]
    if cmd == "cluster":
        c = spec.clustering
        return ["--events", events, "--out", f"{work}/cluster", "--teacher-tier", spec.teacher_tier,
                "--student-tier", spec.student_tier, "--method", c.method, "--max-clusters", str(c.max_clusters),
                "--min-cluster-size", str(c.min_cluster_size), "--top-clusters", str(c.top_clusters),
                *(["--router-version", previous[0]] if previous else [])]
    if cmd == "distill":
        lora = spec.lora
        out = ["--clusters", f"{work}/cluster", "--out", f"{work}/distill", "--base-model", ctx.student_model,
               "--adapter-name", version, "--r", str(lora.r), "--alpha", str(lora.alpha),
               "--dropout", str(lora.dropout), "--target-modules", *lora.target_modules, "--steps", str(lora.steps),
               "--learning-rate", str(lora.learning_rate), "--batch-size", str(lora.batch_size),
               "--samples-per-cluster", str(lora.samples_per_cluster), "--budget-split", lora.budget_split,
               "--top-clusters", str(spec.clustering.top_clusters),
               "--hold-out-fraction", str(spec.evaluation.hold_out_fraction), "--quiet", *teacher,
               *(["--init-adapter", f"{previous[1]}/distill/adapter"] if previous else [])]
        return out + (["--teacher-api-key-env", "TEACHER_API_KEY"] if ctx.teacher_key else [])
    if cmd == "evaluate":
        return ["--distill", f"{work}/distill", "--out", f"{work}/evaluate", "--base-model", ctx.student_model,
                "--min-quality-gain", str(spec.evaluation.min_quality_gain),
                "--max-regression", str(spec.evaluation.max_regression), *teacher,
                *(["--baseline-adapter", f"{previous[1]}/distill/adapter"] if previous else [])]
    common = ["--events", events, "--artifact-dir", routers, "--version", version,
              "--teacher-tier", spec.teacher_tier, "--tiers", *ctx.tiers, "--risk-level", str(ctx.risk_level),
              "--risk-measure", ctx.risk_measure, "--delta", str(ctx.delta),
              "--max-escalations", str(ctx.max_escalations), "--generation-tasks", *ctx.generation_tasks]
    if ctx.chains:
        common += ["--chains", json.dumps({task: list(chain) for task, chain in ctx.chains})]
    if ctx.quality_floors:
        common += ["--quality-floors", json.dumps(dict(ctx.quality_floors))]
    if cmd == "retrain":
        return [*common, "--out", f"{work}/retrain", "--student-tier", spec.student_tier,
                "--student-model", ctx.student_served_name, "--student-url", ctx.student_url,
                "--exclude", f"{work}/distill/train.jsonl"]
    if cmd == "calibrate":
        return [*common, "--out", f"{work}/calibrate", "--signals", f"{work}/retrain/signals.jsonl"]
    if cmd == "publish":
        out = ["--out", f"{work}/publish"]
        if ctx.student_cache_claim:  # the tier loads adapters from its own model-cache PVC
            out += ["--adapter", f"{work}/distill/adapter", "--adapter-name", version,
                    "--adapter-to", f"{ADAPTER_MOUNT}/adapters"]
        if campaign.spec.retrain_router:
            out += ["--router-version", f"{routers}/{version}", "--router-to", f"{DATA_DIR}/routers"]
        return out
    raise ValueError(f"unknown stage command {cmd!r}")


def stage_job(campaign: DistillationCampaign, owner: Obj, namespace: str, stage: str, run: int, attempt: int,
              artifact_claim: str, ctx: StageContext, round_: int = 1) -> Obj:
    name = campaign.metadata.name
    spec, res = campaign.spec, campaign.spec.resources
    commands = stage_commands(campaign, stage)
    gpu = {res.gpu_resource_name: str(res.gpu_count)} if stage == "Distilling" and res.gpu_count else {}
    env: list[Obj] = [{"name": "HF_HUB_OFFLINE", "value": "1"}, *scratch_env()]
    if ctx.teacher_key:  # by reference: the kubelet reads the Secret, the operator never does
        env.append({"name": "TEACHER_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": ctx.teacher_key.name, "key": ctx.teacher_key.key}}})
    scratch, scratch_mounts = scratch_volumes()
    mounts: list[Obj] = [{"name": "routenlp-data", "mountPath": DATA_DIR}, *scratch_mounts]
    volumes: list[Obj] = [{"name": "routenlp-data", "persistentVolumeClaim": {"claimName": artifact_claim}}, *scratch]
    if ctx.student_cache_claim:
        mounts.append({"name": "student-cache", "mountPath": ADAPTER_MOUNT})
        volumes.append({"name": "student-cache", "persistentVolumeClaim": {"claimName": ctx.student_cache_claim}})

    def container(cmd: str) -> Obj:
        return {
            "name": cmd,
            "image": res.image,
            "command": ["routenlp", "train", cmd],
            "args": stage_args(campaign, ctx, cmd, run, round_),
            "env": env,
            "resources": _host_resources(res.cpu, res.memory, gpu),
            "volumeMounts": mounts,
            # The stage prints a one-line JSON summary last; the operator reads it from the termination message.
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "securityContext": restricted_security_context() | {"runAsUser": RUN_AS_USER},
        }

    lbls = labels("campaign-stage", name, campaign=name) | {"routenlp.io/stage": stage, "routenlp.io/run": str(run),
                                                            "routenlp.io/round": str(round_),
                                                            CAMPAIGN_POLICY_LABEL: spec.policy_ref}
    pod_spec: Obj = {
        "restartPolicy": "Never",
        "containers": [container(commands[-1])],
        "volumes": volumes,
        "securityContext": pod_security_context(),
        "automountServiceAccountToken": False,
    }
    if len(commands) > 1:
        pod_spec["initContainers"] = [container(c) for c in commands[:-1]]
    if res.node_selector:
        pod_spec["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod_spec["tolerations"] = [t.to_k8s() for t in res.tolerations]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(job_name(name, run, stage, attempt, round_), namespace, owner, lbls,
                             {"routenlp.io/attempt": str(attempt)}),
        "spec": {
            # Retries are the operator's (bounded by maxStageRetries, visible in status), not the Job's.
            "backoffLimit": 0,
            "activeDeadlineSeconds": res.active_deadline_seconds,
            "ttlSecondsAfterFinished": 7 * 24 * 3600,
            "template": {"metadata": {"labels": lbls}, "spec": pod_spec},
        },
    }


def stage_context(campaign: DistillationCampaign, policy: RoutingPolicy, student: ModelTier, teacher: ModelTier,
                  namespace: str) -> StageContext:
    ext = teacher.spec.external
    engine = student.spec.engine
    return StageContext(
        student_model=engine.model if engine else student.spec.served_model_name,
        student_url=tier_endpoint(student, namespace),
        student_served_name=student.spec.served_model_name,
        teacher_url=tier_endpoint(teacher, namespace),
        teacher_model=ext.model if ext else teacher.spec.served_model_name,
        tiers=tuple(t.name for t in policy.spec.tiers),
        risk_level=policy.spec.cascade.risk_level,
        risk_measure=RiskMeasure(policy.spec.cascade.risk_measure).value,
        delta=policy.spec.cascade.delta,
        max_escalations=policy.spec.cascade.max_escalations,
        generation_tasks=tuple(t.name for t in policy.spec.tasks if t.kind == "generation"),
        teacher_key=ext.api_key_secret_ref if ext else None,
        student_cache_claim=engine.model_cache.claim_name if engine and engine.model_cache else None,
        chains=tuple((t.name, tuple(t.chain)) for t in policy.spec.tasks if t.chain),
        quality_floors=tuple((t.name, t.quality_floor) for t in policy.spec.tasks if t.quality_floor is not None)
        + ((("*", policy.spec.cascade.quality_floor),) if policy.spec.cascade.quality_floor is not None else ()),
    )


def tier_adapter_source(reported: str, ctx_claim: str | None) -> str:
    """publish reports where it wrote the adapter inside the Job; the tier sees the same PVC as pvc://claim/path."""
    path = reported.removeprefix("file://")
    if ctx_claim and path.startswith(ADAPTER_MOUNT + "/"):
        return f"pvc://{ctx_claim}/{path[len(ADAPTER_MOUNT) + 1:]}"
    return reported


def to_yaml(objs: list[Obj]) -> str:
    return yaml.safe_dump_all(objs, sort_keys=False)
