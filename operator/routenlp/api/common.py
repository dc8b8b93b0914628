"""Shared building blocks of the three RouteNLP custom resources.

Field names are camelCase in YAML (what `kubectl` users write) and snake_case in Python; the alias generator keeps
one name per concept. Descriptions are the API documentation: `routenlp crds` copies them into the CRD schemas and
`docs/api.md` is generated from them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler, field_validator
from pydantic.alias_generators import to_camel
from pydantic_core import core_schema as cs

GROUP = "routenlp.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# RFC 1123 label: what Kubernetes accepts for names of Services, Deployments and references to them.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# RFC 1123 subdomain: names of Secrets and PersistentVolumeClaims.
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
# Go-style durations as Kubernetes users write them ("90s", "30m", "1h30m").
DURATION = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_DURATION_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in a Go-style duration such as ``1h30m``; raises ValueError on anything else."""
    if not re.fullmatch(DURATION, text):
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 30m, 1h30m)")
    return sum(float(n) * _DURATION_UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))


class SpecError(ValueError):
    """A rule broken inside one object. `path` is the offending field relative to the object that checks it
    (camelCase, e.g. `resources.gpuCount`); `routenlp validate` joins it to where the object sits in the document."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path
        self.message = message


@dataclass(frozen=True)
class Rule:
    """A cross-field rule stated once for both sides: the API server evaluates `rule` (CEL, `self` = the object whose
    model lists the rule in `RULES`), pydantic raises `error()` from a model validator with the same message.
    Rules must hold on the object after schema defaults are applied (the API server defaults before it validates)."""

    rule: str
    message: str
    field: str = ""  # offending field relative to the object (CEL fieldPath without the leading dot)
    reason: Literal["FieldValueInvalid", "FieldValueForbidden", "FieldValueRequired", "FieldValueDuplicate"] = (
        "FieldValueInvalid"
    )

    def error(self, detail: str = "") -> SpecError:
        return SpecError(self.field, f"{self.message} ({detail})" if detail else self.message)

    def to_k8s(self) -> dict[str, str]:
        out = {"rule": self.rule, "message": self.message}
        if self.field:
            out["fieldPath"] = "." + self.field
        out["reason"] = self.reason
        return out


def duplicates(values: list[str]) -> list[str]:
    return sorted({v for v in values if values.count(v) > 1})


class ApiModel(BaseModel):
    """Base of every spec/status object: camelCase aliases, unknown fields rejected (as `kubectl --validate=strict`)."""

    # CEL rules of this object (see Rule). Only the class that declares them gets them, not its subclasses.
    RULES: ClassVar[tuple[Rule, ...]] = ()

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
    )

    def to_k8s(self) -> dict[str, Any]:
        """The object as it appears in YAML: camelCase keys, unset optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: cs.CoreSchema, handler: GetJsonSchemaHandler) -> dict[str, Any]:
        schema = handler(core_schema)
        rules = cls.__dict__.get("RULES")
        if rules:
            target = handler.resolve_ref_schema(schema)
            target["x-kubernetes-validations"] = [r.to_k8s() for r in rules]
        return schema


