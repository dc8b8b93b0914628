"""`routenlp operator --peering` as its own process against a fresh emulator: kopf peering (two replicas never both
act) finds its ClusterKopfPeering (-A) or its KopfPeering (-n), the operator reconciles, and every request it makes
is allowed by rbac.RULES + rbac.PEERING_RULES (-A) or rbac.RULES + rbac.NAMESPACED_PEERING_RULES (-n)."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import pytest
from kube_emulator.emulator import Client, EmulatorThread
from kube_emulator.harness import free_port, wait_for
from kube_emulator.specs import tier

from routenlp.operator.rbac import NAMESPACED_PEERING_RULES, PEERING_RULES, RULES, allows, triples

PEERING_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "clusterkopfpeerings.kopf.dev"},
    "spec": {"group": "kopf.dev", "scope": "Cluster",
             "names": {"kind": "ClusterKopfPeering", "plural": "clusterkopfpeerings", "singular": "clusterkopfpeering"},
             "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                 "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}}
NS_PEERING_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "kopfpeerings.kopf.dev"},
    "spec": {"group": "kopf.dev", "scope": "Namespaced",
             "names": {"kind": "KopfPeering", "plural": "kopfpeerings", "singular": "kopfpeering"},
             "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                 "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}}


def _start(tmp_path, scope_args: list[str], peering_crd: dict, peering_path: str, kind: str):
    from routenlp.api.crdgen import crds

    emu = EmulatorThread().start()
    api = Client(emu.url)
    for crd in [*crds().values(), peering_crd]:
        api.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    api.create(peering_path, {"apiVersion": "kopf.dev/v1", "kind": kind, "metadata": {"name": "routenlp"}})
    live = free_port()
    env = {**os.environ, "KUBECONFIG": emu.kubeconfig(str(tmp_path / "kubeconfig"))}
    env.pop("ROUTENLP_WEBHOOK_PORT", None)
    log = open(tmp_path / "operator.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "routenlp.cli.main", "operator", *scope_args,
                             "--peering", "routenlp",
                             "--liveness", f"http://127.0.0.1:{live}/healthz", "--metrics-port", "0", "--quiet"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: proc.poll() is None and urllib.request.urlopen(f"http://127.0.0.1:{live}/healthz", timeout=1),
                 60, "operator liveness")
        yield emu, api
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        emu.stop()
        assert proc.returncode in (0, -15), (tmp_path / "operator.log").read_text()[-3000:]


@pytest.fixture
def peered_operator(tmp_path):
    yield from _start(tmp_path, ["-A"], PEERING_CRD, "/apis/kopf.dev/v1/clusterkopfpeerings", "ClusterKopfPeering")


@pytest.fixture
def namespaced_peered_operator(tmp_path):
    yield from _start(tmp_path, ["-n", "peer"], NS_PEERING_CRD, "/apis/kopf.dev/v1/namespaces/peer/kopfpeerings",
                      "KopfPeering")


def test_peering_replica_reconciles_within_rbac(peered_operator):
    emu, api = peered_operator
    api.create("/apis/routenlp.io/v1alpha1/namespaces/peer/modeltiers", tier("small"))
    wait_for(lambda: api.get("/apis/apps/v1/namespaces/peer/deployments/small"), 60, "deployment")
    peering = wait_for(lambda: (p := api.get("/apis/kopf.dev/v1/clusterkopfpeerings/routenlp")).get("status") and p,
                       30, "peering heartbeat")
    assert len(peering["status"]) == 1  # this replica announced itself
    used = {(g, res, verb) for ua, verb, g, res, _ in list(emu.emulator.audit)
            if ua.startswith(("kopf/", "routenlp-operator/"))}
    denied = sorted(t for t in used if not allows(RULES + PEERING_RULES, *t))
    assert not denied, denied
    # Not wider: with -A the replica uses exactly the clusterkopfpeerings permissions (kopfpeerings serve `-n` mode).
    granted = {t for t in triples(PEERING_RULES) if t[1] == "clusterkopfpeerings"}
    assert {t for t in used if t[0] == "kopf.dev"} == granted


def test_namespaced_peering_replica_reconciles_within_namespaced_rbac(namespaced_peered_operator):
    """-n with --peering (the chart's scope namespaced with peering): kopf keeps its KopfPeering in the served
    namespace alive, and everything it calls is allowed by RULES + NAMESPACED_PEERING_RULES (no cluster peering)."""
    emu, api = namespaced_peered_operator
    api.create("/apis/routenlp.io/v1alpha1/namespaces/peer/modeltiers", tier("small"))
    wait_for(lambda: api.get("/apis/apps/v1/namespaces/peer/deployments/small"), 60, "deployment")
    peering = wait_for(lambda: (p := api.get("/apis/kopf.dev/v1/namespaces/peer/kopfpeerings/routenlp")).get("status")
                       and p, 30, "peering heartbeat")
    assert len(peering["status"]) == 1
    used = {(g, res, verb) for ua, verb, g, res, _ in list(emu.emulator.audit)
            if ua.startswith(("kopf/", "routenlp-operator/"))}
    denied = sorted(t for t in used if not allows(RULES + NAMESPACED_PEERING_RULES, *t))
    assert not denied, denied
    # Not wider: exactly the kopfpeerings permissions, never the cluster-wide peering.
    assert {t for t in used if t[0] == "kopf.dev"} == triples(NAMESPACED_PEERING_RULES)
    # kopf tried to list namespaces, was refused (no namespace permissions) and served the one it was given.
    refused = {(ua.split("/")[0], verb) for ua, verb, *_ in emu.emulator.forbidden}
    assert ("kopf", "list") in refused and refused <= {("kopf", "list"), ("kopf", "watch")}, refused
