"""RoutingPolicy: the router objects a policy becomes (pure builders) and its kopf handlers.

A policy whose tiers all resolve becomes the router's ConfigMap (router.yaml) and state ConfigMap, the event-log
PVC, and in gateway mode the router Deployment + Service; NetworkPolicies let its routers and campaign Jobs into its
tiers. Its status rolls up tier resolution, auth Secrets, router readiness and tier readiness into Ready
(status.policy_rollup), and the router's own figures (/routenlp/rollout) into rates, spend and the canary guard.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import kopf
from pydantic import ValidationError

from routenlp.api import GROUP, VERSION, ModelTier, RoutingPolicy
from routenlp.api.common import (
    AUTH_SECRETS_FOUND, BUDGET_EXCEEDED, READY, ROUTER_READY, TIERS_READY, TIERS_RESOLVED, now_rfc3339,
)
from routenlp.api.figures import RolloutAnswer, merge as merge_figures
from routenlp.api.router_config import RouterAuth, RouterConfig, RouterState, RouterVersions, TierEndpoint
from routenlp.api.routingpolicy import ALL_NAMESPACES, deprecations

from .campaign_flow import router_offer
from .meta import (
    NAMESPACE_NAME_LABEL, RUN_AS_USER, VLLM_PORT, NetworkPeers, labels, metadata, network_policy,
    pod_security_context, restricted_security_context, scratch_env, scratch_volumes, selector_labels,
    selector_string, short_name, tcp, tier_endpoint,
)
from .quantities import checked
from .rollout import CanaryStats, budget_condition, decide, observed_figures, prefer_cheaper
from .runtime import (
    NOT_PERMITTED, RT, doc, emit, invalid, kube, log, network_peers, not_permitted, secret_keys, settle, timed,
    transition_events, write_status,
)
from .status import condition, deployment_observation, get_condition, merge_conditions, pod_ready, policy_rollup

Obj = dict[str, Any]

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
ROUTER_SCRATCH_PREFIX = "routenlp-"  # the router's emptyDirs are named apart from a sidecar pod's own volumes
# Pods the policy's NetworkPolicies let reach its tiers: its routers (gateway pods and sidecar-injected pods) and its
# campaigns' stage Jobs (student probes). Not `routenlp.io/policy`: that label asks the webhook for a sidecar.
ROUTER_LABEL = "routenlp.io/router"
CAMPAIGN_POLICY_LABEL = "routenlp.io/campaign-policy"


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
            stable=versions.get("current"),  # status.router.current: the stable version
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
                          [{"from": clients, "ports": tcp(dep.service.port)},
                           {"from": [peers.operator(), *peers.monitoring()], "ports": tcp(dep.admin_port)}])


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
                          selector, [{"from": peers, "ports": tcp(VLLM_PORT)}])


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
        "data": {ROUTER_STATE_KEY: RouterState(prefer_cheaper=prefer_cheaper).dump_yaml()},
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


# ---------------------------------------------------------------- handlers


async def auth_condition(policy: RoutingPolicy, ns: str, gen: int | None) -> Obj | None:
    """`AuthSecretsFound`: the Secrets spec.auth names exist and hold keys (None when it names none). A router pod
    cannot start without them: the kubelet waits for the Secret."""
    auth = policy.spec.auth
    named = [(f, n) for f, n in (("labellersSecret", auth.labellers_secret),
                                 ("clientKeysSecret", auth.client_keys_secret)) if n]
    if not named:
        return None
    unchecked = []
    for fld, name in named:
        keys = await secret_keys(ns, name)
        if keys is None:
            return condition(AUTH_SECRETS_FOUND, False, "SecretNotFound", f"Secret {name!r} (spec.auth.{fld}) does not "
                             "exist: the router pods wait for it", gen)
        if keys is NOT_PERMITTED:
            unchecked.append(not_permitted(ns, name))
        elif not keys:
            return condition(AUTH_SECRETS_FOUND, False, "SecretHasNoKeys", f"Secret {name!r} (spec.auth.{fld}) has no "
                             "keys: add one key per " + ("labeller" if fld == "labellersSecret" else "client"), gen)
    if unchecked:
        return condition(AUTH_SECRETS_FOUND, None, "SecretNotChecked", "; ".join(unchecked), gen)
    return condition(AUTH_SECRETS_FOUND, True, "SecretsFound", ", ".join(n for _, n in named) + " exist", gen)


@kopf.index(GROUP, VERSION, "routingpolicies")
def policies_by_tier(namespace: str, name: str, spec: kopf.Spec, **_: Any) -> dict[tuple[str, str], str]:
    """(namespace, tier) -> names of the policies that list the tier (kept in memory by kopf)."""
    return {(namespace, t["name"]): name for t in spec.get("tiers") or [] if isinstance(t, dict) and "name" in t}


async def wake_policies(ns: str, tier: str) -> None:
    """Re-resolve the policies that reference a tier (its existence, spec, readiness or endpoint changed).

    Wakes are coalesced: tiers of one policy often change together (a rollout, a burst of creations), and one
    reconcile after a short pause sees them all."""
    if RT.policy_index is not None:
        names = set(RT.policy_index.get((ns, tier), []))
    else:  # before kopf handed us the index: ask the API server
        names = {p["metadata"]["name"] for p in await kube().list("RoutingPolicy", ns)
                 if any(t.get("name") == tier for t in (p.get("spec") or {}).get("tiers") or [])}
    for name in sorted(names):
        key = (ns, name)
        if key not in RT.pending_wakes:
            RT.pending_wakes.add(key)
            task = asyncio.get_running_loop().create_task(_wake_later(ns, name))
            RT.wake_tasks.add(task)
            task.add_done_callback(RT.wake_tasks.discard)


async def _wake_later(ns: str, name: str) -> None:
    await asyncio.sleep(RT.wake_delay)
    RT.pending_wakes.discard((ns, name))
    try:
        p = await kube().get("RoutingPolicy", ns, name)
        if p is not None:
            await reconcile_policy(p)
    except Exception:  # the resync timer retries; a lost wake only delays the policy
        log.exception("reconciling RoutingPolicy %s/%s after a tier change failed", ns, name)


async def reconcile_policy(body: Any, observe: bool = False) -> str | None:
    """Reconcile a policy; `observe` also asks its router what it saw (on the resync timer, not on every event).
    Returns the message of an invalid spec (runtime.settle), else None."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    if meta.get("deletionTimestamp"):
        return None
    async with RT.locks[("RoutingPolicy", ns, name)], RT.slots():
        fresh = await kube().get("RoutingPolicy", ns, name)  # the caller's copy may be stale
        if fresh is None:
            return None
        with timed("RoutingPolicy"):
            return await _reconcile_policy(fresh, ns, name, observe)


