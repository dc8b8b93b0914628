"""kopf handlers: thin I/O over the pure builders and decisions.

Each kind has one idempotent `reconcile_*` (read -> build -> apply -> status). It runs on create/update/resume, on a
resync timer (status refresh, drift repair, campaign progress, rollout), and when an owned object changes or is
deleted (immediate drift repair). Bad specs become a `Ready=False, reason=InvalidSpec` condition plus a Warning
Event; the handler returns instead of raising, so kopf does not retry a spec that cannot succeed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import defaultdict
from typing import Any

import jsonpatch
import kopf
from pydantic import ValidationError

from routenlp.api import GROUP, VERSION, DistillationCampaign, ModelTier, RoutingPolicy
from routenlp.api.common import now_rfc3339
from routenlp.api.figures import merge as merge_figures

from . import builders, metrics
from .adapters import AiohttpPodHTTP, PodHTTP, reconcile_adapters, wanted_adapters
from .campaign import advance, campaign_adapters, job_result, now_utc, router_offer, should_start, trigger_waiting
from .distributed import distill_workload
from .kube import ApiError, Kube
from .rollout import CanaryStats, budget_condition, decide, observed_figures, prefer_cheaper
from .status import (
    condition, deployment_observation, get_condition, merge_conditions, merge_patch, pod_ready, tier_rollup,
)

log = logging.getLogger("routenlp.operator")
Obj = dict[str, Any]


class Runtime:
    """Process-wide collaborators; tests replace `pod_http` to fake the vLLM pods' and routers' answers."""

    kube: Kube | None = None
    pod_http: PodHTTP = AiohttpPodHTTP()
    resync_seconds: float = float(os.environ.get("ROUTENLP_RESYNC_SECONDS", "30"))
    campaign_seconds: float = float(os.environ.get("ROUTENLP_CAMPAIGN_SECONDS", "10"))
    locks: dict[tuple[str, str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
    fingerprints: dict[str, str] = {}  # owned object uid -> last seen content (see owned_changed)
    policy_index: Any = None  # kopf's policies_by_tier index, captured from the first handler call
    pending_wakes: set[tuple[str, str]] = set()
    wake_tasks: set[asyncio.Task] = set()
    wake_delay: float = float(os.environ.get("ROUTENLP_WAKE_DELAY_SECONDS", "0.2"))
    # Bounds concurrent reconciles: a burst of thousands of objects otherwise floods the API server at once.
    concurrency = int(os.environ.get("ROUTENLP_MAX_CONCURRENT_RECONCILES", "16"))
    _slots: asyncio.Semaphore | None = None

    @classmethod
    def slots(cls) -> asyncio.Semaphore:
        if cls._slots is None:
            cls._slots = asyncio.Semaphore(cls.concurrency)
        return cls._slots


RT = Runtime


@kopf.on.startup()
async def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = "routenlp.io/operator"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="operator.routenlp.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="operator.routenlp.io", key="last-handled-configuration")
    settings.posting.level = logging.WARNING  # only Warning-level kopf messages become Events; ours are explicit
    settings.watching.server_timeout = int(os.environ.get("ROUTENLP_WATCH_TIMEOUT", "300"))
    settings.batching.worker_limit = int(os.environ.get("ROUTENLP_WORKER_LIMIT", "0")) or None
    port = int(os.environ.get("ROUTENLP_WEBHOOK_PORT", "0"))
    if port:  # sidecar injection: kopf serves the mutating webhook over HTTPS with the given certificate
        settings.admission.server = kopf.WebhookServer(
            addr=os.environ.get("ROUTENLP_WEBHOOK_ADDR", "0.0.0.0"), port=port,
            certfile=os.environ["ROUTENLP_WEBHOOK_CERT"], pkeyfile=os.environ["ROUTENLP_WEBHOOK_KEY"])
        # The server and its handler follow the same environment, read now (root tasks start after startup).
        register_sidecar_webhook()


@kopf.on.login()
def _login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """kopf's usual login (service account in a pod, else kubeconfig); our client reuses the same credentials."""
    info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    if info is not None:
        RT.kube = Kube.from_connection_info(info)
    return info


@kopf.on.cleanup()
async def _cleanup(**_: Any) -> None:
    for task in list(RT.wake_tasks):  # shutting down: the next start's resume handlers redo them
        task.cancel()
    if RT.kube is not None:
        await RT.kube.close()


def _api() -> Kube:
    assert RT.kube is not None, "not logged in"
    return RT.kube


