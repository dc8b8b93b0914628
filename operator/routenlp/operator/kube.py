"""A small async Kubernetes client for the operator's own calls (kopf does its own watching and patching).

Writes are server-side apply with one field manager, so re-applying the same object is a no-op and fields a user
changed on an owned object are taken back (drift repair) while fields the operator never set stay the user's.
Credentials come from kopf's login (the same ConnectionInfo kopf uses), so there is one place that authenticates.
Hand-written, not the `kubernetes` package's client: that one is synchronous and would block kopf's event loop (the
operator uses the package for what needs no I/O: quantities.py).
"""

from __future__ import annotations

import base64
import json
import ssl
from typing import Any
from urllib.parse import urlencode

import aiohttp

from routenlp.api import API_VERSION
from routenlp.api.release import RELEASE

from .meta import FIELD_MANAGER

Obj = dict[str, Any]
USER_AGENT = f"routenlp-operator/{RELEASE}"

# kind -> (apiVersion, plural): every kind the operator reads or writes. rbac.RULES (+ SECRET_RULES) must cover
# each use.
KINDS: dict[str, tuple[str, str]] = {
    "Deployment": ("apps/v1", "deployments"),
    "Service": ("v1", "services"),
    "ConfigMap": ("v1", "configmaps"),
    "PersistentVolumeClaim": ("v1", "persistentvolumeclaims"),
    "Secret": ("v1", "secrets"),
    "Pod": ("v1", "pods"),
    "Job": ("batch/v1", "jobs"),
    "JobSet": ("jobset.x-k8s.io/v1alpha2", "jobsets"),  # a campaign's distill stage (resources.distillRunner)
    "TrainJob": ("trainer.kubeflow.org/v1alpha1", "trainjobs"),
    "NetworkPolicy": ("networking.k8s.io/v1", "networkpolicies"),
    "ModelTier": (API_VERSION, "modeltiers"),
    "RoutingPolicy": (API_VERSION, "routingpolicies"),
    "DistillationCampaign": (API_VERSION, "distillationcampaigns"),
}


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def path(kind: str, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
    api_version, plural = KINDS[kind]
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    out = base + (f"/namespaces/{namespace}" if namespace else "") + f"/{plural}"
    if name:
        out += f"/{name}"
    if subresource:
        out += f"/{subresource}"
    return out


class Kube:
    def __init__(self, server: str, headers: dict[str, str] | None = None, ssl_context: ssl.SSLContext | bool | None = None):
        self.server = server.rstrip("/")
        self.headers = headers or {}
        self.ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_connection_info(cls, info: Any) -> "Kube":
        headers = {}
        if info.token:
            headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
        ctx: ssl.SSLContext | bool | None = None
        if info.server.startswith("https"):
            if info.insecure:
                ctx = False
            else:
                ctx = ssl.create_default_context(cafile=info.ca_path or None, cadata=_text(info.ca_data))
                if info.certificate_path and info.private_key_path:
                    ctx.load_cert_chain(info.certificate_path, info.private_key_path)
        return cls(info.server, headers, ctx)

    async def _request(self, method: str, url: str, body: Any = None, content_type: str = "application/json") -> Any:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        data = json.dumps(body) if body is not None else None
        headers = {**self.headers, "Accept": "application/json", "User-Agent": USER_AGENT}
        if data is not None:
            headers["Content-Type"] = content_type
        async with self._session.request(method, self.server + url, data=data, headers=headers, ssl=self.ssl) as r:
            text = await r.text()
            if r.status >= 400:
                try:
                    msg = json.loads(text).get("message", text)
                except ValueError:
                    msg = text
                raise ApiError(r.status, msg[:500])
            return json.loads(text) if text else None

    async def apply(self, obj: Obj) -> Obj:
        """Server-side apply (force: the operator owns what it applies)."""
        meta = obj["metadata"]
        q = urlencode({"fieldManager": FIELD_MANAGER, "force": "true"})
        return await self._request("PATCH", path(obj["kind"], meta.get("namespace"), meta["name"]) + "?" + q, obj,
                                   "application/apply-patch+yaml")

    async def get(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        try:
            return await self._request("GET", path(kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, kind: str, namespace: str | None, label_selector: str | None = None) -> list[Obj]:
        url = path(kind, namespace)
        if label_selector:
            url += "?" + urlencode({"labelSelector": label_selector})
        return (await self._request("GET", url)).get("items", [])

    async def patch_status(self, kind: str, namespace: str, name: str, status: Obj) -> Obj:
        return await self._request("PATCH", path(kind, namespace, name, "status"), {"status": status},
                                   "application/merge-patch+json")

    async def patch_metadata(self, kind: str, namespace: str, name: str, metadata: Obj) -> Obj:
        return await self._request("PATCH", path(kind, namespace, name), {"metadata": metadata},
                                   "application/merge-patch+json")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _text(data: str | bytes | None) -> str | None:
    if data is None:
        return None
    if isinstance(data, bytes):
        data = data.decode()
    if "BEGIN CERTIFICATE" not in data:  # kubeconfig stores it base64-encoded
        data = base64.b64decode(data).decode()
    return data
