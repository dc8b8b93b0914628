"""The rollout figures: what a router observed per router version, the wire format between router and operator
(the operator's rollout, campaign triggers and budget). The router counts them (routenlp.router.figures).

Served as `GET /routenlp/rollout`:

    {"stable": {version, since, requests, acceptanceRate, violationRate, escalationRate, costReduction,
                escalations, labelled, violations, spentUsd, referenceCostUsd} ,
     "canary": {same fields} | null,
     "spentUsd24h": float}

Each version's counters start when the router first serves it (start-up or version change) and are dropped when it
is neither stable nor canary any more, so a promoted canary keeps its history. Definitions are the metrics' ones:
- acceptanceRate: answered requests accepted by the first tier they tried, at a non-reference tier
  (the "first-tier acceptance" the promotion guard compares), over answered requests;
- escalationRate: answered requests that escalated at least once (`escalations`) over answered requests;
- violationRate: the observed risk in the policy's `riskMeasure` (served as `riskMeasure`), as
  routenlp_violation_rate: `acceptedAnswers`: labels of accepted answers at non-reference tiers that said unacceptable
  (`violations`) over such labels (`labelled`); `allRequests`: over the random-sample labels of attempts at
  non-reference tiers (`sampled`: shadow-labelled, or at a tier with no threshold yet: the requests that reached the
  tier, whatever it decided), the ones accepted there and unacceptable (`sampledViolations`). None without labels;
  `riskLabels` is its denominator (`labelled` or `sampled`);
- costReduction: 1 - spentUsd / referenceCostUsd (what always-reference would have cost; shadow calls count as
  spent, as in routenlp_cost_usd_total); None before any cost.
Counts (requests, escalations, labelled, violations, sampled, sampledViolations, spentUsd, referenceCostUsd)
are served too, so an aggregator over several router pods can sum them and recompute exact rates (`merge`).

`RolloutAnswer` is the answer as a model: the router builds and serialises it, the operator parses it. The serving
version is called "stable" here and in the router, as in every rollout figure; the RoutingPolicy's
`status.router.current` and router.yaml's `router.current` name the same version (not renamed: the CRD field is
user-facing). On input `current` is accepted for `stable` (see `RolloutAnswer.stable`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import AliasChoices, Field, field_validator

from .common import WireModel
from .routingpolicy import RiskMeasure

ROLES = ("stable", "canary")


def _unless_none(value: object) -> bool:
    return value is None


class Counts(WireModel):
    """What a router counts for one version. None: not reported (a partial answer, e.g. from an older router)."""

    requests: int | None = None  # answered requests
    accepted: int | None = None  # answered by the first tier tried, accepted there, not the reference tier
    escalations: int | None = None  # answered requests that escalated at least once
    labelled: int | None = None  # labels of accepted answers at non-reference tiers
    violations: int | None = None  # ... that said unacceptable
    sampled: int | None = None  # random-sample labels of attempts at non-reference tiers
    sampled_violations: int | None = None  # ... accepted there and unacceptable
    spent_usd: float | None = None
    reference_cost_usd: float | None = None

    @classmethod
    def total(cls, blocks: Iterable[Counts]) -> Counts:
        """The sum of several pods' counts (not reported = 0)."""
        rows = list(blocks)
        return cls(**{name: sum(getattr(b, name) or 0 for b in rows) for name in Counts.model_fields})


# The served counts (camelCase, as in /routenlp/rollout and the router's snapshots) -> Counts attributes.
COUNT_ATTRS = {str(f.alias): name for name, f in Counts.model_fields.items()}


