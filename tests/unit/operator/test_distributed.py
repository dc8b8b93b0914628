"""The distill stage on a distributed engine (spec.resources.distillRunner): JobSet and Kubeflow Trainer TrainJob
manifests, validated against the engines' API models as the registry package `kubeflow-trainer-api` ships them
(TrainJob trainer.kubeflow.org/v1alpha1 and JobSet jobset.x-k8s.io/v1alpha2), with torchrun over the same stage CLI.
No cluster runs here: what a real engine does with them is not tested."""

from __future__ import annotations

import json

import kubernetes_validate
import pytest
from kubeflow_trainer_api.models import JobsetV1alpha2JobSet, TrainerV1alpha1TrainJob
from pydantic import ValidationError

from routenlp.api import DistillationCampaign, ModelTier, RoutingPolicy
from routenlp.operator import campaign, distributed

API = "routenlp.io/v1alpha1"
NS = "team-a"
OWNER = {"apiVersion": API, "kind": "DistillationCampaign",
         "metadata": {"name": "c", "uid": "7b3f1c2e-0000-4000-8000-000000000001"}}


def dc(**resources) -> DistillationCampaign:
    return DistillationCampaign.model_validate({"apiVersion": API, "kind": "DistillationCampaign",
                                                "metadata": {"name": "c"}, "spec": {
                                                    "policyRef": "p", "studentTier": "small", "teacherTier": "large",
                                                    "resources": {"gpuCount": 4, **resources}}})


def ctx(c: DistillationCampaign) -> campaign.StageContext:
    tier = {"apiVersion": API, "kind": "ModelTier", "metadata": {"name": "small"}, "spec": {
        "servedModelName": "small", "cost": {"inputPerMillion": 0.1, "outputPerMillion": 0.3},
        "engine": {"model": "pvc://weights/small", "modelCache": {"claimName": "weights"}}}}
    teacher = {**tier, "metadata": {"name": "large"}, "spec": {**tier["spec"], "servedModelName": "large"}}
    policy = RoutingPolicy.model_validate({"apiVersion": API, "kind": "RoutingPolicy", "metadata": {"name": "p"},
                                           "spec": {"tiers": [{"name": "small"}, {"name": "large"}],
                                                    "tasks": [{"name": "intent"}]}})
    return campaign.stage_context(c, policy, ModelTier.model_validate(tier), ModelTier.model_validate(teacher), NS)


def workload(c: DistillationCampaign, round_: int = 1) -> tuple[dict, dict]:
    job = campaign.stage_job(c, OWNER, NS, "Distilling", 2, 1, "p-events", ctx(c), round_)
    return job, distributed.distill_workload(json.loads(json.dumps(job)), c)


def fits(model, obj: dict) -> None:
    """The engine's model accepts it and drops nothing (an unknown or misplaced field would vanish)."""
    parsed = model.from_dict(obj)
    assert json.loads(json.dumps(parsed.to_dict(), default=str)) == obj


def test_job_is_the_default_and_a_single_node():
    c = dc()
    job, out = workload(c)
    assert out == job and c.spec.resources.distill_runner == "Job"
    with pytest.raises(ValidationError, match="distillRunner TrainJob or JobSet"):
        dc(distillNodes=2)


def test_jobset_runs_torchrun_over_the_stage_cli_on_every_node():
    c = dc(distillRunner="JobSet", distillNodes=3)
    job, js = workload(c, round_=2)
    fits(JobsetV1alpha2JobSet, js)
    assert js["kind"] == "JobSet" and js["metadata"]["name"] == job["metadata"]["name"] == "c-r2-n2-distilling-a1"
    assert js["metadata"]["ownerReferences"] == job["metadata"]["ownerReferences"]
    (rj,) = js["spec"]["replicatedJobs"]
    node_job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x", **rj["template"]["metadata"]},
                "spec": rj["template"]["spec"]}
    kubernetes_validate.validate(node_job, "1.37", strict=True)  # each node job is a valid batch/v1 Job
    # the node Jobs carry the stage labels: the state machine observes them as it observes a stage Job
    assert rj["template"]["metadata"]["labels"]["routenlp.io/stage"] == "Distilling"
    assert rj["template"]["metadata"]["labels"]["routenlp.io/round"] == "2"
    assert rj["template"]["metadata"]["annotations"]["routenlp.io/attempt"] == "1"
    spec = rj["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 3
    assert js["spec"]["failurePolicy"] == {"maxRestarts": 0}  # retries are the operator's
    main = spec["template"]["spec"]["containers"][0]
    single = job["spec"]["template"]["spec"]["containers"][0]
    assert main["command"] == ["torchrun"]
    args = main["args"]
    assert args[:4] == ["--nnodes", "3", "--nproc-per-node", "4"]  # gpuCount processes per node
    assert args[args.index("--master-addr") + 1] == "c-r2-n2-distilling-a1-node-0-0.c-r2-n2-distilling-a1"
    cli = args[args.index("-m"):]
    assert cli == ["-m", "--", "routenlp.cli.main", "train", "distill", *single["args"]]  # the same stage CLI
    assert "--init-adapter" in cli  # round 2 continues round 1's adapter there too
    assert main["resources"] == single["resources"] and main["volumeMounts"] == single["volumeMounts"]
    assert main["securityContext"] == single["securityContext"]


def test_trainjob_uses_the_torch_runtime_and_patches_the_stage_pod_in():
    c = dc(distillRunner="TrainJob", distillNodes=2, trainingRuntime="torch-distributed")
    job, tj = workload(c)
    fits(TrainerV1alpha1TrainJob, tj)
    assert tj["kind"] == "TrainJob" and tj["spec"]["runtimeRef"]["name"] == "torch-distributed"
    single = job["spec"]["template"]["spec"]["containers"][0]
    trainer = tj["spec"]["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 4
    assert trainer["command"] == ["torchrun"]
    assert trainer["args"] == ["-m", "--", "routenlp.cli.main", "train", "distill", *single["args"]]
    assert trainer["resourcesPerNode"] == single["resources"] and trainer["image"] == single["image"]
    (patch,) = tj["spec"]["runtimePatches"]
    (rj,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert rj["name"] == "node" and rj["template"]["metadata"]["labels"]["routenlp.io/stage"] == "Distilling"
    pod = rj["template"]["spec"]["template"]["spec"]
    assert pod["volumes"] == job["spec"]["template"]["spec"]["volumes"]
    assert pod["containers"][0]["volumeMounts"] == single["volumeMounts"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_a_manifest_the_engine_would_not_accept_fails_the_check():
    """The check can fail: a misplaced field is dropped by the engine's model, a wrong type is refused."""
    _, tj = workload(dc(distillRunner="TrainJob", distillNodes=2))
    tj["spec"]["trainer"]["replicas"] = 2  # not a TrainJob field
    with pytest.raises(AssertionError):
        fits(TrainerV1alpha1TrainJob, tj)
    _, js = workload(dc(distillRunner="JobSet", distillNodes=2))
    js["spec"]["replicatedJobs"][0]["replicas"] = "one"
    with pytest.raises(ValidationError):
        fits(JobsetV1alpha2JobSet, js)
