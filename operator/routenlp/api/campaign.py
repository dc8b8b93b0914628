"""DistillationCampaign (`dc`): cluster escalation failures, distill into a cheaper tier, retrain the router, roll out."""

from __future__ import annotations

import re
from enum import Enum
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from .common import DNS_LABEL, DURATION, ApiModel, Resource, Rule, SpecError, StatusBase
from .modeltier import Toleration
from .release import RELEASE

DEFAULT_TRAINER_IMAGE = f"ghcr.io/routenlp/trainer:{RELEASE}"

STAGES = ("Clustering", "Distilling", "Evaluating", "RetrainingRouter", "RollingOut")
"""Campaign stages in order; each runs as one Job (RollingOut is done by the operator itself)."""


# Five whitespace-separated cron fields (minute hour day-of-month month day-of-week).
CRON = r"^\S+(\s+\S+){4}$"


class TriggerMode(str, Enum):
    """What starts a campaign run."""

    MANUAL = "Manual"
    SCHEDULE = "Schedule"
    ESCALATION_RATE = "EscalationRate"


TRIGGER_SCHEDULE_REQUIRED = Rule(
    rule="self.mode != 'Schedule' || has(self.schedule)",
    message="spec.trigger.schedule is required when spec.trigger.mode is Schedule: add a 5-field cron expression "
    "such as '0 3 * * *'",
    field="schedule",
    reason="FieldValueRequired",
)
TRIGGER_THRESHOLD_REQUIRED = Rule(
    rule="self.mode != 'EscalationRate' || has(self.escalationRateThreshold)",
    message="spec.trigger.escalationRateThreshold is required when spec.trigger.mode is EscalationRate: add the "
    "escalation rate (0-1) that starts a run, e.g. 0.25",
    field="escalationRateThreshold",
    reason="FieldValueRequired",
)


class Trigger(ApiModel):
    """When a campaign run starts."""

    RULES = (TRIGGER_SCHEDULE_REQUIRED, TRIGGER_THRESHOLD_REQUIRED)

    mode: TriggerMode = Field(
        default=TriggerMode.MANUAL,
        description="`Manual`: runs once when created (and again when `runId` changes); `Schedule`: on `schedule`; "
        "`EscalationRate`: when the student tier's escalation rate exceeds `escalationRateThreshold`.",
    )
    run_id: str | None = Field(default=None, description="Change it to start another manual run.")
    schedule: str | None = Field(
        default=None,
        max_length=100,
        description="Cron schedule (5 fields, UTC) for `Schedule` mode, e.g. `0 3 * * *`.",
        json_schema_extra={"pattern": CRON},  # pydantic checks it below, with a clearer message
    )
    escalation_rate_threshold: float | None = Field(
        default=None, gt=0, lt=1, description="Escalation rate that starts a run in `EscalationRate` mode."
    )
    min_failures: int = Field(default=200, ge=1, description="Escalation failures needed before a run starts.")
    cooldown: str = Field(default="24h", pattern=DURATION, description="Least time between two automatic runs.")

    @model_validator(mode="after")
    def _mode_settings(self) -> "Trigger":
        if self.mode == TriggerMode.SCHEDULE and not self.schedule:
            raise TRIGGER_SCHEDULE_REQUIRED.error()
        if self.schedule is not None and not re.fullmatch(CRON, self.schedule):
            raise SpecError(
                "schedule", f"spec.trigger.schedule must be a 5-field cron expression such as '0 3 * * *', "
                f"got {self.schedule!r}"
            )
        if self.mode == TriggerMode.ESCALATION_RATE and self.escalation_rate_threshold is None:
            raise TRIGGER_THRESHOLD_REQUIRED.error()
        return self


class Clustering(ApiModel):
    """How escalation failures are grouped into topics worth distilling."""

    method: Literal["kmeans", "hdbscan"] = Field(
        default="kmeans", description="`kmeans` (k chosen by silhouette up to `maxClusters`) or `hdbscan` (density)."
    )
    max_clusters: int = Field(default=20, ge=2, le=500, description="Largest k tried (kmeans).")
    min_cluster_size: int = Field(default=10, ge=2, description="Smallest cluster kept.")
    top_clusters: int = Field(
        default=5, ge=1, le=100, description="Costliest clusters distilled; the cluster stage reports how many cover "
        "80 % of the failure cost (`cost_cover_80`), a good value.")


