"""ModelTier: the vLLM Deployment, Service and NetworkPolicy an engine tier becomes (pure builders), and its kopf
handlers. External tiers make no objects: their API-key Secret is checked. Status rolls up the Deployment and pods
(status.tier_rollup) and the LoRA adapters loaded into the ready pods; policies listing the tier are woken when its
readiness or endpoint changes."""

from __future__ import annotations

from typing import Any

import kopf
from pydantic import ValidationError

from routenlp.api import GROUP, VERSION, ModelTier
from routenlp.api.common import ADAPTERS_LOADED, READY

from . import metrics
from .adapters import reconcile_adapters, wanted_adapters
from .campaign_flow import campaign_adapters
from .meta import (
    CACHE_DIR, VLLM_PORT, NetworkPeers, host_resources, labels, metadata, network_policy, pod_security_context,
    restricted_security_context, scratch_env, scratch_volumes, selector_labels, selector_string, short_name, tcp,
    tier_endpoint,
)
from .quantities import checked
from .routingpolicy import wake_policies
from .runtime import (
    NOT_PERMITTED, RT, doc, invalid, kube, network_peers, not_permitted, secret_keys, settle, timed,
    transition_events, write_status,
)
from .status import condition, deployment_observation, get_condition, merge_conditions, pod_ready, tier_rollup

Obj = dict[str, Any]
PRESTOP_SECONDS = 10


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
        "resources": host_resources(res.cpu, res.memory, gpu),
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
                          [{"from": [peers.operator()], "ports": tcp(VLLM_PORT)}])


def tier_objects(tier: ModelTier, owner: Obj, namespace: str, peers: NetworkPeers | None = None) -> list[Obj]:
    if tier.spec.external is not None:
        return []
    objs = [tier_deployment(tier, owner, namespace), tier_service(tier, owner, namespace)]
    return objs + ([tier_network_policy(tier, owner, namespace, peers)] if peers else [])


# ---------------------------------------------------------------- handlers


