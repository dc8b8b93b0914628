"""Pure status logic: conditions and the roll-up of what the operator observed into phase + Ready."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from routenlp.api.common import (
    AUTH_SECRETS_FOUND, READY, ROUTER_READY, ROUTING_POLICY_READY, TIERS_READY, TIERS_RESOLVED, now_rfc3339,
)

Obj = dict[str, Any]


def condition(type_: str, ok: bool | None, reason: str, message: str = "", generation: int | None = None) -> Obj:
    status = "Unknown" if ok is None else ("True" if ok else "False")
    out = {"type": type_, "status": status, "reason": reason, "message": message}
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def merge_conditions(old: list[Obj] | None, new: list[Obj], now: str | None = None) -> list[Obj]:
    """New conditions replace old ones of the same type; lastTransitionTime moves only when status changes."""
    now = now or now_rfc3339()
    by_type = {c["type"]: c for c in (old or [])}
    out = {c["type"]: c for c in (old or [])}
    for c in new:
        prev = by_type.get(c["type"])
        keep_time = prev is not None and prev.get("status") == c["status"] and prev.get("lastTransitionTime")
        out[c["type"]] = {**c, "lastTransitionTime": prev["lastTransitionTime"] if keep_time else now}
    return list(out.values())


def get_condition(conditions: list[Obj] | None, type_: str) -> Obj | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


@dataclass(frozen=True)
class TierObservation:
    """What the handler saw of a tier's Deployment and pods."""

    desired: int
    replicas: int = 0
    ready: int = 0
    updated: int = 0
    deployment_generation_observed: bool = True  # deployment.status.observedGeneration >= metadata.generation
    unschedulable_messages: tuple[str, ...] = ()  # PodScheduled=False messages of pending pods


def tier_rollup(obs: TierObservation, gpu_resource: str, generation: int | None) -> tuple[str, Obj]:
    """(phase, Ready condition) of an engine tier."""
    gpu_short = [m for m in obs.unschedulable_messages if f"Insufficient {gpu_resource}" in m]
    if obs.desired == 0:
        return "Ready", condition(READY, True, "ScaledToZero", "replicas is 0: no pods wanted", generation)
    if obs.ready >= obs.desired and obs.updated >= obs.desired and obs.deployment_generation_observed:
        return "Ready", condition(READY, True, "PodsReady", f"{obs.ready}/{obs.desired} pods ready", generation)
    if gpu_short:
        return ("Degraded" if obs.ready else "Pending"), condition(
            READY, False, "InsufficientGPU",
            f"{obs.ready}/{obs.desired} pods ready; pods cannot be scheduled: {gpu_short[0]}", generation)
    if obs.updated < obs.desired or not obs.deployment_generation_observed:
        return "Progressing", condition(
            READY, False, "Progressing", f"rolling out: {obs.updated}/{obs.desired} pods updated, {obs.ready} ready",
            generation)
    return ("Degraded" if obs.ready else "Progressing"), condition(
        READY, False, "PodsNotReady", f"{obs.ready}/{obs.desired} pods pass /health", generation)


# A RoutingPolicy's phase while a condition of its ready set holds Ready back.
_POLICY_PHASE = {TIERS_RESOLVED: "Pending", AUTH_SECRETS_FOUND: "Failed", ROUTER_READY: "Progressing",
                 TIERS_READY: "Degraded"}


def policy_rollup(conditions: list[Obj], generation: int | None) -> tuple[str, Obj]:
    """(phase, Ready condition) of a RoutingPolicy from the conditions this reconcile computed: Ready says why
    the first blocking one (api.common.ROUTING_POLICY_READY) blocks, in its words."""
    blocking = ROUTING_POLICY_READY.blocking(conditions)
    if blocking is None:
        return "Ready", condition(READY, True, "Ready", "router serving; every tier Ready", generation)
    return _POLICY_PHASE[blocking["type"]], condition(READY, False, blocking["reason"], blocking["message"],
                                                      generation)


def deployment_observation(deployment: Obj | None, desired: int, pods: list[Obj]) -> TierObservation:
    st = (deployment or {}).get("status", {}) or {}
    meta = (deployment or {}).get("metadata", {})
    gen_ok = st.get("observedGeneration", 0) >= meta.get("generation", 0) if deployment else False
    messages = []
    for p in pods:
        for c in (p.get("status") or {}).get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False":
                messages.append(c.get("message", ""))
    return TierObservation(
        desired=desired,
        replicas=st.get("replicas", 0) or 0,
        ready=st.get("readyReplicas", 0) or 0,
        updated=st.get("updatedReplicas", 0) or 0,
        deployment_generation_observed=gen_ok,
        unschedulable_messages=tuple(messages),
    )


def pod_ready(pod: Obj) -> bool:
    """The kubelet's own Ready condition of the Pod is True and the Pod is not terminating."""
    st = pod.get("status") or {}
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or [])


def merge_patch(old: Obj, new: Obj) -> Obj:
    """A JSON merge patch turning `old` into `new` for the keys `new` names (others, e.g. figures the router
    writes, are left alone); keys dropped inside nested objects become null (= delete)."""
    out: Obj = {}
    for k, v in new.items():
        o = old.get(k)
        if isinstance(v, dict) and isinstance(o, dict):
            sub = merge_patch(o, v)
            sub.update({kk: None for kk in o if kk not in v})
            if sub:
                out[k] = sub
        elif v != o:
            out[k] = v
    return out
