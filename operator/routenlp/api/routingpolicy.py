"""RoutingPolicy (`rp`): an ordered tier portfolio, per-task quality targets, a risk level, and the router serving it."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from .common import DNS_LABEL, DNS_SUBDOMAIN, DURATION, ApiModel, Resource, Rule, SpecError, StatusBase, duplicates
from .release import RELEASE

DEFAULT_ROUTER_IMAGE = f"ghcr.io/routenlp/router:{RELEASE}"


class TierRef(ApiModel):
    """A reference to a ModelTier."""

    name: str = Field(pattern=DNS_LABEL, max_length=63, description="Name of a ModelTier in the same namespace.")


class TaskKind(str, Enum):
    """What answers of a task look like."""

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

    @model_validator(mode="after")
    def _patterns_compile(self) -> "TaskMatch":
        # The router compiles these with Python's `re`; a schema cannot say "is a valid regular expression".
        for i, pattern in enumerate(self.patterns):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise SpecError(f"patterns[{i}]", f"not a valid Python regular expression: {exc} ({pattern!r})")
        return self


TASK_ANSWERS_NEED_STRUCTURED = Rule(
    rule="self.kind == 'structured' || !has(self.answers) || size(self.answers) == 0",
    message="answers apply only to structured tasks: set kind: structured, or remove answers",
    field="answers",
    reason="FieldValueForbidden",
)
# The same rule for the deprecated spelling, so that the message names the field the user wrote.
TASK_LABELS_NEED_STRUCTURED = Rule(
    rule="self.kind == 'structured' || !has(self.labels) || size(self.labels) == 0",
    message="labels (the deprecated name of answers) apply only to structured tasks: set kind: structured, or "
    "remove labels",
    field="labels",
    reason="FieldValueForbidden",
)
# `tasks[].labels` was renamed `answers` ("label" means a feedback label everywhere else).
ANSWERS_RENAMED_SINCE = "v0.2"
ANSWERS_OLD_NAME_UNTIL = "v0.3"


class Task(ApiModel):
    """A kind of request the policy serves, with its own quality target and calibration."""

    RULES = (TASK_ANSWERS_NEED_STRUCTURED, TASK_LABELS_NEED_STRUCTURED)

    name: str = Field(pattern=DNS_LABEL, max_length=63, description="Task name; requests name it in `X-RouteNLP-Task`.")
    kind: TaskKind = Field(
        default=TaskKind.GENERATION,
        description="`structured`: a closed set of `answers` (class names, JSON); `generation`: free text.",
    )
    quality_target: float = Field(
        default=0.97,
        gt=0,
        le=1,
        description="Start rule (not a promise): a request starts at the cheapest tier of the task's chain whose "
        "predicted acceptance is at least qualityTarget x that of the chain's last tier (unless costWeight is set). "
        "The promise is qualityFloor.",
    )
    cost_weight: float | None = Field(
        default=None,
        ge=0,
        le=100,
        description="Cost-weighted start rule, instead of qualityTarget: a request starts at the tier of the task's "
        "chain with the highest predicted acceptance minus costWeight x the tier's price relative to the reference "
        "(blended at 3 input tokens per output token). 0: the tier most likely to answer well; larger: cheaper "
        "starts. Suits portfolios whose prices lie close together (self-hosted tiers), where a cheapest-adequate "
        "start pays for many failed attempts. Escalation, thresholds and qualityFloor apply as with qualityTarget.",
    )
    quality_floor: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="A promise: with probability at least 1 - cascade.delta, the task's quality on new traffic is at "
        "least qualityFloor x the quality of always using the reference tier (docs/guarantee.md). The trainer then "
        "certifies one confidence level for the chain's cheaper tiers on the task's own calibration requests "
        "(Learn-then-Test of the quality ratio), instead of cascade.riskLevel; a task no level certifies is served "
        "by the reference. Unset: cascade.qualityFloor, if set, covers the task; else only riskLevel is promised.",
    )
    chain: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="The tiers this task's requests may use, cheapest first in spec.tiers order; the last always "
        "answers (it may be cheaper than the reference where it is the task's best). Empty: learned by the trainer "
        "(the task's cost/quality Pareto set on logged quality); every tier until a trained router version exists.",
        json_schema_extra={"x-kubernetes-list-type": "atomic"},
    )
    answers: list[str] = Field(
        default_factory=list,
        max_length=1000,
        description="Allowed answers of a structured task (e.g. its intents), each once: a cheaper tier's answer agrees "
        "with the reference tier's when both name the same one (how shadow and judge labels are made).",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    labels: list[str] | None = Field(
        default=None,
        max_length=1000,
        description=f"Deprecated since {ANSWERS_RENAMED_SINCE}, accepted until {ANSWERS_OLD_NAME_UNTIL}: the former "
        "name of `answers` (same meaning), read as `answers` when that is unset; setting both to different values "
        "is an error the operator reports (InvalidSpec).",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    match: TaskMatch = Field(default_factory=TaskMatch, description="Rules that map a request to this task.")

    @model_validator(mode="after")
    def _answers(self) -> "Task":
        # The deprecated spelling is checked under its own name (errors name the field the user wrote), then read as
        # `answers`.
        self._check_answers(self.answers, "answers", TASK_ANSWERS_NEED_STRUCTURED)
        if self.labels:
            self._check_answers(self.labels, "labels", TASK_LABELS_NEED_STRUCTURED)
            # No CEL rule for this one: comparing two lists of up to 1000 strings of unbounded length is beyond the
            # API server's cost budget for a rule, so the operator (and `routenlp validate`) reject it. Sets: the
            # order does not matter.
            if self.answers and set(self.answers) != set(self.labels):
                only_answers = sorted(set(self.answers) - set(self.labels))
                only_labels = sorted(set(self.labels) - set(self.answers))
                raise SpecError("labels", "labels is the deprecated name of answers and the two differ: set only "
                                f"answers (only in answers: {', '.join(only_answers) or '-'}; only in labels: "
                                f"{', '.join(only_labels) or '-'})")
            if not self.answers:
                self.answers = list(self.labels)
        return self

    def _check_answers(self, values: list[str], field: str, rule: Rule) -> None:
        """Allowed answers: structured tasks only, each once (the CRD states uniqueness as a list-type set, which the
        API server enforces itself)."""
        if values and self.kind != TaskKind.STRUCTURED:
            raise rule.error()
        dup = duplicates(values)
        if dup:
            raise SpecError(field, f"{field} must be unique; repeated: {', '.join(dup)}")


class RiskMeasure(str, Enum):
    """What `riskLevel` bounds per (task, tier); the values `routenlp.router.conformal` takes."""

    ACCEPTED_ANSWERS = "acceptedAnswers"
    ALL_REQUESTS = "allRequests"


class ConfidenceSource(str, Enum):
    """Where the confidence score of an answer comes from."""

    LOGPROB = "logprob"
    LABEL_PROBABILITY = "labelProbability"
    ROUTER_PRIOR = "routerPrior"
    COMBINED = "combined"


CASCADE_WINDOW_COVERS_MINIMUM = Rule(
    rule="self.calibrationWindow >= self.minCalibrationSamples",
    message="calibrationWindow must be >= minCalibrationSamples, or no threshold could ever be calibrated: raise "
    "calibrationWindow or lower minCalibrationSamples",
    field="calibrationWindow",
)


class Cascade(ApiModel):
    """Conformal cascading: when an answer of a cheaper tier is accepted, and when it escalates."""

    RULES = (CASCADE_WINDOW_COVERS_MINIMUM,)

    risk_level: float = Field(
        default=0.05,
        gt=0,
        lt=1,
        description="alpha: the highest tolerated rate of accepted-but-unacceptable answers per (task, tier), "
        "measured as `riskMeasure` says.",
    )
    risk_measure: RiskMeasure = Field(
        default=RiskMeasure.ACCEPTED_ANSWERS,
        description="`acceptedAnswers`: riskLevel bounds the unacceptable share among the answers a tier accepts. "
        "`allRequests`: it bounds the share of all requests reaching the tier that get an unacceptable answer "
        "accepted there, which caps each tier's quality cost per task at riskLevel (see docs/guarantee.md).",
    )
    delta: float = Field(
        default=0.1,
        gt=0,
        lt=1,
        description="The guarantee holds with probability at least 1 - delta over the calibration sample.",
    )
    quality_floor: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="A promise over the traffic mix: with probability at least 1 - delta, the quality of the "
        "requests of all tasks without their own qualityFloor is at least qualityFloor x that of always using the "
        "reference tier (docs/guarantee.md). One confidence level for every cheaper tier, certified on their pooled "
        "calibration requests; a larger sample than any one task's, so it costs less than per-task floors.",
    )
    min_calibration_samples: int = Field(
        default=200, ge=10, description="Labelled events a (task, tier) needs before its threshold is used."
    )
    calibration_window: int = Field(
        default=5000, ge=10, description="Most recent labelled events per (task, tier) used to calibrate."
    )
    recalibration_interval: str = Field(default="10m", pattern=DURATION, description="How often thresholds are recomputed.")
    max_escalations: int = Field(default=2, ge=0, le=10, description="Tiers tried after the first one, at most.")
    request_deadline: str = Field(
        default="60s", pattern=DURATION,
        description="Longest a request may take across all its tier calls and escalations; no tier is called after "
        "it, and a request that got no answer by then is answered 504. Each tier call is also bounded by the "
        "tier's timeoutSeconds (for streams: the longest wait for the next chunk).")
    confidence_source: ConfidenceSource = Field(
        default=ConfidenceSource.COMBINED,
        description="Answer confidence: token `logprob`s, structured `labelProbability`, the `routerPrior`, or "
        "`combined` (a small calibrated model over all three).",
    )

    @model_validator(mode="after")
    def _window_covers_minimum(self) -> "Cascade":
        if self.calibration_window < self.min_calibration_samples:
            raise CASCADE_WINDOW_COVERS_MINIMUM.error(
                f"calibrationWindow {self.calibration_window}, minCalibrationSamples {self.min_calibration_samples}"
            )
        return self


class PromotionGuard(ApiModel):
    """When a canary router version is promoted (or rolled back)."""

    min_requests: int = Field(default=500, ge=1, description="Canary requests needed before a decision.")
    min_labels: int = Field(
        default=30, ge=1, description="Labels the canary's violation rate must rest on (the risk measure's sample: "
        "labelled accepted answers, or shadow labels under allRequests) before it can promote or roll back on it.")
    max_violation_rate: float | None = Field(
        default=None, gt=0, lt=1, description="Highest violation rate allowed on labelled canary traffic, in the policy's "
        "riskMeasure (default: riskLevel)."
    )
    max_acceptance_drop: float = Field(
        default=0.02, ge=0, le=1, description="Largest drop in first-tier acceptance versus the current version."
    )


class RouterSettings(ApiModel):
    """Which router artifact version serves, and how new versions roll out."""

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
    """How the router runs."""

    GATEWAY = "gateway"
    SIDECAR = "sidecar"


class ServiceSettings(ApiModel):
    """The Service in front of the gateway router."""

    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(default="ClusterIP", description="Service type.")
    port: int = Field(default=8080, ge=1, le=65535, description="Service port of the router.")


ALL_NAMESPACES = "*"
ClientNamespace = Annotated[str, Field(pattern=r"^(\*|[a-z0-9]([-a-z0-9]*[a-z0-9])?)$", max_length=63)]


class RouterNetwork(ApiModel):
    """Who may reach a gateway router: the NetworkPolicy the operator renders in front of it (sidecar routers live in
    the application's pods, whose NetworkPolicy is the application's)."""

    allowed_client_namespaces: list[ClientNamespace] = Field(
        default_factory=list,
        max_length=64,
        description="Namespaces whose pods may call the router's client port (`/v1/*`, `/healthz`, `/readyz`), "
        "besides the policy's own namespace, which always may; `*`: every namespace. The admin port (`/metrics`, "
        "`/routenlp/*`) stays open only to the operator and the monitoring namespace the chart names.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    allowed_client_cidrs: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="IP ranges (CIDR, e.g. `10.0.0.0/8`) outside the cluster that may call the client port: a "
        "LoadBalancer's or NodePort's clients, which no namespace names.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )

    @model_validator(mode="after")
    def _cidrs_parse(self) -> "RouterNetwork":
        # Kubernetes rejects a bad ipBlock only when the operator applies the NetworkPolicy: say it up front.
        for i, cidr in enumerate(self.allowed_client_cidrs):
            try:
                ipaddress.ip_network(cidr, strict=True)
            except ValueError as exc:
                raise SpecError(f"allowedClientCidrs[{i}]", f"not a CIDR range: {exc} (e.g. 10.0.0.0/8, 2001:db8::/32)")
        return self


ROUTER_ADMIN_PORT_DIFFERS = Rule(
    rule="self.adminPort != self.service.port",
    message="adminPort must differ from service.port: the admin endpoints (/metrics, /routenlp/*) are served on "
    "their own port so that clients never reach them",
    field="adminPort",
)


class RouterDeployment(ApiModel):
    """Where and how the router runs."""

    RULES = (ROUTER_ADMIN_PORT_DIFFERS,)

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
    admin_port: int = Field(
        default=9091, ge=1, le=65535, description="Container port of the router's admin endpoints (`/metrics`, "
        "`/routenlp/rollout`), apart from the client port so that a NetworkPolicy can keep clients off them."
    )
    network: RouterNetwork = Field(default_factory=RouterNetwork, description="Who may reach a gateway router.")

    @model_validator(mode="after")
    def _admin_port_differs(self) -> "RouterDeployment":
        if self.admin_port == self.service.port:
            raise ROUTER_ADMIN_PORT_DIFFERS.error(f"both {self.admin_port}")
        return self


AUTH_SECRETS_DIFFER = Rule(
    rule="!has(self.labellersSecret) || !has(self.clientKeysSecret) || self.labellersSecret != self.clientKeysSecret",
    message="clientKeysSecret must differ from labellersSecret: every client key would also be a labeller token, "
    "and any client could move the acceptance thresholds",
    field="clientKeysSecret",
)


class Auth(ApiModel):
    """Credentials the router checks: Secrets in the policy's namespace that the operator mounts into the router
    (the kubelet refreshes the files when a Secret changes; the router re-reads them). Their values never appear in
    the router configuration, status, Events or logs."""

    RULES = (AUTH_SECRETS_DIFFER,)

    labellers_secret: str | None = Field(
        default=None, pattern=DNS_SUBDOMAIN, max_length=253,
        description="Secret of the labellers whose feedback may move acceptance thresholds: each key is a labeller "
        "name, its value that labeller's bearer token (`Authorization: Bearer <token>` on `/v1/feedback`). Unset: "
        "feedback is still logged, but only the shadow judge's labels calibrate.",
    )
    client_keys_secret: str | None = Field(
        default=None, pattern=DNS_SUBDOMAIN, max_length=253,
        description="Secret of client API keys: when set, `/v1/*` requires `Authorization: Bearer <key>`; each key "
        "is a client name (recorded in routing events), its value that client's key. Unset: `/v1/*` is open to "
        "whoever the NetworkPolicy lets in.",
    )

    @model_validator(mode="after")
    def _secrets_differ(self) -> "Auth":
        if self.labellers_secret is not None and self.labellers_secret == self.client_keys_secret:
            raise AUTH_SECRETS_DIFFER.error(f"both {self.labellers_secret!r}")
        return self


class Feedback(ApiModel):
    """How labelled events are collected for calibration and campaigns."""

    shadow_sample_rate: float = Field(
        default=0.02, ge=0, le=1, description="Fraction of requests also sent to the reference tier to collect labels."
    )
    event_log_claim_name: str | None = Field(
        default=None, description="PVC for the routing event log (the trainer reads it); default: an operator-made PVC."
    )
    event_log_size: str = Field(default="10Gi", description="Size of the operator-made event-log PVC.")


class Budget(ApiModel):
    """A daily spending limit across all tiers of the policy."""

    max_usd_per_day: float = Field(gt=0, description="Spend above which the policy reports `BudgetExceeded`.")
    action: Literal["Alert", "PreferCheaper"] = Field(
        default="Alert", description="`Alert`: `BudgetExceeded` condition + Warning Event. `PreferCheaper`: also, "
        "while over budget, the routers start every request at the cheapest tier (the difficulty router no longer "
        "skips it; acceptance thresholds unchanged, see docs/operations.md). Gateway mode (the spend is read from "
        "the gateway's routers)."
    )


POLICY_TIERS_UNIQUE = Rule(
    rule="self.tiers.all(t, self.tiers.exists_one(u, u.name == t.name))",
    message="spec.tiers names must be unique: list each ModelTier once, cheapest first",
    field="tiers",
    reason="FieldValueDuplicate",
)
POLICY_TASKS_UNIQUE = Rule(
    rule="self.tasks.all(t, self.tasks.exists_one(u, u.name == t.name))",
    message="spec.tasks names must be unique: merge or rename the repeated task",
    field="tasks",
    reason="FieldValueDuplicate",
)
POLICY_CHAIN_TIERS_KNOWN = Rule(
    rule="self.tasks.all(t, !has(t.chain) || t.chain.all(c, self.tiers.exists(r, r.name == c)))",
    message="every tier of a task's chain must be one of spec.tiers",
    field="tasks",
)
POLICY_DEFAULT_TASK_KNOWN = Rule(
    rule="!has(self.defaultTask) || self.tasks.exists(t, t.name == self.defaultTask)",
    message="spec.defaultTask must name one of spec.tasks",
    field="defaultTask",
)
POLICY_DEFAULT_TASK_REQUIRED = Rule(
    rule="has(self.defaultTask) || size(self.tasks) == 1 || self.unknownTask == 'Reject'",
    message="spec.defaultTask is required when there are several tasks and spec.unknownTask is UseDefault: name the "
    "task of requests no rule matches, or set unknownTask: Reject",
    field="defaultTask",
    reason="FieldValueRequired",
)


class RoutingPolicySpec(ApiModel):
    """An ordered tier portfolio, the tasks served with their quality targets, and the router that serves them."""

    RULES = (POLICY_TIERS_UNIQUE, POLICY_TASKS_UNIQUE, POLICY_DEFAULT_TASK_KNOWN, POLICY_DEFAULT_TASK_REQUIRED,
             POLICY_CHAIN_TIERS_KNOWN)

    tiers: list[TierRef] = Field(
        min_length=1,
        max_length=16,
        description="ModelTiers from the cheapest to the reference tier (the last: the quality reference).",
    )
    tasks: list[Task] = Field(min_length=1, max_length=64, description="Tasks served and their quality targets.")
    default_task: str | None = Field(
        default=None, pattern=DNS_LABEL, max_length=63, description="Task of requests no rule matches."
    )
    unknown_task: Literal["UseDefault", "Reject"] = Field(
        default="UseDefault", description="A request naming a task not listed: use `defaultTask`, or answer 400."
    )
    cascade: Cascade = Field(default_factory=Cascade, description="Conformal cascade settings.")
    router: RouterSettings = Field(default_factory=RouterSettings, description="Router version and rollout.")
    deployment: RouterDeployment = Field(default_factory=RouterDeployment, description="How the router runs.")
    feedback: Feedback = Field(default_factory=Feedback, description="Label collection.")
    auth: Auth = Field(default_factory=Auth, description="Labeller tokens and client API keys the router checks.")
    budget: Budget | None = Field(default=None, description="Optional spending limit.")

    @model_validator(mode="after")
    def _consistent(self) -> "RoutingPolicySpec":
        dup = duplicates([t.name for t in self.tiers])
        if dup:
            raise POLICY_TIERS_UNIQUE.error(f"repeated: {', '.join(dup)}")
        tasks = [t.name for t in self.tasks]
        dup = duplicates(tasks)
        if dup:
            raise POLICY_TASKS_UNIQUE.error(f"repeated: {', '.join(dup)}")
        if self.default_task is not None and self.default_task not in tasks:
            raise POLICY_DEFAULT_TASK_KNOWN.error(f"{self.default_task!r} is not one of {', '.join(tasks)}")
        if self.unknown_task == "UseDefault" and self.default_task is None and len(tasks) > 1:
            raise POLICY_DEFAULT_TASK_REQUIRED.error()
        order = {t.name: k for k, t in enumerate(self.tiers)}
        for i, t in enumerate(self.tasks):
            unknown = [c for c in t.chain if c not in order]
            if unknown:
                raise POLICY_CHAIN_TIERS_KNOWN.error(f"tasks[{i}].chain names {', '.join(unknown)}; tiers: "
                                                     f"{', '.join(order)}")
            ks = [order[c] for c in t.chain]
            if ks != sorted(set(ks)):
                raise SpecError(f"tasks[{i}].chain", "list each tier once, cheapest first, in spec.tiers order "
                                f"({', '.join(order)}); got {', '.join(t.chain)}")
        # Two tasks claiming the same request `model` would make matching depend on list order.
        seen: dict[str, str] = {}
        for i, t in enumerate(self.tasks):
            for model in t.match.models:
                if model in seen:
                    raise SpecError(
                        f"tasks[{i}].match.models",
                        f"request model {model!r} already matches task {seen[model]!r}: each model value may map to "
                        "one task only",
                    )
                seen[model] = t.name
        return self

    @property
    def reference_tier(self) -> str:
        return self.tiers[-1].name

    def resolved_default_task(self) -> str:
        return self.default_task or self.tasks[0].name


@dataclass(frozen=True)
class Deprecation:
    """A deprecated field a spec sets: `path` (e.g. `spec.tasks[2].labels`) and the field that replaces it."""

    path: str
    use: str
    since: str
    until: str

    def __str__(self) -> str:
        return (f"{self.path} is deprecated since {self.since}: use {self.use} (same meaning); the old name is "
                f"accepted until {self.until}")


def deprecations(spec: RoutingPolicySpec) -> list[Deprecation]:
    """The deprecated fields `spec` sets, in document order: what the admission webhook returns as warnings (kubectl
    prints them), the reconcile reports as a `DeprecatedField` Event and `routenlp validate` as warnings."""
    return [Deprecation(f"spec.tasks[{i}].labels", f"spec.tasks[{i}].answers", ANSWERS_RENAMED_SINCE,
                        ANSWERS_OLD_NAME_UNTIL)
            for i, t in enumerate(spec.tasks) if t.labels is not None]


class RolloutEvent(ApiModel):
    """One rollout decision."""

    version: str = Field(description="Router version.")
    action: Literal["Canary", "Promoted", "RolledBack", "Pinned", "Proposed"] = Field(description="What happened.")
    reason: str = Field(description="Why, e.g. `GuardHeld`, `ViolationRateAboveRisk`.")
    time: str = Field(description="RFC 3339 time.")


class RouterVersionStatus(ApiModel):
    """Router versions serving now and how the rollout stands."""

    current: str | None = Field(default=None, description="Version serving the stable share of traffic.")
    canary: str | None = Field(default=None, description="Version serving `canaryPercent` of traffic, if any.")
    canary_percent: int = Field(default=0, description="Share of traffic of the canary now.")
    proposed: str | None = Field(default=None, description="Version a campaign produced that waits for a user to pin it.")
    history: list[RolloutEvent] = Field(default_factory=list, description="Most recent rollout decisions (newest last).")


class TaskChain(ApiModel):
    """One task's tier chain in force."""

    task: str
    tiers: list[str] = Field(default_factory=list, description="Tiers, cheapest first; the last always answers.")