async def reconcile_tier(body: Any, wake: bool = False) -> str | None:
    """Reconcile a tier; wake the policies using it when asked or when its readiness or endpoint changed. Returns
    the message of an invalid spec (runtime.settle), else None."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    if meta.get("deletionTimestamp"):
        return None
    async with RT.locks[("ModelTier", ns, name)], RT.slots():
        with timed("ModelTier"):
            old_face = _tier_face(body.get("status") or {})
            new_status, invalid_spec = await _reconcile_tier(body, ns, name)
    # An invalid tier is Ready=False for its policies, with no endpoint.
    new_face = _tier_face(new_status) if new_status is not None else ("False", old_face[1])
    if wake or old_face != new_face:
        await wake_policies(ns, name)
    return invalid_spec


def _tier_face(status: Obj) -> tuple:
    """What policies see of a tier: its readiness and endpoint."""
    ready = get_condition(status.get("conditions"), READY) or {}
    return ready.get("status"), status.get("endpoint")


async def _external_ready(tier: ModelTier, ns: str, gen: int | None) -> tuple[str, Obj]:
    """(phase, Ready) of an external tier: its API-key Secret and key exist (the value is never read)."""
    assert tier.spec.external is not None
    ref = tier.spec.external.api_key_secret_ref
    keys = await secret_keys(ns, ref.name) if ref else None
    if ref and keys is None:
        return "Failed", condition(READY, False, "SecretNotFound",
                                   f"Secret {ref.name!r} (key {ref.key!r}) does not exist", gen)
    if ref and keys is not NOT_PERMITTED and ref.key not in keys:
        return "Failed", condition(READY, False, "SecretKeyNotFound", f"Secret {ref.name!r} has no key {ref.key!r}",
                                   gen)
    unchecked = f"; {not_permitted(ns, ref.name)}" if ref and keys is NOT_PERMITTED else ""
    return "Ready", condition(READY, True, "ExternalEndpoint",
                              f"external endpoint {tier.spec.external.base_url}{unchecked}", gen)


async def _adapters(tier: ModelTier, ns: str, pods: list[Obj], gen: int | None) -> tuple[list[Obj], Obj | None]:
    """(status.adapters, AdaptersLoaded) after loading the adapters the tier should serve into its ready pods."""
    assert tier.spec.engine is not None
    campaigns = []
    if tier.spec.adapter_policy == "AcceptCampaign":
        for c in await kube().list("DistillationCampaign", ns):
            if (c.get("spec") or {}).get("studentTier") == tier.metadata.name:
                campaigns += campaign_adapters(c.get("status") or {})
    wanted = wanted_adapters([a.to_k8s() for a in tier.spec.adapters], campaigns,
                             tier.spec.adapter_policy == "AcceptCampaign")
    if not wanted:
        return [], None
    ips = [p["status"]["podIP"] for p in pods if pod_ready(p) and (p.get("status") or {}).get("podIP")]
    cache = tier.spec.engine.model_cache.mount_path if tier.spec.engine.model_cache else None
    adapters = await reconcile_adapters(RT.pod_http, ips, wanted, cache)
    missing = [a for a in adapters if not a["loaded"]]
    message = (f"not loaded: {', '.join(a['name'] for a in missing)}; {missing[0]['message']}" if missing
               else f"{len(adapters)} adapters in every ready pod")
    return adapters, condition(ADAPTERS_LOADED, not missing, "AdaptersMissing" if missing else "AllLoaded", message,
                               gen)


async def _reconcile_tier(body: Any, ns: str, name: str) -> tuple[Obj | None, str | None]:
    """(the status written, None), or (None, the message) for an invalid spec."""
    api = kube()
    try:
        tier = checked(ModelTier.model_validate(doc(body)))
    except (ValidationError, ValueError) as exc:
        metrics.MODELTIER_READY.labels(ns, name).set(0)
        return None, await invalid("ModelTier", body, exc)
    gen = body["metadata"].get("generation")
    status: Obj = {"observedGeneration": gen, "endpoint": tier_endpoint(tier, ns)}
    if tier.spec.external is not None:
        phase, ready = await _external_ready(tier, ns, gen)
        conds = [ready]
    else:
        dep = None
        for obj in tier_objects(tier, dict(body), ns, network_peers()):
            applied = await api.apply(obj)  # the answer carries the Deployment's current status
            dep = applied if obj["kind"] == "Deployment" else dep
        selector = selector_string(tier_selector(tier))
        obs = deployment_observation(dep, tier.spec.replicas, [])
        # Pods are read only when they matter: to explain missing replicas, or to load adapters into them.
        pods = await api.list("Pod", ns, selector) if (obs.ready < obs.desired or tier.spec.lora_enabled) else []
        obs = deployment_observation(dep, tier.spec.replicas, pods)
        phase, ready = tier_rollup(obs, tier.spec.engine.resources.gpu_resource_name, gen)
        status.update(replicas=obs.replicas, readyReplicas=obs.ready, selector=selector)
        status["adapters"], loaded = await _adapters(tier, ns, pods, gen)
        conds = [ready] + ([loaded] if loaded else [])
    status["phase"] = phase
    status["conditions"] = merge_conditions((body.get("status") or {}).get("conditions"), conds)
    metrics.MODELTIER_READY.labels(ns, name).set(1 if ready["status"] == "True" else 0)
    transition_events(body, conds)
    await write_status("ModelTier", body, status)
    return status, None


@kopf.on.create(GROUP, VERSION, "modeltiers", backoff=5)
@kopf.on.update(GROUP, VERSION, "modeltiers", field="spec", backoff=5)
@kopf.on.resume(GROUP, VERSION, "modeltiers", backoff=5)
async def tier_changed(body: kopf.Body, policies_by_tier: kopf.Index, **_: Any) -> None:
    RT.policy_index = policies_by_tier
    settle(await reconcile_tier(body, wake=True))  # its spec (cost, served name) is in the policies' router config


@kopf.timer(GROUP, VERSION, "modeltiers", interval=RT.resync_seconds, initial_delay=RT.resync_seconds, idle=0)
async def tier_resync(body: kopf.Body, policies_by_tier: kopf.Index, **_: Any) -> None:
    RT.policy_index = policies_by_tier
    await reconcile_tier(body)


@kopf.on.delete(GROUP, VERSION, "modeltiers", optional=True)
async def tier_deleted(body: kopf.Body, **_: Any) -> None:
    # Children go with the owner (garbage collection); policies must learn the tier is gone.
    try:
        metrics.MODELTIER_READY.remove(body["metadata"]["namespace"], body["metadata"]["name"])
    except KeyError:
        pass
    await wake_policies(body["metadata"]["namespace"], body["metadata"]["name"])