class LoRASettings(ApiModel):
    """peft LoRA fine-tuning of the student tier on teacher answers."""

    r: int = Field(default=16, ge=1, le=512, description="LoRA rank.")
    alpha: int = Field(default=32, ge=1, description="LoRA scaling alpha.")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], min_length=1, description="Modules that get adapters."
    )
    steps: int = Field(default=200, ge=1, description="Optimizer steps.")
    learning_rate: float = Field(default=2e-4, gt=0, lt=1, description="Peak learning rate.")
    batch_size: int = Field(default=8, ge=1, description="Examples per step.")
    samples_per_cluster: int = Field(default=200, ge=1, description="Training examples taken per cluster.")
    budget_split: Literal["cost", "equal"] = Field(
        default="cost",
        description="How the pair budget (`samplesPerCluster` per top cluster) is split: `cost`, by the escalation "
        "cost each cluster's failures caused (the costliest topics get most pairs); `equal`, the same per cluster.")


class EvaluationGate(ApiModel):
    """What a new adapter must achieve on held-out queries before it is used."""

    min_quality_gain: float = Field(
        default=0.02, ge=0, le=1, description="Student accuracy gain on held-out cluster queries needed to pass."
    )
    max_regression: float = Field(
        default=0.01, ge=0, le=1, description="Largest accuracy drop allowed outside the clusters."
    )
    hold_out_fraction: float = Field(default=0.2, gt=0, lt=1, description="Share of each cluster held out.")


class Rollout(ApiModel):
    """How the router versions this campaign produces reach traffic (other versions follow the policy's settings)."""

    canary_percent: int | None = Field(
        default=None, ge=0, le=100,
        description="Traffic share of this campaign's router version while it is a canary (0: promoted at once); "
        "default: the policy's `spec.router.canaryPercent`.")
    promote_after: str | None = Field(
        default=None, pattern=DURATION,
        description="Least time this campaign's canary serves before the promotion guard may promote it (a failing "
        "guard rolls it back at once); default: none, the guard decides as soon as it has `minRequests` and "
        "`minLabels`.")


CAMPAIGN_NODES_NEED_RUNNER = Rule(
    rule="self.distillNodes == 1 || self.distillRunner != 'Job'",
    message="spec.resources.distillNodes above 1 needs spec.resources.distillRunner TrainJob or JobSet: a plain Job "
    "runs the distill stage on one node",
    field="distillNodes",
)


class CampaignResources(ApiModel):
    """Image and resources of the stage Jobs."""

    RULES = (CAMPAIGN_NODES_NEED_RUNNER,)

    image: str = Field(default=DEFAULT_TRAINER_IMAGE, description="Trainer image the stage Jobs run.")
    gpu_count: int = Field(default=1, ge=0, le=16, description="GPUs for the distill stage.")
    gpu_resource_name: str = Field(default="nvidia.com/gpu", description="Extended resource name of the GPU.")
    cpu: str = Field(default="4", description="CPU per stage Job.")
    memory: str = Field(default="16Gi", description="Memory per stage Job.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels for stage Jobs.")
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Tolerations for stage Jobs."
    )
    active_deadline_seconds: int = Field(default=6 * 3600, ge=60, description="Deadline of each stage Job.")
    artifact_claim_name: str | None = Field(
        default=None, description="PVC where stages write artifacts; default: the policy's event-log PVC."
    )
    distill_runner: Literal["Job", "TrainJob", "JobSet"] = Field(
        default="Job",
        description="What runs the distill stage: `Job` (one pod); for students beyond one machine `TrainJob` "
        "(Kubeflow Trainer, runtime `trainingRuntime`) or `JobSet` (one indexed Job of `distillNodes` pods), "
        "both running `torchrun` over the same `routenlp train distill` (`gpuCount` processes per node).",
    )
    distill_nodes: int = Field(default=1, ge=1, le=64, description="Nodes of a TrainJob or JobSet distill stage.")
    training_runtime: str = Field(
        default="torch-distributed", pattern=DNS_LABEL, max_length=63,
        description="Kubeflow Trainer ClusterTrainingRuntime of a `TrainJob` distill stage.")

    @model_validator(mode="after")
    def _runner_nodes(self) -> "CampaignResources":
        if self.distill_nodes > 1 and self.distill_runner == "Job":
            raise CAMPAIGN_NODES_NEED_RUNNER.error(f"distillNodes is {self.distill_nodes}")
        return self