async def router_figures(policy: RoutingPolicy, ns: str) -> RolloutAnswer:
    """The router's /routenlp/rollout answer for the whole gateway: each ready router pod is asked directly and the
    counts are summed (api.figures.merge), since one call through the Service reaches one replica only. Without
    ready router pods (or none answering), the Service is asked. A malformed answer raises (pydantic's
    ValidationError): the caller reads no figures this time, as for a router that cannot be reached."""
    name = policy.metadata.name
    pods = await kube().list("Pod", ns, selector_string(selector_labels("router", name)))
    ips = [p["status"]["podIP"] for p in pods if pod_ready(p) and (p.get("status") or {}).get("podIP")]
    answers = []
    for ip in sorted(ips):  # the admin port: the router's NetworkPolicy lets the operator (only) reach it
        try:
            answers.append(await RT.pod_http.get_json(f"{router_admin_url(policy, ip)}/routenlp/rollout"))
        except Exception as exc:  # a pod restarting: the others still count
            log.info("router pod %s of %s/%s unavailable: %s", ip, ns, name, exc)
    if answers:
        return merge_figures([RolloutAnswer.model_validate(a) for a in answers])
    service = f"{policy_names(name)['service']}.{ns}.svc"
    url = f"{router_admin_url(policy, service)}/routenlp/rollout"
    return RolloutAnswer.model_validate(await RT.pod_http.get_json(url))