class WireModel(BaseModel):
    """Base of the formats operator, router and trainer exchange outside Kubernetes objects (rollout figures, router
    state, stage summaries): camelCase on the wire, snake_case accepted too; unknown fields ignored, since the other
    side may be a release older or newer (a rolling upgrade)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def wire(self) -> dict[str, Any]:
        """The JSON-able form the other side reads (camelCase)."""
        return self.model_dump(mode="json", by_alias=True)


class ConditionStatus(str, Enum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(ApiModel):
    """A Kubernetes-style condition (the `metav1.Condition` shape)."""

    type: str = Field(description="Condition type in CamelCase, e.g. `Ready`, `TiersResolved`, `Calibrated`.")
    status: ConditionStatus = Field(description="`True`, `False` or `Unknown`.")
    reason: str = Field(
        description="One CamelCase word saying why, stable enough for alerts (e.g. `InsufficientGPU`, `MissingTiers`)."
    )
    message: str = Field(default="", description="Human-readable detail: what is wrong and what to do about it.")
    last_transition_time: str = Field(
        description="RFC 3339 time the status last changed (not the reason or message)."
    )
    observed_generation: int | None = Field(
        default=None, description="The `.metadata.generation` this condition was computed from."
    )


# Condition types the operator writes. `Ready` summarises the others (see ReadySet).
READY = "Ready"
TIERS_RESOLVED = "TiersResolved"  # RoutingPolicy: every tier it lists exists and is valid
AUTH_SECRETS_FOUND = "AuthSecretsFound"  # RoutingPolicy: the Secrets spec.auth names exist and hold keys
ROUTER_READY = "RouterReady"  # RoutingPolicy: its router pods are ready (gateway) or injected (sidecar)
TIERS_READY = "TiersReady"  # RoutingPolicy: every tier it lists is Ready
BUDGET_EXCEEDED = "BudgetExceeded"  # RoutingPolicy: the last 24 h spend is over spec.budget (informational)
ADAPTERS_LOADED = "AdaptersLoaded"  # ModelTier: the adapters it should serve are loaded in every ready pod


@dataclass(frozen=True)
class ReadySet:
    """The condition types that decide `Ready`, in the order their problems are reported (KServe's
    `inference_service_status.go` pattern). Ready is True unless one of them is False; then Ready carries the
    first such condition's reason and message. An absent or Unknown one does not hold Ready back: it is optional
    (e.g. AuthSecretsFound without spec.auth) or could not be checked."""

    types: tuple[str, ...]

    def blocking(self, conditions: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The first condition of the set that is False, or None when Ready is True."""
        by_type = {c["type"]: c for c in conditions}
        return next((by_type[t] for t in self.types
                     if t in by_type and by_type[t]["status"] == ConditionStatus.FALSE.value), None)


ROUTING_POLICY_READY = ReadySet((TIERS_RESOLVED, AUTH_SECRETS_FOUND, ROUTER_READY, TIERS_READY))


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class SecretKeyRef(ApiModel):
    """A key in a Secret in the resource's namespace. Secret values never appear in status, events or logs."""

    name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253, description="Name of the Secret.")
    key: str = Field(min_length=1, description="Key inside the Secret whose value is used.")


class StatusBase(ApiModel):
    """Fields every RouteNLP status has."""

    observed_generation: int | None = Field(
        default=None, description="The `.metadata.generation` the operator last acted on."
    )
    phase: str | None = Field(default=None, description="One-word summary of the resource's state.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Kubernetes-style conditions; `Ready` summarises the others.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


class ObjectMeta(BaseModel):
    """The part of `metadata` that RouteNLP reads; everything else Kubernetes adds is kept as is."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, alias_generator=to_camel)

    name: str = Field(description="Resource name (an RFC 1123 label).")
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    generation: int | None = None

    @field_validator("name")
    @classmethod
    def _name_is_label(cls, v: str) -> str:
        if len(v) > 63 or not re.fullmatch(DNS_LABEL, v):
            raise SpecError("", f"{NAME_RULE.message} (got {v!r})")  # the loc is metadata.name already
        return v


# Checked at the root of every CRD: only metadata.name is visible to CEL there.
NAME_RULE = Rule(
    rule="size(self.metadata.name) <= 63 && self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')",
    message="metadata.name must be an RFC 1123 label: at most 63 lower-case letters, digits and '-', starting and "
    "ending with a letter or digit (it names the Deployments and Services made from this resource)",
    field="metadata.name",
)


class Resource(ApiModel):
    """A whole custom resource document: apiVersion, kind, metadata, spec, status."""

    KIND: ClassVar[str] = ""
    PLURAL: ClassVar[str] = ""
    SHORT_NAMES: ClassVar[list[str]] = []

    api_version: Literal["routenlp.io/v1alpha1"] = Field(alias="apiVersion")
    kind: str
    metadata: ObjectMeta

    @field_validator("kind")
    @classmethod
    def _kind_matches(cls, v: str) -> str:
        if cls.KIND and v != cls.KIND:
            raise ValueError(f"kind must be {cls.KIND!r}, got {v!r}")
        return v

