"""A Kubernetes API server emulator good enough to run the real kopf operator against, built on kmock==0.8.

kmock's `KubernetesEmulator` provides the HTTP server, URL parsing into (resource, namespace, name, action),
Kubernetes-style error bodies, streaming and API discovery. On its own (0.8) it cannot carry kopf; this subclass
replaces its object store to close those gaps:

- uid / resourceVersion / creationTimestamp / generation assigned; generation bumps only when something other than
  metadata and status changes; a patch that changes nothing is a no-op (same resourceVersion, no watch event);
- namespace taken from the URL; generateName; 409 on duplicate create; 404 on missing objects;
- watches start from the requested resourceVersion (replaying later events only; 410 Gone when too old), end
  after `timeoutSeconds`, and filter by namespace, labelSelector and fieldSelector (`a.b=c`, `!=`);
- status subresource (kinds that declare one): create drops `.status`; writes to the main resource keep `.status`, writes to `/status` change only `.status`;
  `/scale` of custom resources with a scale subresource (GET and merge PATCH);
- patch types: merge (RFC 7386), strategic merge (treated as merge: lists replaced), JSON patch (a failed `test`
  op is a 422, as kopf's resourceVersion check expects), and server-side apply (create if absent, else a deep merge of the applied fields: lists replaced);
- finalizers: DELETE sets deletionTimestamp; removing the last finalizer deletes;
- created CRDs become discoverable (with their subresources) and `kubectl get` gets server-side Tables built from
  their additionalPrinterColumns; `GET /api/v1/namespaces` (the bare path) answers 403, as for an operator without
  namespace permissions (kmock cannot route it);
- every request is recorded as (user agent, verb, group, resource, namespace) for RBAC checks.

It does NOT emulate: authentication or RBAC (everything is allowed; the audit log lets tests check RBAC rules),
garbage collection of owned objects, defaulting or schema validation (CRD openAPIV3Schema and CEL rules are not
applied), field ownership of server-side apply (no managedFields; fields dropped from an applied config are not
removed), admission webhooks (the test calls the webhook itself), or any controller: no pods run, Deployments and
Jobs get no status unless a test writes it through `/status`.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import threading
import uuid
from collections import defaultdict, deque
from datetime import datetime, timezone
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
import yaml
from kmock._internal import apps as _kmock_apps  # RawHandler._handle: kmock's reaction dispatch

Obj = dict[str, Any]
ResKey = tuple[str, str, str]  # group, version, plural
HISTORY = 20000  # watch events kept per resource for resourceVersion replays


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge(out.get(k), v)
    return out


def apply_merge(target: Any, applied: Any) -> Any:
    """Server-side apply without field ownership: applied fields win, lists are replaced, other fields stay."""
    if not isinstance(applied, dict) or not isinstance(target, dict):
        return copy.deepcopy(applied)
    out = dict(target)
    for k, v in applied.items():
        out[k] = apply_merge(out.get(k), v)
    return out


def _selector_ok(labels: dict[str, str], selector: str | None) -> bool:
    if not selector:
        return True
    for term in re.split(r",(?![^(]*\))", selector):
        term = term.strip()
        if not term:
            continue
        if m := re.fullmatch(r"([^!=\s]+)\s*!=\s*(.*)", term):
            if labels.get(m[1]) == m[2]:
                return False
        elif m := re.fullmatch(r"([^!=\s]+)\s*==?\s*(.*)", term):
            if labels.get(m[1]) != m[2]:
                return False
        elif m := re.fullmatch(r"([^\s]+)\s+in\s+\((.*)\)", term):
            if labels.get(m[1]) not in [v.strip() for v in m[2].split(",")]:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _field(obj: Obj, path: str) -> Any:
    cur: Any = obj
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    return cur


def _fields_ok(obj: Obj, selector: str | None) -> bool:
    if not selector:
        return True
    for term in selector.split(","):
        if m := re.fullmatch(r"([^!=]+)!=(.*)", term):
            if str(_field(obj, m[1]) or "") == m[2]:
                return False
        elif m := re.fullmatch(r"([^!=]+)==?(.*)", term):
            if str(_field(obj, m[1]) or "") != m[2]:
                return False
    return True


def jsonpath(obj: Any, expr: str) -> list[Any]:
    """The subset of JSONPath that printer columns use: .a.b, [n], [*], [?(@.k=="v")]."""
    tokens = re.findall(r"\.([A-Za-z0-9_$-]+)|\[(\*|\d+|\?\(@\.([A-Za-z0-9_]+)\s*==\s*[\"']([^\"']*)[\"']\))\]", expr)
    values = [obj]
    for name, bracket, fkey, fval in tokens:
        nxt: list[Any] = []
        for v in values:
            if name:
                if isinstance(v, dict) and name in v:
                    nxt.append(v[name])
            elif bracket == "*":
                nxt.extend(v if isinstance(v, list) else [])
            elif bracket.isdigit():
                if isinstance(v, list) and int(bracket) < len(v):
                    nxt.append(v[int(bracket)])
            elif fkey:
                nxt.extend(x for x in (v if isinstance(v, list) else []) if isinstance(x, dict) and str(x.get(fkey)) == fval)
        values = nxt
    return values


def _age(ts: str | None) -> str:
    if not ts:
        return "<unknown>"
    secs = int((datetime.now(timezone.utc) - datetime.fromisoformat(ts.replace("Z", "+00:00"))).total_seconds())
    if secs < 120:
        return f"{max(secs, 0)}s"
    if secs < 7200:
        return f"{secs // 60}m"
    return f"{secs // 3600}h"


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator with the object semantics kopf and kubectl rely on (see the module docstring)."""

    _store: dict[ResKey, dict[tuple[str | None, str], Obj]] = attrs.field(factory=lambda: defaultdict(dict), init=False)
    _history: dict[ResKey, deque] = attrs.field(factory=lambda: defaultdict(lambda: deque(maxlen=HISTORY)), init=False)
    _subscribers: dict[ResKey, set] = attrs.field(factory=lambda: defaultdict(set), init=False)
    _rv: int = attrs.field(default=1000, init=False)
    _crds: dict[ResKey, Obj] = attrs.field(factory=dict, init=False)
    audit: list[tuple[str, str, str, str, str | None]] = attrs.field(factory=list, init=False)
    forbidden: list[tuple[str, str, str, str, str | None]] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources.load_bundled()  # built-in kinds (pods, deployments, jobs, events, ...) for discovery
        self.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = {
            "kind": "CustomResourceDefinition", "singular": "customresourcedefinition", "namespaced": False,
            "verbs": ["create", "delete", "get", "list", "patch", "watch"], "shortnames": ["crd"],
            "categories": [], "subresources": ["status"]}

    # ---------------------------------------------------------------- dispatch

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock cannot parse the bare collection path `/api/v1/namespaces` (kopf lists and watches it when serving
        # named namespaces, -n). Answer as a cluster where the operator holds no namespace permissions (rbac.RULES
        # grants none): 403, on which kopf falls back to the namespaces it was given. Recorded in `forbidden`.
        if raw_request.path.rstrip("/") == "/api/v1/namespaces":
            verb = "watch" if raw_request.query.get("watch") in ("true", "1") else "list"
            self.forbidden.append((raw_request.headers.get("User-Agent", ""), verb, "", "namespaces", None))
            return aiohttp.web.json_response(
                {"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "Forbidden", "code": 403,
                 "message": f"namespaces is forbidden: cannot {verb} resource \"namespaces\" at the cluster scope"},
                status=403)
        return await super().__call__(raw_request)

    async def _handle(self, request: kmock.Request) -> Any:
        # kmock matches each request against views over ALL past requests (O(n) per request); keep only the
        # current one so discovery stays fast, and serve object requests directly.
        del self._requests[:-1]
        res = request.resource
        if res is not None and res.plural and request.action is not None:
            self._audit(request)
            try:
                if request.action == kmock.action.WATCH:
                    return await self._stream(request)
                serve = {kmock.action.LIST: self._serve_list, kmock.action.FETCH: self._serve_fetch,
                         kmock.action.CREATE: self._serve_create, kmock.action.UPDATE: self._serve_update,
                         kmock.action.DELETE: self._serve_delete}[request.action]
                payload = await serve(request)
                return aiohttp.web.json_response(payload, status=201 if request.action == kmock.action.CREATE else 200)
            except kmock.KubernetesError as exc:
                return await self._render_error(exc)
        return await _kmock_apps.RawHandler._handle(self, request)

    async def _stream(self, request: kmock.Request) -> Any:
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request._raw_request)
        try:
            async for event in self._serve_watch(request):
                if event:
                    await response.write(json.dumps(event).encode() + b"\n")
        except ConnectionResetError:  # the client went away
            pass
        return response

    def _audit(self, request: kmock.Request) -> None:
        verb = {"LIST": "list", "WATCH": "watch", "FETCH": "get", "CREATE": "create", "UPDATE": "patch",
                "DELETE": "delete"}.get(request.action.name if request.action else "", request.method.lower())
        res = request.resource
        plural = res.plural + (f"/{request.subresource}" if request.subresource else "")
        self.audit.append((request.headers.get("User-Agent", ""), verb, res.group or "", plural, request.namespace))

    def _key(self, request: kmock.Request) -> ResKey:
        r = request.resource
        return (r.group or "", r.version or "", r.plural or "")

    def _known(self, key: ResKey) -> bool:
        return any((r.group or "", r.version or "", r.plural or "") == key for r in self.resources)

    def _namespaced(self, key: ResKey) -> bool:
        for r in self.resources:
            if (r.group or "", r.version or "", r.plural or "") == key:
                ns = self.resources[r].namespaced
                return True if ns is None else ns
        return True

    def _kind(self, key: ResKey) -> str:
        for r in self.resources:
            if (r.group or "", r.version or "", r.plural or "") == key and self.resources[r].kind:
                return self.resources[r].kind
        return ""

    def _subresources(self, key: ResKey) -> set[str]:
        for r in self.resources:
            if (r.group or "", r.version or "", r.plural or "") == key:
                return set(self.resources[r].subresources)
        return set()

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _publish(self, key: ResKey, type_: str, obj: Obj) -> None:
        event = {"type": type_, "object": copy.deepcopy(obj)}
        rv = int(obj["metadata"]["resourceVersion"])
        self._history[key].append((rv, event))
        for q in list(self._subscribers[key]):
            q.put_nowait((rv, event))

    # ---------------------------------------------------------------- reads

    def _matches(self, request: kmock.Request, obj: Obj) -> bool:
        meta = obj["metadata"]
        if request.namespace and meta.get("namespace") != request.namespace:
            return False
        if request.name and meta.get("name") != request.name:
            return False
        return (_selector_ok(meta.get("labels") or {}, request.params.get("labelSelector"))
                and _fields_ok(obj, request.params.get("fieldSelector")))

    async def _serve_list(self, request: kmock.Request) -> Any:
        key = self._key(request)
        if key == ("", "v1", "namespaces"):
            names = {"default", "kube-system"} | {ns for k in self._store for ns, _ in self._store[k] if ns}
            items = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n, "uid": n,
                                                                          "resourceVersion": "1"}} for n in sorted(names)]
            return {"apiVersion": "v1", "kind": "NamespaceList", "metadata": {"resourceVersion": str(self._rv)},
                    "items": items}
        if not self._known(key):
            raise kmock.KubernetesResourceNotFoundError()
        items = [copy.deepcopy(o) for o in self._store[key].values() if self._matches(request, o)]
        items.sort(key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))
        if "as=Table" in request.headers.get("Accept", ""):
            return self._table(key, items)
        return {"apiVersion": f"{key[0]}/{key[1]}".lstrip("/"), "kind": f"{self._kind(key)}List",
                "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    async def _serve_fetch(self, request: kmock.Request) -> Any:
        key = self._key(request)
        obj = self._store[key].get((request.namespace, request.name))
        if obj is None:
            raise kmock.KubernetesObjectNotFoundError()
        if request.subresource == "scale":
            return self._scale(key, obj)
        if "as=Table" in request.headers.get("Accept", ""):
            return self._table(key, [obj])
        return copy.deepcopy(obj)

    async def _serve_watch(self, request: kmock.Request) -> Any:  # an async generator of watch events
        key = self._key(request)
        queue: asyncio.Queue = asyncio.Queue()
        self._subscribers[key].add(queue)
        try:
            since = request.params.get("resourceVersion")
            if since and since != "0":
                history = self._history[key]
                oldest = history[0][0] if history else self._rv + 1
                if len(history) == history.maxlen and int(since) < oldest - 1:
                    yield {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                       "code": 410, "reason": "Expired",
                                                       "message": f"too old resource version: {since}"}}
                    return
                backlog = [(rv, e) for rv, e in history if rv > int(since)]
            else:
                backlog = [(int(o["metadata"]["resourceVersion"]), {"type": "ADDED", "object": copy.deepcopy(o)})
                           for o in self._store[key].values()]
            last = int(since) if since and since.isdigit() else 0
            for rv, event in backlog:
                last = max(last, rv)
                if self._matches(request, event["object"]):
                    yield event
            timeout = float(request.params.get("timeoutSeconds") or 3600)
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    return
                try:
                    rv, event = await asyncio.wait_for(queue.get(), remaining)
                except asyncio.TimeoutError:
                    return
                if rv > last and self._matches(request, event["object"]):
                    last = rv
                    yield event
        finally:
            self._subscribers[key].discard(queue)

    # ---------------------------------------------------------------- writes

    async def _serve_create(self, request: kmock.Request) -> Any:
        key = self._key(request)
        if not self._known(key):
            raise kmock.KubernetesResourceNotFoundError()
        obj = copy.deepcopy(request.data or {})
        meta = obj.setdefault("metadata", {})
        if self._namespaced(key):
            meta["namespace"] = request.namespace or meta.get("namespace") or "default"
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:10]
        if not meta.get("name"):
            raise kmock.KubernetesError(status=422, reason="Invalid", message="metadata.name: Required value")
        if (meta.get("namespace"), meta["name"]) in self._store[key]:
            raise kmock.KubernetesError(status=409, reason="AlreadyExists",
                                        message=f'{key[2]} "{meta["name"]}" already exists')
        if key == ("apiextensions.k8s.io", "v1", "customresourcedefinitions"):
            self._register_crd(obj)
        if "status" in self._subresources(key):  # status is written through /status only
            obj.pop("status", None)
        meta.update(uid=str(uuid.uuid4()), resourceVersion=self._next_rv(), creationTimestamp=_now(), generation=1)
        self._store[key][(meta.get("namespace"), meta["name"])] = obj
        self._publish(key, "ADDED", obj)
        return copy.deepcopy(obj)

    async def _serve_update(self, request: kmock.Request) -> Any:
        key = self._key(request)
        ctype = request.headers.get("Content-Type", "application/merge-patch+json").split(";")[0]
        ns = request.namespace if self._namespaced(key) else None
        old = self._store[key].get((ns, request.name))
        if request.subresource == "scale":
            return self._patch_scale(key, old, request.data or {})
        if old is None:
            if ctype == "application/apply-patch+yaml":  # server-side apply creates (RBAC: needs `create`)
                ua, _, g, plural, ns_ = self.audit[-1]
                self.audit.append((ua, "create", g, plural, ns_))
                body = request.data if isinstance(request.data, dict) else yaml.safe_load(request.text)
                body.setdefault("metadata", {})["name"] = request.name
                request = attrs.evolve(request, data=body)
                return await self._serve_create(request)
            raise kmock.KubernetesObjectNotFoundError()
        patch = request.data if isinstance(request.data, dict | list) else yaml.safe_load(request.text)
        if ctype == "application/json-patch+json":
            try:
                new = jsonpatch.apply_patch(old, patch)
            except (jsonpatch.JsonPatchTestFailed, jsonpatch.JsonPatchConflict) as e:
                # The API server answers 422 to a failed `test` op (kopf's optimistic-concurrency check on
                # resourceVersion) and kopf then retries on its next cycle; a 500 made it back off for seconds.
                raise kmock.KubernetesError(status=422, reason="Invalid", message=f"json patch: {e}") from None
        elif ctype == "application/apply-patch+yaml":
            new = apply_merge(old, patch)
        else:  # merge and strategic merge (lists replaced)
            new = merge(old, patch)
        if request.subresource == "status":
            new = {**old, "status": new.get("status")} if new.get("status") is not None else \
                {k: v for k, v in old.items() if k != "status"}
        elif request.subresource is None:
            if "status" in self._subresources(key):  # the main resource cannot change status
                new = {k: v for k, v in new.items() if k != "status"} | (
                    {"status": old["status"]} if "status" in old else {})
            for fixed in ("uid", "creationTimestamp", "resourceVersion", "generation", "namespace", "name"):
                if fixed in old["metadata"]:
                    new["metadata"][fixed] = old["metadata"][fixed]
        return self._store_update(key, old, new)

    def _store_update(self, key: ResKey, old: Obj, new: Obj) -> Obj:
        if new == old:
            return copy.deepcopy(old)  # no-op: no new resourceVersion, no event
        meta = new["metadata"]
        spec_of = lambda o: {k: v for k, v in o.items() if k not in ("metadata", "status")}  # noqa: E731
        if spec_of(new) != spec_of(old):
            meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        meta["resourceVersion"] = self._next_rv()
        k = (meta.get("namespace"), meta["name"])
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            del self._store[key][k]
            self._publish(key, "DELETED", new)
            return copy.deepcopy(new)
        self._store[key][k] = new
        self._publish(key, "MODIFIED", new)
        return copy.deepcopy(new)

    async def _serve_delete(self, request: kmock.Request) -> Any:
        key = self._key(request)
        ns = request.namespace if self._namespaced(key) else None
        old = self._store[key].get((ns, request.name))
        if old is None:
            raise kmock.KubernetesObjectNotFoundError()
        if old["metadata"].get("finalizers"):
            if old["metadata"].get("deletionTimestamp"):
                return copy.deepcopy(old)
            new = copy.deepcopy(old)
            new["metadata"]["deletionTimestamp"] = _now()
            return self._store_update(key, old, new)
        del self._store[key][(ns, request.name)]
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = self._next_rv()
        self._publish(key, "DELETED", gone)
        return gone

    # ---------------------------------------------------------------- CRDs, scale, tables

    def _register_crd(self, crd: Obj) -> None:
        spec = crd["spec"]
        names = spec["names"]
        for v in spec["versions"]:
            key = (spec["group"], v["name"], names["plural"])
            self.resources[f"{spec['group']}/{v['name']}/{names['plural']}"] = {
                "kind": names["kind"], "singular": names.get("singular", names["kind"].lower()),
                "namespaced": spec.get("scope", "Namespaced") == "Namespaced",
                "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
                "shortnames": names.get("shortNames", []), "categories": names.get("categories", []),
                "subresources": list((v.get("subresources") or {}).keys()),
            }
            self._crds[key] = v

    def _scale(self, key: ResKey, obj: Obj) -> Obj:
        paths = (self._crds.get(key) or {}).get("subresources", {}).get("scale")
        if not paths:
            raise kmock.KubernetesResourceNotFoundError()
        spec_replicas = jsonpath(obj, paths["specReplicasPath"])
        status_replicas = jsonpath(obj, paths["statusReplicasPath"])
        selector = jsonpath(obj, paths.get("labelSelectorPath", ".status.selector"))
        return {"apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {k: obj["metadata"][k] for k in ("name", "namespace", "uid", "resourceVersion")},
                "spec": {"replicas": spec_replicas[0] if spec_replicas else 0},
                "status": {"replicas": status_replicas[0] if status_replicas else 0,
                           **({"selector": selector[0]} if selector else {})}}

    def _patch_scale(self, key: ResKey, old: Obj | None, patch: Obj) -> Obj:
        if old is None:
            raise kmock.KubernetesObjectNotFoundError()
        paths = (self._crds.get(key) or {}).get("subresources", {}).get("scale")
        if not paths:
            raise kmock.KubernetesResourceNotFoundError()
        replicas = (patch.get("spec") or {}).get("replicas")
        new = copy.deepcopy(old)
        cur = new
        parts = paths["specReplicasPath"].strip(".").split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = replicas
        return self._scale(key, self._store_update(key, old, new))

    def _table(self, key: ResKey, items: list[Obj]) -> Obj:
        columns = (self._crds.get(key) or {}).get("additionalPrinterColumns") or [
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
        defs = [{"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0}]
        defs += [{"name": c["name"], "type": c["type"], "format": c.get("format", ""),
                  "description": c.get("description", ""), "priority": c.get("priority", 0)} for c in columns]
        rows = []
        for o in items:
            cells: list[Any] = [o["metadata"]["name"]]
            for c in columns:
                vals = jsonpath(o, c["jsonPath"])
                if c["type"] == "date":
                    cells.append(_age(vals[0] if vals else None))
                elif not vals:
                    cells.append(None)
                else:
                    cells.append(vals[0] if len(vals) == 1 else ",".join(str(v) for v in vals))
            rows.append({"cells": cells, "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                                    "metadata": o["metadata"]}})
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": str(self._rv)},
                "columnDefinitions": defs, "rows": rows}


class EmulatorThread:
    """Runs the emulator's HTTP server on its own event loop in a daemon thread (kopf runs in another thread)."""

    def __init__(self) -> None:
        self.emulator = Emulator()
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.url = ""
        self.thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with self.emulator, kmock.Server(self.emulator) as server:
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def start(self) -> "EmulatorThread":
        self.thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("emulator did not start")
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(10)

    def kubeconfig(self, path: str) -> str:
        cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "emulator",
               "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
               "users": [{"name": "emulator", "user": {"token": "emulator"}}],
               "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator",
                                                             "namespace": "default"}}]}
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f)
        return path


class Client:
    """A blocking JSON client for tests (its own user agent, so RBAC checks can tell it from the operator)."""

    USER_AGENT = "routenlp-test"

    def __init__(self, url: str):
        self.url = url

    def request(self, method: str, path: str, body: Any = None, ctype: str = "application/merge-patch+json") -> Any:
        import urllib.error
        import urllib.request

        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": ctype, "User-Agent": self.USER_AGENT,
                                              "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                text = r.read().decode()
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and method == "GET":
                return None
            raise
        return json.loads(text) if text else None

    def create(self, path: str, body: Obj) -> Obj:
        return self.request("POST", path, body, "application/json")

    def get(self, path: str) -> Obj | None:
        return self.request("GET", path)

    def patch(self, path: str, body: Obj) -> Obj:
        return self.request("PATCH", path, body)

    def delete(self, path: str) -> Obj:
        return self.request("DELETE", path)
