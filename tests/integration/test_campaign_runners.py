"""The distill stage on a distributed engine, through the operator against the emulator: with the engine's CRD
installed (JobSet, Kubeflow Trainer TrainJob), a campaign's distill stage becomes that object, owned by the campaign.
The emulator serves the kinds from minimal CRDs (no engine controller runs here: nothing reconciles them)."""

from __future__ import annotations

import pytest
from kube_emulator.harness import wait_for
from kube_emulator.campaigns import _finish, _job, _setup

ENGINES = {
    "JobSet": ("jobset.x-k8s.io", "v1alpha2", "jobsets", {}),
    "TrainJob": ("trainer.kubeflow.org", "v1alpha1", "trainjobs", {"trainingRuntime": "torch-distributed"}),
}


def _install_crd(cluster, group: str, version: str, plural: str, kind: str) -> None:
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": f"{plural}.{group}"},
           "spec": {"group": group, "scope": "Namespaced",
                    "names": {"plural": plural, "singular": kind.lower(), "kind": kind},
                    "versions": [{"name": version, "served": True, "storage": True,
                                  "schema": {"openAPIV3Schema": {"type": "object",
                                                                 "x-kubernetes-preserve-unknown-fields": True}},
                                  "subresources": {"status": {}}}]}}
    if cluster.api.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{plural}.{group}") is None:
        cluster.api.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)


@pytest.mark.parametrize("runner", list(ENGINES))
def test_distill_runs_on_the_chosen_engine(cluster, runner):
    group, version, plural, extra = ENGINES[runner]
    _install_crd(cluster, group, version, plural, runner)
    ns = f"runner-{runner.lower()}"
    _setup(cluster, ns, resources={"distillRunner": runner, "distillNodes": 2, **extra})
    _job(cluster, ns, "c-r1-clustering-a1")
    _finish(cluster, ns, "c-r1-clustering-a1", {"clusters": [{"id": 1, "size": 50, "costUsd": 3.0}]})
    path = f"/apis/{group}/{version}/namespaces/{ns}/{plural}/c-r1-distilling-a1"
    obj = wait_for(lambda: cluster.api.get(path), what=f"{runner} of the distill stage")
    assert obj["kind"] == runner and obj["metadata"]["ownerReferences"][0]["kind"] == "DistillationCampaign"