MAX_ROUNDS = 10
"""Rounds per run, at most: each round waits for a canary promotion and fresh failures, so ten already span days."""

CAMPAIGN_ROUNDS_APPLY = Rule(
    rule="self.rounds == 1 || (self.autoApply && self.retrainRouter)",
    message="spec.rounds above 1 needs spec.autoApply and spec.retrainRouter true: each round learns from the "
    "failures logged under the router version and adapter the previous round rolled out",
    field="rounds",
)

CAMPAIGN_STUDENT_NOT_TEACHER = Rule(
    rule="self.studentTier != self.teacherTier",
    message="spec.studentTier and spec.teacherTier must differ: the student is the cheaper tier that learns from "
    "the teacher",
    field="studentTier",
)


class DistillationCampaignSpec(ApiModel):
    """The closed loop: distill the teacher into a cheaper student tier where the student escalates most."""

    RULES = (CAMPAIGN_STUDENT_NOT_TEACHER, CAMPAIGN_ROUNDS_APPLY)

    policy_ref: str = Field(pattern=DNS_LABEL, max_length=63, description="RoutingPolicy whose traffic is improved.")
    student_tier: str = Field(pattern=DNS_LABEL, max_length=63, description="Cheaper ModelTier that gets the LoRA adapter.")
    teacher_tier: str = Field(pattern=DNS_LABEL, max_length=63, description="ModelTier whose answers are distilled.")
    trigger: Trigger = Field(default_factory=Trigger, description="When a run starts.")
    rounds: int = Field(
        default=1,
        description=f"Rounds per run (1-{MAX_ROUNDS}). Round n+1 starts once round n's router version is promoted "
        "and the policy's router has seen `trigger.minFailures` escalations under it; it clusters the failures "
        "logged under that version and continues training round n's adapter (the same student).",
        json_schema_extra={"minimum": 1, "maximum": MAX_ROUNDS},  # pydantic checks it below, with a clearer message
    )
    clustering: Clustering = Field(default_factory=Clustering, description="How escalation failures are clustered.")
    lora: LoRASettings = Field(default_factory=LoRASettings, description="LoRA fine-tuning settings.")
    evaluation: EvaluationGate = Field(default_factory=EvaluationGate, description="Gate a new adapter must pass.")
    retrain_router: bool = Field(default=True, description="Retrain and recalibrate the router after distillation.")
    rollout: Rollout = Field(default_factory=Rollout, description="How the new router version rolls out.")
    resources: CampaignResources = Field(default_factory=CampaignResources, description="Stage Job resources.")
    auto_apply: bool = Field(
        default=True,
        description="Apply results (load adapter, roll router) automatically; false: stop at `Proposed` and "
        "report them in status for a GitOps change.",
    )
    max_stage_retries: int = Field(default=2, ge=0, le=10, description="Retries of a failed stage Job.")

    @model_validator(mode="after")
    def _consistent(self) -> "DistillationCampaignSpec":
        if self.student_tier == self.teacher_tier:
            raise CAMPAIGN_STUDENT_NOT_TEACHER.error(f"both are {self.student_tier!r}")
        if not 1 <= self.rounds <= MAX_ROUNDS:
            raise SpecError("rounds", f"spec.rounds must be between 1 and {MAX_ROUNDS}, got {self.rounds}: each round "
                            "waits for a canary promotion and fresh failures; start another run for more")
        if self.rounds > 1 and not (self.auto_apply and self.retrain_router):
            raise CAMPAIGN_ROUNDS_APPLY.error(f"rounds is {self.rounds}")
        return self