def _doc(body: Any) -> Obj:
    """The part of a CR body the API models parse."""
    meta = dict(body.get("metadata", {}))
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": meta,
            "spec": dict(body.get("spec") or {})}


def _spec_error(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors()[:3]:
        loc = ".".join(str(x) for x in e.get("loc", ()))
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return "; ".join(parts)


async def _write_status(kind: str, body: Any, new: Obj) -> None:
    """Patch status only when it changed (a no-op write would wake every watcher)."""
    patch = merge_patch(body.get("status") or {}, new)
    if patch:
        meta = body["metadata"]
        try:
            await _api().patch_status(kind, meta["namespace"], meta["name"], patch)
        except ApiError as exc:
            if exc.status != 404:  # deleted meanwhile: nothing to report on
                raise


def _emit(body: Any, events: list[tuple[str, str, str]]) -> None:
    for etype, reason, message in events:
        kopf.event(dict(body), type=etype, reason=reason, message=message)


# Not-ready-yet reasons that are part of normal progress, not problems: their Events are Normal, not Warning.
_IN_PROGRESS = {"Progressing", "Pending", "WaitingForTrigger", "RouterNotReady", "Clustering", "Distilling",
                "Evaluating", "RetrainingRouter", "RollingOut"}


def _transition_events(body: Any, new_conditions: list[Obj]) -> None:
    """One Event per condition whose status or reason changed (not one per resync)."""
    old = (body.get("status") or {}).get("conditions") or []
    for c in new_conditions:
        prev = get_condition(old, c["type"])
        if prev is None or prev.get("status") != c["status"] or prev.get("reason") != c["reason"]:
            etype = "Normal" if c["status"] == "True" or c["reason"] in _IN_PROGRESS else "Warning"
            kopf.event(dict(body), type=etype, reason=c["reason"], message=f"{c['type']}: {c['message']}"[:1000])


async def _invalid(kind: str, body: Any, exc: ValidationError | ValueError) -> None:
    msg = _spec_error(exc) if isinstance(exc, ValidationError) else str(exc)
    gen = body["metadata"].get("generation")
    conds = [condition("Ready", False, "InvalidSpec", f"invalid spec: {msg}", gen)]
    _transition_events(body, conds)
    await _write_status(kind, body, {
        "phase": "Failed", "observedGeneration": gen,
        "conditions": merge_conditions((body.get("status") or {}).get("conditions"), conds)})


class _timed:
    def __init__(self, kind: str):
        self.kind = kind

    def __enter__(self) -> "_timed":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        metrics.RECONCILE_SECONDS.labels(self.kind).observe(time.perf_counter() - self.t0)
        metrics.RECONCILES.labels(self.kind, "error" if exc_type else "ok").inc()


# ---------------------------------------------------------------- Secrets and NetworkPolicies

# _secret_keys' answer where the operator may not read Secrets (a distinct object: compared with `is`).
NOT_PERMITTED: frozenset[str] = frozenset({"<not permitted>"})


async def _secret_keys(ns: str, name: str) -> frozenset[str] | None:
    """The keys of a Secret (never its values), None when it does not exist, NOT_PERMITTED when the operator may not
    read Secrets in `ns` (the chart's default cluster-wide install grants Secret `get` only where asked): the check
    is then left to the kubelet, which holds the pod until the Secret exists."""
    try:
        secret = await _api().get("Secret", ns, name)
    except ApiError as exc:
        if exc.status == 403:
            return NOT_PERMITTED
        raise
    if secret is None:
        return None
    return frozenset(secret.get("data") or {}) | frozenset(secret.get("stringData") or {})


def _not_permitted(ns: str, name: str) -> str:
    return (f"Secret {name!r} not checked: the operator may not read Secrets in namespace {ns!r} (chart value "
            "rbac.secretNamespaces)")


def _network_peers() -> builders.NetworkPeers | None:
    """What the NetworkPolicies let in besides routers and campaign Jobs (None: render none), from the flags."""
    return builders.NetworkPeers.from_env(os.environ)


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
        keys = await _secret_keys(ns, name)
        if keys is None:
            return condition("AuthSecretsFound", False, "SecretNotFound", f"Secret {name!r} (spec.auth.{fld}) does not "
                             "exist: the router pods wait for it", gen)
        if keys is NOT_PERMITTED:
            unchecked.append(_not_permitted(ns, name))
        elif not keys:
            return condition("AuthSecretsFound", False, "SecretHasNoKeys", f"Secret {name!r} (spec.auth.{fld}) has no "
                             "keys: add one key per " + ("labeller" if fld == "labellersSecret" else "client"), gen)
    if unchecked:
        return condition("AuthSecretsFound", None, "SecretNotChecked", "; ".join(unchecked), gen)
    return condition("AuthSecretsFound", True, "SecretsFound", ", ".join(n for _, n in named) + " exist", gen)


# ---------------------------------------------------------------- ModelTier


async def reconcile_tier(body: Any, wake: bool = False) -> None:
    """Reconcile a tier; wake the policies using it when asked or when its readiness or endpoint changed."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    if meta.get("deletionTimestamp"):
        return
    async with RT.locks[("ModelTier", ns, name)], RT.slots():
        with _timed("ModelTier"):
            changed = await _reconcile_tier(body, ns, name)
    if wake or changed:
        await _wake_policies(ns, name)


def _tier_face(status: Obj) -> tuple:
    """What policies see of a tier: its readiness and endpoint."""
    ready = get_condition(status.get("conditions"), "Ready") or {}
    return ready.get("status"), status.get("endpoint")


async def _reconcile_tier(body: Any, ns: str, name: str) -> bool:
    api = _api()
    try:
        tier = ModelTier.model_validate(_doc(body))
    except (ValidationError, ValueError) as exc:
        metrics.MODELTIER_READY.labels(ns, name).set(0)
        await _invalid("ModelTier", body, exc)
        return _tier_face(body.get("status") or {})[0] != "False"
    gen = body["metadata"].get("generation")
    status: Obj = {"observedGeneration": gen, "endpoint": builders.tier_endpoint(tier, ns)}
    conds: list[Obj] = []
    if tier.spec.external is not None:
        ref = tier.spec.external.api_key_secret_ref
        keys = await _secret_keys(ns, ref.name) if ref else None
        if ref and keys is None:
            phase, ready = "Failed", condition("Ready", False, "SecretNotFound",
                                               f"Secret {ref.name!r} (key {ref.key!r}) does not exist", gen)
        elif ref and keys is not NOT_PERMITTED and ref.key not in keys:
            phase, ready = "Failed", condition("Ready", False, "SecretKeyNotFound",
                                               f"Secret {ref.name!r} has no key {ref.key!r}", gen)
        else:
            unchecked = f"; {_not_permitted(ns, ref.name)}" if keys is NOT_PERMITTED else ""
            phase, ready = "Ready", condition("Ready", True, "ExternalEndpoint",
                                              f"external endpoint {tier.spec.external.base_url}{unchecked}", gen)
        conds.append(ready)
    else:
        dep = None
        for obj in builders.tier_objects(tier, dict(body), ns, _network_peers()):
            applied = await api.apply(obj)  # the answer carries the Deployment's current status
            dep = applied if obj["kind"] == "Deployment" else dep
        selector = builders.selector_string(builders.tier_selector(tier))
        obs = deployment_observation(dep, tier.spec.replicas, [])
        lora = tier.spec.lora_enabled
        # Pods are read only when they matter: to explain missing replicas, or to load adapters into them.
        pods = await api.list("Pod", ns, selector) if (obs.ready < obs.desired or lora) else []
        obs = deployment_observation(dep, tier.spec.replicas, pods)
        phase, ready = tier_rollup(obs, tier.spec.engine.resources.gpu_resource_name, gen)
        conds.append(ready)
        status.update(replicas=obs.replicas, readyReplicas=obs.ready, selector=selector)
        campaigns = []
        if tier.spec.adapter_policy == "AcceptCampaign":
            for c in await api.list("DistillationCampaign", ns):
                if (c.get("spec") or {}).get("studentTier") == name:
                    campaigns += campaign_adapters(c.get("status") or {})
        wanted = wanted_adapters([a.to_k8s() for a in tier.spec.adapters], campaigns,
                                 tier.spec.adapter_policy == "AcceptCampaign")
        if wanted:
            ips = [p["status"]["podIP"] for p in pods if pod_ready(p) and (p.get("status") or {}).get("podIP")]
            cache = tier.spec.engine.model_cache.mount_path if tier.spec.engine.model_cache else None
            adapters = await reconcile_adapters(RT.pod_http, ips, wanted, cache)
            status["adapters"] = adapters
            missing = [a for a in adapters if not a["loaded"]]
            message = (f"not loaded: {', '.join(a['name'] for a in missing)}; {missing[0]['message']}" if missing
                       else f"{len(adapters)} adapters in every ready pod")
            conds.append(condition("AdaptersLoaded", not missing, "AdaptersMissing" if missing else "AllLoaded",
                                   message, gen))
        else:
            status["adapters"] = []
    status["phase"] = phase
    status["conditions"] = merge_conditions((body.get("status") or {}).get("conditions"), conds)
    metrics.MODELTIER_READY.labels(ns, name).set(1 if conds[0]["status"] == "True" else 0)
    _transition_events(body, conds)
    await _write_status("ModelTier", body, status)
    return _tier_face(body.get("status") or {}) != _tier_face(status)


@kopf.on.create(GROUP, VERSION, "modeltiers", backoff=5)
@kopf.on.update(GROUP, VERSION, "modeltiers", field="spec", backoff=5)
@kopf.on.resume(GROUP, VERSION, "modeltiers", backoff=5)
async def tier_changed(body: kopf.Body, policies_by_tier: kopf.Index, **_: Any) -> None:
    RT.policy_index = policies_by_tier
    await reconcile_tier(body, wake=True)  # its spec (cost, served name) is in the policies' router config


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
    await _wake_policies(body["metadata"]["namespace"], body["metadata"]["name"])


# ---------------------------------------------------------------- RoutingPolicy


@kopf.index(GROUP, VERSION, "routingpolicies")
def policies_by_tier(namespace: str, name: str, spec: kopf.Spec, **_: Any) -> dict[tuple[str, str], str]:
    """(namespace, tier) -> names of the policies that list the tier (kept in memory by kopf)."""
    return {(namespace, t["name"]): name for t in spec.get("tiers") or [] if isinstance(t, dict) and "name" in t}


async def _wake_policies(ns: str, tier: str) -> None:
    """Re-resolve the policies that reference a tier (its existence, spec, readiness or endpoint changed).

    Wakes are coalesced: tiers of one policy often change together (a rollout, a burst of creations), and one
    reconcile after a short pause sees them all."""
    if RT.policy_index is not None:
        names = set(RT.policy_index.get((ns, tier), []))
    else:  # before kopf handed us the index: ask the API server
        names = {p["metadata"]["name"] for p in await _api().list("RoutingPolicy", ns)
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
        p = await _api().get("RoutingPolicy", ns, name)
        if p is not None:
            await reconcile_policy(p)
    except Exception:  # the resync timer retries; a lost wake only delays the policy
        log.exception("reconciling RoutingPolicy %s/%s after a tier change failed", ns, name)


async def reconcile_policy(body: Any, observe: bool = False) -> None:
    """Reconcile a policy; `observe` also asks its router what it saw (on the resync timer, not on every event)."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    if meta.get("deletionTimestamp"):
        return
    async with RT.locks[("RoutingPolicy", ns, name)], RT.slots():
        fresh = await _api().get("RoutingPolicy", ns, name)  # the caller's copy may be stale
        if fresh is None:
            return
        with _timed("RoutingPolicy"):
            await _reconcile_policy(fresh, ns, name, observe)


async def router_figures(policy: RoutingPolicy, ns: str) -> Obj:
    """The router's /routenlp/rollout answer for the whole gateway: each ready router pod is asked directly and the
    counts are summed (api.figures.merge), since one call through the Service reaches one replica only. Without
    ready router pods (or none answering), the Service is asked."""
    name = policy.metadata.name
    pods = await _api().list("Pod", ns, builders.selector_string(builders.selector_labels("router", name)))
    ips = [p["status"]["podIP"] for p in pods if pod_ready(p) and (p.get("status") or {}).get("podIP")]
    answers = []
    for ip in sorted(ips):  # the admin port: the router's NetworkPolicy lets the operator (only) reach it
        try:
            answers.append(await RT.pod_http.get_json(f"{builders.router_admin_url(policy, ip)}/routenlp/rollout"))
        except Exception as exc:  # a pod restarting: the others still count
            log.info("router pod %s of %s/%s unavailable: %s", ip, ns, name, exc)
    if answers:
        return merge_figures(answers)
    service = f"{builders.policy_names(name)['service']}.{ns}.svc"
    return await RT.pod_http.get_json(f"{builders.router_admin_url(policy, service)}/routenlp/rollout")


async def _reconcile_policy(body: Obj, ns: str, name: str, observe: bool) -> None:
    api = _api()
    try:
        policy = RoutingPolicy.model_validate(_doc(body))
    except (ValidationError, ValueError) as exc:
        await _invalid("RoutingPolicy", body, exc)
        return
    gen = body["metadata"].get("generation")
    old = body.get("status") or {}
    budget: Obj | None = None  # BudgetExceeded, when the router's figures were read this time
    tiers: list[ModelTier] = []
    missing: list[str] = []
    invalid: list[str] = []
    not_ready: list[str] = []
    for ref in policy.spec.tiers:
        t = await api.get("ModelTier", ns, ref.name)
        if t is None:
            missing.append(ref.name)
            continue
        try:
            tiers.append(ModelTier.model_validate(_doc(t)))
        except (ValidationError, ValueError):
            invalid.append(ref.name)
            continue
        rc = get_condition((t.get("status") or {}).get("conditions"), "Ready")
        if not rc or rc.get("status") != "True":
            not_ready.append(ref.name)
    status: Obj = {"observedGeneration": gen, "tiers": [t.metadata.name for t in tiers], "missingTiers": missing}
    conds: list[Obj] = []
    if missing or invalid:
        msg = "; ".join(filter(None, [f"missing ModelTiers: {', '.join(missing)}" if missing else "",
                                      f"invalid ModelTiers: {', '.join(invalid)}" if invalid else ""]))
        reason = "MissingTiers" if missing else "InvalidTiers"
        conds += [condition("TiersResolved", False, reason, msg, gen), condition("Ready", False, reason, msg, gen)]
        status["phase"] = "Pending"
    else:
        conds.append(condition("TiersResolved", True, "AllTiersFound", f"{len(tiers)} tiers resolved", gen))
        offer = router_offer(await api.list("DistillationCampaign", ns), name)
        stats = None
        router_old = old.get("router") or {}
        if observe and policy.spec.deployment.mode == "gateway":
            # What the router observed (its /routenlp/rollout answer): canary guard inputs and the policy's figures.
            try:
                answer = await router_figures(policy, ns)
                canary = router_old.get("canary")
                stats = CanaryStats.from_answer(answer, canary) if canary else None
                status.update(observed_figures(answer))
                budget = budget_condition(policy, status.get("spentUsd24h"), gen)
            except Exception as exc:  # router not reachable yet: decide later
                log.info("router figures of %s/%s unavailable: %s", ns, name, exc)
        router_status, events = decide(policy, router_old, offer.version, stats, now_rfc3339(), offer.propose_only,
                                       offer.canary_percent, offer.promote_after)
        _emit(body, events)
        cheaper = prefer_cheaper(policy, budget or get_condition(old.get("conditions"), "BudgetExceeded"))
        objs, cfg_hash = builders.policy_objects(policy, tiers, dict(body), ns, router_status, cheaper,
                                                 _network_peers())
        for obj in objs:
            await api.apply(obj)
        status.update(configHash=cfg_hash, router=router_status)
        if policy.spec.deployment.mode == "gateway":
            status["endpoint"] = builders.router_endpoint(policy, ns)
            dep = await api.get("Deployment", ns, builders.policy_names(name)["deployment"])
            obs = deployment_observation(dep, policy.spec.deployment.replicas, [])
            if obs.desired == 0 or (obs.ready >= obs.desired and obs.updated >= obs.desired
                                    and obs.deployment_generation_observed):
                router_ok = condition("RouterReady", True, "RouterReady", f"{obs.ready}/{obs.desired} router pods ready", gen)
            else:
                router_ok = condition("RouterReady", False, "RouterNotReady",
                                      f"{obs.ready}/{obs.desired} router pods ready, {obs.updated} updated", gen)
        else:
            router_ok = condition("RouterReady", True, "SidecarMode",
                                  f"router injected into pods labelled routenlp.io/policy={name}", gen)
        conds.append(router_ok)
        auth = await auth_condition(policy, ns, gen)
        conds += [auth] if auth else []
        if not_ready:
            conds.append(condition("TiersReady", False, "TiersNotReady", f"not ready: {', '.join(not_ready)}", gen))
        else:
            conds.append(condition("TiersReady", True, "AllTiersReady", "every tier is Ready", gen))
        if auth and auth["status"] == "False":  # the router cannot start without them: say why first
            ready = condition("Ready", False, auth["reason"], auth["message"], gen)
            status["phase"] = "Failed"
        elif router_ok["status"] != "True":
            ready = condition("Ready", False, router_ok["reason"], router_ok["message"], gen)
            status["phase"] = "Progressing"
        elif not_ready:
            ready = condition("Ready", False, "TiersNotReady", f"not ready: {', '.join(not_ready)}", gen)
            status["phase"] = "Degraded"
        else:
            ready = condition("Ready", True, "Ready", "router serving; every tier Ready", gen)
            status["phase"] = "Ready"
        conds.append(ready)
    status["conditions"] = merge_conditions(old.get("conditions"), conds + ([budget] if budget else []))
    if policy.spec.budget is None:  # budget removed from the spec: so is its condition
        status["conditions"] = [c for c in status["conditions"] if c["type"] != "BudgetExceeded"]
    if not (policy.spec.auth.labellers_secret or policy.spec.auth.client_keys_secret):  # likewise spec.auth
        status["conditions"] = [c for c in status["conditions"] if c["type"] != "AuthSecretsFound"]
    _transition_events(body, conds)
    _emit(body, budget_events(get_condition(old.get("conditions"), "BudgetExceeded"), budget))
    await _write_status("RoutingPolicy", body, status)


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
    await reconcile_policy(body)


@kopf.timer(GROUP, VERSION, "routingpolicies", interval=RT.resync_seconds, initial_delay=RT.resync_seconds, idle=0)
async def policy_resync(body: kopf.Body, **_: Any) -> None:
    await reconcile_policy(body, observe=True)


# ---------------------------------------------------------------- owned objects: drift repair


_OWNER_RECONCILE = {"ModelTier": reconcile_tier, "RoutingPolicy": reconcile_policy}


def _fingerprint(body: Any) -> str:
    """Everything of an owned object but its bookkeeping metadata: equal fingerprints = nothing to react to."""
    keep = {k: v for k, v in body.items() if k != "metadata"}
    meta = body.get("metadata", {})
    keep["_meta"] = {k: meta.get(k) for k in ("labels", "annotations", "ownerReferences", "generation")}
    return json.dumps(keep, sort_keys=True, default=str)


_OWNED = {"app.kubernetes.io/managed-by": "routenlp-operator"}


@kopf.on.event("apps", "v1", "deployments", labels=_OWNED)
@kopf.on.event("v1", "services", labels=_OWNED)
@kopf.on.event("v1", "configmaps", labels=_OWNED)
async def owned_changed(event: Obj, body: kopf.Body, uid: str, policies_by_tier: kopf.Index, **_: Any) -> None:
    """An owned object changed (its status, or a user's edit) or vanished: reconcile its owner now.

    Events that change nothing we care about (the object's own creation, re-lists after a watch restart) are
    skipped: only deletions and real changes cost a reconcile."""
    RT.policy_index = policies_by_tier
    fp = _fingerprint(body)
    previous = RT.fingerprints.get(uid)
    if event.get("type") == "DELETED":
        RT.fingerprints.pop(uid, None)
    else:
        RT.fingerprints[uid] = fp
        if previous is None or previous == fp:  # first sight (we just applied it) or no change
            return
    for ref in body["metadata"].get("ownerReferences") or []:
        fn = _OWNER_RECONCILE.get(ref.get("kind"))
        if fn is None or not ref.get("apiVersion", "").startswith(GROUP + "/"):
            continue
        owner = await _api().get(ref["kind"], body["metadata"]["namespace"], ref["name"])
        if owner is not None and owner["metadata"].get("uid") == ref.get("uid"):
            await fn(owner)


# ---------------------------------------------------------------- DistillationCampaign


async def reconcile_campaign(body: Any) -> None:
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    if meta.get("deletionTimestamp"):
        return
    async with RT.locks[("DistillationCampaign", ns, name)], RT.slots():
        fresh = await _api().get("DistillationCampaign", ns, name)
        if fresh is None:
            return
        with _timed("DistillationCampaign"):
            follow_up = await _reconcile_campaign(fresh, ns, name)
    if follow_up:
        # Results flow to the policy's status (router version) and the student tier (adapter), never their spec.
        policy_name, student = follow_up
        policy = await _api().get("RoutingPolicy", ns, policy_name)
        if policy is not None:
            await reconcile_policy(policy)
        tier = await _api().get("ModelTier", ns, student)
        if tier is not None:
            await reconcile_tier(tier)


async def _reconcile_campaign(body: Obj, ns: str, name: str) -> tuple[str, str] | None:
    api = _api()
    try:
        campaign = DistillationCampaign.model_validate(_doc(body))
    except (ValidationError, ValueError) as exc:
        await _invalid("DistillationCampaign", body, exc)
        return None
    gen = body["metadata"].get("generation")
    old = body.get("status") or {}
    policy = await api.get("RoutingPolicy", ns, campaign.spec.policy_ref)
    if policy is None:
        conds = [condition("Ready", False, "PolicyNotFound",
                           f"RoutingPolicy {campaign.spec.policy_ref!r} does not exist", gen)]
        _transition_events(body, conds)
        await _write_status("DistillationCampaign", body, {
            "observedGeneration": gen, "phase": old.get("phase") or "Pending",
            "conditions": merge_conditions(old.get("conditions"), conds)})
        return None
    tiers = {t: await api.get("ModelTier", ns, t) for t in (campaign.spec.student_tier, campaign.spec.teacher_tier)}
    missing = [t for t, obj in tiers.items() if obj is None]
    problem = ("TiersNotFound", f"ModelTiers not found: {', '.join(missing)}") if missing else None
    if problem is None:
        try:
            policy_model = RoutingPolicy.model_validate(_doc(policy))
            ctx = builders.stage_context(
                campaign, policy_model, ModelTier.model_validate(_doc(tiers[campaign.spec.student_tier])),
                ModelTier.model_validate(_doc(tiers[campaign.spec.teacher_tier])), ns)
        except (ValidationError, ValueError) as exc:
            problem = ("InvalidReference", f"the policy or a tier it names is invalid: {exc}"[:500])
    if problem:
        conds = [condition("Ready", False, *problem, gen)]
        _transition_events(body, conds)
        await _write_status("DistillationCampaign", body, {
            "observedGeneration": gen, "phase": old.get("phase") or "Pending",
            "conditions": merge_conditions(old.get("conditions"), conds)})
        return None
    pol_status = policy.get("status") or {}
    annotations = body["metadata"].get("annotations") or {}
    observed_run_id = annotations.get("routenlp.io/observed-run-id")
    # The policy's figures come from its router (/routenlp/rollout): escalations since its stable version was first
    # served, so a new version from the previous run starts the failure count afresh.
    rate, failures = pol_status.get("escalationRate"), pol_status.get("escalations")
    reason = should_start(campaign, old, observed_run_id, now_utc(), rate, failures)
    run = int(old.get("run") or 0)
    jobs = []
    if run:
        for j in await api.list("Job", ns, f"routenlp.io/campaign={name},routenlp.io/run={run}"):
            pods = await api.list("Pod", ns, f"job-name={j['metadata']['name']}")
            jobs.append(job_result(j, pods))
    step = advance(campaign, old, jobs, now_rfc3339(), pol_status.get("router"), reason, pol_status)
    if reason and campaign.spec.trigger.run_id and step.status.get("run", 0) > run:
        await api.patch_metadata("DistillationCampaign", ns, name,
                                 {"annotations": {"routenlp.io/observed-run-id": campaign.spec.trigger.run_id}})
    for holder in (step.status, *step.status.get("rounds", [])):  # where the student tier sees what publish wrote
        if holder.get("adapter") and ctx is not None:
            adapter, _, source = holder["adapter"].partition("@")
            holder["adapter"] = f"{adapter}@{builders.tier_adapter_source(source, ctx.student_cache_claim)}"
    if step.create_job:
        stage, attempt = step.create_job
        claim = campaign.spec.resources.artifact_claim_name or builders.events_claim(policy_model)
        job = builders.stage_job(campaign, body, ns, stage, int(step.status["run"]), attempt, claim, ctx,
                                 int(step.status.get("round") or 1))
        await api.apply(distill_workload(job, campaign) if stage == "Distilling" else job)
    _emit(body, step.events)
    if step.finished:
        metrics.CAMPAIGN_RUNS.labels(ns, name, step.finished).inc()
    phase = step.status.get("phase")
    ok = phase in ("Succeeded", "Proposed")
    reason_word = {"Failed": "RunFailed", "Pending": "WaitingForTrigger"}.get(phase, phase)
    stage_msg = next((s.get("message") for s in reversed(step.status.get("stages", [])) if s.get("message")), "")
    waiting = trigger_waiting(campaign, step.status, now_utc(), rate, failures) if phase == "Pending" else ""
    conds = [condition("Ready", ok if phase != "Failed" else False, reason_word,
                       f"phase {phase}" + (f": {stage_msg}" if stage_msg else "")
                       + (f": waiting for the trigger: {waiting}" if waiting else ""), gen)]
    step.status["observedGeneration"] = gen
    step.status["conditions"] = merge_conditions(old.get("conditions"), conds)
    _transition_events(body, conds)
    await _write_status("DistillationCampaign", body, step.status)
    if phase != old.get("phase") and phase in ("RollingOut", "Proposed", "Succeeded"):
        return campaign.spec.policy_ref, campaign.spec.student_tier
    return None


@kopf.on.create(GROUP, VERSION, "distillationcampaigns", backoff=5)
@kopf.on.update(GROUP, VERSION, "distillationcampaigns", field="spec", backoff=5)
@kopf.on.resume(GROUP, VERSION, "distillationcampaigns", backoff=5)
async def campaign_changed(body: kopf.Body, **_: Any) -> None:
    await reconcile_campaign(body)


@kopf.timer(GROUP, VERSION, "distillationcampaigns", interval=RT.campaign_seconds, initial_delay=RT.campaign_seconds,
            idle=0)
async def campaign_resync(body: kopf.Body, **_: Any) -> None:
    await reconcile_campaign(body)


@kopf.on.event("batch", "v1", "jobs", labels={"routenlp.io/campaign": kopf.PRESENT})
async def stage_job_changed(body: kopf.Body, **_: Any) -> None:
    for ref in body["metadata"].get("ownerReferences") or []:
        if ref.get("kind") == "DistillationCampaign":
            owner = await _api().get("DistillationCampaign", body["metadata"]["namespace"], ref["name"])
            if owner is not None:
                await reconcile_campaign(owner)


# ---------------------------------------------------------------- sidecar injection (mutating admission webhook)


@kopf.index(GROUP, VERSION, "routingpolicies")
def policies_by_name(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[tuple[str, str], Obj]:
    return {(namespace, name): _doc(body)}


@kopf.index(GROUP, VERSION, "modeltiers")
def tiers_by_name(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[tuple[str, str], Obj]:
    return {(namespace, name): _doc(body)}


def _one(index: kopf.Index, key: tuple[str, str]) -> Obj | None:
    for v in index.get(key, []):
        return v
    return None


def inject_router(body: kopf.Body, patch: kopf.Patch, policies_by_name: kopf.Index, tiers_by_name: kopf.Index,
                  namespace: str | None, **_: Any) -> None:
    """Add the router container + config volume to pods labelled routenlp.io/policy=<a sidecar-mode policy>."""
    ns = namespace or body["metadata"].get("namespace") or "default"
    pname = body["metadata"]["labels"]["routenlp.io/policy"]
    doc = _one(policies_by_name, (ns, pname))
    if doc is None:
        raise kopf.AdmissionError(f"RoutingPolicy {pname!r} not found in namespace {ns!r}", code=400)
    try:
        policy = RoutingPolicy.model_validate(doc)
    except (ValidationError, ValueError) as exc:
        raise kopf.AdmissionError(f"RoutingPolicy {pname!r} is invalid: {exc}", code=400)
    if policy.spec.deployment.mode != "sidecar":
        return  # gateway-mode policies are reached through their Service; nothing to inject
    tiers = []
    for ref in policy.spec.tiers:
        t = _one(tiers_by_name, (ns, ref.name))
        if t is not None:
            tiers.append(ModelTier.model_validate(t))
    ops = builders.sidecar_patch(dict(body), policy, tiers)
    if ops:
        patch.fns.append(lambda b: jsonpatch.apply_patch(b, ops, in_place=True))


def register_sidecar_webhook(registry: kopf.OperatorRegistry | None = None) -> bool:
    """Register the sidecar-injection mutating handler once, if ROUTENLP_WEBHOOK_PORT names a webhook server.

    kopf refuses to start with admission handlers but no webhook server, so registration follows the environment.
    It runs at import (the usual `kopf run -m routenlp.operator.handlers`) and again in `_startup`, where the
    server is configured: a process that imported this module before the port was set (tests collected first, an
    embedding program) would otherwise serve a webhook with no handler, answering 404 to every review.
    Returns whether the handler is registered.
    """
    registry = kopf.get_default_registry() if registry is None else registry
    # kopf has no public lookup by handler id; its own observation code reads the same registry.
    if any(h.id == "routenlp-sidecar" for h in registry._webhooks.get_all_handlers()):
        return True
    if not int(os.environ.get("ROUTENLP_WEBHOOK_PORT", "0")):
        return False
    kopf.on.mutate("v1", "pods", id="routenlp-sidecar", operation="CREATE",
                   labels={"routenlp.io/policy": kopf.PRESENT}, side_effects=False, ignore_failures=False,
                   registry=registry)(inject_router)
    return True


register_sidecar_webhook()
