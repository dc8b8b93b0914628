"""The admission webhooks kopf serves when ROUTENLP_WEBHOOK_PORT is set: sidecar injection (the mutating webhook that
adds a policy's router to pods labelled routenlp.io/policy=<a sidecar-mode policy>), and the validating webhook that
answers RoutingPolicy writes with warnings for the deprecated fields they set (kubectl prints them); it never
refuses one (the CRD's schema and rules do that)."""

from __future__ import annotations

import os
from typing import Any

import jsonpatch
import kopf
from pydantic import ValidationError

from routenlp.api import GROUP, VERSION, ModelTier, RoutingPolicy
from routenlp.api.routingpolicy import deprecations

from .quantities import checked
from .routingpolicy import ROUTER_LABEL, router_container, router_volumes
from .runtime import doc

Obj = dict[str, Any]


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


# ---------------------------------------------------------------- handlers


@kopf.index(GROUP, VERSION, "routingpolicies")
def policies_by_name(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[tuple[str, str], Obj]:
    return {(namespace, name): doc(body)}


@kopf.index(GROUP, VERSION, "modeltiers")
def tiers_by_name(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[tuple[str, str], Obj]:
    return {(namespace, name): doc(body)}


def _one(index: kopf.Index, key: tuple[str, str]) -> Obj | None:
    for v in index.get(key, []):
        return v
    return None


def inject_router(body: kopf.Body, patch: kopf.Patch, policies_by_name: kopf.Index, tiers_by_name: kopf.Index,
                  namespace: str | None, **_: Any) -> None:
    """Add the router container + config volume to pods labelled routenlp.io/policy=<a sidecar-mode policy>."""
    ns = namespace or body["metadata"].get("namespace") or "default"
    pname = body["metadata"]["labels"]["routenlp.io/policy"]
    found = _one(policies_by_name, (ns, pname))
    if found is None:
        raise kopf.AdmissionError(f"RoutingPolicy {pname!r} not found in namespace {ns!r}", code=400)
    try:
        policy = checked(RoutingPolicy.model_validate(found))  # the pod would be refused for a bad quantity
    except (ValidationError, ValueError) as exc:
        raise kopf.AdmissionError(f"RoutingPolicy {pname!r} is invalid: {exc}", code=400)
    if policy.spec.deployment.mode != "sidecar":
        return  # gateway-mode policies are reached through their Service; nothing to inject
    tiers = []
    for ref in policy.spec.tiers:
        t = _one(tiers_by_name, (ns, ref.name))
        if t is not None:
            tiers.append(ModelTier.model_validate(t))
    ops = sidecar_patch(dict(body), policy, tiers)
    if ops:
        patch.fns.append(lambda b: jsonpatch.apply_patch(b, ops, in_place=True))


def deprecation_warnings(body: Any) -> list[str]:
    """The AdmissionReview warnings for a RoutingPolicy: one per deprecated field it sets. None for a spec the models
    reject: the operator reports that one as InvalidSpec (its Ready condition and a Warning Event)."""
    try:
        policy = RoutingPolicy.model_validate(doc(body))
    except (ValidationError, ValueError):
        return []
    return [str(d) for d in deprecations(policy.spec)]


def warn_deprecated(body: kopf.Body, warnings: list[str], **_: Any) -> None:
    """Validating handler of RoutingPolicy CREATE/UPDATE: allows every write, with warnings for deprecated fields."""
    warnings.extend(deprecation_warnings(body))


def register_webhooks(registry: kopf.OperatorRegistry | None = None) -> bool:
    """Register the admission handlers (sidecar injection, deprecation warnings) once, if ROUTENLP_WEBHOOK_PORT names
    a webhook server.

    kopf refuses to start with admission handlers but no webhook server, so registration follows the environment.
    It runs at import (the usual `kopf run -m routenlp.operator.handlers`) and again in `_webhook_startup`, where
    the server is configured: a process that imported this module before the port was set (tests collected first, an
    embedding program) would otherwise serve a webhook with no handler, answering 404 to every review.
    Returns whether the handlers are registered.
    """
    registry = kopf.get_default_registry() if registry is None else registry
    # kopf has no public lookup by handler id; its own observation code reads the same registry.
    if any(h.id == "routenlp-sidecar" for h in registry._webhooks.get_all_handlers()):
        return True
    if not int(os.environ.get("ROUTENLP_WEBHOOK_PORT", "0")):
        return False
    # kopf serves each handler at /<id>: the paths of the chart's webhook configurations.
    kopf.on.mutate("v1", "pods", id="routenlp-sidecar", operation="CREATE",
                   labels={"routenlp.io/policy": kopf.PRESENT}, side_effects=False, ignore_failures=False,
                   registry=registry)(inject_router)
    kopf.on.validate(GROUP, VERSION, "routingpolicies", id="routenlp-deprecations", operations=["CREATE", "UPDATE"],
                     side_effects=False, ignore_failures=True, registry=registry)(warn_deprecated)
    return True


@kopf.on.startup()
async def _webhook_startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    port = int(os.environ.get("ROUTENLP_WEBHOOK_PORT", "0"))
    if port:  # kopf serves the mutating webhook over HTTPS with the given certificate
        settings.admission.server = kopf.WebhookServer(
            addr=os.environ.get("ROUTENLP_WEBHOOK_ADDR", "0.0.0.0"), port=port,
            certfile=os.environ["ROUTENLP_WEBHOOK_CERT"], pkeyfile=os.environ["ROUTENLP_WEBHOOK_KEY"])
        # The server and its handlers follow the same environment, read now (root tasks start after startup).
        register_webhooks()


register_webhooks()
