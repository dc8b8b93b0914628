"""The process-wide runtime every kind's handlers share: collaborators and settings, kopf's startup, login and
cleanup, and the I/O helpers of a reconcile (status writes, Events, the invalid-spec report, Secret checks)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import defaultdict
from typing import Any

import kopf
from pydantic import ValidationError

from routenlp.api.common import READY

from . import metrics
from .adapters import AiohttpPodHTTP, PodHTTP
from .kube import ApiError, Kube
from .meta import NetworkPeers
from .status import condition, get_condition, merge_conditions, merge_patch

log = logging.getLogger("routenlp.operator")
Obj = dict[str, Any]


class Runtime:
    """Process-wide collaborators; tests replace `pod_http` to fake the vLLM pods' and routers' answers."""

    kube: Kube | None = None
    pod_http: PodHTTP = AiohttpPodHTTP()
    resync_seconds: float = float(os.environ.get("ROUTENLP_RESYNC_SECONDS", "30"))
    campaign_seconds: float = float(os.environ.get("ROUTENLP_CAMPAIGN_SECONDS", "10"))
    # One reconcile per object at a time: kopf serialises an object's change handlers, but its timers, the policy
    # wakes and the drift/campaign follow-ups run beside them.
    locks: dict[tuple[str, str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
    fingerprints: dict[str, str] = {}  # owned object uid -> last seen content (see owned.owned_changed)
    deprecations_reported: dict[str, int | None] = {}  # policy uid -> generation whose DeprecatedField Event was sent
    policy_index: Any = None  # kopf's policies_by_tier index, captured from the first handler call
    pending_wakes: set[tuple[str, str]] = set()
    wake_tasks: set[asyncio.Task] = set()
    wake_delay: float = float(os.environ.get("ROUTENLP_WAKE_DELAY_SECONDS", "0.2"))
    # Bounds concurrent reconciles: a burst of thousands of objects otherwise floods the API server at once. Not
    # kopf's settings.batching.worker_limit: that bounds watch workers only, not timers, wakes or follow-ups.
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


def kube() -> Kube:
    assert RT.kube is not None, "not logged in"
    return RT.kube


def doc(body: Any) -> Obj:
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


async def write_status(kind: str, body: Any, new: Obj) -> None:
    """Patch status only when it changed (a no-op write would wake every watcher)."""
    patch = merge_patch(body.get("status") or {}, new)
    if patch:
        meta = body["metadata"]
        try:
            await kube().patch_status(kind, meta["namespace"], meta["name"], patch)
        except ApiError as exc:
            if exc.status != 404:  # deleted meanwhile: nothing to report on
                raise


def emit(body: Any, events: list[tuple[str, str, str]]) -> None:
    for etype, reason, message in events:
        kopf.event(dict(body), type=etype, reason=reason, message=message)


# Not-ready-yet reasons that are part of normal progress, not problems: their Events are Normal, not Warning.
_IN_PROGRESS = {"Progressing", "Pending", "WaitingForTrigger", "RouterNotReady", "Clustering", "Distilling",
                "Evaluating", "RetrainingRouter", "RollingOut"}


def transition_events(body: Any, new_conditions: list[Obj]) -> None:
    """One Event per condition whose status or reason changed (not one per resync)."""
    old = (body.get("status") or {}).get("conditions") or []
    for c in new_conditions:
        prev = get_condition(old, c["type"])
        if prev is None or prev.get("status") != c["status"] or prev.get("reason") != c["reason"]:
            etype = "Normal" if c["status"] == "True" or c["reason"] in _IN_PROGRESS else "Warning"
            kopf.event(dict(body), type=etype, reason=c["reason"], message=f"{c['type']}: {c['message']}"[:1000])


async def invalid(kind: str, body: Any, exc: ValidationError | ValueError) -> str:
    """Report a spec that cannot succeed (Ready=False, InvalidSpec, a Warning Event); returns the message, which
    the change handlers raise as kopf.PermanentError (see settle)."""
    msg = f"invalid spec: {_spec_error(exc) if isinstance(exc, ValidationError) else exc}"
    gen = body["metadata"].get("generation")
    conds = [condition(READY, False, "InvalidSpec", msg, gen)]
    transition_events(body, conds)
    await write_status(kind, body, {
        "phase": "Failed", "observedGeneration": gen,
        "conditions": merge_conditions((body.get("status") or {}).get("conditions"), conds)})
    return msg


def settle(invalid_spec: str | None) -> None:
    """In a change handler: an invalid spec is final, so kopf must not retry (a spec change calls it again).
    Timers and follow-ups do not raise: the status already says why, and kopf would log it every resync."""
    if invalid_spec:
        raise kopf.PermanentError(invalid_spec)


class timed:
    """Counts a kind's reconciles by result and times them (metrics.RECONCILES, RECONCILE_SECONDS)."""

    def __init__(self, kind: str):
        self.kind = kind

    def __enter__(self) -> "timed":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        metrics.RECONCILE_SECONDS.labels(self.kind).observe(time.perf_counter() - self.t0)
        metrics.RECONCILES.labels(self.kind, "error" if exc_type else "ok").inc()


# secret_keys' answer where the operator may not read Secrets (a distinct object: compared with `is`).
NOT_PERMITTED: frozenset[str] = frozenset({"<not permitted>"})


async def secret_keys(ns: str, name: str) -> frozenset[str] | None:
    """The keys of a Secret (never its values), None when it does not exist, NOT_PERMITTED when the operator may not
    read Secrets in `ns` (the chart's default cluster-wide install grants Secret `get` only where asked): the check
    is then left to the kubelet, which holds the pod until the Secret exists."""
    try:
        secret = await kube().get("Secret", ns, name)
    except ApiError as exc:
        if exc.status == 403:
            return NOT_PERMITTED
        raise
    if secret is None:
        return None
    return frozenset(secret.get("data") or {}) | frozenset(secret.get("stringData") or {})


def not_permitted(ns: str, name: str) -> str:
    return (f"Secret {name!r} not checked: the operator may not read Secrets in namespace {ns!r} (chart value "
            "rbac.secretNamespaces)")


def network_peers() -> NetworkPeers | None:
    """What the NetworkPolicies let in besides routers and campaign Jobs (None: render none), from the flags."""
    return NetworkPeers.from_env(os.environ)