async def _resolve_tiers(policy: RoutingPolicy, ns: str) -> tuple[list[ModelTier], list[str], list[str], list[str]]:
    """(tiers, missing, invalid, not Ready) of the tiers the policy lists, in its order."""
    tiers: list[ModelTier] = []
    missing: list[str] = []
    invalid_: list[str] = []
    not_ready: list[str] = []
    for ref in policy.spec.tiers:
        t = await kube().get("ModelTier", ns, ref.name)
        if t is None:
            missing.append(ref.name)
            continue
        try:
            tiers.append(checked(ModelTier.model_validate(doc(t))))  # as the tier's own InvalidSpec
        except (ValidationError, ValueError):
            invalid_.append(ref.name)
            continue
        rc = get_condition((t.get("status") or {}).get("conditions"), READY)
        if not rc or rc.get("status") != "True":
            not_ready.append(ref.name)
    return tiers, missing, invalid_, not_ready


def router_condition(policy: RoutingPolicy, deployment: Obj | None, gen: int | None) -> Obj:
    """`RouterReady`: the gateway's router pods are ready and updated; a sidecar policy's router is injected."""
    name = policy.metadata.name
    if policy.spec.deployment.mode != "gateway":
        return condition(ROUTER_READY, True, "SidecarMode",
                         f"router injected into pods labelled routenlp.io/policy={name}", gen)
    obs = deployment_observation(deployment, policy.spec.deployment.replicas, [])
    if obs.desired == 0 or (obs.ready >= obs.desired and obs.updated >= obs.desired
                            and obs.deployment_generation_observed):
        return condition(ROUTER_READY, True, "RouterReady", f"{obs.ready}/{obs.desired} router pods ready", gen)
    return condition(ROUTER_READY, False, "RouterNotReady",
                     f"{obs.ready}/{obs.desired} router pods ready, {obs.updated} updated", gen)


async def _observe_router(policy: RoutingPolicy, ns: str, router_old: Obj, status: Obj,
                          gen: int | None) -> tuple[CanaryStats | None, Obj | None]:
    """What the gateway's router observed (its /routenlp/rollout answer), into `status`: the canary guard's inputs
    and the BudgetExceeded condition."""
    stats = budget = None
    try:
        answer = await router_figures(policy, ns)
        canary = router_old.get("canary")
        stats = CanaryStats.from_answer(answer, canary) if canary else None
        status.update(observed_figures(answer))
        budget = budget_condition(policy, status.get("spentUsd24h"), gen)
    except Exception as exc:  # router not reachable yet: decide later
        log.info("router figures of %s/%s unavailable: %s", ns, policy.metadata.name, exc)
    return stats, budget


