"""Drift repair: when an object the operator owns changes (its status, a user's edit) or vanishes, its ModelTier or
RoutingPolicy is reconciled at once instead of at the next resync."""

from __future__ import annotations

import json
from typing import Any

import kopf

from routenlp.api import GROUP

from .meta import MANAGED_BY
from .modeltier import reconcile_tier
from .routingpolicy import reconcile_policy
from .runtime import RT, kube

Obj = dict[str, Any]


_OWNER_RECONCILE = {"ModelTier": reconcile_tier, "RoutingPolicy": reconcile_policy}


def _fingerprint(body: Any) -> str:
    """Everything of an owned object but its bookkeeping metadata: equal fingerprints = nothing to react to."""
    keep = {k: v for k, v in body.items() if k != "metadata"}
    meta = body.get("metadata", {})
    keep["_meta"] = {k: meta.get(k) for k in ("labels", "annotations", "ownerReferences", "generation")}
    return json.dumps(keep, sort_keys=True, default=str)


@kopf.on.event("apps", "v1", "deployments", labels=MANAGED_BY)
@kopf.on.event("v1", "services", labels=MANAGED_BY)
@kopf.on.event("v1", "configmaps", labels=MANAGED_BY)
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
        owner = await kube().get(ref["kind"], body["metadata"]["namespace"], ref["name"])
        if owner is not None and owner["metadata"].get("uid") == ref.get("uid"):
            await fn(owner)