class VersionFigures(Counts):
    """One version's block: its counts and the rates they give (`rates`)."""

    version: str | None = None
    since: str | None = None  # RFC 3339: when this router first served the version
    risk_measure: RiskMeasure | None = None  # absent: a router from before riskMeasure was served (the default)
    acceptance_rate: float | None = None
    escalation_rate: float | None = None
    violation_rate: float | None = None
    risk_labels: int | None = None  # the labels violationRate is over (the promotion guard's minLabels)
    cost_reduction: float | None = None
    # Served only when known: `pods` by an aggregator (`merge`), `chains` (task -> tier chain in force) by the router.
    pods: int | None = Field(default=None, exclude_if=_unless_none)
    chains: dict[str, list[str]] | None = Field(default=None, exclude_if=_unless_none)

    @field_validator("chains", mode="before")
    @classmethod
    def _chains_or_none(cls, value: Any) -> Any:
        """Chains the operator cannot read are left out, not a reason to drop the whole answer."""
        ok = isinstance(value, dict) and all(isinstance(v, list) and all(isinstance(t, str) for t in v)
                                             for v in value.values())
        return value if ok else None


def rates(counts: Counts, risk_measure: str, **block: Any) -> VersionFigures:
    """The served block from counts (None where the denominator is empty); `block`: its version, since, pods,
    chains."""
    measure = RiskMeasure(risk_measure)
    c = Counts.total([counts])  # not reported = 0
    n, spent, ref = float(c.requests or 0), float(c.spent_usd or 0), float(c.reference_cost_usd or 0)
    if measure == RiskMeasure.ALL_REQUESTS:
        bad, over = c.sampled_violations or 0, c.sampled or 0
    else:
        bad, over = c.violations or 0, c.labelled or 0
    return VersionFigures.model_validate({
        **c.model_dump(),
        "spent_usd": round(spent, 9),
        "reference_cost_usd": round(ref, 9),
        "risk_measure": measure,
        "acceptance_rate": (c.accepted or 0) / n if n else None,
        "escalation_rate": (c.escalations or 0) / n if n else None,
        "violation_rate": bad / over if over else None,
        "risk_labels": over,
        "cost_reduction": 1 - spent / ref if ref > 0 else None,
        **block,
    })


class RolloutAnswer(WireModel):
    """`GET /routenlp/rollout`: the stable version's and the canary's figures, and the 24 h spend."""

    # "stable" is the name; "current" (the CRD's status.router.current spelling) is accepted on input for a release.
    stable: VersionFigures | None = Field(default=None, validation_alias=AliasChoices("stable", "current"))
    canary: VersionFigures | None = None
    # to_camel would write "spentUsd24H"; an explicit alias for each direction keeps the name usable in Python
    spent_usd_24h: float | None = Field(default=None, validation_alias="spentUsd24h",
                                        serialization_alias="spentUsd24h")

    @field_validator("stable", "canary", mode="before")
    @classmethod
    def _block_or_none(cls, value: Any) -> Any:
        """A role that is not an object counts as not served (as an aggregator always read it)."""
        return value if isinstance(value, dict | VersionFigures) else None

    def block(self, role: str) -> VersionFigures | None:
        return self.stable if role == "stable" else self.canary


def merge(answers: Sequence[RolloutAnswer]) -> RolloutAnswer:
    """Sum the figures several router pods serve (same versions) into one answer with exact rates. A role whose
    version differs between pods (a rollout in progress) keeps the pods serving the most common version."""
    merged: dict[str, VersionFigures | None] = {}
    for role in ROLES:
        blocks = [b for a in answers if (b := a.block(role)) is not None]
        if not blocks:
            merged[role] = None
            continue
        versions = [b.version for b in blocks]
        version = max(set(versions), key=versions.count)
        blocks = [b for b in blocks if b.version == version]
        # Pods of one policy share its config; a pod from before riskMeasure was served counts as the default.
        measure = blocks[0].risk_measure or RiskMeasure.ACCEPTED_ANSWERS
        # one version, one policy: every pod serves the same chains
        chains = next((b.chains for b in blocks if b.chains is not None), None)
        merged[role] = rates(Counts.total(blocks), measure, version=version, since=min(b.since or "" for b in blocks),
                             pods=len(blocks), chains=chains)
    return RolloutAnswer(stable=merged["stable"], canary=merged["canary"],
                         spent_usd_24h=sum(a.spent_usd_24h or 0 for a in answers))