async def _reconcile_policy(body: Obj, ns: str, name: str, observe: bool) -> str | None:
    api = kube()
    try:
        policy = checked(RoutingPolicy.model_validate(doc(body)))
    except (ValidationError, ValueError) as exc:
        return await invalid("RoutingPolicy", body, exc)
    gen = body["metadata"].get("generation")
    uid = body["metadata"].get("uid") or f"{ns}/{name}"
    deprecated = deprecation_events(policy)
    # Once per generation (and per operator start: upgraded objects); only policies that set a deprecated field are
    # remembered, so the map stays as small as they are.
    if deprecated and RT.deprecations_reported.get(uid) != gen:
        emit(body, deprecated)
        RT.deprecations_reported[uid] = gen
    old = body.get("status") or {}
    budget: Obj | None = None  # BudgetExceeded, when the router's figures were read this time
    tiers, missing, invalid_tiers, not_ready = await _resolve_tiers(policy, ns)
    status: Obj = {"observedGeneration": gen, "tiers": [t.metadata.name for t in tiers], "missingTiers": missing}
    if missing or invalid_tiers:
        msg = "; ".join(filter(None, [f"missing ModelTiers: {', '.join(missing)}" if missing else "",
                                      f"invalid ModelTiers: {', '.join(invalid_tiers)}" if invalid_tiers else ""]))
        conds = [condition(TIERS_RESOLVED, False, "MissingTiers" if missing else "InvalidTiers", msg, gen)]
    else:
        conds = [condition(TIERS_RESOLVED, True, "AllTiersFound", f"{len(tiers)} tiers resolved", gen)]
        offer = router_offer(await api.list("DistillationCampaign", ns), name)
        stats = None
        router_old = old.get("router") or {}
        if observe and policy.spec.deployment.mode == "gateway":
            stats, budget = await _observe_router(policy, ns, router_old, status, gen)
        router_status, events = decide(policy, router_old, offer.version, stats, now_rfc3339(), offer.propose_only,
                                       offer.canary_percent, offer.promote_after)
        emit(body, events)
        cheaper = prefer_cheaper(policy, budget or get_condition(old.get("conditions"), BUDGET_EXCEEDED))
        objs, cfg_hash = policy_objects(policy, tiers, dict(body), ns, router_status, cheaper, network_peers())
        for obj in objs:
            await api.apply(obj)
        status.update(configHash=cfg_hash, router=router_status)
        dep = None
        if policy.spec.deployment.mode == "gateway":
            status["endpoint"] = router_endpoint(policy, ns)
            dep = await api.get("Deployment", ns, policy_names(name)["deployment"])
        conds.append(router_condition(policy, dep, gen))
        auth = await auth_condition(policy, ns, gen)
        conds += [auth] if auth else []
        conds.append(condition(TIERS_READY, False, "TiersNotReady", f"not ready: {', '.join(not_ready)}", gen)
                     if not_ready else condition(TIERS_READY, True, "AllTiersReady", "every tier is Ready", gen))
    status["phase"], ready = policy_rollup(conds, gen)
    conds.append(ready)
    status["conditions"] = merge_conditions(old.get("conditions"), conds + ([budget] if budget else []))
    if policy.spec.budget is None:  # budget removed from the spec: so is its condition
        status["conditions"] = [c for c in status["conditions"] if c["type"] != BUDGET_EXCEEDED]
    if not (policy.spec.auth.labellers_secret or policy.spec.auth.client_keys_secret):  # likewise spec.auth
        status["conditions"] = [c for c in status["conditions"] if c["type"] != AUTH_SECRETS_FOUND]
    transition_events(body, conds)
    emit(body, budget_events(get_condition(old.get("conditions"), BUDGET_EXCEEDED), budget))
    await write_status("RoutingPolicy", body, status)
    return None


def deprecation_events(policy: RoutingPolicy) -> list[tuple[str, str, str]]:
    """One Warning Event `DeprecatedField` naming every deprecated field the spec sets (api.routingpolicy.deprecations,
    which the admission webhook returns as warnings too)."""
    found = deprecations(policy.spec)
    return [("Warning", "DeprecatedField", "; ".join(map(str, found))[:1000])] if found else []


def budget_events(prev: Obj | None, new: Obj | None) -> list[tuple[str, str, str]]:
    """A Warning when the policy goes over budget, a Normal Event when it is back within (not one per resync)."""
    if new is None or (prev or {}).get("status") == new["status"]:
        return []
    if new["status"] == "True":
        return [("Warning", "BudgetExceeded", new["message"])]
    if (prev or {}).get("status") == "True" and new["status"] == "False":
        return [("Normal", "WithinBudget", new["message"])]
    return []


@kopf.on.create(GROUP, VERSION, "routingpolicies", backoff=5)
@kopf.on.update(GROUP, VERSION, "routingpolicies", field="spec", backoff=5)
@kopf.on.resume(GROUP, VERSION, "routingpolicies", backoff=5)
async def policy_changed(body: kopf.Body, **_: Any) -> None:
    settle(await reconcile_policy(body))


@kopf.timer(GROUP, VERSION, "routingpolicies", interval=RT.resync_seconds, initial_delay=RT.resync_seconds, idle=0)
async def policy_resync(body: kopf.Body, **_: Any) -> None:
    await reconcile_policy(body, observe=True)