class RoutingPolicyStatus(StatusBase):
    """What the operator and the router observed about the policy."""

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
    violation_rate: float | None = Field(default=None, description="Observed risk of the stable router version in the policy's "
                                         "riskMeasure, on labelled events (see docs/operator.md).")
    escalations: int | None = Field(
        default=None, description="Observed requests that escalated since the stable router version was first served "
        "(compared with a campaign's `trigger.minFailures`)."
    )
    figures_version: str | None = Field(
        default=None, description="Router version the observed figures are of (the stable version the router "
        "reported): a campaign's next round waits until they are of its own version."
    )
    spent_usd24h: float | None = Field(
        default=None, alias="spentUsd24h",
        description="Observed spend over the last 24 h, in USD (compared with `spec.budget.maxUsdPerDay`).",
    )
    chains: list[TaskChain] = Field(
        default_factory=list, description="The tier chain each task routes over, as the stable router version serves "
        "it: the task's pinned `chain`, else the one the trainer learnt, else every tier.")
    chain_summary: str | None = Field(default=None, description="`chains` on one line (`kubectl get rp -o wide`).")


class RoutingPolicy(Resource):
    """An ordered portfolio of tiers, per-task quality targets and a risk level, served by a versioned router."""

    KIND: ClassVar[str] = "RoutingPolicy"
    PLURAL: ClassVar[str] = "routingpolicies"
    SHORT_NAMES: ClassVar[list[str]] = ["rp"]

    kind: Literal["RoutingPolicy"] = "RoutingPolicy"
    spec: RoutingPolicySpec
    status: RoutingPolicyStatus | None = None
