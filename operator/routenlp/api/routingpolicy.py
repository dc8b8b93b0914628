"""RoutingPolicy (`rp`): an ordered tier portfolio, per-task quality targets, a risk level, and the router serving it."""

from __future__ import annotations

from enum import Enum
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from .common import DNS_LABEL, DURATION, ApiModel, Resource, StatusBase

DEFAULT_ROUTER_IMAGE = "ghcr.io/routenlp/router:0.1.0"


class TierRef(ApiModel):
    name: str = Field(pattern=DNS_LABEL, max_length=63, description="Name of a ModelTier in the same namespace.")


class TaskKind(str, Enum):
    STRUCTURED = "structured"
    GENERATION = "generation"


class TaskMatch(ApiModel):
    """How a request is matched to this task when it carries no `X-RouteNLP-Task` header or `metadata.task`."""

    models: list[str] = Field(
        default_factory=list, description="Request `model` values that mean this task (e.g. `support-intent`)."
    )
    path_prefixes: list[str] = Field(default_factory=list, description="Request path prefixes (e.g. `/tasks/intent`).")
    patterns: list[str] = Field(
        default_factory=list, description="Python regular expressions searched in the last user message."
    )


class Task(ApiModel):
    name: str = Field(pattern=DNS_LABEL, max_length=63, description="Task name; requests name it in `X-RouteNLP-Task`.")
    kind: TaskKind = Field(
        default=TaskKind.GENERATION,
        description="`structured`: a closed set of answers (labels, JSON); `generation`: free text.",
    )
    quality_target: float = Field(
        default=0.97,
        gt=0,
        le=1,
        description="Quality to hold, as a fraction of the reference (last) tier's quality on this task.",
    )
    labels: list[str] = Field(
        default_factory=list, description="Allowed answers of a structured task (label confidence comes from them)."
    )
    match: TaskMatch = Field(default_factory=TaskMatch, description="Rules that map a request to this task.")


class ConfidenceSource(str, Enum):
    LOGPROB = "logprob"
    LABEL_PROBABILITY = "labelProbability"
    ROUTER_PRIOR = "routerPrior"
    COMBINED = "combined"


class Cascade(ApiModel):
    """Conformal cascading: when an answer of a cheaper tier is accepted, and when it escalates."""

    risk_level: float = Field(
        default=0.05,
        gt=0,
        lt=1,
        description="alpha: the highest tolerated rate of accepted-but-unacceptable answers per (task, tier).",
    )
    delta: float = Field(
        default=0.1,
        gt=0,
        lt=1,
        description="The guarantee holds with probability at least 1 - delta over the calibration sample.",
    )
    min_calibration_samples: int = Field(
        default=200, ge=10, description="Labelled events a (task, tier) needs before its threshold is used."
    )
    calibration_window: int = Field(
        default=5000, ge=10, description="Most recent labelled events per (task, tier) used to calibrate."
    )
    recalibration_interval: str = Field(default="10m", pattern=DURATION, description="How often thresholds are recomputed.")
    max_escalations: int = Field(default=2, ge=0, le=10, description="Tiers tried after the first one, at most.")
    confidence_source: ConfidenceSource = Field(
        default=ConfidenceSource.COMBINED,
        description="Answer confidence: token `logprob`s, structured `labelProbability`, the `routerPrior`, or "
        "`combined` (a small calibrated model over all three).",
    )


class PromotionGuard(ApiModel):
    """When a canary router version is promoted (or rolled back)."""

    min_requests: int = Field(default=500, ge=1, description="Canary requests needed before a decision.")
    max_violation_rate: float | None = Field(
        default=None, gt=0, lt=1, description="Highest violation rate allowed on labelled canary traffic (default: riskLevel)."
    )
    max_acceptance_drop: float = Field(
        default=0.02, ge=0, le=1, description="Largest drop in first-tier acceptance versus the current version."
    )


class RouterSettings(ApiModel):
    version: str = Field(
        default="auto",
        pattern=r"^(auto|[A-Za-z0-9][A-Za-z0-9._-]*)$",
        description="Router artifact version to serve, or `auto` to follow versions that campaigns produce.",
    )
    artifact_uri: str | None = Field(
        default=None, description="Where router versions live (`pvc://claim/path` or `s3://...`); default: the policy's store."
    )
    canary_percent: int = Field(default=10, ge=0, le=100, description="Share of traffic a new version gets first.")
    promotion_guard: PromotionGuard = Field(default_factory=PromotionGuard, description="When a canary is promoted.")


class DeploymentMode(str, Enum):
    GATEWAY = "gateway"
    SIDECAR = "sidecar"


class ServiceSettings(ApiModel):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(default="ClusterIP", description="Service type.")
    port: int = Field(default=8080, ge=1, le=65535, description="Service port of the router.")


class RouterDeployment(ApiModel):
    mode: DeploymentMode = Field(
        default=DeploymentMode.GATEWAY,
        description="`gateway`: a router Deployment + Service; `sidecar`: injected into pods labelled "
        "`routenlp.io/policy=<name>`.",
    )
    replicas: int = Field(default=2, ge=0, le=100, description="Router pods in gateway mode.")
    image: str = Field(default=DEFAULT_ROUTER_IMAGE, description="Router image.")
    service: ServiceSettings = Field(default_factory=ServiceSettings, description="Service of the gateway.")
    cpu: str = Field(default="1", description="CPU request per router pod.")
    memory: str = Field(default="1Gi", description="Memory request and limit per router pod.")


