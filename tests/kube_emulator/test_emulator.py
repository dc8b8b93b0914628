"""The emulator's own semantics that kopf and the operator tests rely on."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from .emulator import Client, EmulatorThread, jsonpath, merge

CM = "/api/v1/namespaces/e/configmaps"


@pytest.fixture(scope="module")
def emu():
    e = EmulatorThread().start()
    yield e
    e.stop()


def test_create_assigns_metadata_and_conflicts(emu):
    c = Client(emu.url)
    obj = c.create(CM, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"k": "v"}})
    meta = obj["metadata"]
    assert meta["namespace"] == "e" and meta["uid"] and meta["resourceVersion"] and meta["creationTimestamp"]
    assert meta["generation"] == 1
    gen = c.create(CM, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"generateName": "g-"}})
    assert gen["metadata"]["name"].startswith("g-") and len(gen["metadata"]["name"]) > 2
    with pytest.raises(urllib.error.HTTPError) as exc:
        c.create(CM, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}})
    assert exc.value.code == 409


def test_generation_noop_and_status_subresource(emu):
    c = Client(emu.url)
    dep = "/apis/apps/v1/namespaces/e/deployments"
    obj = c.create(dep, {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
                         "spec": {"replicas": 1}, "status": {"replicas": 9}})
    assert "status" not in obj  # create ignores status
    rv = obj["metadata"]["resourceVersion"]
    same = c.patch(f"{dep}/d", {"spec": {"replicas": 1}})
    assert same["metadata"]["resourceVersion"] == rv  # no-op: nothing changes
    labelled = c.patch(f"{dep}/d", {"metadata": {"labels": {"x": "y"}}})
    assert labelled["metadata"]["generation"] == 1 and labelled["metadata"]["resourceVersion"] != rv
    bumped = c.patch(f"{dep}/d", {"spec": {"replicas": 2}, "status": {"replicas": 5}})
    assert bumped["metadata"]["generation"] == 2 and "status" not in bumped  # main resource ignores status
    st = c.patch(f"{dep}/d/status", {"spec": {"replicas": 7}, "status": {"replicas": 2}})
    assert st["status"] == {"replicas": 2} and st["spec"]["replicas"] == 2  # /status changes only status


def test_apply_creates_then_merges(emu):
    c = Client(emu.url)
    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa", "labels": {"a": "1"}},
            "data": {"k": "v"}}
    created = c.request("PATCH", f"{CM}/ssa?fieldManager=t&force=true", body, "application/apply-patch+yaml")
    assert created["metadata"]["generation"] == 1
    c.patch(f"{CM}/ssa", {"metadata": {"labels": {"b": "2"}}, "data": {"k": "drift"}})
    again = c.request("PATCH", f"{CM}/ssa?fieldManager=t&force=true", body, "application/apply-patch+yaml")
    assert again["data"] == {"k": "v"} and again["metadata"]["labels"] == {"a": "1", "b": "2"}


def test_finalizers_delay_deletion(emu):
    c = Client(emu.url)
    c.create(CM, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "f", "finalizers": ["x/y"]}})
    marked = c.delete(f"{CM}/f")
    assert marked["metadata"]["deletionTimestamp"]
    assert c.get(f"{CM}/f") is not None
    c.patch(f"{CM}/f", {"metadata": {"finalizers": None}})
    assert c.get(f"{CM}/f") is None


def test_watch_from_resource_version_replays_only_later_events(emu):
    c = Client(emu.url)
    c.create(CM, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "w1", "labels": {"w": "1"}}})
    listing = c.get(f"{CM}?labelSelector=w%3D1")
    assert listing["kind"] == "ConfigMapList" and [o["metadata"]["name"] for o in listing["items"]] == ["w1"]
    rv = listing["metadata"]["resourceVersion"]
    c.create(CM, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "w2", "labels": {"w": "1"}}})
    c.create(CM, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "w3", "labels": {"w": "0"}}})
    url = f"{emu.url}{CM}?watch=true&resourceVersion={rv}&labelSelector=w%3D1&timeoutSeconds=1"
    with urllib.request.urlopen(url, timeout=10) as r:
        events = [json.loads(line) for line in r.read().splitlines() if line.strip()]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "w2")]


def test_helpers():
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"c": None, "d": 3}}) == {"a": {"b": 1, "d": 3}}
    obj = {"status": {"conditions": [{"type": "A", "status": "x"}, {"type": "Ready", "status": "True"}]},
           "spec": {"tiers": [{"name": "a"}, {"name": "b"}]}}
    assert jsonpath(obj, '.status.conditions[?(@.type=="Ready")].status') == ["True"]
    assert jsonpath(obj, ".spec.tiers[*].name") == ["a", "b"]