class ClusterReport(ApiModel):
    """One cluster of escalation failures chosen for distillation."""

    id: int = Field(description="Cluster id.")
    size: int = Field(description="Escalation failures in it.")
    cost_usd: float = Field(description="Escalation cost it caused.")
    escalation_rate: float | None = Field(default=None, description="Escalation rate of queries near it.")
    examples: list[str] = Field(default_factory=list, description="A few example queries (truncated).")


class StageStatus(ApiModel):
    """One stage of the current run."""

    stage: str = Field(description="Stage name.")
    job: str | None = Field(default=None, description="Job running it.")
    attempts: int = Field(default=0, description="Jobs started for it.")
    state: Literal["Running", "Succeeded", "Failed", "Skipped"] = Field(description="Outcome.")
    seconds: float | None = Field(default=None, description="Wall time.")
    message: str = Field(default="", description="Detail.")


class CampaignMetrics(ApiModel):
    """Before/after figures of the current run."""

    quality_before: float | None = Field(default=None, description="Student accuracy on held-out cluster queries, before.")
    quality_after: float | None = Field(default=None, description="Same, with the adapter.")
    quality_gain: float | None = Field(default=None, description="after - before.")
    regression: float | None = Field(default=None, description="Accuracy drop outside the clusters.")
    teacher_quality: float | None = Field(default=None, description="Teacher accuracy on the same queries.")


class RoundStatus(ApiModel):
    """One round of the current run and its figures."""

    round: int = Field(description="Round number (1 = the first).")
    state: Literal["Running", "Succeeded", "Failed"] = Field(
        description="Running; Succeeded once its router version serves; Failed.")
    failures: int | None = Field(default=None, description="Escalation failures clustered (under the previous "
                                 "round's router version from round 2 on).")
    targeted_cost_usd: float | None = Field(default=None, description="Cost the distilled clusters' failures caused.")
    quality_after: float | None = Field(default=None, description="Student accuracy on held-out cluster queries, "
                                        "with this round's adapter.")
    quality_gain: float | None = Field(default=None, description="Gain over the student before this round.")
    adapter: str | None = Field(default=None, description="Adapter produced (name@uri).")
    router_version: str | None = Field(default=None, description="Router version produced.")
    cost_reduction: float | None = Field(default=None, description="Cost reduction the policy's router observed "
                                         "while this round's version served as stable.")
    violation_rate: float | None = Field(default=None, description="Risk the policy's router observed while this "
                                         "round's version served as stable.")


class DistillationCampaignStatus(StatusBase):
    """Where the campaign's current run is and what it produced."""

    phase: Literal[
        "Pending", "Clustering", "Distilling", "Evaluating", "RetrainingRouter", "RollingOut", "Observing",
        "Proposed", "Succeeded", "Failed",
    ] | None = Field(default=None, description="Where the current run is (`Observing`: between rounds, waiting for "
                     "failures under the round's router version).")
    run: int = Field(default=0, description="Runs started so far.")
    round: int = Field(default=0, description="Round of the current run (1..spec.rounds).")
    rounds: list[RoundStatus] = Field(default_factory=list, description="Rounds of the current run, with figures.")
    last_run_time: str | None = Field(default=None, description="When the last run started.")
    stages: list[StageStatus] = Field(default_factory=list, description="Stages of the current run.")
    clusters: list[ClusterReport] = Field(default_factory=list, description="Clusters selected for distillation.")
    adapter: str | None = Field(default=None, description="Adapter produced (name@uri).")
    router_version: str | None = Field(default=None, description="Router version produced.")
    metrics: CampaignMetrics = Field(default_factory=CampaignMetrics, description="Before/after figures.")


class DistillationCampaign(Resource):
    """Cluster escalation failures, distill the teacher into a cheaper tier with LoRA, retrain the router, roll out."""

    KIND: ClassVar[str] = "DistillationCampaign"
    PLURAL: ClassVar[str] = "distillationcampaigns"
    SHORT_NAMES: ClassVar[list[str]] = ["dc"]

    kind: Literal["DistillationCampaign"] = "DistillationCampaign"
    spec: DistillationCampaignSpec
    status: DistillationCampaignStatus | None = None