class Feedback(ApiModel):
    shadow_sample_rate: float = Field(
        default=0.02, ge=0, le=1, description="Fraction of requests also sent to the reference tier to collect labels."
    )
    event_log_claim_name: str | None = Field(
        default=None, description="PVC for the routing event log (the trainer reads it); default: an operator-made PVC."
    )
    event_log_size: str = Field(default="10Gi", description="Size of the operator-made event-log PVC.")


class Budget(ApiModel):
    max_usd_per_day: float = Field(gt=0, description="Spend above which the policy reports `BudgetExceeded`.")
    action: Literal["Alert", "PreferCheaper"] = Field(
        default="Alert", description="`Alert`: condition + metric only; `PreferCheaper`: also raise the start tier."
    )


class RoutingPolicySpec(ApiModel):
    tiers: list[TierRef] = Field(
        min_length=1,
        max_length=16,
        description="ModelTiers from cheapest to frontier; the last one is the quality reference.",
    )
    tasks: list[Task] = Field(min_length=1, description="Tasks served and their quality targets.")
    default_task: str | None = Field(default=None, description="Task of requests no rule matches.")
    unknown_task: Literal["UseDefault", "Reject"] = Field(
        default="UseDefault", description="A request naming a task not listed: use `defaultTask`, or answer 400."
    )
    cascade: Cascade = Field(default_factory=Cascade, description="Conformal cascade settings.")
    router: RouterSettings = Field(default_factory=RouterSettings, description="Router version and rollout.")
    deployment: RouterDeployment = Field(default_factory=RouterDeployment, description="How the router runs.")
    feedback: Feedback = Field(default_factory=Feedback, description="Label collection.")
    budget: Budget | None = Field(default=None, description="Optional spending limit.")

    @model_validator(mode="after")
    def _consistent(self) -> "RoutingPolicySpec":
        tiers = [t.name for t in self.tiers]
        dup = sorted({n for n in tiers if tiers.count(n) > 1})
        if dup:
            raise ValueError(f"spec.tiers names must be unique; repeated: {', '.join(dup)}")
        tasks = [t.name for t in self.tasks]
        dup = sorted({n for n in tasks if tasks.count(n) > 1})
        if dup:
            raise ValueError(f"spec.tasks names must be unique; repeated: {', '.join(dup)}")
        if self.default_task is not None and self.default_task not in tasks:
            raise ValueError(f"spec.defaultTask {self.default_task!r} is not one of spec.tasks ({', '.join(tasks)})")
        if self.unknown_task == "UseDefault" and self.default_task is None and len(tasks) > 1:
            raise ValueError("spec.defaultTask is required when spec.unknownTask is UseDefault and there are several tasks")
        for t in self.tasks:
            if t.kind == TaskKind.STRUCTURED and t.labels and len(set(t.labels)) != len(t.labels):
                raise ValueError(f"spec.tasks[{t.name}].labels must be unique")
        return self

    @property
    def reference_tier(self) -> str:
        return self.tiers[-1].name

    def resolved_default_task(self) -> str:
        return self.default_task or self.tasks[0].name


class RolloutEvent(ApiModel):
    version: str = Field(description="Router version.")
    action: Literal["Canary", "Promoted", "RolledBack", "Pinned", "Proposed"] = Field(description="What happened.")
    reason: str = Field(description="Why, e.g. `GuardHeld`, `ViolationRateAboveRisk`.")
    time: str = Field(description="RFC 3339 time.")


class RouterVersionStatus(ApiModel):
    current: str | None = Field(default=None, description="Version serving the stable share of traffic.")
    canary: str | None = Field(default=None, description="Version serving `canaryPercent` of traffic, if any.")
    canary_percent: int = Field(default=0, description="Share of traffic of the canary now.")
    proposed: str | None = Field(default=None, description="Version a campaign produced that waits for a user to pin it.")
    history: list[RolloutEvent] = Field(default_factory=list, description="Most recent rollout decisions (newest last).")


class RoutingPolicyStatus(StatusBase):
    phase: Literal["Pending", "Progressing", "Ready", "Degraded", "Failed"] | None = Field(
        default=None, description="Pending, Progressing, Ready, Degraded or Failed."
    )
    tiers: list[str] = Field(default_factory=list, description="Resolved tiers, in routing order.")
    missing_tiers: list[str] = Field(default_factory=list, description="Referenced tiers that do not exist.")
    config_hash: str | None = Field(default=None, description="Hash of the rendered router configuration.")
    endpoint: str | None = Field(default=None, description="URL of the router (gateway mode).")
    router: RouterVersionStatus = Field(default_factory=RouterVersionStatus, description="Router versions and rollout.")
    cost_reduction: float | None = Field(default=None, description="Observed 1 - cost / cost of always using the reference tier.")
    escalation_rate: float | None = Field(default=None, description="Observed share of requests that escalated.")
    violation_rate: float | None = Field(default=None, description="Observed accepted-but-unacceptable rate on labelled events.")


class RoutingPolicy(Resource):
    KIND: ClassVar[str] = "RoutingPolicy"
    PLURAL: ClassVar[str] = "routingpolicies"
    SHORT_NAMES: ClassVar[list[str]] = ["rp"]

    kind: Literal["RoutingPolicy"] = "RoutingPolicy"
    spec: RoutingPolicySpec
    status: RoutingPolicyStatus | None = None
