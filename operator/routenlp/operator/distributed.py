"""The distill stage on a distributed engine, for students beyond one machine (spec.resources.distillRunner).

The stage Job `campaign.stage_job` renders is the single source: its pod (image, arguments, volumes, security
context, labels) becomes the node template of a JobSet (jobset.x-k8s.io/v1alpha2) or of a Kubeflow Trainer TrainJob
(trainer.kubeflow.org/v1alpha1), and `routenlp train distill` runs under `torchrun`: `distillNodes` nodes of
`gpuCount` processes each (data-parallel LoRA, routenlp.trainer.distill). Both engines run the nodes as pods of an
indexed batch/v1 Job that carries the stage labels, so the state machine observes the stage as it observes a Job.
"""

from __future__ import annotations

import copy
from typing import Any

from routenlp.api import DistillationCampaign

Obj = dict[str, Any]

JOBSET_API = "jobset.x-k8s.io/v1alpha2"
TRAINJOB_API = "trainer.kubeflow.org/v1alpha1"
NODE = "node"  # the replicated job of a JobSet; also the trainer job of Kubeflow's torch runtimes
MASTER_PORT = 29500
PATCH_MANAGER = "routenlp.io/operator"


def procs_per_node(campaign: DistillationCampaign) -> int:
    return max(1, campaign.spec.resources.gpu_count)


def torchrun_args(stage_args: list[str], nodes: int, procs: int, master: str | None) -> list[str]:
    """torchrun over the stage's own CLI. `master` None: the engine sets the rendezvous (Kubeflow's PET_* env).
    `--` ends torchrun's options: its parser would otherwise take the stage's `--r` for an ambiguous abbreviation."""
    rdzv = ["--nnodes", str(nodes), "--nproc-per-node", str(procs), "--node-rank", "$(NODE_RANK)",
            "--master-addr", master, "--master-port", str(MASTER_PORT)] if master else []
    return [*rdzv, "-m", "--", "routenlp.cli.main", "train", "distill", *stage_args]


def distill_workload(job: Obj, campaign: DistillationCampaign) -> Obj:
    """The distill stage's object for the campaign's runner: the Job itself, a JobSet or a TrainJob."""
    runner = campaign.spec.resources.distill_runner
    if runner == "Job":
        return job
    if runner == "JobSet":
        return jobset(job, campaign)
    return trainjob(job, campaign)


def _main(pod: Obj) -> Obj:
    return pod["containers"][0]


def jobset(job: Obj, campaign: DistillationCampaign) -> Obj:
    """One replicated job `node`: an indexed Job of `distillNodes` pods; pod i is torchrun's node i, pod 0 of it
    the rendezvous host (JobSet's headless Service gives each pod the name <jobset>-node-0-<i>.<jobset>)."""
    name, nodes = job["metadata"]["name"], campaign.spec.resources.distill_nodes
    spec = copy.deepcopy(job["spec"])
    pod = spec["template"]["spec"]
    main = _main(pod)
    main["args"] = torchrun_args(main["args"], nodes, procs_per_node(campaign), f"{name}-{NODE}-0-0.{name}")
    main["command"] = ["torchrun"]
    main["env"] = [*main.get("env", []), {"name": "NODE_RANK", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}]
    main["ports"] = [{"name": "rendezvous", "containerPort": MASTER_PORT, "protocol": "TCP"}]
    spec.update(completionMode="Indexed", completions=nodes, parallelism=nodes)
    spec.pop("activeDeadlineSeconds", None)  # the JobSet's failure policy and the stage's deadline below govern
    meta = job["metadata"]
    return {
        "apiVersion": JOBSET_API,
        "kind": "JobSet",
        "metadata": copy.deepcopy(meta),
        "spec": {
            "network": {"enableDNSHostnames": True, "subdomain": name},
            "replicatedJobs": [{"name": NODE, "replicas": 1, "template": {
                "metadata": {"labels": dict(meta.get("labels", {})),
                             "annotations": dict(meta.get("annotations", {}))},
                "spec": spec}}],
            # Retries are the operator's (maxStageRetries), as for a plain Job.
            "failurePolicy": {"maxRestarts": 0},
            "successPolicy": {"operator": "All"},
            **({"ttlSecondsAfterFinished": job["spec"]["ttlSecondsAfterFinished"]}
               if "ttlSecondsAfterFinished" in job["spec"] else {}),
        },
    }


def trainjob(job: Obj, campaign: DistillationCampaign) -> Obj:
    """A TrainJob on the ClusterTrainingRuntime `trainingRuntime` (a torch runtime: it sets torchrun's rendezvous
    through PET_* variables). The stage's labels, volumes and security context reach the runtime's `node` job
    through a runtime patch."""
    res = campaign.spec.resources
    meta = job["metadata"]
    pod = job["spec"]["template"]["spec"]
    main = _main(pod)
    container_patch = {"name": NODE, "volumeMounts": main["volumeMounts"], "securityContext": main["securityContext"]}
    pod_patch: Obj = {"volumes": pod["volumes"], "securityContext": pod["securityContext"],
                      "containers": [container_patch]}
    for key in ("nodeSelector", "tolerations"):
        if pod.get(key):
            pod_patch[key] = pod[key]
    labels = dict(meta.get("labels", {}))
    return {
        "apiVersion": TRAINJOB_API,
        "kind": "TrainJob",
        "metadata": copy.deepcopy(meta),
        "spec": {
            "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                           "name": res.training_runtime},
            "activeDeadlineSeconds": res.active_deadline_seconds,
            "trainer": {
                "image": main["image"],
                "command": ["torchrun"],
                "args": torchrun_args(main["args"], res.distill_nodes, procs_per_node(campaign), None),
                "env": main.get("env", []),
                "numNodes": res.distill_nodes,
                "numProcPerNode": procs_per_node(campaign),
                "resourcesPerNode": main["resources"],
            },
            "runtimePatches": [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {
                "replicatedJobs": [{"name": NODE, "template": {
                    "metadata": {"labels": labels, "annotations": dict(meta.get("annotations", {}))},
                    "spec": {"template": {"metadata": {"labels": labels}, "spec": pod_patch}}}}]}}}}],
        },
    }
